"""The ``load`` stage: take a model directory written earlier as this run's current model (and teacher)."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import RecipeError
from compressor.model.io import load_model, read_manifest
from compressor.report.evaluate import evaluate_rows
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    path = Path(ctx.stage.path).expanduser().resolve()
    manifest = read_manifest(path)
    added_later = {s.task for s in ctx.recipe.stages[ctx.index + 1 :] if s.kind == "add_task"}
    missing = sorted(set(ctx.data.tasks) - {t["name"] for t in manifest["tasks"]} - added_later)
    if missing:
        raise RecipeError(f"stages[{ctx.index}].path: model {path} has no head for task(s) {missing}")
    if ctx.stage.evaluate:
        model, tokenizer, _ = load_model(path)  # also checks the weights against the manifest
        ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=ctx.stage.name, stage=ctx.stage.name,
                                          model_dir=path, report=ctx.recipe.report))
    return StageResult(model_dir=path, outputs={"model": str(path)}, notes=[f"loaded {path}"])
