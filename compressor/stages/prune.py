"""The ``prune`` stage: structured pruning (heads, FFN neurons, layers) with distillation recovery.

Input is the latest model (``ctx.model_dir``); the pruned model is saved with its new per-layer architecture
in the manifest, so ``load_model`` rebuilds it exactly. Recovery distils from the run's teacher (or from the
model as it was before this stage) after every pruning step: a fixed ``recovery_steps``, or with
``recovery_until`` until every task's dev metric is back within a tolerance of the model's before this stage
(checked every ``eval_every`` steps; at most ``max_steps`` / ``max_epochs``; the best checked weights kept).
Hidden states and attention relations are distilled through the layer map (kept teacher layers).
Resumable: a ``recovery_until`` recovery writes a checkpoint at every dev check (weights, optimizer, schedule,
sampler, the checks so far) and one when it ends, so ``--resume`` after a kill replays the pruning steps (they are
deterministic), skips the recoveries that had finished and continues the one that had not.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from compressor.distill.cache import open_cache
from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers, read_architecture
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.model.student import recorded_teacher_layers, teacher_layers_entry
from compressor.prune.importance import task_batches
from compressor.prune.pruner import StructuredPruner
from compressor.recipe import PruneStage
from compressor.report.evaluate import evaluate_rows
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    """Prune the latest model in ``steps`` steps (recovering by distillation after each), save and report it."""
    cfg: PruneStage = ctx.stage
    if ctx.model_dir is None:
        raise RecipeError("prune stage needs a model: put a train or distill stage before it")
    recipe = ctx.recipe
    seed = cfg.seed if cfg.seed is not None else recipe.seed
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, manifest = load_model(ctx.model_dir, device)
    max_length = recipe.model.max_length
    before = model.num_parameters()
    arch_before = read_architecture(model.encoder)

    recovers = bool(cfg.recovery_steps or cfg.recovery_until is not None)
    dev_tasks = _dev_tasks(ctx, cfg, model)
    needs_data = cfg.reconstruct or (cfg.method == "iterative" and (cfg.importance == "taylor"
                                                                  or cfg.drop_num_layers > 0))
    batches = (task_batches(ctx.data, tokenizer, model.tasks, max_length, cfg.importance_batches, cfg.batch_size, seed)
               if needs_data else None)
    teacher, teacher_name, same_stack = _teacher(ctx, cfg, model, device)
    base_map = _base_map(manifest, len(arch_before), same_stack)
    cache = (open_cache(cfg.recovery.teacher_cache, ctx.run_dir, teacher, f"stages[{ctx.index}].recovery.teacher_cache")
             if teacher is not None else None)
    reference = None
    if cfg.recovery_until is not None:
        from compressor.model.forward import dev_metrics

        reference = dev_metrics(model, tokenizer, ctx.data, dev_tasks, max_length, cfg.eval_batch_size)
    width = _cut_width(ctx, cfg, model, tokenizer, seed) if cfg.hidden_size else None
    post = _posttrain(ctx, cfg, model, tokenizer, seed) if cfg.method == "posttrain" else None
    pruner = StructuredPruner(model, cfg, batches)
    rebuilt: list[dict[str, Any]] = []
    rebuild = _layer_reconstruction(cfg, model, batches, pruner, rebuilt)

    def recover(step: int) -> dict[str, Any] | None:
        """Reconstruction (``reconstruct``) and distillation after pruning step ``step`` (None without recovery
        or teacher)."""
        rebuild(step)
        if not recovers or teacher is None:
            return None
        kept = [base_map[i] for i in pruner.layer_ids] if base_map is not None else None
        return _recover(ctx, cfg, model, teacher, tokenizer, kept, seed + step, reference, cache, step)

    reports = pruner.run(recover)
    model.eval()
    after = model.num_parameters()
    arch = read_architecture(model.encoder)

    saved = ctx.out_dir / "model"
    summary = {"stage": cfg.name, "method": cfg.method, "importance": cfg.importance, "scope": cfg.scope,
               "layers_kept": pruner.layer_ids, "parameters_before": before}
    teacher_layers = _teacher_layers(ctx, manifest, len(arch_before), list(pruner.layer_ids))
    save_model(model, tokenizer, saved, max_length, extra={"pruned_by": summary, **teacher_layers_entry(teacher_layers)})
    ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                                      report=recipe.report, batch_size=cfg.eval_batch_size))

    notes = _notes(cfg, before, after, arch_before, arch, pruner.layer_ids, teacher_name, reference, reports)
    if post is not None:
        notes.insert(1, _posttrain_note(cfg, post))
    if rebuilt:
        notes.insert(1, f"{cfg.name}: least-squares reconstruction after each of {len(rebuilt)} pruning step(s): "
                        + "; ".join(f"step {r['step']} (layers {r['layers']}): worst layer output error "
                                    f"{r['worst_before']:.4f} -> {r['worst_after']:.4f}" for r in rebuilt))
    if width is not None:
        notes.insert(1, f"{cfg.name}: hidden width {width['before']} -> {width['after']} (the most active residual "
                        "channels on the importance batches; embeddings, every layer and the task heads)")
    outputs: dict[str, Any] = {
        "parameters_before": before, "parameters_after": after,
        "architecture_before": [a.to_dict() for a in arch_before], "architecture": [a.to_dict() for a in arch],
        "layers_kept": pruner.layer_ids, "teacher_layers": teacher_layers, "teacher": teacher_name if recovers else None,
        "steps": [r.to_dict() for r in reports], "dev_before": reference,
        **({"posttrain": post.to_dict()} if post is not None else {}),
        **({"hidden_size": width} if width is not None else {}),
        **({"reconstruction": rebuilt} if rebuilt else {}),
    }
    if cache is not None:
        outputs["teacher_cache"] = {"path": str(cache.root), **cache.stats}
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _dev_tasks(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel) -> list[str]:
    """The tasks with a dev split; with ``recovery_until`` every task must have one."""
    dev_tasks = [t for t in model.tasks if ctx.data.has(t, "dev")]
    if cfg.recovery_until is not None and len(dev_tasks) < len(model.tasks):
        missing = next(t for t in model.tasks if t not in dev_tasks)
        raise RecipeError(f"prune stage '{cfg.name}': recovery_until needs a dev split of every task; "
                          f"task '{missing}' has none")
    return dev_tasks


def _base_map(manifest: dict[str, Any], n_layers: int, same_stack: bool) -> list[int] | None:
    """The teacher layer each input layer stands for: the input model's own layers, or the run-teacher layers an
    earlier distill or prune stage recorded (so hidden-state / attention KD compares matching depths); None when
    unknown."""
    return list(range(n_layers)) if same_stack else recorded_teacher_layers(manifest, n_layers)


def _teacher_layers(ctx: StageContext, manifest: dict[str, Any], n_layers: int, kept: list[int]) -> list[int] | None:
    """The run-teacher layers the pruned model's layers stand for (recorded in its manifest for later stages): the
    input's own record, or its layers when the input is the run's teacher, composed with the layers kept."""
    is_teacher = ctx.teacher_dir is not None and Path(ctx.teacher_dir).resolve() == Path(ctx.model_dir).resolve()
    base = list(range(n_layers)) if is_teacher else recorded_teacher_layers(manifest, n_layers)
    return [base[i] for i in kept] if base is not None else None


def _notes(cfg: PruneStage, before: int, after: int, arch_before: list[Any], arch: list[Any], layers_kept: list[int],
           teacher_name: str, reference: dict[str, float] | None, reports: list[Any]) -> list[str]:
    """The stage's notes: sizes and architecture before / after, recovery per step, units global scope kept."""
    notes = [
        f"{cfg.name}: parameters {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer), "
        f"{cfg.importance} importance, {cfg.scope} scope, {cfg.steps} step(s)",
        f"{cfg.name}: layers kept {layers_kept} of {len(arch_before)}; heads per layer "
        f"{[a.heads for a in arch]} (was {[a.heads for a in arch_before]}); FFN per layer {[a.ffn for a in arch]} "
        f"(was {[a.ffn for a in arch_before]})",
    ]
    if cfg.recovery_steps:
        notes.append(f"{cfg.name}: {cfg.recovery_steps} distillation step(s) after each pruning step, "
                     f"teacher = {teacher_name}")
    if cfg.recovery_until is not None and reference is not None:
        ru = cfg.recovery_until
        notes.append(f"{cfg.name}: recovery after each pruning step until every task's dev metric is within "
                     f"{ru.tolerance:.1%} of the input model's ({_fmt(reference)}), checked every {ru.eval_every} "
                     f"steps, budget {reports[0].recovery['budget'] if reports and reports[0].recovery else '?'} "
                     f"steps; teacher = {teacher_name}")
        for r in reports:
            notes.append(f"{cfg.name}: step {r.step}: {_recovery_line(r.recovery)}")
    short = {k: sum(r.not_removed.get(k, 0) for r in reports) for k in ("heads", "ffn")}
    if any(short.values()):
        notes.append(f"{cfg.name}: global scope kept one unit per layer, so {short} fewer were removed than asked")
    return notes


