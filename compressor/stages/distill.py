"""The ``distill`` stage: one multi-task student learns every task from the teacher at once (and, with
``single_task_students``, one student per task on the same budget)."""

from __future__ import annotations

from typing import Any

import torch

from compressor.distill.cache import TeacherCache, open_cache
from compressor.distill.teachers import TaskTeachers, resolve
from compressor.distill.objective import kd_config
from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers
from compressor.model.forward import dev_metrics
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel, keep_tasks
from compressor.model.student import teacher_layers_entry
from compressor.recipe import DistillStage
from compressor.stages import StageContext, StageResult
from compressor.tasks import with_required


def run(ctx: StageContext) -> StageResult:
    """Distil the multi-task student from the teacher (and, when asked, one single-task student per task)."""
    from compressor.report.evaluate import evaluate_rows

    cfg: DistillStage = ctx.stage
    recipe = ctx.recipe
    if ctx.teacher_dir is None:
        raise RecipeError(f"stage '{cfg.name}': distill stage needs a teacher: put a train stage first")
    seed = recipe.seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    teacher, tokenizer, _ = load_model(ctx.teacher_dir)
    _check_tasks(ctx, teacher)

    student, kept, origin, layer_map = _student_and_layer_map(ctx, teacher, seed)
    tasks = list(student.tasks)
    per_task = resolve(ctx, student, teacher, tokenizer, kd_config(cfg), layer_map)
    teacher_dev = dev_metrics(teacher, tokenizer, ctx.data,
                              [t for t in tasks if ctx.data.has(t, "dev") and t in teacher.tasks],
                              recipe.model.max_length, cfg.eval_batch_size)
    for t, chosen in per_task.chosen.items():
        if chosen["dev"] is None and per_task.models[t] is teacher:
            chosen["dev"] = teacher_dev.get(t)
    cache = open_cache(cfg.teacher_cache, ctx.run_dir, teacher, f"stages[{ctx.index}].teacher_cache")
    own, own_caches = _own_teachers(ctx, per_task, teacher)
    student, run_ = _distill(ctx, student, teacher, tokenizer, tasks, layer_map, teacher_dev, seed,
                             teacher_cache=cache, teachers=own, teacher_caches=own_caches)

    saved = ctx.out_dir / "model"
    save_model(student, tokenizer, saved, recipe.model.max_length,
               extra={"distilled_by": {"stage": cfg.name, "teacher_layers": kept, "layer_map": layer_map},
                      **teacher_layers_entry(kept)})
    teacher.to("cpu")
    ctx.reporter.extend(evaluate_rows(student, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                                      report=recipe.report, batch_size=cfg.eval_batch_size))

    params_s, params_t = student.num_parameters(), teacher.num_parameters()
    notes = _notes(cfg, run_, origin, len(encoder_layers(student.encoder)), params_s, params_t, layer_map)
    outputs: dict[str, Any] = {
        "model_dir": str(ctx.final_dir / "model"),
        "teacher_layers": kept,
        "layer_map": {str(k): v for k, v in layer_map.items()},
        "steps": run_["total"],
        "params": params_s,
        "teacher_params": params_t,
        "loss_first": run_["loss_first"],
        "loss_last": run_["loss_last"],
        "epochs": run_["history"],
        "best_epoch": run_["best"][1] if run_["best"] is not None else None,
        "stopped_early": run_["stopped_early"],
        "steps_done": run_["steps_done"],
        "task_steps": run_["task_steps"],
        "device": run_["device"],
        "mixed_precision": run_["mixed_precision"],
        "teachers": per_task.chosen,
    }
    notes += [f"{cfg.name}: task {t} learns from {c['teacher']} ({c['reason']})" for t, c in per_task.chosen.items()]
    if cfg.single_task_students:
        single_task_students(ctx, student, teacher, tokenizer, tasks, layer_map, kept, teacher_dev, seed,
                             run_, outputs, notes, cache, own, own_caches)
    if cache is not None:
        outputs["teacher_cache"] = {"path": str(cache.root), **cache.stats}
        notes.append(f"{cfg.name}: teacher cache {cache.root}: {cache.stats['built']} feature(s) computed into it, "
                     f"{cache.stats['loaded']} read from an earlier run; {cache.stats['hits']} batch rows answered "
                     f"from it, {cache.stats['misses']} by the teacher on the fly")
    if own_caches:
        outputs["teacher_caches"] = {per_task.chosen[t]["teacher"]: {"path": str(c.root), **c.stats}
                                     for t, c in own_caches.items()}
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _own_teachers(ctx: StageContext, per_task: TaskTeachers, teacher: MultiTaskModel,
                  ) -> tuple[dict[str, MultiTaskModel], dict[str, TeacherCache]]:
    """The tasks that learn from another model than the run's teacher: task -> model, and (with
    ``teacher_cache``) task -> that model's cache, one per model, under ``<run>/teacher-cache/``."""
    cfg: DistillStage = ctx.stage
    own = {t: m for t, m in per_task.models.items() if m is not teacher}
    caches: dict[str, TeacherCache] = {}
    if cfg.teacher_cache is not None:
        opened: dict[int, TeacherCache] = {}
        for t, m in own.items():
            if id(m) not in opened:
                opened[id(m)] = TeacherCache.open(
                    ctx.run_dir / "teacher-cache", m, max_mb=cfg.teacher_cache.max_mb, dtype=cfg.teacher_cache.dtype,
                    build_batch_size=cfg.teacher_cache.build_batch_size, field=f"stages[{ctx.index}].teachers.{t}")
            caches[t] = opened[id(m)]
    return own, caches


