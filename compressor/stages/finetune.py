"""The ``finetune`` stage: per-task fine-tuning of a jointly trained multi-task model (MT-DNN's second step).

For each task in turn, a copy of the source model keeps that task's head and the heads of the tasks it requires,
and the training engine fine-tunes it on those tasks only. Each per-task model is saved as ``<task>/``, scored on
its task beside the joint model (label ``<stage>:<task>``), and recorded with its dev metric, so a distillation
can learn each task from the best model the run has. The run's current model is unchanged.
"""

from __future__ import annotations

from typing import Any

from compressor.errors import RecipeError
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel, keep_tasks
from compressor.recipe import FinetuneStage
from compressor.report.evaluate import evaluate_rows
from compressor.rundir import ModelDir
from compressor.stages import StageContext, StageResult
from compressor.stages.train import train_job
from compressor.tasks import with_required


def run(ctx: StageContext) -> StageResult:
    cfg: FinetuneStage = ctx.stage
    source_name, source = ctx.latest(ModelDir, cfg.source)
    joint, _, _ = load_model(source.path)
    tasks = _tasks(ctx, cfg, list(joint.tasks))
    models: dict[str, str] = {}
    dev: dict[str, float | None] = {}
    training: dict[str, Any] = {}
    notes = [f"fine-tuned from stage '{source_name}' ({source.path.name}), one task at a time: {', '.join(tasks)}"]
    for task in tasks:
        names = with_required(joint.tasks, task)
        label = f"{cfg.name}:{task}"
        job = _job_options(cfg, names)
        result, model, tokenizer = train_job(ctx, job, label, task, lambda names=names: _subset(source.path, names))
        saved = ctx.out_dir / task
        save_model(model, tokenizer, saved, ctx.recipe.model.max_length,
                   extra={"trained_by": {"stage": cfg.name, "label": label, "from": source_name,
                                         "epochs": result.epochs_run, "best_epoch": result.best_epoch}})
        ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=label, stage=cfg.name, tasks=[task],
                                          model_dir=saved, report=ctx.recipe.report))
        models[task] = str(ctx.final_dir / task)
        best = next((h["dev"] for h in result.history if h["epoch"] == result.best_epoch), {})
        dev[task] = best.get(task)
        training[label] = {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                           "wall_s": round(result.wall_s, 1), "optimizer_steps": result.optimizer_steps,
                           "examples_per_s": result.examples_per_s, "history": result.history,
                           "selection": result.selection}
        trained_with = f" (with {', '.join(names[1:])}, which it requires)" if len(names) > 1 else ""
        notes.append(f"{label}: {result.epochs_run} epoch(s){trained_with}, best dev epoch {result.best_epoch} "
                     f"({task} dev {dev[task]}), {result.wall_s:.0f}s")
    return StageResult(outputs={"models": models, "dev": dev, "source": source_name, "training": training},
                       notes=notes)


def _tasks(ctx: StageContext, cfg: FinetuneStage, available: list[str]) -> list[str]:
    tasks = cfg.tasks or available
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise RecipeError(f"stages[{ctx.index}].tasks: the model to fine-tune has no task {unknown}; it has "
                          f"{available}")
    return list(dict.fromkeys(tasks))


def _job_options(cfg: FinetuneStage, names: list[str]) -> FinetuneStage:
    """The stage's options for one job: loss weights and passes of the job's tasks only."""
    weighting = cfg.loss_weighting
    if weighting.strategy == "fixed":
        weighting = weighting.model_copy(update={"weights": {t: w for t, w in weighting.weights.items() if t in names}})
    sampling = cfg.sampling.model_copy(update={"passes": {t: p for t, p in cfg.sampling.passes.items() if t in names}})
    return cfg.model_copy(update={"loss_weighting": weighting, "sampling": sampling})


def _subset(path, names: list[str]) -> tuple[MultiTaskModel, Any]:
    """The model at ``path`` with only the heads of ``names`` (weights as trained)."""
    model, tokenizer, _ = load_model(path)
    keep_tasks(model, names)
    return model, tokenizer
