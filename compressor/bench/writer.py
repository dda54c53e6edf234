"""Write a measured benchmark: rows, targets, the two plots, and the report as ``<out>.json`` and ``<out>.md``.

Split out of :mod:`compressor.bench.benchmark`, which calls :func:`write_report` last.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compressor.bench.candidates import Candidate
    from compressor.bench.state import Bench

INTERNAL = ("tasks", "timings", "real_timings", "real_inputs", "predictions")  # per-model keys the rows carry (predictions: the bootstrap's)


def write_report(bench: Bench, src: Any, recipe: Any, cands: list[Candidate], has_singles: bool,
                 models: dict[str, dict[str, Any]], out: Path, cores: int) -> dict[str, Path]:
    """Rows, targets, plots, and the report as Markdown and JSON."""
    import onnxruntime
    import optimum.version
    import torch

    from compressor.bench.render import plot, render_markdown
    from compressor.bench.results import build_rows, check_targets
    from compressor.fsutil import atomic_write_text, portable
    from compressor.report.machine import describe_machine

    settings, thread_list = bench.settings, bench.settings.threads
    rows = build_rows(models, thread_list)
    targets = check_targets(rows, thread_list, settings.seq_len, recipe.report.targets)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"latency_plot": Path(f"{out}-metric-vs-latency.png"), "size_plot": Path(f"{out}-metric-vs-size.png"),
             "json": Path(f"{out}.json"), "markdown": Path(f"{out}.md")}
    lat_threads = 1 if 1 in thread_list else thread_list[0]
    retention = recipe.report.targets.retention
    plot(rows, f"latency_seq_p50_ms_t{lat_threads}",
         f"p50 latency (ms), batch 1, {settings.seq_len} tokens, {lat_threads} thread(s)", paths["latency_plot"],
         target=retention)
    plot(rows, "size_bytes", "size on disk (MB)", paths["size_plot"], scale=1e-6, target=retention)
    data_out = {
        "title": f"Benchmark: {recipe.name}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(src.run_dir), "recipe": recipe.name,
        "machine": describe_machine(),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "optimum": optimum.version.__version__},
        "settings": {**asdict(settings), "threads": list(thread_list), "all_cores": cores,
                     "warmup": settings.warmup, "batch_runs": settings.batch_runs,
                     "quantization_target": bench.target},
        "models": {m: {k: v for k, v in models[m].items() if k not in INTERNAL}
                   for m in ("a", "b", "c", "d", "e-fp32", "e-int8") if m in models},
        "targets": targets,
        "footprint": bench.footprint,
        "rows": rows,
        "notes": _notes(bench, cands, has_singles),
        "plots": {"metric vs latency": str(paths["latency_plot"]), "metric vs size": str(paths["size_plot"])},
    }
    data_out = portable(data_out, Path(src.run_dir) / "report.json")  # the run's paths relative to it
    data_out["run"] = portable(os.path.abspath(src.run_dir))  # the run relative to the repository
    atomic_write_text(paths["json"], json.dumps(data_out, indent=2))
    atomic_write_text(paths["markdown"], render_markdown(data_out) + "\n")
    return paths


def _notes(bench: Bench, cands: list[Candidate], has_singles: bool) -> list[str]:
    """The report's notes: the benchmark's, each candidate's, row (d)'s, and splits other than test."""
    notes = list(bench.notes)
    for cand in cands:
        notes += [f"({cand.key}) {n}" for n in cand.notes]
    if has_singles:
        notes.append("(d) size, parameters and latency are sums over the single-task models (serving every task "
                     "needs each of them); throughput combines as 1 / sum(1 / x). On another task's real inputs a "
                     "single-task model gets the same tokens (ids clipped into its vocabulary).")
    for group, per_task in bench.inputs.items():
        for t, ti in per_task.items():
            if ti.split != "test":
                notes.append(f"task '{t}' has no test split: {group} models were measured on its {ti.split} split")
    return list(dict.fromkeys(notes))