def _student_and_layer_map(ctx: StageContext, teacher: MultiTaskModel,
                           seed: int) -> tuple[MultiTaskModel, list[int] | None, str, dict[int, int]]:
    """The student (with the teacher layers it kept and where it came from) and the checked layer map."""
    from compressor.model.student import check_layer_map, default_layer_map

    cfg: DistillStage = ctx.stage
    try:
        student, kept, origin = _build_student(ctx, teacher, seed)
        n_s, n_t = len(encoder_layers(student.encoder)), len(encoder_layers(teacher.encoder))
        layer_map = check_layer_map(cfg.layer_map if cfg.layer_map is not None else default_layer_map(n_s, n_t, kept),
                                    n_s, n_t)
    except RecipeError as exc:
        raise RecipeError(f"stage '{cfg.name}': {exc}") from exc
    return student, kept, origin, layer_map


def _notes(cfg: DistillStage, run_: dict[str, Any], origin: str, n_s: int, params_s: int, params_t: int,
           layer_map: dict[int, int]) -> list[str]:
    """The multi-task student's notes: where it came from, how it was trained, the loss and the dev retention."""
    fmt = ", ".join(f"{k}={v:.4f}" for k, v in run_["loss_last"].items())
    notes = [
        f"{cfg.name}: student = {origin}; {n_s} layers, {params_s:,} parameters "
        f"({params_s / params_t:.1%} of the teacher's {params_t:,})",
        f"{cfg.name}: {run_['steps_done']} of {run_['total']} steps on {run_['device']}"
        f"{' (bf16)' if run_['mixed_precision'] == 'bf16' else ''}; layer map {layer_map}; "
        f"alpha {cfg.alpha}, T {cfg.temperature}, weights logits={cfg.weights.logits} hidden={cfg.weights.hidden} "
        f"attention={cfg.weights.attention}"
        + (f" transfer={cfg.weights.transfer} ({', '.join(f'{h} on {t}' for h, t in cfg.transfer.items())})"
           if cfg.transfer else ""),
        f"{cfg.name}: mean loss parts over the last {run_['last_n']} steps: {fmt}",
    ]
    if run_["best"] is not None:
        notes.append(_retention_note(cfg, cfg.name, run_))
    return notes


