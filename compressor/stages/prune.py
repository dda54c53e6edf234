"""The ``prune`` stage: structured pruning (heads, FFN neurons, layers) with distillation recovery.

Input is the latest model (``ctx.model_dir``); the pruned model is saved with its new per-layer architecture
in the manifest, so ``load_model`` rebuilds it exactly. Recovery distils from the run's teacher (or from the
model as it was before this stage) for ``recovery_steps`` steps after every pruning step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers, read_architecture
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.prune.importance import task_batches
from compressor.prune.pruner import StructuredPruner
from compressor.recipe import PruneStage
from compressor.report.evaluate import evaluate_rows
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    cfg: PruneStage = ctx.stage
    if ctx.model_dir is None:
        raise RecipeError("prune stage needs a model: put a train or distill stage before it")
    recipe = ctx.recipe
    seed = cfg.seed if cfg.seed is not None else recipe.seed
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_model(ctx.model_dir, device)
    max_length = recipe.model.max_length
    before = model.num_parameters()
    arch_before = read_architecture(model.encoder)

    needs_data = cfg.importance == "taylor" or cfg.drop_num_layers > 0
    batches = (task_batches(ctx.data, tokenizer, model.tasks, max_length, cfg.importance_batches, cfg.batch_size, seed)
               if needs_data else None)
    teacher, teacher_name, same_stack = _teacher(ctx, cfg, model, device)
    pruner = StructuredPruner(model, cfg, batches)

    def recover(step: int) -> dict[str, float] | None:
        if not cfg.recovery_steps or teacher is None:
            return None
        kept = pruner.layer_ids if same_stack else None
        return _recover(ctx, cfg, model, teacher, tokenizer, kept, seed + step)

    reports = pruner.run(recover)
    model.eval()
    after = model.num_parameters()
    arch = read_architecture(model.encoder)

    saved = ctx.out_dir / "model"
    summary = {"stage": cfg.name, "importance": cfg.importance, "scope": cfg.scope,
               "layers_kept": pruner.layer_ids, "parameters_before": before}
    save_model(model, tokenizer, saved, max_length, extra={"pruned_by": summary})
    ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                                      report=recipe.report, batch_size=cfg.eval_batch_size))

    notes = [
        f"{cfg.name}: parameters {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer), "
        f"{cfg.importance} importance, {cfg.scope} scope, {cfg.steps} step(s)",
        f"{cfg.name}: layers kept {pruner.layer_ids} of {len(arch_before)}; heads per layer "
        f"{[a.heads for a in arch]} (was {[a.heads for a in arch_before]}); FFN per layer {[a.ffn for a in arch]} "
        f"(was {[a.ffn for a in arch_before]})",
    ]
    if cfg.recovery_steps:
        notes.append(f"{cfg.name}: {cfg.recovery_steps} distillation step(s) after each pruning step, "
                     f"teacher = {teacher_name}")
    short = {k: sum(r.not_removed.get(k, 0) for r in reports) for k in ("heads", "ffn")}
    if any(short.values()):
        notes.append(f"{cfg.name}: global scope kept one unit per layer, so {short} fewer were removed than asked")
    outputs: dict[str, Any] = {
        "parameters_before": before, "parameters_after": after,
        "architecture_before": [a.to_dict() for a in arch_before], "architecture": [a.to_dict() for a in arch],
        "layers_kept": pruner.layer_ids, "teacher": teacher_name if cfg.recovery_steps else None,
        "steps": [r.to_dict() for r in reports],
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _teacher(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel,
             device: torch.device) -> tuple[MultiTaskModel | None, str, bool]:
    """(teacher, its name, whether its layers are the input model's): the run's teacher, or a frozen copy of the
    unpruned input model (also when the input *is* the teacher, i.e. pruning right after training)."""
    if not cfg.recovery_steps:
        return None, "none", False
    input_is_teacher = ctx.teacher_dir is not None and ctx.teacher_dir == ctx.model_dir
    if cfg.recovery.teacher == "teacher" and ctx.teacher_dir is not None and not input_is_teacher:
        teacher, _, _ = load_model(ctx.teacher_dir, device)
        return teacher, "teacher", False
    return copy.deepcopy(model).eval(), "teacher" if input_is_teacher else "input", True


def _recover(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel, teacher: MultiTaskModel, tokenizer: Any,
             kept: list[int] | None, seed: int) -> dict[str, float]:
    """``recovery_steps`` distillation steps; ``kept`` maps student layers to the teacher's (same stack)."""
    from compressor.distill.losses import KDConfig
    from compressor.distill.trainer import TaskBatches, distill_steps
    from compressor.model.student import default_layer_map

    rc = cfg.recovery
    batches = TaskBatches.from_store(ctx.data, list(model.tasks), tokenizer, ctx.recipe.model.max_length,
                                     rc.batch_size, rc.sampling.strategy, rc.sampling.tau, seed)
    layer_map = default_layer_map(len(encoder_layers(model.encoder)), len(encoder_layers(teacher.encoder)), kept)
    kd = KDConfig(alpha=rc.alpha, temperature=rc.temperature, logits=rc.weights.logits, hidden=rc.weights.hidden,
                  attention=rc.weights.attention)
    parts = distill_steps(model, teacher, batches, cfg.recovery_steps, kd, layer_map=layer_map, lr=rc.lr,
                          weight_decay=rc.weight_decay, warmup_ratio=rc.warmup_ratio, grad_clip=rc.grad_clip,
                          mixed_precision=rc.mixed_precision != "no")
    model.eval()
    return parts
