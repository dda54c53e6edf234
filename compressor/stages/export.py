"""The ``export`` stage: the latest model as ONE ONNX graph, checked against PyTorch, optimised, evaluated.

Artefacts (``ctx.out_dir``): ``model.onnx`` (the raw export), ``model.opt.onnx`` (when an optimisation passed
parity), ``graph.json`` (the graph contract, :class:`compressor.runtime.spec.GraphSpec`) and ``parity.json``.
Every graph is written to a temporary directory first and moved into place only after it passed parity.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compressor.console import progress
from compressor.errors import RecipeError
from compressor.export.checked import export_checked
from compressor.fsutil import atomic_write_text
from compressor.recipe import ExportStage
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    """Export the latest model as one ONNX graph (parity-checked, optimised), write its contract, evaluate it."""
    import torch

    from compressor.export.checked import load_for_export
    from compressor.export.evaluate import onnx_rows

    cfg: ExportStage = ctx.stage
    if ctx.model_dir is None:
        raise RecipeError(f"stage '{cfg.name}': no model to export; put a train, distill or prune stage before it")
    src = load_for_export(ctx.model_dir, ctx.data, cfg.parity_batches, cfg.parity_batch_size)
    model, tokenizer, spec, batches = src.model, src.tokenizer, src.spec, src.batches
    spec.metadata["opset"] = cfg.opset
    threads = ctx.recipe.report.threads or torch.get_num_threads()
    notes: list[str] = []
    with progress(f"{cfg.name}: export", total=2 if cfg.evaluate else 1) as advance:
        advance(0, "exporting, checking parity, optimising")
        parity, parity_json, opt_info, optimized = _export_graphs(ctx, model, spec, batches, threads, notes)
        final_name = "model.opt.onnx" if optimized else "model.onnx"
        spec.metadata["graph_file"] = final_name
        spec.write(ctx.out_dir / "graph.json")
        atomic_write_text(ctx.out_dir / "parity.json", json.dumps(parity_json, indent=2))
        worst = max(parity.outputs.values(), key=lambda o: o.max_abs)
        notes.insert(0, f"exported {len(spec.output_names)} output(s) of {len(spec.tasks)} task(s) in one graph; "
                        f"parity max |diff| {worst.max_abs:.2g} ({worst.output})")
        advance(1, "evaluating with ONNX Runtime" if cfg.evaluate else "done")
        if cfg.evaluate:
            ctx.reporter.extend(onnx_rows(
                ctx.out_dir / final_name, spec, model.tasks, ctx.data, tokenizer, label=cfg.name, stage=cfg.name,
                fmt="onnx", report=ctx.recipe.report, threads=threads, batch_size=cfg.eval_batch_size,
            ))
            advance(1, "done")
    outputs = {
        "onnx": str(ctx.final_dir / final_name),
        "raw": str(ctx.final_dir / "model.onnx"),
        "optimized": str(ctx.final_dir / "model.opt.onnx") if optimized else None,
        "graph": str(ctx.final_dir / "graph.json"),
        "model_dir": str(ctx.model_dir),
        "optimization": opt_info,
        "outputs": spec.output_names,
        "inputs": spec.input_names,
    }
    return StageResult(outputs=outputs, notes=notes)


def _export_graphs(ctx: StageContext, model: Any, spec: Any, batches: Any, threads: int,
                   notes: list[str]) -> tuple[Any, dict[str, Any], dict[str, Any], bool]:
    """Export and optimise in a temporary directory, move the graphs that passed parity into ``ctx.out_dir``.

    Records the optimisation in ``spec.metadata`` and appends its notes to ``notes``; returns (the raw graph's
    parity, ``parity.json``'s content, the optimisation info, whether ``model.opt.onnx`` was kept).
    """
    from compressor.export.optimize import describe

    cfg: ExportStage = ctx.stage
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
    return parity, parity_json, opt_info, optimized is not None