def _teacher(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel,
             device: torch.device) -> tuple[MultiTaskModel | None, str, bool]:
    """(teacher, its name, whether its layers are the input model's): the run's teacher, or a frozen copy of the
    unpruned input model (also when the input *is* the teacher, i.e. pruning right after training)."""
    if not (cfg.recovery_steps or cfg.recovery_until is not None):
        return None, "none", False
    input_is_teacher = ctx.teacher_dir is not None and ctx.teacher_dir == ctx.model_dir
    if cfg.recovery.teacher == "teacher" and ctx.teacher_dir is not None and not input_is_teacher:
        teacher, _, _ = load_model(ctx.teacher_dir, device)
        return teacher, "teacher", False
    return copy.deepcopy(model).eval(), "teacher" if input_is_teacher else "input", True


def _recover(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel, teacher: MultiTaskModel, tokenizer: Any,
             kept: list[int] | None, seed: int, reference: dict[str, float] | None = None,
             teacher_cache: Any = None, step: int = 1) -> dict[str, Any]:
    """Distillation after one pruning step; ``kept`` maps student layers to the teacher's.

    Without ``cfg.recovery_until``: ``recovery_steps`` steps; returns the mean loss parts. With it: dev checks
    every ``eval_every`` steps (and one before the first step) against ``reference``, the dev metrics of the model
    before this stage; stops at the first check where every task is within the tolerance or when the budget is
    spent, and keeps the weights of the best check (highest worst-task retention). Returns the mean loss parts
    plus ``steps``, ``budget``, ``reached``, ``retention`` / ``dev`` (of the kept weights), ``kept_at`` and
    ``checks`` (every check: steps, dev, retention). ``step``: the pruning step (names its checkpoint).
    """
    from compressor.distill.objective import recovery_engine
    from compressor.model.student import default_layer_map

    rc = cfg.recovery
    layer_map = default_layer_map(len(encoder_layers(model.encoder)), len(encoder_layers(teacher.encoder)), kept)
    budget = _recovery_budget(ctx, cfg, model, tokenizer)
    engine = recovery_engine(model, teacher, tokenizer, ctx.data, rc, steps=budget, seed=seed, layer_map=layer_map,
                             teacher_cache=teacher_cache, label=f"{cfg.name} recovery")
    if cfg.recovery_until is None:
        parts = engine.run(budget).means()
        model.eval()
        return parts
    assert reference is not None
    ckpt = ctx.checkpoint_dir / f"recovery-{step}" if ctx.checkpoint_dir is not None else None
    return _recover_until(ctx, cfg, model, tokenizer, engine, budget, reference, ckpt)


