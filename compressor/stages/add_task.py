"""The ``add_task`` stage: teach a finished (compressed) model one more task without touching the others.

The model is the latest one of the run, an earlier stage's (``source``: a model stage, or an export / quantize /
bundle stage, meaning the model its graph came from) or a model directory from another run (``path``). A new head
for ``task`` is built by its plugin and trained on the frozen shared encoder: every parameter of the encoder and of
the existing heads has ``requires_grad`` off and the optimizer sees only the new head, so the existing tasks'
outputs cannot move. The stage proves it before it succeeds: the existing tasks' PyTorch outputs on real batches
before and after are compared (max |diff| must be exactly 0) and so is every tensor of the old state dict; then
both models are exported to ONNX and the existing outputs of the two graphs compared on the same feeds (again
exactly 0). The model is saved like any stage's, so the ``export``, ``quantize`` and ``bundle`` stages after it
ship the graph with the new output.

Reported (``outputs`` and notes): the new task's dev/test metric beside the same task trained into the teacher
(``compare_to``, default the run's teacher when it has the task) and the bytes the new task added (head
parameters, weights file growth).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError, RecipeError
from compressor.recipe import AddTaskStage
from compressor.stages import StageContext, StageResult

#: real batches per existing task compared before / after
PROBE_BATCHES = 3
PROBE_BATCH_SIZE = 8


def run(ctx: StageContext) -> StageResult:
    """Add ``cfg.task`` to the model on its frozen encoder, prove the existing outputs unchanged, save and report."""
    from compressor.model.io import load_model, save_model, weights_size
    from compressor.report.evaluate import evaluate_rows

    cfg: AddTaskStage = ctx.stage
    base_dir = base_model_dir(ctx, cfg)
    model, tokenizer, manifest = load_model(base_dir, device="cpu")
    _check_new_task(ctx, cfg, model, base_dir)
    existing = list(model.tasks)
    max_length = min(int(manifest["max_length"]), ctx.recipe.model.max_length)
    seed = ctx.recipe.seed if cfg.seed is None else cfg.seed

    # what must not change: every tensor, and the existing tasks' outputs on real batches
    before_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = _probe_batches(model, tokenizer, ctx.data, max_length)
    before = _outputs(model, probe)

    head_params, head_bytes = _add_head(ctx, cfg, model, seed)
    model, history = _train_head(ctx, cfg, model, tokenizer, max_length, seed)

    torch_diff, onnx_diff = _check_unchanged(cfg, model, base_dir, max_length, probe, existing, before_state, before)

    saved = ctx.out_dir / "model"
    save_model(model, tokenizer, saved, int(manifest["max_length"]), extra={
        "added_task": {"stage": cfg.name, "task": cfg.task, "base_model": str(base_dir), "epochs": len(history)}})
    added_file_bytes = weights_size(saved) - weights_size(base_dir)

    rows = evaluate_rows(model, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                         tasks=[t for t in model.tasks if t in ctx.data.tasks], report=ctx.recipe.report,
                         batch_size=cfg.eval_batch_size)
    ctx.reporter.extend(rows)
    comparison = _compare(ctx, cfg, rows)
    notes = _notes(cfg, base_dir, existing, head_params, head_bytes, added_file_bytes, len(history), torch_diff,
                   onnx_diff, len(probe), comparison)
    outputs = {
        "model_dir": str(ctx.final_dir / "model"),
        "base_model": str(base_dir),
        "task": cfg.task,
        "existing_tasks": existing,
        "head_params": head_params,
        "head_bytes": head_bytes,
        "added_file_bytes": added_file_bytes,
        "existing_max_abs_diff": {"pytorch": torch_diff, "onnx": onnx_diff},
        "history": history,
        "comparison": comparison,
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _train_head(ctx: StageContext, cfg: AddTaskStage, model: Any, tokenizer: Any, max_length: int,
                seed: int) -> tuple[Any, list[dict[str, Any]]]:
    """Train the new head (the only parameters with ``requires_grad``) with the training engine on the task's
    training split, the frozen encoder in eval mode (no dropout); the model ends with the head of the best dev
    epoch (the last without a dev split). Resumable: epoch checkpoints, and a finished head is reloaded. Returns
    the model (reloaded on resume) and the per-epoch history."""
    from compressor.stages.train import train_job
    from compressor.train.options import TrainOptions

    options = TrainOptions(epochs=cfg.epochs, max_steps=cfg.steps, batch_size=cfg.batch_size,
                           eval_batch_size=cfg.eval_batch_size, lr=cfg.lr, head_lr=cfg.lr,
                           weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                           early_stopping_patience=cfg.early_stopping_patience, head_selection="best_mean")
    result, model, _ = train_job(ctx, options, cfg.name, "head", lambda: (model, tokenizer), seed=seed,
                                 tasks=[cfg.task], max_length=max_length)
    for p in model.parameters():
        p.requires_grad_(True)
    history = [{"epoch": h["epoch"], "train_loss": h["train_loss"].get(cfg.task), "steps": h["steps"].get(cfg.task, 0),
                **({"dev": h["dev"][cfg.task]} if cfg.task in h["dev"] else {})} for h in result.history]
    return model, history


def _check_new_task(ctx: StageContext, cfg: AddTaskStage, model: Any, base_dir: Path) -> None:
    """The model must not have the task yet, and must have every task the new one requires."""
    if cfg.task in model.tasks:
        raise RecipeError(f"stage '{cfg.name}': model {base_dir} already has task '{cfg.task}' (tasks: "
                          f"{', '.join(model.tasks)}); add_task adds a task the model does not have")
    missing = [t for t in ctx.data.tasks[cfg.task].requires() if t not in model.tasks]
    if missing:
        raise RecipeError(f"stage '{cfg.name}': task '{cfg.task}' needs task(s) {missing}, which model {base_dir} "
                          f"does not have")


def _add_head(ctx: StageContext, cfg: AddTaskStage, model: Any, seed: int) -> tuple[int, int]:
    """Add the new task's plugin and head (built with the labels and options the run fitted for it) and freeze
    everything else; returns the head's parameter count and fp32 bytes."""
    import torch

    from compressor.tasks import build_task

    recipe_task = ctx.data.tasks[cfg.task]
    torch.manual_seed(seed)
    plugin = build_task(recipe_task.plugin_name or "", cfg.task, recipe_task.labels,
                        recipe_task.options.model_dump())
    model.tasks[cfg.task] = plugin
    for task in model.tasks.values():
        task.bind(model.tasks)
    model.heads[cfg.task] = plugin.build_head(model.encoder.config.hidden_size)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"heads.{cfg.task}."))
    head_params = sum(p.numel() for p in model.heads[cfg.task].parameters())
    head_bytes = sum(p.numel() * p.element_size() for p in model.heads[cfg.task].parameters())
    return head_params, head_bytes


