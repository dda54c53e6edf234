"""Numeric parity of an exported graph with the PyTorch model, output by output, on real task batches.

Each task's outputs are checked on collated batches of that task's own dev/test features (the other tasks'
extra inputs get placeholders, and their outputs are checked on their own batches). An element passes when
``|onnx - torch| <= atol + rtol * |torch|``: ``atol`` is the plugin's ``OnnxOutput.atol``; ``rtol`` (default
1e-3) absorbs the float32 reassociation of fused kernels on large logits, where a fixed atol alone would be
either too loose for small values or too tight for large ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.errors import CompressorError
from compressor.model.multitask import MultiTaskModel
from compressor.runtime.session import build_feeds, make_session
from compressor.runtime.spec import GraphSpec

DEFAULT_RTOL = 1e-3

Batch = tuple[str, dict[str, np.ndarray]]  # (task, collated numpy batch)


class ParityError(CompressorError):
    """An exported graph disagrees with PyTorch beyond an output's tolerance."""


@dataclass
class OutputParity:
    output: str  # graph output name
    atol: float
    rtol: float
    max_abs: float = 0.0  # largest |onnx - torch| seen
    max_excess: float = float("-inf")  # largest |onnx - torch| - (atol + rtol |torch|); <= 0 passes
    batches: int = 0
    synthetic: bool = False  # checked on placeholder inputs only (the task has no dev/test data)

    @property
    def passed(self) -> bool:
        return self.batches > 0 and self.max_excess <= 0


@dataclass
class ParityReport:
    graph: str
    outputs: dict[str, OutputParity] = field(default_factory=dict)

    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs.values() if not o.passed]

    def raise_for_failures(self, what: str = "graph") -> None:
        bad = self.failures()
        if bad:
            worst = max(bad, key=lambda o: o.max_excess)
            details = "; ".join(f"{o.output}: max |diff| {o.max_abs:.3g} (atol {o.atol:g}, rtol {o.rtol:g})"
                                for o in bad)
            raise ParityError(f"{what} {self.graph} disagrees with PyTorch on output '{worst.output}' "
                              f"(max |diff| {worst.max_abs:.3g}); failing: {details}")

    def to_json(self) -> dict[str, Any]:
        return {name: {**asdict(o), "passed": o.passed} for name, o in self.outputs.items()}


def real_batches(model: MultiTaskModel, tokenizer: Any, data: Any, max_length: int, n_batches: int = 3,
                 batch_size: int = 8, splits: Sequence[str] = ("dev", "test")) -> list[Batch]:
    """Up to ``n_batches`` collated batches per task from its dev/test features (dev first)."""
    batches: list[Batch] = []
    for name, task in model.tasks.items():
        features: list[dict[str, Any]] = []
        for split in splits:
            if data.has(name, split) and len(features) < n_batches * batch_size:
                features += data.encoded(name, split, tokenizer, max_length).features
        features = features[: n_batches * batch_size]
        for start in range(0, len(features), batch_size):
            collated = task.collate(features[start : start + batch_size])
            batches.append((name, {k: v.numpy() for k, v in collated.items()}))
    return batches


def synthetic_batches(model: MultiTaskModel, spec: GraphSpec, tasks: Sequence[str]) -> list[Batch]:
    """Placeholder batches (random vocabulary ids, one padded row) for tasks without dev/test data."""
    from compressor.export.onnx_export import sample_inputs

    out: list[Batch] = []
    for seq in (16, 37):
        inputs = {k: v.numpy() for k, v in sample_inputs(model, spec, batch=3, seq_len=seq).items()}
        for name in tasks:
            batch = {k: inputs[k] for k in spec.base_inputs}
            batch.update({e.name: inputs[e.graph_name] for e in spec.tasks[name].extra_inputs})
            out.append((name, batch))
    return out


def torch_outputs(model: MultiTaskModel, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every graph output computed by PyTorch from exactly the feeds ONNX Runtime gets."""
    from compressor.export.onnx_export import ExportWrapper

    wrapper = ExportWrapper(model, spec).eval()
    with torch.no_grad():
        values = wrapper(*(torch.as_tensor(feeds[n]) for n in spec.input_names))
    return {n: v.float().numpy() if v.is_floating_point() else v.numpy() for n, v in zip(spec.output_names, values)}


def check_parity(path: Path, model: MultiTaskModel, spec: GraphSpec, batches: Sequence[Batch],
                 rtol: float = DEFAULT_RTOL, threads: int | None = None,
                 cache: dict[int, dict[str, np.ndarray]] | None = None) -> ParityReport:
    """Compare each task's graph outputs with PyTorch on that task's batches (no exception: see the report).

    ``cache`` (batch position -> PyTorch outputs) lets several graphs of one model share the PyTorch runs.
    """
    model = model.to("cpu").eval()
    session = make_session(path, threads)
    report = ParityReport(str(path))
    covered = {name for name, _ in batches}
    all_batches = list(batches) + synthetic_batches(model, spec, [t for t in spec.tasks if t not in covered])
    for name, task in spec.tasks.items():
        for out_name, graph_name in task.outputs.items():
            report.outputs[graph_name] = OutputParity(graph_name, task.atol[out_name], rtol,
                                                      synthetic=name not in covered)
    cache = {} if cache is None else cache
    for position, (name, batch) in enumerate(all_batches):
        feeds = build_feeds(spec, batch, [name])
        wanted = list(spec.tasks[name].outputs.values())
        got = dict(zip(wanted, session.run(wanted, feeds)))
        if position not in cache:
            cache[position] = torch_outputs(model, spec, feeds)
        ref = cache[position]
        for graph_name in wanted:
            _compare(report.outputs[graph_name], got[graph_name], ref[graph_name])
    return report


def _compare(entry: OutputParity, got: np.ndarray, ref: np.ndarray) -> None:
    entry.batches += 1
    if got.shape != ref.shape:
        entry.max_abs = entry.max_excess = float("inf")
        return
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(got64) & np.isnan(ref64)
    same_inf = np.isinf(got64) & (got64 == ref64)
    ok = both_nan | same_inf
    diff = np.where(ok, 0.0, np.abs(got64 - ref64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    allowed = entry.atol + entry.rtol * np.where(ok, 0.0, np.abs(np.nan_to_num(ref64, posinf=0, neginf=0)))
    if diff.size:
        entry.max_abs = max(entry.max_abs, float(diff.max()))
        entry.max_excess = max(entry.max_excess, float((diff - allowed).max()))
    else:
        entry.max_excess = max(entry.max_excess, 0.0)