def _recovery_budget(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel, tokenizer: Any) -> int:
    """Distillation steps per pruning step: ``recovery_steps``, or ``recovery_until``'s max_steps / max_epochs
    (epochs as the training engine counts them under the recovery's sampling)."""
    from compressor.distill.objective import train_options
    from compressor.train.steps import epoch_steps

    ru = cfg.recovery_until
    if ru is None:
        return cfg.recovery_steps
    limits = [ru.max_steps] if ru.max_steps else []
    if ru.max_epochs:
        sizes = {t: len(ctx.data.encoded(t, "train", tokenizer, ctx.recipe.model.max_length, train=True).features)
                 for t in model.tasks}
        limits.append(max(1, round(ru.max_epochs * epoch_steps(train_options(cfg.recovery), sizes))))
    return min(limits)


def _recover_until(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel, tokenizer: Any, engine: Any,
                   budget: int, reference: dict[str, float], ckpt: Path | None = None) -> dict[str, Any]:
    """Distil in ``eval_every``-step runs until every task is within the tolerance of ``reference`` or the
    budget is spent; loads the best check's weights. Returns what :func:`_recover` documents. ``ckpt``: the
    directory of this recovery's checkpoint (written at every check; continued from on ``--resume``)."""
    from compressor.model.forward import dev_metrics

    ru = cfg.recovery_until
    tasks = list(reference)
    start = _fingerprint(model)  # the pruned (and reconstructed) weights this recovery starts from

    def check() -> dict[str, Any]:
        dev = dev_metrics(model, tokenizer, ctx.data, tasks, ctx.recipe.model.max_length, cfg.eval_batch_size)
        retention = {t: model.tasks[t].metric.retention(dev[t], reference[t]) for t in tasks}
        return {"steps": engine.steps_done, "dev": dev, "retention": retention}

    def score(c: dict[str, Any]) -> tuple[float, float]:
        r = list(c["retention"].values())
        return min(r), sum(r) / len(r)

    def finish(best: dict[str, Any], checks: list[dict[str, Any]], sums: dict[str, float]) -> dict[str, Any]:
        done = engine.steps_done
        parts = {k: v / done for k, v in sums.items()} if done else {}
        return {**parts, "steps": done, "budget": budget, "tolerance": ru.tolerance,
                "reached": score(best)[0] >= floor - 1e-12, "kept_at": best["steps"], "dev": best["dev"],
                "retention": best["retention"], "checks": checks}

    floor = 1.0 - ru.tolerance
    saved = _load_recovery(ctx, ckpt, engine, start) if ckpt is not None else None
    if saved is not None and saved.get("result") is not None:  # this recovery had finished: its kept weights
        model.eval()
        return saved["result"]
    if saved is not None:
        checks, sums = saved["checks"], saved["sums"]
        best = checks[saved["best"]]
        best_state = _best_weights(ckpt)
    else:
        checks, sums = [check()], {}
        best, best_state = checks[0], _state(model)
        _save_recovery(ckpt, engine, start, checks, sums, 0, improved=True)
    while score(checks[-1])[0] < floor - 1e-12 and engine.steps_done < budget:
        n = min(ru.eval_every, budget - engine.steps_done)
        means = engine.run(n).means()
        sums = {k: sums.get(k, 0.0) + v * n for k, v in means.items()}
        checks.append(check())
        improved = score(checks[-1]) > score(best)
        if improved:
            best, best_state = checks[-1], _state(model)
        _save_recovery(ckpt, engine, start, checks, sums, checks.index(best), improved)
    if best is not checks[-1]:
        model.load_state_dict(best_state)
    model.eval()
    result = finish(best, checks, sums)
    _save_recovery(ckpt, engine, start, checks, sums, checks.index(best), True, result)  # the model holds the best
    return result


