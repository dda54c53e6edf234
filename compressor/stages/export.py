"""The ``export`` stage: the latest model as ONE ONNX graph, checked against PyTorch, optimised, evaluated.

Artefacts (``ctx.out_dir``): ``model.onnx`` (the raw export), ``model.opt.onnx`` (when an optimisation passed
parity), ``graph.json`` (the graph contract, :class:`compressor.runtime.spec.GraphSpec`) and ``parity.json``.
Every graph is written to a temporary directory first and moved into place only after it passed parity.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import RecipeError
from compressor.fsutil import atomic_write_text
from compressor.recipe import ExportStage
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    import torch

    from compressor.export.evaluate import onnx_rows
    from compressor.export.onnx_export import graph_spec
    from compressor.export.optimize import describe
    from compressor.export.parity import real_batches
    from compressor.model.io import load_model

    cfg: ExportStage = ctx.stage
    if ctx.model_dir is None:
        raise RecipeError(f"stage '{cfg.name}': no model to export; put a train, distill or prune stage before it")
    model, tokenizer, manifest = load_model(ctx.model_dir, device="cpu")
    max_length = int(manifest["max_length"])
    spec = graph_spec(model, max_length)
    spec.metadata.update({"opset": cfg.opset, "source_model": str(ctx.model_dir)})
    threads = ctx.recipe.report.threads or torch.get_num_threads()
    notes: list[str] = []

    batches = real_batches(model, tokenizer, ctx.data, max_length, cfg.parity_batches, cfg.parity_batch_size)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".export-") as tmp_str:
        checked = export_checked(model, spec, batches, Path(tmp_str), threads, opset=cfg.opset, rtol=cfg.rtol,
                                 optimize=cfg.optimize)
        parity, optimized = checked.parity, checked.optimized_path
        parity_json: dict[str, Any] = {"model.onnx": parity.to_json()}
        opt_info: dict[str, Any] = {"level": None, "fused": {}, "notes": ["disabled by the recipe"]}
        if checked.optimized is not None:
            opt_info = describe(checked.optimized)
            notes += checked.optimized.notes
        if optimized is not None:
            parity_json["model.opt.onnx"] = checked.optimized.parity.to_json() if checked.optimized.parity else {}
            notes.append(f"optimised graph: {checked.optimized.level} (fused: {checked.fused})")
        spec.metadata["optimization"] = opt_info

        # verified: move into the stage directory
        os.replace(checked.raw, ctx.out_dir / "model.onnx")
        if optimized is not None:
            os.replace(optimized, ctx.out_dir / "model.opt.onnx")
    final_name = "model.opt.onnx" if optimized is not None else "model.onnx"
    spec.metadata["graph_file"] = final_name
    spec.write(ctx.out_dir / "graph.json")
    atomic_write_text(ctx.out_dir / "parity.json", json.dumps(parity_json, indent=2))
    worst = max(parity.outputs.values(), key=lambda o: o.max_abs)
    notes.insert(0, f"exported {len(spec.output_names)} output(s) of {len(spec.tasks)} task(s) in one graph; "
                    f"parity max |diff| {worst.max_abs:.2g} ({worst.output})")

    if cfg.evaluate:
        ctx.reporter.extend(onnx_rows(
            ctx.out_dir / final_name, spec, model.tasks, ctx.data, tokenizer, label=cfg.name, stage=cfg.name,
            fmt="onnx", report=ctx.recipe.report, threads=threads, batch_size=cfg.eval_batch_size,
        ))
    outputs = {
        "onnx": str(ctx.final_dir / final_name),
        "raw": str(ctx.final_dir / "model.onnx"),
        "optimized": str(ctx.final_dir / "model.opt.onnx") if optimized is not None else None,
        "graph": str(ctx.final_dir / "graph.json"),
        "model_dir": str(ctx.model_dir),
        "optimization": opt_info,
        "outputs": spec.output_names,
        "inputs": spec.input_names,
    }
    return StageResult(outputs=outputs, notes=notes)


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
    too. The one export path of the export stage and the benchmark."""
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