def _notes(cfg: AddTaskStage, base_dir: Path, existing: list[str], head_params: int, head_bytes: int,
           added_file_bytes: int, epochs: int, torch_diff: float, onnx_diff: float, n_probe: int,
           comparison: dict[str, Any]) -> list[str]:
    """The stage's notes: the head added, the unchanged existing outputs and the comparison with the reference."""
    notes = [f"added task '{cfg.task}' to {base_dir} ({', '.join(existing)}): a {head_params:,}-parameter head "
             f"({head_bytes / 1e3:.1f} kB fp32; weights file +{added_file_bytes / 1e3:.1f} kB) trained on the frozen "
             f"encoder for {epochs} epoch(s)",
             f"existing tasks unchanged: max |diff| {torch_diff} in PyTorch, {onnx_diff} between the ONNX graphs "
             f"before and after, on {n_probe} real batch(es)"]
    for split, c in comparison.get("splits", {}).items():
        ref = "n/a" if c["reference"] is None else f"{c['reference']:.4f}"
        ret = "" if c["retention"] is None else f" ({c['retention']:.3f} of it)"
        notes.append(f"{cfg.task} {split} {c['metric']}: {c['added']:.4f} on the frozen encoder vs {ref} trained into "
                     f"{comparison['reference']}{ret}")
    if not comparison.get("splits"):
        notes.append(f"no model with task '{cfg.task}' trained in to compare against (compare_to)")
    return notes