def _save_recovery(ckpt: Path | None, engine: Any, start: str, checks: list[dict[str, Any]],
                   sums: dict[str, float], best: int, improved: bool, result: dict[str, Any] | None = None) -> None:
    """The recovery's checkpoint (see :func:`_recover_until`): the engine's state, the checks, the best check's
    weights (``improved``: the model's current ones), ``result`` once the recovery has ended, and ``start``, the
    fingerprint of the weights it started from."""
    from compressor.train.checkpoint import save_checkpoint

    if ckpt is None:
        return
    state = {"start": start, "checks": checks, "sums": sums, "best": best, "result": result}
    save_checkpoint(ckpt, *engine.checkpoint_parts(), state, improved, extra=engine.objective_module())


def _load_recovery(ctx: StageContext, ckpt: Path, engine: Any, start: str) -> dict[str, Any] | None:
    """The state a resumed run's recovery continues from (the engine restored in place), or None: not resuming,
    no checkpoint, or one that started from other weights (the replayed pruning did not come out bit for bit the
    same: this recovery starts afresh). A finished recovery also gets its kept weights loaded into the model."""
    import json

    from compressor.train.checkpoint import load_checkpoint

    trainer = ckpt / "trainer.json"
    if not (ctx.resume and trainer.is_file()):
        return None
    if json.loads(trainer.read_text()).get("start") != start:
        engine.log(f"[{engine.label}] the replayed pruning step is not the checkpoint's: recovering afresh")
        return None
    state = load_checkpoint(ckpt, *engine.checkpoint_parts(), extra=engine.objective_module())
    if state.get("result") is not None:
        engine.core.load_state_dict(_best_weights(ckpt))
        engine.log(f"[{engine.label}] finished before the interruption: its kept weights reloaded")
    else:
        engine.log(f"[{engine.label}] resumed at step {engine.steps_done} ({len(state['checks'])} dev check(s) done)")
    return state


