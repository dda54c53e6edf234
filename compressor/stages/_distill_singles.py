"""The ``distill`` stage's single-task students: one student per task, distilled on the multi-head student's budget.

Split out of :mod:`compressor.stages.distill`, whose ``run`` calls :func:`single_task_students` when the stage has
``single_task_students`` set; also the task-subset helpers ``_with_required`` / ``_keep_tasks`` (re-exported there).
"""

from __future__ import annotations

from typing import Any

from compressor.model.multitask import MultiTaskModel
from compressor.stages import StageContext


def single_task_students(ctx: StageContext, student: Any, teacher: Any, tokenizer: Any, tasks: list[str],
                         layer_map: dict[int, int], kept: list[int] | None, teacher_dev: dict[str, float],
                         device: Any, seed: int, run_: dict[str, Any], outputs: dict[str, Any],
                         notes: list[str]) -> None:
    """Distil, save and evaluate one single-task student per task (with the tasks it requires); fills
    ``outputs["single_task_students"]`` / ``outputs["single_task_training"]`` and appends to ``notes``."""
    cfg = ctx.stage
    outputs["single_task_students"], outputs["single_task_training"] = {}, {}
    if len(tasks) == 1:
        notes.append(f"{cfg.name}: single_task_students skipped: the student has one task, so it is its own "
                     "single-task student")
    for t in tasks if len(tasks) > 1 else []:
        _single_task_student(ctx, student, teacher, tokenizer, t, layer_map, kept, teacher_dev, device, seed, run_,
                             outputs, notes)


def _single_task_student(ctx: StageContext, student: Any, teacher: Any, tokenizer: Any, t: str,
                         layer_map: dict[int, int], kept: list[int] | None, teacher_dev: dict[str, float],
                         device: Any, seed: int, run_: dict[str, Any], outputs: dict[str, Any],
                         notes: list[str]) -> None:
    """The single-task student of task ``t``: distilled, saved as ``single-<t>/``, evaluated and noted."""
    from compressor.model.io import save_model
    from compressor.report.evaluate import evaluate_rows
    from compressor.stages.distill import _build_student, _distill, _retention_note

    cfg, recipe = ctx.stage, ctx.recipe
    names = _with_required(student, t)
    single, _, _ = _build_student(ctx, teacher, seed)
    _keep_tasks(single, names)
    # the same per-task budget: the steps the multi-head student spent on these tasks (and epochs of the
    # same share of its epoch, so dev checks and early stopping work alike)
    steps = sum(run_["task_steps"].get(n, 0) for n in names)
    share = steps / max(run_["steps_done"], 1)
    per_epoch = max(1, round(run_["steps_per_epoch"] * share))
    if steps < 1:
        notes.append(f"{cfg.name}: single-task student of {t} skipped: the multi-head student took no "
                     f"step on {', '.join(names)}")
        return
    s_run = _distill(ctx, single, teacher, tokenizer, names, layer_map,
                     {n: v for n, v in teacher_dev.items() if n in names}, device, seed,
                     total=steps, steps_per_epoch=per_epoch, label=f"{cfg.name} single:{t}")
    subdir = f"single-{t}"
    s_saved = ctx.out_dir / subdir
    save_model(single, tokenizer, s_saved, recipe.model.max_length,
               extra={"distilled_by": {"stage": cfg.name, "teacher_layers": kept, "layer_map": layer_map,
                                       "single_task": t}})
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


def _with_required(model: MultiTaskModel, task: str) -> list[str]:
    """``task`` first, then every task it needs (transitively), in the model's order."""
    need, todo = {task}, [task]
    while todo:
        for req in model.tasks[todo.pop()].requires():
            if req not in need:
                need.add(req)
                todo.append(req)
    return [task] + [t for t in model.tasks if t in need and t != task]


def _keep_tasks(model: MultiTaskModel, names: list[str]) -> None:
    """Drop every task (and head) of ``model`` but ``names``, in place."""
    for name in list(model.tasks):
        if name not in names:
            del model.heads[name]
            del model.tasks[name]
    for plugin in model.tasks.values():
        plugin.bind(model.tasks)
