"""Accuracy-budgeted compression search: the smallest / fastest student whose every task keeps its floor.

* ``space``: the knobs (layers kept, head and FFN ratios, global or per layer, vocabulary, INT8 mode), their
  feasibility against the source model's architecture, and the optuna distributions they map to;
* ``candidate``: one candidate built from the source model with the toolkit's structured pruner, recovered by
  distillation, exported to ONNX (optionally INT8) and scored: every task's dev metric and retention vs the
  teacher, ONNX Runtime latency (batch 1, one thread), size on disk;
* ``study``: the optuna study (multi-objective, seeded, stored in SQLite so a killed search resumes without
  repeating finished trials) and the budget loop;
* ``evidence``: the trial table (Markdown + JSON) and the Pareto plot.
"""

from compressor.errors import CompressorError


class SearchFailed(CompressorError):
    """No candidate held every task's floor; the CLI exits with code 1 (the search ran, the answer is no)."""

    exit_code = 1
