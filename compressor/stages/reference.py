"""The ``reference`` stage: the teacher as a user gets it without compressor, for the student to be measured
against: (b) its checked ONNX export, (c) optimum's dynamic INT8 of (b) (:mod:`compressor.export.reference`).

Artefacts (``ctx.out_dir``): ``teacher.onnx`` (b), ``graph.json`` (its contract), ``teacher.int8.onnx`` (c).
Both graphs are built in a temporary directory and moved into place only when both exist. With ``evaluate`` the
report gets rows ``<name>`` (b) and ``<name>-int8`` (c) for every task on dev and test, beside the student's.
The stage hands no model on: the stages after it continue from the model before it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from compressor.errors import RecipeError
from compressor.recipe import ReferenceStage
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    import torch

    from compressor.export.checked import load_for_export
    from compressor.export.evaluate import onnx_rows
    from compressor.export.reference import build_reference_graphs

    cfg: ReferenceStage = ctx.stage
    if ctx.teacher_dir is None:
        raise RecipeError(f"stage '{cfg.name}': no teacher; put a train or load stage before it")
    src = load_for_export(ctx.teacher_dir, ctx.data, cfg.parity_batches, cfg.parity_batch_size)
    model, tokenizer, spec, batches = src.model, src.tokenizer, src.spec, src.batches
    threads = ctx.recipe.report.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".reference-") as tmp_str:
        ref = build_reference_graphs(model, spec, batches, Path(tmp_str), threads,
                                     None if cfg.target == "auto" else cfg.target)
        os.replace(ref.onnx, ctx.out_dir / "teacher.onnx")
        os.replace(ref.int8, ctx.out_dir / "teacher.int8.onnx")
    spec.metadata.update({"graph_file": "teacher.onnx", "reference": {"target": ref.target}})
    spec.write(ctx.out_dir / "graph.json")

    if cfg.evaluate:
        for label, name, fmt in ((cfg.name, "teacher.onnx", "onnx"), (f"{cfg.name}-int8", "teacher.int8.onnx",
                                                                     "onnx-int8")):
            ctx.reporter.extend(onnx_rows(
                ctx.out_dir / name, spec, model.tasks, ctx.data, tokenizer, label=label, stage=cfg.name, fmt=fmt,
                report=ctx.recipe.report, threads=threads, batch_size=cfg.eval_batch_size,
            ))
    outputs = {
        "onnx": str(ctx.final_dir / "teacher.onnx"),
        "graph": str(ctx.final_dir / "graph.json"),
        "int8": str(ctx.final_dir / "teacher.int8.onnx"),
        "model_dir": str(ctx.teacher_dir),
        "int8_matmuls": ref.int8_matmuls,
        "target": ref.target,
        "onnx_notes": ref.onnx_notes,
        "int8_notes": ref.int8_notes,
    }
    notes = [f"(b) teacher export: {'; '.join(ref.onnx_notes)}", f"(c) {'; '.join(ref.int8_notes)}"]
    if cfg.evaluate:
        notes.append(f"report rows '{cfg.name}' (b) and '{cfg.name}-int8' (c)")
    return StageResult(outputs=outputs, notes=notes)
