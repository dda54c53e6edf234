"""The ``train`` stage: the jointly trained multi-task teacher and, optionally, its single-task twins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel, load_pretrained
from compressor.recipe import TrainStage
from compressor.report.evaluate import evaluate_rows
from compressor.stages import StageContext, StageResult
from compressor.tasks import build_task, with_required
from compressor.train.loop import Objective, Scorer, TrainResult, clear_checkpoint, train_model
from compressor.train.options import TrainOptions


def run(ctx: StageContext) -> StageResult:
    cfg: TrainStage = ctx.stage
    recipe = ctx.recipe
    tasks = dict(ctx.data.tasks)
    outputs: dict[str, Any] = {"baselines": {}, "training": {}}
    notes: list[str] = []

    jobs: list[tuple[str, str, list[str]]] = [(cfg.name, "model", list(tasks))]
    if cfg.baselines and len(tasks) > 1:
        jobs += [(f"single:{t}", f"single-{t}", with_required(tasks, t)) for t in tasks]
    elif cfg.baselines:
        notes.append("baselines skipped: the recipe has a single task, so the model is its own baseline")

    shares: dict[str, int] = {}
    for label, subdir, task_names in jobs:
        job_cfg = cfg
        if label != cfg.name and cfg.baseline_steps == "task_share" and cfg.sampling.strategy != "passes":
            # (under 'passes' every task already takes the same steps per epoch in the twin as in the teacher)
            # the multi-task job ran first: its tokenizer's encodings are cached, so counting features is free
            shares = shares or _task_steps(ctx, cfg, list(tasks), tokenizer)
            job_cfg = cfg.model_copy(update={"steps_per_epoch": sum(shares[t] for t in task_names)})
        result, model, tokenizer = train_job(ctx, job_cfg, label, subdir,
                                             lambda names=task_names: _fresh_model(ctx, names))
        saved = ctx.out_dir / subdir
        save_model(model, tokenizer, saved, recipe.model.max_length,
                   extra={"trained_by": {"stage": cfg.name, "label": label, "epochs": result.epochs_run,
                                         "best_epoch": result.best_epoch,
                                         "head_epochs": {t: c["head_epoch"] for t, c in result.selection.items()}}})
        scored = None if label == cfg.name else task_names[:1]  # a twin is scored on its own task only
        ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=label, stage=cfg.name, tasks=scored,
                                          model_dir=saved, report=recipe.report))
        summary = {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "best_dev": result.best_score,
                   "wall_s": round(result.wall_s, 1), "device": result.device, "mixed_precision": result.mixed_precision,
                   "optimizer_steps": result.optimizer_steps, "examples_per_s": result.examples_per_s,
                   "history": result.history, "selection": result.selection}
        outputs["training"][label] = summary
        if label != cfg.name:
            outputs["baselines"][task_names[0]] = str(ctx.final_dir / subdir)
        if label != cfg.name and len(task_names) > 1:
            notes.append(f"{label} is trained together with {', '.join(task_names[1:])}, which it requires; "
                         f"it is scored on {task_names[0]} only")
        notes.append(f"{label}: {result.epochs_run} epoch(s) on {result.device} ({result.mixed_precision}), "
                     f"best dev epoch {result.best_epoch}, {result.wall_s:.0f}s" + _head_note(result))
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _head_note(result: TrainResult) -> str:
    moved = {t: c["head_epoch"] for t, c in result.selection.items() if c["head_epoch"] != result.best_epoch}
    return ("; heads from their own best epoch: " + ", ".join(f"{t} {e}" for t, e in moved.items())) if moved else ""


def _task_steps(ctx: StageContext, cfg: TrainStage, tasks: list[str], tokenizer: Any) -> dict[str, int]:
    """Steps per epoch the multi-task sampler gives each task (its expected share of the epoch's steps)."""
    from compressor.data.sampling import task_probabilities

    sizes = {t: len(ctx.data.encoded(t, "train", tokenizer, ctx.recipe.model.max_length, train=True).features)
             for t in tasks}
    total = cfg.steps_per_epoch or sum(-(-n // cfg.batch_size) for n in sizes.values())
    probs = task_probabilities(sizes, cfg.sampling.strategy, cfg.sampling.tau)
    return {t: max(1, round(probs[t] * total)) for t in tasks}


def _fresh_model(ctx: StageContext, task_names: list[str]) -> tuple[MultiTaskModel, Any]:
    """The recipe's pretrained encoder with a new head per task (each model its own plugin instances, so heads
    never alias)."""
    tasks = {t: build_task(ctx.data.tasks[t].plugin_name or "", t, ctx.data.tasks[t].labels,
                           ctx.data.tasks[t].options.model_dump()) for t in task_names}
    encoder, tokenizer = load_pretrained(ctx.recipe.model.encoder, ctx.recipe.model.trust_remote_code)
    return MultiTaskModel(encoder, tasks), tokenizer


def train_job(ctx: StageContext, cfg: TrainOptions, label: str, subdir: str,
              build: Callable[[], tuple[MultiTaskModel, Any]], *,
              objective: Callable[[MultiTaskModel], Objective] | None = None, score: Scorer | None = None,
              seed: int | None = None, tasks: list[str] | None = None,
              max_length: int | None = None) -> tuple[TrainResult, MultiTaskModel, Any]:
    """Train the model ``build()`` makes on all its tasks with the engine, resumable: epoch checkpoints under the
    stage's checkpoint directory, and a finished job (``<subdir>/done``) is reloaded instead of retrained.
    ``objective(model)``: what the steps minimise instead of the task loss (distillation); ``score``: how epochs
    rank, ``tasks`` which take steps, ``max_length`` of the inputs (:func:`~compressor.train.loop.train_model`);
    ``seed``: default the recipe's."""
    recipe = ctx.recipe
    seed = recipe.seed if seed is None else seed
    checkpoint_dir = ctx.checkpoint_dir / subdir if ctx.checkpoint_dir else None
    done = checkpoint_dir / "done" if checkpoint_dir else None
    if ctx.resume and done is not None and done.is_dir():
        model, tokenizer, manifest = load_model(done)
        result = TrainResult(**manifest["train_result"])
        return result, model, tokenizer
    # seeded before anything random is built (the heads' initial weights), so a recipe and seed give one result
    from accelerate.utils import set_seed

    set_seed(seed)
    model, tokenizer = build()
    result = train_model(model, tokenizer, ctx.data, cfg, seed=seed, checkpoint_dir=checkpoint_dir,
                         resume=ctx.resume, label=label, objective=objective(model) if objective else None,
                         score=score, tasks=tasks, max_length=max_length)
    if done is not None:
        from dataclasses import asdict

        save_model(model, tokenizer, done, max_length or recipe.model.max_length,
                   extra={"train_result": asdict(result)})
        clear_checkpoint(checkpoint_dir)
    return result, model, tokenizer