def _distill(ctx: StageContext, student: MultiTaskModel, teacher: MultiTaskModel, tokenizer: Any, tasks: list[str],
             layer_map: dict[int, int], teacher_dev: dict[str, float], seed: int,
             total: int | None = None, steps_per_epoch: int | None = None, label: str | None = None,
             subdir: str = "student", teacher_cache: Any = None, teachers: dict[str, MultiTaskModel] | None = None,
             teacher_caches: dict[str, TeacherCache] | None = None) -> tuple[MultiTaskModel, dict[str, Any]]:
    """Distil ``student`` on ``tasks`` with the training engine, epoch by epoch: dev retention (student / teacher
    dev metric) after each epoch, the best epoch's weights kept, early stopping on patience, an epoch checkpoint
    under ``<checkpoints>/<subdir>`` that ``--resume`` continues from. ``total`` / ``steps_per_epoch`` default to
    the stage config's. Returns the student (the one trained, or a finished one reloaded on resume) and the
    history, the best (mean retention, epoch), the steps done (in all and per task) and the mean loss parts."""
    from compressor.distill.objective import Distillation, train_options, unlabeled_features
    from compressor.stages.train import train_job

    cfg: DistillStage = ctx.stage
    dev_tasks = [t for t in tasks if t in teacher_dev]

    def score(model: MultiTaskModel, dev: dict[str, float]) -> tuple[float, dict[str, Any]]:
        retention = {t: model.tasks[t].metric.retention(dev[t], teacher_dev[t]) for t in dev_tasks if t in dev}
        mean = sum(retention.values()) / len(retention) if retention else 0.0
        return mean, {"retention": retention, "mean_retention": mean}

    unlabeled = unlabeled_features(cfg, ctx.data, tokenizer, ctx.recipe.model.max_length)

    def objective(model: MultiTaskModel) -> Distillation:
        return Distillation(model, teacher, kd_config(cfg), layer_map=layer_map, teacher_cache=teacher_cache,
                            teachers=teachers, teacher_caches=teacher_caches, unlabeled=unlabeled,
                            batch_size=cfg.batch_size, seed=seed)

    options = train_options(cfg, epochs=cfg.epochs, max_steps=total or cfg.steps,
                            steps_per_epoch=steps_per_epoch or cfg.steps_per_epoch,
                            early_stopping_patience=cfg.early_stopping_patience, keep_best=cfg.keep_best,
                            eval_batch_size=cfg.eval_batch_size)
    torch.manual_seed(seed)
    result, student, _ = train_job(ctx, options, label or cfg.name, subdir, lambda: (student, tokenizer),
                                   objective=objective, score=score if dev_tasks else None, seed=seed)
    history = [{k: v for k, v in h.items() if k not in ("task_weights", "stopped")} for h in result.history]
    for h in history:  # steps: done by the end of the epoch; task_steps: the epoch's steps per task
        h["task_steps"], h["steps"], h["loss"] = h.pop("steps"), h.pop("steps_done"), h.pop("loss_parts", {})
    task_steps = {t: sum(h["task_steps"].get(t, 0) for h in history) for t in tasks}
    best = (result.best_score, result.best_epoch) if dev_tasks and result.best_epoch else None
    last_n = history[-1]["steps"] - (history[-2]["steps"] if len(history) > 1 else 0) if history else 0
    planned = options.max_steps or result.steps_per_epoch * cfg.epochs
    return student, {"history": history, "best": best, "total": planned,
                     "stopped_early": bool(cfg.early_stopping_patience) and result.optimizer_steps < planned,
                     "device": result.device, "mixed_precision": result.mixed_precision,
                     "steps_per_epoch": result.steps_per_epoch, "steps_done": result.optimizer_steps,
                     "task_steps": task_steps, "loss_first": history[0]["loss"] if history else {},
                     "loss_last": history[-1]["loss"] if history else {}, "last_n": last_n}


