"""The accuracy-aware loop: quantize, evaluate every task, and while a task drops more than its tolerance below
the fp32 graph, move the most sensitive nodes back to fp32 and quantize again. "More than its tolerance" is the
point drop, or (with a noise test) a drop whose paired-bootstrap interval lies wholly above the tolerance."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compressor.export.quant_graph import QuantizationError, QuantOptions, nodes_to_exclude, quantize_graph, quantized_nodes
from compressor.export.quant_nodes import (
    fp32_nodes,
    integer_matmuls,
    integer_op_counts,
    node_sensitivity,
    rank_per_byte,
    weight_elements,
)
from compressor.significance import DropInterval, relative_drop


@dataclass
class Attempt:
    iteration: int  # 0: everything quantizable quantized; i > 0: i-th fallback
    excluded: list[str]  # nodes moved back to fp32 by the fallback (user exclusions not listed)
    metrics: dict[str, float]
    drops: dict[str, float]
    failing: list[str]
    integer_ops: dict[str, int]
    #: with a noise test: task -> the drop's paired-bootstrap interval (DropInterval.to_json)
    drop_intervals: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class QuantizeOutcome:
    path: Path  # the kept quantized graph
    passed: bool
    attempts: list[Attempt]
    kept: int  # index into attempts
    reference: dict[str, float]
    tolerances: dict[str, float]
    ranking: list[tuple[str, float]] = field(default_factory=list)
    fp32: list[dict[str, Any]] = field(default_factory=list)  # nodes left fp32 in the kept graph, and why

    @property
    def final(self) -> Attempt:
        return self.attempts[self.kept]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "kept_iteration": self.final.iteration, "reference": self.reference,
            "tolerances": self.tolerances, "attempts": [asdict(a) for a in self.attempts],
            "fallback_nodes": self.final.excluded, "integer_ops": self.final.integer_ops,
            "sensitivity_top": [[n, round(s, 6)] for n, s in self.ranking[:20]],
            "fp32_nodes": self.fp32,
        }


def quantize_accuracy_aware(
    source: Path,
    out: Path,
    options: QuantOptions,
    evaluate: Callable[[Path], Mapping[str, float]],
    reference: Mapping[str, float],
    tolerances: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    batches: Sequence[Mapping[str, np.ndarray]],
    max_iterations: int = 5,
    step: int = 2,
    ranges: Any = None,
    order: str = "error",
    noise: Callable[[Path], Mapping[str, DropInterval]] | None = None,
) -> QuantizeOutcome:
    """Quantize ``source`` (prepared by :func:`prepare_source`) into ``out``, falling back node by node.

    Args:
        evaluate: quantized graph path -> {task: primary metric}.
        reference: {task: metric of the fp32 graph}; a task passes when ``relative_drop <= tolerance``.
        batches: graph feeds for sensitivity ranking (calibration batches).
        max_iterations: fallback rounds after the first attempt; round ``i`` keeps the ``step * 2**(i-1)`` most
            sensitive nodes in fp32 (doubling, so a deep encoder is covered in a few rounds); only nodes that add
            error (output error above their inputs') are ever moved.
        ranges: calibration ranges (static mode).
        order: which nodes fall back first: ``error`` (the largest added error) or ``error_per_byte`` (the largest
            added error per weight element: accuracy bought per byte of fp32 weights).
        noise: quantized graph path -> {task: paired-bootstrap interval of its drop} (the stage keeps each
            graph's predictions from ``evaluate``); given, a task fails only when its whole interval lies above its
            tolerance (the drop is larger than the tolerance at the interval's confidence), not when the point drop
            does.

    Returns the outcome; ``out`` holds the first graph that passes, or, if none does, the attempt with the
    fewest failing tasks (then the smallest worst excess of a drop over its tolerance).
    """
    if order not in ("error", "error_per_byte"):
        raise ValueError(f"unknown fallback order '{order}' (error, error_per_byte)")
    workdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=".quantize-"))
    goal = _Goal(evaluate, dict(reference), dict(tolerances), dict(higher_is_better), noise)
    try:
        attempts, files, ranking = _attempts(source, workdir, options, goal, batches, max_iterations, step, ranges,
                                             order)
        passed = not attempts[-1].failing
        kept = len(attempts) - 1 if passed else min(range(len(attempts)), key=lambda i: goal.shortfall(attempts[i]))
        fp32 = fp32_nodes(source, files[kept], options, attempts[kept].excluded, dict(ranking))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(files[kept]), str(out))
        return QuantizeOutcome(out, passed, attempts, kept, dict(reference), dict(tolerances), ranking, fp32)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class _Goal:
    """What an attempt is measured against: the fp32 metrics and each task's tolerance."""

    evaluate: Callable[[Path], Mapping[str, float]]
    reference: dict[str, float]
    tolerances: dict[str, float]
    higher_is_better: dict[str, bool]
    noise: Callable[[Path], Mapping[str, DropInterval]] | None = None

    def attempt(self, iteration: int, path: Path, fallback: list[str], counts: dict[str, int]) -> Attempt:
        metrics = {k: float(v) for k, v in self.evaluate(path).items()}
        drops = {t: relative_drop(self.reference[t], metrics[t], self.higher_is_better.get(t, True)) for t in metrics}
        if self.noise is None:
            failing = [t for t, d in drops.items() if d > self.tolerances.get(t, 0.0) + 1e-12]
            return Attempt(iteration, list(fallback), metrics, drops, failing, counts)
        intervals = dict(self.noise(path))
        failing = [t for t in drops if t in intervals and intervals[t].exceeds(self.tolerances.get(t, 0.0))]
        failing += [t for t, d in drops.items() if t not in intervals and d > self.tolerances.get(t, 0.0) + 1e-12]
        return Attempt(iteration, list(fallback), metrics, drops, failing, counts,
                       {t: iv.to_json() for t, iv in intervals.items()})

    def shortfall(self, a: Attempt) -> tuple[int, float]:
        return len(a.failing), max((d - self.tolerances.get(t, 0.0) for t, d in a.drops.items()), default=0.0)


def _attempts(source: Path, workdir: Path, options: QuantOptions, goal: _Goal,
              batches: Sequence[Mapping[str, np.ndarray]], max_iterations: int, step: int,
              ranges: Any, order: str = "error") -> tuple[list[Attempt], list[Path], list[tuple[str, float]]]:
    """Quantize and evaluate until every task passes or the fallback rounds run out; the attempts, their
    graphs and the sensitivity ranking (empty when the first attempt passed)."""
    attempts: list[Attempt] = []
    files: list[Path] = []
    ranking: list[tuple[str, float]] = []
    fallback: list[str] = []
    for iteration in range(max_iterations + 1):
        path = workdir / f"attempt{iteration}.onnx"
        quantize_graph(source, path, options, fallback, ranges)
        counts = integer_op_counts(path)
        if iteration == 0 and integer_matmuls(counts) == 0:
            raise QuantizationError(f"{source}: quantization produced no integer MatMul (op types "
                                    f"{options.ops()}, {len(nodes_to_exclude(source, options))} node(s) "
                                    "excluded)")
        attempts.append(goal.attempt(iteration, path, fallback, counts))
        files.append(path)
        if not attempts[-1].failing:
            break
        if iteration == 0:
            ranking = node_sensitivity(source, path, quantized_nodes(source, path, options), batches)
            if order == "error_per_byte":
                ranking = rank_per_byte(ranking, weight_elements(source, [n for n, _ in ranking]))
        # only nodes that add error are candidates: one whose output is no worse than its inputs (added error
        # <= 0, measurement noise) cannot buy accuracy back, only size and speed
        candidates = [n for n, err in ranking if err > 0]
        if len(fallback) >= len(candidates):
            break  # every node that adds error is fp32 already: more rounds cannot help
        fallback = candidates[: min(len(candidates), step * 2**iteration)]
    return attempts, files, ranking