def _fingerprint(model: MultiTaskModel) -> str:
    """SHA-256 of the model's weights (names, shapes and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _best_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The best check's weights saved with the recovery's checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(ckpt / "best.safetensors"))


def _state(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _fmt(values: dict[str, float]) -> str:
    """``task value`` pairs, comma-separated."""
    return ", ".join(f"{t} {v:.4f}" for t, v in values.items())


def _recovery_line(rec: dict[str, Any] | None) -> str:
    """One pruning step's recovery (``recovery_until``) in words."""
    if not rec:
        return "no recovery"
    first = rec["checks"][0]["retention"]
    head = f"dev retention right after pruning {_fmt(first)}; "
    if rec["steps"] == 0:
        return head + "already within the tolerance, no recovery steps"
    tail = (f"back within {rec['tolerance']:.1%} after {rec['steps']} of {rec['budget']} step(s)" if rec["reached"]
            else f"NOT back within {rec['tolerance']:.1%} after the whole budget ({rec['steps']} steps); kept the "
                 f"best check (step {rec['kept_at']}, worst task {min(rec['retention'].values()):.4f})")
    return head + f"{tail}: {_fmt(rec['retention'])}"


def _posttrain(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel, tokenizer: Any, seed: int) -> Any:
    """``method: posttrain``: Fisher masks within the budget and layer-wise reconstruction, in place."""
    from compressor.prune.posttrain import Budget, posttrain_prune

    pt = cfg.posttrain
    max_length = ctx.recipe.model.max_length
    fisher = task_batches(ctx.data, tokenizer, model.tasks, max_length, pt.examples, 1, seed)
    calibration = None
    if pt.reconstruct:
        per_task = task_batches(ctx.data, tokenizer, model.tasks, max_length, -(-pt.examples // pt.batch_size),
                                pt.batch_size, seed)
        calibration = [b for bs in per_task.values() for b in bs]
    budget = Budget(pt.flops_ratio, pt.params_ratio, pt.seq_len, field=f"stage '{cfg.name}': posttrain")
    return posttrain_prune(model, fisher, budget, calibration, pt.damp)


def _posttrain_note(cfg: PruneStage, post: Any) -> str:
    """What the post-training masks kept and what the reconstruction did."""
    f, p = post.flops, post.params
    note = (f"{cfg.name}: posttrain (Fisher masks, {cfg.posttrain.examples} examples a task): encoder-layer FLOPs "
            f"per token {f['before']:,.0f} -> {f['after']:,.0f} ({f['after'] / f['before']:.1%}), head and FFN "
            f"parameters {p['before']:,.0f} -> {p['after']:,.0f} ({p['after'] / p['before']:.1%}); the kept units "
            f"hold {post.fisher_kept:.1%} of the Fisher information")
    if post.reconstruction:
        worst = max(post.reconstruction, key=lambda r: r["ffn_before"])
        note += (f"; reconstruction of {len(post.reconstruction)} layer(s): worst layer output error "
                 f"{worst['ffn_before']:.4f} -> {worst['ffn_after']:.4f} (relative, on the examples)")
    return note


def _cut_width(ctx: StageContext, cfg: PruneStage, model: MultiTaskModel, tokenizer: Any, seed: int) -> dict[str, int]:
    """``hidden_size``: keep the most active residual channels, in place; before and after widths."""
    from compressor.prune.width import channel_scores, check_width, choose_channels, cut_width

    field = f"stage '{cfg.name}': hidden_size"
    check_width(model.encoder, cfg.hidden_size, field)  # before any data is read
    before = model.encoder.config.hidden_size
    batches = task_batches(ctx.data, tokenizer, model.tasks, ctx.recipe.model.max_length, cfg.importance_batches,
                           cfg.batch_size, seed)
    keep = choose_channels(channel_scores(model, batches), cfg.hidden_size)
    cut_width(model, keep, {t: bs[0] for t, bs in batches.items()}, field)
    return {"before": before, "after": cfg.hidden_size}


def preflight(recipe: Any, index: int) -> None:
    """Checks made before anything is written when the stage's input is a model directory a ``load`` stage names:
    the layers to drop exist, ``hidden_size`` fits the model's width and heads, a posttrain budget is reachable."""
    from compressor.model.architecture import LayerArch
    from compressor.model.io import read_manifest

    cfg = recipe.stages[index]
    model_kinds = ("train", "load", "distill", "prune", "prune_vocab", "search", "add_task")
    prev = next((s for s in reversed(recipe.stages[:index]) if s.kind in model_kinds), None)
    if prev is None or prev.kind != "load":
        return
    manifest = read_manifest(Path(prev.path).expanduser().resolve())
    config = (manifest.get("encoder") or {}).get("config") or {}
    arch = [LayerArch(**{k: int(v) for k, v in a.items()}) for a in manifest["architecture"]["layers"]]
    where = f"stages[{index}]"
    n = len(arch)
    bad = sorted({int(i) for i in cfg.drop_layers if int(i) >= n})
    if bad:
        raise RecipeError(f"{where}.drop_layers: the model has {n} layers (0-{n - 1}); no layer {bad[0]}")
    if len(set(cfg.drop_layers)) + cfg.drop_num_layers >= n:
        raise RecipeError(f"{where}.drop_num_layers: dropping {len(set(cfg.drop_layers)) + cfg.drop_num_layers} "
                          f"of the model's {n} layers would leave no layer")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if cfg.hidden_size and hidden and heads:
        from compressor.prune.width import check_width_of

        check_width_of(int(hidden), int(heads), cfg.hidden_size, f"{where}.hidden_size")
    if cfg.method == "posttrain" and hidden:
        from compressor.prune.posttrain import Budget, check_budget

        pt = cfg.posttrain
        check_budget(arch, int(cfg.hidden_size or hidden),
                     Budget(pt.flops_ratio, pt.params_ratio, pt.seq_len, field=f"{where}.posttrain"))


def _layer_reconstruction(cfg: PruneStage, model: MultiTaskModel, batches: Any, pruner: StructuredPruner,
                          log: list[dict[str, Any]]) -> Any:
    """The per-step hook of ``reconstruct``: re-solve the output projections against the model as it was before
    the pruner's first step (the layers each remaining one stands for); appends what it did to ``log``."""
    if not cfg.reconstruct:
        return lambda step: None
    from compressor.prune.posttrain import reconstruct

    reference = copy.deepcopy(model.encoder).eval()
    calibration = [b for bs in batches.values() for b in bs]

    def rebuild(step: int) -> None:
        errors = reconstruct(model.encoder, reference, calibration, layer_map=list(pruner.layer_ids))
        log.append({"step": step, "layers": list(pruner.layer_ids), "errors": errors,
                    "worst_before": max(e["ffn_before"] for e in errors),
                    "worst_after": max(e["ffn_after"] for e in errors)})
    return rebuild