def _retention_note(cfg: DistillStage, label: str, run_: dict[str, Any]) -> str:
    history, best = run_["history"], run_["best"]
    per_epoch = ", ".join(f"{h['epoch']}: {h['mean_retention']:.4f}" for h in history)
    return (f"{label}: mean dev retention per epoch (student / teacher) {per_epoch}; "
            f"{'kept' if cfg.keep_best else 'best was'} epoch {best[1]}"
            + (f"; stopped after epoch {history[-1]['epoch']} ({cfg.early_stopping_patience} epoch(s) "
               "without improvement)" if run_["stopped_early"] else ""))


def _build_student(ctx: StageContext, teacher: MultiTaskModel, seed: int) -> tuple[MultiTaskModel, list[int] | None, str]:
    """The student the config asks for, the teacher layers it kept (when known) and a line saying where it came from."""
    from compressor.model.student import (recorded_teacher_layers, select_layers, student_from_config,
                                          student_from_teacher)

    spec = ctx.stage.student
    if spec.from_teacher is not None:
        kept = select_layers(spec.from_teacher.layers, len(encoder_layers(teacher.encoder)))
        student = student_from_teacher(teacher, kept, spec.from_teacher.heads, spec.from_teacher.ffn)
        return student, kept, f"teacher layers {kept}"
    if spec.from_config is not None:
        c = spec.from_config
        student = student_from_config(teacher, hidden_size=c.hidden_size, num_layers=c.num_layers, heads=c.heads,
                                      ffn=c.ffn, seed=seed)
        return student, None, f"fresh {c.num_layers} layers x {c.hidden_size} wide, {c.heads} heads"
    if ctx.model_dir is None:
        raise RecipeError("student.from_previous needs an earlier stage that produced a model")
    student, _, manifest = load_model(ctx.model_dir)
    if student.encoder.get_input_embeddings().num_embeddings != teacher.encoder.get_input_embeddings().num_embeddings:
        raise RecipeError(f"the model in {ctx.model_dir} has another vocabulary than the teacher; distil before prune_vocab")
    n = len(encoder_layers(student.encoder))
    kept = recorded_teacher_layers(manifest, n) or _earlier_kept_layers(ctx, n)
    return student, kept, f"previous model {ctx.model_dir}"


def _check_tasks(ctx: StageContext, teacher: MultiTaskModel) -> None:
    """The teacher's tasks must be the recipe's, with the same label order (labels index the heads' outputs)."""
    for name, plugin in teacher.tasks.items():
        if name not in ctx.data.tasks:
            raise RecipeError(f"stage '{ctx.stage.name}': the teacher has task '{name}' but the recipe does not")
        data_task = ctx.data.tasks[name]
        if not data_task.labels:
            data_task.labels = list(plugin.labels)
        elif list(data_task.labels) != list(plugin.labels):
            raise RecipeError(
                f"stage '{ctx.stage.name}': task '{name}': the teacher's labels {plugin.labels} differ from the "
                f"recipe's {data_task.labels}"
            )


def _earlier_kept_layers(ctx: StageContext, num_layers: int) -> list[int] | None:
    """Teacher layers an earlier distill stage kept, if the previous model still has that many layers."""
    for out in reversed(list(ctx.outputs.values())):
        kept = out.get("teacher_layers") if isinstance(out, dict) else None
        if kept and len(kept) == num_layers:
            return [int(i) for i in kept]
    return None