# ---- which model ----------------------------------------------------------------------------------------------
def base_model_dir(ctx: StageContext, cfg: AddTaskStage) -> Path:
    """The model directory to extend: ``path``, the model behind ``source``, or the run's latest model."""
    if cfg.path is not None:
        return Path(cfg.path).expanduser().resolve()
    if cfg.source is None:
        if ctx.model_dir is None:
            raise RecipeError(f"stage '{cfg.name}': no model to add a task to; put a model stage before it or give "
                              "path")
        return Path(ctx.model_dir)
    return _model_of(ctx, cfg.source)


def _model_of(ctx: StageContext, name: str) -> Path:
    from compressor.rundir import Bundle, Graph, ModelDir, RunDir, StageRecord

    stage = next((s for s in ctx.recipe.stages[: ctx.index] if s.name == name), None)
    if stage is None:
        raise RecipeError(f"stage '{ctx.stage.name}': source '{name}' is not an earlier stage")
    here = StageRecord(name, stage.kind, ctx.outputs.get(name) or {})
    graph, bundle = here.get(Graph), here.get(Bundle)
    if graph is not None:
        return graph.model_dir
    if bundle is not None and bundle.source_stage:
        return _model_of(ctx, bundle.source_stage)
    record = next((r for r in RunDir(ctx.run_dir).records() if r.name == name), None)
    model = record.get(ModelDir) if record is not None else None
    if model is None:
        raise RecipeError(f"stage '{ctx.stage.name}': source stage '{name}' ({stage.kind}) left no model")
    return model.path


# ---- the checks ---------------------------------------------------------------------------------------------------
def _probe_batches(model: Any, tokenizer: Any, data: Any, max_length: int) -> list[tuple[str, dict[str, Any]]]:
    """Real batches (dev/test, else train features) of every existing task, as tensors."""
    import torch

    from compressor.export.parity import real_batches

    from compressor.export.onnx_export import graph_spec
    from compressor.export.parity import synthetic_batches

    class _Known:  # the model's tasks the recipe has data for; the others get placeholder batches
        def __init__(self) -> None:
            self.tasks = {n: t for n, t in model.tasks.items() if n in data.tasks}

    known = _Known()
    batches = real_batches(known, tokenizer, data, max_length, PROBE_BATCHES, PROBE_BATCH_SIZE,
                           splits=("dev", "test", "train"))
    others = [n for n in model.tasks if n not in known.tasks]
    if others:
        batches += synthetic_batches(model, graph_spec(model, max_length), others)
    return [(name, {k: torch.as_tensor(v) for k, v in batch.items()}) for name, batch in batches]


def _check_unchanged(cfg: AddTaskStage, model: Any, base_dir: Path, max_length: int,
                     probe: list[tuple[str, dict[str, Any]]], existing: list[str], before_state: dict[str, Any],
                     before: list[dict[str, Any]]) -> tuple[float, float]:
    """Prove the existing tasks unchanged (every tensor, the PyTorch outputs, the ONNX graphs' outputs); returns
    the max |diff| in PyTorch and between the graphs, raising CompressorError when anything moved."""
    import torch

    after = _outputs(model, probe)
    torch_diff = _max_diff(before, after)
    state = model.state_dict()
    changed = [k for k, v in before_state.items() if not torch.equal(state[k], v)]
    if changed or torch_diff != 0.0:
        raise CompressorError(f"stage '{cfg.name}': existing outputs moved while adding task '{cfg.task}' (max |diff| "
                              f"{torch_diff}; changed tensors: {changed[:3]}); this is a bug")
    onnx_diff = _onnx_diff(base_dir, model, max_length, probe, existing)
    if onnx_diff != 0.0:
        raise CompressorError(f"stage '{cfg.name}': the exported graph's existing outputs differ from the previous "
                              f"graph's (max |diff| {onnx_diff}); this is a bug")
    return torch_diff, onnx_diff


