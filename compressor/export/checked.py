"""The one checked export path: a model's ONNX graph that passed parity with PyTorch, then its fused version
kept only when that passes too. Used by the ``export`` stage, the ``reference`` stage and the benchmark
(:func:`load_for_export` reads what the two stages export: model, contract and parity batches)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CheckedExport:
    """A model's ONNX export that passed parity with PyTorch, and its checked optimisation (if asked for)."""

    raw: Path
    parity: Any  # compressor.export.parity.ParityReport of the raw export
    optimized: Any = None  # compressor.export.optimize's result; None when optimisation was not asked for

    @property
    def optimized_path(self) -> Path | None:
        return self.optimized.path if self.optimized is not None else None

    @property
    def graph(self) -> Path:
        """The graph to use: the optimised one when one passed parity, else the raw export."""
        return self.optimized_path or self.raw

    @property
    def fused(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.optimized.fused.items()) or "none"


def export_checked(model: Any, spec: Any, batches: Any, workdir: Path, threads: int, opset: int | None = None,
                   rtol: float | None = None, optimize: bool = True) -> CheckedExport:
    """Export ``model`` to ``workdir/model.onnx``, check it against PyTorch on ``batches`` (``ParityError`` when it
    disagrees) and, with ``optimize``, fuse it into ``workdir/model.opt.onnx``, kept only when it passes parity
    too."""
    from compressor.export.onnx_export import export_onnx
    from compressor.export.optimize import optimize_checked
    from compressor.export.parity import check_parity

    workdir.mkdir(parents=True, exist_ok=True)
    raw = export_onnx(model, workdir / "model.onnx", spec, **({"opset": opset} if opset is not None else {}))
    tol = {"rtol": rtol} if rtol is not None else {}
    cache: dict = {}  # PyTorch outputs per batch, shared by the checks of every candidate graph

    def check(path: Path) -> Any:
        return check_parity(path, model, spec, batches, threads=threads, cache=cache, **tol)

    parity = check(raw)
    parity.raise_for_failures("exported graph")
    return CheckedExport(raw, parity, optimize_checked(raw, workdir / "model.opt.onnx", check) if optimize else None)


@dataclass
class ExportSource:
    """A model directory read for export: the model (on the CPU), its tokenizer, its graph contract and real
    batches of every task for the parity check."""

    model: Any
    tokenizer: Any
    spec: Any  # compressor.runtime.spec.GraphSpec; metadata["source_model"] names the directory
    batches: Any


def load_for_export(model_dir: Path, data: Any, n_batches: int, batch_size: int) -> ExportSource:
    """Load ``model_dir`` on the CPU with its graph contract and up to ``n_batches`` dev/test batches per task."""
    from compressor.export.onnx_export import graph_spec
    from compressor.export.parity import real_batches
    from compressor.model.io import load_model

    model, tokenizer, manifest = load_model(model_dir, device="cpu")
    max_length = int(manifest["max_length"])
    spec = graph_spec(model, max_length)
    spec.metadata["source_model"] = str(model_dir)
    return ExportSource(model, tokenizer, spec, real_batches(model, tokenizer, data, max_length, n_batches, batch_size))