# ---- single-task students ----------------------------------------------------------------------------------
def single_task_students(ctx: StageContext, student: Any, teacher: Any, tokenizer: Any, tasks: list[str],
                         layer_map: dict[int, int], kept: list[int] | None, teacher_dev: dict[str, float],
                         seed: int, run_: dict[str, Any], outputs: dict[str, Any],
                         notes: list[str], teacher_cache: Any = None,
                         teachers: dict[str, MultiTaskModel] | None = None,
                         teacher_caches: dict[str, TeacherCache] | None = None) -> None:
    """Distil, save and evaluate one single-task student per task (with the tasks it requires); fills
    ``outputs["single_task_students"]`` / ``outputs["single_task_training"]`` and appends to ``notes``."""
    cfg = ctx.stage
    outputs["single_task_students"], outputs["single_task_training"] = {}, {}
    if len(tasks) == 1:
        notes.append(f"{cfg.name}: single_task_students skipped: the student has one task, so it is its own "
                     "single-task student")
    for t in tasks if len(tasks) > 1 else []:
        _single_task_student(ctx, student, teacher, tokenizer, t, layer_map, kept, teacher_dev, seed, run_,
                             outputs, notes, teacher_cache, teachers, teacher_caches)


def _single_task_student(ctx: StageContext, student: Any, teacher: Any, tokenizer: Any, t: str,
                         layer_map: dict[int, int], kept: list[int] | None, teacher_dev: dict[str, float],
                         seed: int, run_: dict[str, Any], outputs: dict[str, Any],
                         notes: list[str], teacher_cache: Any = None,
                         teachers: dict[str, MultiTaskModel] | None = None,
                         teacher_caches: dict[str, TeacherCache] | None = None) -> None:
    """The single-task student of task ``t``: distilled, saved as ``single-<t>/``, evaluated and noted."""
    from compressor.report.evaluate import evaluate_rows

    cfg, recipe = ctx.stage, ctx.recipe
    names = with_required(student.tasks, t)
    single, _, _ = _build_student(ctx, teacher, seed)
    keep_tasks(single, names)
    # the same per-task budget: the steps the multi-head student spent on these tasks (and epochs of the
    # same share of its epoch, so dev checks and early stopping work alike)
    steps = sum(run_["task_steps"].get(n, 0) for n in names)
    share = steps / max(run_["steps_done"], 1)
    per_epoch = max(1, round(run_["steps_per_epoch"] * share))
    if steps < 1:
        notes.append(f"{cfg.name}: single-task student of {t} skipped: the multi-head student took no "
                     f"step on {', '.join(names)}")
        return
    subdir = f"single-{t}"
    single, s_run = _distill(ctx, single, teacher, tokenizer, names, layer_map,
                             {n: v for n, v in teacher_dev.items() if n in names}, seed,
                             total=steps, steps_per_epoch=per_epoch, label=f"{cfg.name} single:{t}", subdir=subdir,
                             teacher_cache=teacher_cache, teachers=teachers, teacher_caches=teacher_caches)
    s_saved = ctx.out_dir / subdir
    save_model(single, tokenizer, s_saved, recipe.model.max_length,
               extra={"distilled_by": {"stage": cfg.name, "teacher_layers": kept, "layer_map": layer_map,
                                       "single_task": t}, **teacher_layers_entry(kept)})
    ctx.reporter.extend(evaluate_rows(single, tokenizer, ctx.data, label=f"{cfg.name}:single:{t}",
                                      stage=cfg.name, tasks=[t], model_dir=s_saved, report=recipe.report,
                                      batch_size=cfg.eval_batch_size))
    outputs["single_task_students"][t] = str(ctx.final_dir / subdir)
    outputs["single_task_training"][t] = {
        "tasks": names, "steps": steps, "steps_done": s_run["steps_done"], "task_steps": s_run["task_steps"],
        "params": single.num_parameters(), "best_epoch": s_run["best"][1] if s_run["best"] else None,
        "epochs": s_run["history"]}
    notes.append(f"{cfg.name}: single-task student of {t}"
                 + (f" (with {', '.join(names[1:])}, which it requires)" if len(names) > 1 else "")
                 + f": {steps} steps (the multi-head student's steps on {', '.join(names)}), "
                 f"{single.num_parameters():,} parameters, saved as {subdir}/")
    if s_run["best"] is not None:
        notes.append(_retention_note(cfg, f"{cfg.name} single:{t}", s_run))