def _outputs(model: Any, probe: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    import torch

    model.eval()
    with torch.no_grad():
        return [{k: v.detach().clone() for k, v in model.forward_batch(name, batch).outputs.items()}
                for name, batch in probe]


def _max_diff(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    worst = 0.0
    for a, b in zip(before, after):
        for key in a:
            if a[key].numel():
                worst = max(worst, float((a[key].float() - b[key].float()).abs().max()))
    return worst


def _onnx_diff(base_dir: Path, model: Any, max_length: int, probe: list[tuple[str, dict[str, Any]]],
               existing: list[str]) -> float:
    """Max |diff| of the existing tasks' outputs between the base model's graph and the new model's graph, run by
    ONNX Runtime on the same feeds (raw exports, opset and exporter as the export stage uses)."""
    from compressor.export.onnx_export import export_onnx, graph_spec
    from compressor.model.io import load_model
    from compressor.runtime.session import build_feeds, make_session

    base, _tok, _manifest = load_model(base_dir, device="cpu")
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="compressor-add-task-") as tmp:
        old_spec, new_spec = graph_spec(base, max_length), graph_spec(model, max_length)
        old = make_session(export_onnx(base, Path(tmp) / "old.onnx", old_spec), threads=1)
        new = make_session(export_onnx(model, Path(tmp) / "new.onnx", new_spec), threads=1)
        for name, batch in probe:
            if name not in existing:
                continue
            numpy_batch = {k: v.numpy() for k, v in batch.items()}
            wanted = list(old_spec.tasks[name].outputs.values())
            a = old.run(wanted, build_feeds(old_spec, numpy_batch, [name]))
            b = new.run(wanted, build_feeds(new_spec, numpy_batch, [name]))
            for x, y in zip(a, b):
                if x.size:
                    worst = max(worst, float(abs(x.astype("float64") - y.astype("float64")).max()))
    return worst


# ---- against the same task trained into the teacher --------------------------------------------------------------
def _compare(ctx: StageContext, cfg: AddTaskStage, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from compressor.model.io import read_manifest

    ref_dir = Path(cfg.compare_to).expanduser().resolve() if cfg.compare_to else ctx.teacher_dir
    if ref_dir is None or cfg.task not in {t["name"] for t in read_manifest(ref_dir)["tasks"]}:
        return {"reference": None, "splits": {}}
    mine = {r["split"]: r for r in rows if r["task"] == cfg.task}
    theirs: dict[str, float] = {}
    if cfg.compare_to is None:  # the run's teacher: its rows are in the report when it was evaluated
        label = ctx.reporter.teacher_label
        theirs = {r["split"]: r["value"] for r in ctx.reporter.rows if r["model"] == label and r["task"] == cfg.task}
    if not all(split in theirs for split in mine):
        from compressor.model.io import load_model
        from compressor.report.evaluate import evaluate_rows

        ref, ref_tok, _ = load_model(ref_dir, device="cpu")
        theirs = {r["split"]: r["value"] for r in evaluate_rows(
            ref, ref_tok, ctx.data, label="reference", stage=cfg.name, tasks=[cfg.task],
            report=ctx.recipe.report.model_copy(update={"latency": False}), batch_size=cfg.eval_batch_size)}
    splits = {}
    for split, row in mine.items():
        ref_value = theirs.get(split)
        splits[split] = {"metric": row["metric"], "added": row["value"], "reference": ref_value,
                         "retention": (row["value"] / ref_value) if ref_value else None}
    return {"reference": str(ref_dir), "splits": splits}
