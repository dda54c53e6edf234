"""The ``distill`` stage: one multi-task student learns every task from the teacher at once."""

from __future__ import annotations

from typing import Any

import torch

from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.recipe import DistillStage
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    from compressor.distill.losses import KDConfig
    from compressor.distill.trainer import Distiller, TaskBatches
    from compressor.model.student import check_layer_map, default_layer_map
    from compressor.report.evaluate import evaluate_rows

    cfg: DistillStage = ctx.stage
    recipe = ctx.recipe
    if ctx.teacher_dir is None:
        raise RecipeError(f"stage '{cfg.name}': distill stage needs a teacher: put a train stage first")
    seed = recipe.seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    teacher, tokenizer, _ = load_model(ctx.teacher_dir)
    _check_tasks(ctx, teacher)

    try:
        student, kept, origin = _build_student(ctx, teacher, seed)
        n_s, n_t = len(encoder_layers(student.encoder)), len(encoder_layers(teacher.encoder))
        layer_map = check_layer_map(cfg.layer_map if cfg.layer_map is not None else default_layer_map(n_s, n_t, kept),
                                    n_s, n_t)
    except RecipeError as exc:
        raise RecipeError(f"stage '{cfg.name}': {exc}") from exc
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
    max_length = recipe.model.max_length
    tasks = list(student.tasks)
    batches = TaskBatches.from_store(ctx.data, tasks, tokenizer, max_length, cfg.batch_size,
                                     cfg.sampling.strategy, cfg.sampling.tau, seed)
    total = cfg.steps or cfg.epochs * (cfg.steps_per_epoch or batches.steps_per_epoch())
    loss_config = KDConfig(alpha=cfg.alpha, temperature=cfg.temperature, logits=cfg.weights.logits,
                           hidden=cfg.weights.hidden, attention=cfg.weights.attention,
                           relation_heads=cfg.relation_heads)
    distiller = Distiller(student, teacher, batches, loss_config, total_steps=total, layer_map=layer_map, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                          optimizer=cfg.optimizer, momentum=cfg.momentum, device=device, mixed_precision=mixed)
    # the mean loss parts of the first and the last steps go into the outputs, so a report shows the descent
    first_n = max(1, total // 10) if total > 1 else total
    with _Progress(cfg.name, total) as progress:
        first = distiller.run(first_n, on_step=progress.update)
        rest = distiller.run(on_step=progress.update) if total > first_n else first
    last_n = total - first_n or total
    student.eval()

    saved = ctx.out_dir / "model"
    save_model(student, tokenizer, saved, max_length,
               extra={"distilled_by": {"stage": cfg.name, "teacher_layers": kept, "layer_map": layer_map}})
    teacher.to("cpu")
    ctx.reporter.extend(evaluate_rows(student, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                                      report=recipe.report, batch_size=cfg.eval_batch_size))

    params_s, params_t = student.num_parameters(), teacher.num_parameters()
    fmt = ", ".join(f"{k}={v:.4f}" for k, v in rest.items())
    notes = [
        f"{cfg.name}: student = {origin}; {n_s} layers, {params_s:,} parameters "
        f"({params_s / params_t:.1%} of the teacher's {params_t:,})",
        f"{cfg.name}: {total} steps on {device.type}{' (bf16)' if mixed else ''}; layer map {layer_map}; "
        f"alpha {cfg.alpha}, T {cfg.temperature}, weights logits={cfg.weights.logits} hidden={cfg.weights.hidden} "
        f"attention={cfg.weights.attention}",
        f"{cfg.name}: mean loss parts over the last {last_n} steps: {fmt}",
    ]
    outputs: dict[str, Any] = {
        "model_dir": str(ctx.final_dir / "model"),
        "teacher_layers": kept,
        "layer_map": {str(k): v for k, v in layer_map.items()},
        "steps": total,
        "params": params_s,
        "teacher_params": params_t,
        "loss_first": first,
        "loss_last": rest,
        "device": device.type,
        "mixed_precision": "bf16" if mixed else "no",
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _build_student(ctx: StageContext, teacher: MultiTaskModel, seed: int) -> tuple[MultiTaskModel, list[int] | None, str]:
    """The student the config asks for, the teacher layers it kept (when known) and a line saying where it came from."""
    from compressor.model.student import select_layers, student_from_config, student_from_teacher

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
    recorded = (manifest.get("distilled_by") or {}).get("teacher_layers")
    kept = [int(i) for i in recorded] if recorded and len(recorded) == n else _earlier_kept_layers(ctx, n)
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


class _Progress:
    """A rich progress bar showing the running loss parts."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, total
        self.bar = None
        self.sums: dict[str, float] = {}

    def __enter__(self) -> _Progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[losses]}"), transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total, losses="")
        return self

    def update(self, step: int, task: str, parts: dict[str, float]) -> None:
        # exponential moving average: per-batch losses jump between tasks
        self.sums = {k: v if k not in self.sums else 0.95 * self.sums[k] + 0.05 * v for k, v in parts.items()}
        shown = " ".join(f"{k}={v:.3f}" for k, v in self.sums.items() if k == "loss" or v)
        self.bar.update(self.task, completed=step, losses=shown)

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
