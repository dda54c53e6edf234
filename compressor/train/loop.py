"""Joint multi-task training on accelerate: task-homogeneous batches, task sampling, loss weighting,
AdamW/SGD with warmup + linear decay, clipping, freezing, early stopping on the mean dev metric, an
epoch checkpoint that ``resume`` continues from.

The same loop trains the multi-task teacher and each single-task baseline (a model with one task).
CPU here; CUDA with bf16 autocast when present; several GPUs with ``accelerate launch`` (each process draws the
same task per step and its own batch, and DDP averages gradients).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.console import say
from compressor.data.sampling import BatchStream, QuotaSampler, TaskSampler
from compressor.data.store import DataStore
from compressor.errors import DataError, TrainingError
from compressor.fsutil import atomic_dir, atomic_write_text
from compressor.model.architecture import encoder_layers
from compressor.model.forward import dev_metrics
from compressor.model.multitask import MultiTaskModel
from compressor.train.options import TrainOptions
from compressor.train.weighting import LossWeighter

CHECKPOINT = "last"


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_score: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: losses, dev metrics, weights
    wall_s: float = 0.0
    device: str = "cpu"
    mixed_precision: str = "no"
    optimizer_steps: int = 0
    final_lr: float = 0.0
    examples_per_s: float | None = None  # training examples per second of training (evaluation excluded)


def dev_score(model: MultiTaskModel, tokenizer: Any, data: DataStore, tasks: list[str], max_length: int,
              batch_size: int) -> tuple[float | None, dict[str, float]]:
    """Mean primary dev metric over ``tasks`` (sign-flipped for lower-is-better metrics); None without dev data."""
    per_task = dev_metrics(model, tokenizer, data, tasks, max_length, batch_size)
    model.train()
    if not per_task:
        return None, per_task
    signed = [v if model.tasks[t].metric.higher_is_better else -v for t, v in per_task.items()]
    return float(np.mean(signed)), per_task


def train_model(
    model: MultiTaskModel,
    tokenizer: Any,
    data: DataStore,
    cfg: TrainOptions,
    *,
    seed: int,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    label: str = "model",
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` on all of its tasks in place; on return it holds the best-dev-epoch weights.

    ``cfg.batch_size`` is the global batch: with N processes (``accelerate launch``) each takes
    ``batch_size / N`` examples of the same batch, so the optimizer steps, the schedule and the result do not
    depend on N. The learning-rate schedule (warmup then linear decay) counts optimizer steps over the run.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    log = log or say
    started = time.perf_counter()
    set_seed(seed)
    cuda = torch.cuda.is_available()
    mixed = "bf16" if cfg.mixed_precision == "bf16" or (cuda and cfg.mixed_precision == "auto") else "no"
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision=mixed,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(model.tasks) > 1)],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise TrainingError(f"[{label}] batch_size {cfg.batch_size} does not divide among {world} "
                            f"processes; use a multiple of {world}")
    tasks = list(model.tasks)
    max_length = data.max_length
    features = {t: data.encoded(t, "train", tokenizer, max_length, train=True).features for t in tasks}
    for t, f in features.items():
        if not f:
            raise DataError(data.path(t, "train"), f"task '{t}': no training features after encoding")

    _configure(model, cfg)
    weighter = LossWeighter(tasks, cfg.loss_weighting.strategy, cfg.loss_weighting.weights)
    optimizer = _optimizer(model, weighter, cfg)
    # every process draws the same global batches (same seeds) and keeps its own slice of each
    streams = {t: BatchStream(len(f), cfg.batch_size, seed=seed + i, lengths=[len(x["input_ids"]) for x in f])
               for i, (t, f) in enumerate(features.items())}
    sampler = make_sampler(cfg, {t: len(f) for t, f in features.items()}, seed)
    steps_per_epoch = epoch_steps(cfg, {t: len(f) for t, f in features.items()})
    total = steps_per_epoch * cfg.epochs
    # not passed to accelerator.prepare: a prepared scheduler steps once per process per optimizer step
    scheduler = _schedule(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    step_module, optimizer = accelerator.prepare(_Step(model, weighter), optimizer)
    core: MultiTaskModel = accelerator.unwrap_model(step_module).model
    core_weighter: LossWeighter = accelerator.unwrap_model(step_module).weighter

    state: dict[str, Any] = {"epoch": 0, "best_score": None, "best_epoch": 0, "bad_epochs": 0, "history": [],
                             "task_best": {}, "task_bad": {}, "train_s": 0.0, "train_examples": 0}
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and ckpt is not None and (ckpt / "trainer.json").is_file():
        state = {**state, **_load_checkpoint(ckpt, core, core_weighter, optimizer, scheduler, sampler, streams)}
        log(f"[{label}] resumed after epoch {state['epoch']}")

    device = accelerator.device
    best_state: dict[str, torch.Tensor] | None = None
    patience = cfg.early_stopping_patience or math.inf
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["bad_epochs"] >= patience:
            break
        n_steps = sampler.epoch_steps() if isinstance(sampler, QuotaSampler) else steps_per_epoch
        if n_steps == 0:
            break
        step_module.train()
        sums = {t: 0.0 for t in tasks}
        counts = {t: 0 for t in tasks}
        tic = time.perf_counter()
        examples = 0
        with _progress(accelerator, f"{label} epoch {epoch}/{cfg.epochs}", n_steps) as (bar, bar_task):
            for step in range(n_steps):
                task = next(sampler)
                idx = _rank_slice(streams[task].next(), rank, world)
                examples += len(idx) * world
                batch = core.tasks[task].collate([features[task][i] for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss, total_loss = step_module(task, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"[{label}] task '{task}': the loss is {value} at epoch {epoch} step {step + 1}; training "
                        f"diverged (is lr {cfg.lr:g} / head_lr {cfg.head_lr:g} too high?); the last good checkpoint "
                        "is kept")
                accelerator.backward(total_loss)
                if cfg.grad_clip:
                    accelerator.clip_grad_norm_(step_module.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                sums[task] += value
                counts[task] += 1
                if bar is not None:
                    shown = " ".join(f"{t}={sums[t] / counts[t]:.3f}" for t in tasks if counts[t])
                    bar.update(bar_task, advance=1, losses=shown)
                    if not bar.console.is_terminal and (step + 1) % max(1, n_steps // 5) == 0:
                        log(f"[{label}] epoch {epoch} step {step + 1}/{n_steps} loss {shown}")
        state["train_s"] += time.perf_counter() - tic
        state["train_examples"] += examples
        _check_finite(core, label, epoch)
        score, per_task = dev_score(core, tokenizer, data, tasks, max_length, cfg.eval_batch_size)
        record = {
            "epoch": epoch,
            "train_loss": {t: sums[t] / counts[t] for t in tasks if counts[t]},
            "steps": dict(counts),
            "lr": scheduler.get_last_lr()[0],
            "dev": per_task,
            "dev_mean": score,
            "task_weights": core_weighter.current(),
            "examples_per_s": round(examples / max(time.perf_counter() - tic, 1e-9), 2),
        }
        improved = score is None or state["best_score"] is None or score > state["best_score"]
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        record["stopped"] = _stop_tasks(sampler, state, per_task, model, patience)
        state["history"].append(record)
        state["epoch"] = epoch
        log(f"[{label}] epoch {epoch}: loss {_fmt(record['train_loss'])} dev {_fmt(per_task)}"
            + (" *" if improved else "") + (f" (stopped: {', '.join(record['stopped'])})" if record["stopped"] else ""))
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        if ckpt is not None and accelerator.is_main_process:
            _save_checkpoint(ckpt, core, core_weighter, optimizer, scheduler, sampler, streams, state, improved)
        accelerator.wait_for_everyone()

    if best_state is None and ckpt is not None and (ckpt / "best.safetensors").is_file():
        from safetensors.torch import load_file

        best_state = load_file(str(ckpt / "best.safetensors"))
    if best_state is not None:
        core.load_state_dict(best_state, strict=True)
    core.eval()
    return TrainResult(
        epochs_run=state["epoch"], best_epoch=state["best_epoch"], best_score=state["best_score"],
        history=state["history"], wall_s=time.perf_counter() - started, device=str(device), mixed_precision=mixed,
        optimizer_steps=int(scheduler.last_epoch), final_lr=float(scheduler.get_last_lr()[0]),
        examples_per_s=round(state["train_examples"] / state["train_s"], 2) if state["train_s"] else None,
    )


def make_sampler(cfg: TrainOptions, sizes: Mapping[str, int], seed: int) -> TaskSampler | QuotaSampler:
    """The task sampler of ``cfg.sampling`` over tasks with ``sizes`` training features."""
    if cfg.sampling.strategy == "passes":
        return QuotaSampler(task_quotas(cfg, sizes), seed=seed)
    return TaskSampler(sizes, cfg.sampling.strategy, cfg.sampling.tau, seed=seed)


def task_quotas(cfg: TrainOptions, sizes: Mapping[str, int]) -> dict[str, int]:
    """Steps per epoch of each task under strategy ``passes``: passes x batches of its training data, scaled to
    ``cfg.steps_per_epoch`` in all when that is set (the tasks keep their shares)."""
    passes = cfg.sampling.passes
    quotas = {t: passes.get(t, 1.0) * -(-n // cfg.batch_size) for t, n in sizes.items()}
    scale = cfg.steps_per_epoch / sum(quotas.values()) if cfg.steps_per_epoch else 1.0
    return {t: max(1, round(q * scale)) for t, q in quotas.items()}


def epoch_steps(cfg: TrainOptions, sizes: Mapping[str, int]) -> int:
    """Optimizer steps of one epoch (before any task stops early)."""
    if cfg.sampling.strategy == "passes":
        return sum(task_quotas(cfg, sizes).values())
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    return sum(-(-n // cfg.batch_size) for n in sizes.values())


def _rank_slice(idx: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch; a short last batch is topped up so no process gets none."""
    if world == 1:
        return idx
    if len(idx) < world:
        idx = (idx * world)[:world]
    return idx[rank::world]


def _stop_tasks(sampler, state: dict, per_task: Mapping[str, float], model: MultiTaskModel, patience: float) -> list[str]:
    """Per-task early stopping: a task whose dev metric has not improved for ``patience`` epochs takes no more
    steps (strategy ``passes``). Returns the tasks stopped now."""
    stopped = []
    for task, value in per_task.items():
        signed = value if model.tasks[task].metric.higher_is_better else -value
        best = state["task_best"].get(task)
        if best is None or signed > best:
            state["task_best"][task], state["task_bad"][task] = signed, 0
        else:
            state["task_bad"][task] = state["task_bad"].get(task, 0) + 1
            if state["task_bad"][task] >= patience and isinstance(sampler, QuotaSampler) \
                    and task not in sampler.stopped and len(sampler.stopped) < len(sampler.tasks) - 1:
                sampler.stop(task)
                stopped.append(task)
    return stopped


def _check_finite(model: MultiTaskModel, label: str, epoch: int) -> None:
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(f"[{label}] weight '{name}' is not finite after epoch {epoch}; training diverged "
                                "(lower lr / head_lr); the last good checkpoint is kept")


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def clear_checkpoint(checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is not None:
        shutil.rmtree(Path(checkpoint_dir) / CHECKPOINT, ignore_errors=True)


# ---- pieces -----------------------------------------------------------------------------------------------
class _Step(nn.Module):
    """Model + loss weighter as one module, so DDP syncs the learned task weights with the model."""

    def __init__(self, model: MultiTaskModel, weighter: LossWeighter):
        super().__init__()
        self.model = model
        self.weighter = weighter

    def forward(self, task: str, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_batch(task, batch)
        loss = self.model.tasks[task].loss(out.outputs, batch)
        return loss, self.weighter.weighted(task, loss)


def _configure(model: MultiTaskModel, cfg: TrainOptions) -> None:
    if cfg.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = cfg.dropout
    if cfg.freeze_embeddings:
        for p in model.encoder.embeddings.parameters():
            p.requires_grad_(False)
    if cfg.freeze_layers:
        layers = encoder_layers(model.encoder)
        if cfg.freeze_layers > len(layers):
            raise TrainingError(f"freeze_layers={cfg.freeze_layers} but the encoder has {len(layers)} layers")
        for layer in layers[: cfg.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def _optimizer(model: MultiTaskModel, weighter: LossWeighter, cfg: TrainOptions) -> torch.optim.Optimizer:
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
        if name.startswith("heads."):
            (head_no_decay if plain else head_decay).append(p)
        else:
            (no_decay if plain else decay).append(p)
    head_lr = cfg.head_lr
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": head_decay, "weight_decay": cfg.weight_decay, "lr": head_lr},
        {"params": head_no_decay, "weight_decay": 0.0, "lr": head_lr},
    ]
    if len(weighter.log_vars):
        # log-variances need a larger step than the encoder to move within a few epochs
        groups.append({"params": list(weighter.parameters()), "weight_decay": 0.0, "lr": max(cfg.lr, 1e-2)})
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _save_checkpoint(path: Path, model: MultiTaskModel, weighter: LossWeighter, optimizer, scheduler,
                     sampler, streams: Mapping[str, BatchStream], state: dict, improved: bool) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    best = path / "best.safetensors"
    with atomic_dir(path) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if improved:
            save_file(weights, str(tmp / "best.safetensors"))
        elif best.is_file():
            shutil.copy2(best, tmp / "best.safetensors")
        save_file({k: v.detach().cpu() for k, v in weighter.state_dict().items()} or {"_": torch.zeros(0)},
                  str(tmp / "weighter.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        trainer = {**state, "sampler": sampler.state_dict(),
                   "streams": {t: {"order": s._order, "pos": s._pos, "rng": s._rng.getstate()} for t, s in streams.items()},
                   "python_rng": random.getstate()}
        atomic_write_text(tmp / "trainer.json", json.dumps(trainer, allow_nan=False))


def _load_checkpoint(path: Path, model: MultiTaskModel, weighter: LossWeighter, optimizer, scheduler,
                     sampler, streams: Mapping[str, BatchStream]) -> dict:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    wstate = {k: v for k, v in load_file(str(path / "weighter.safetensors")).items() if k != "_"}
    weighter.load_state_dict(wstate, strict=True)
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(opt["torch_rng"])
    trainer = json.loads((path / "trainer.json").read_text())
    sampler.load_state_dict(trainer.pop("sampler"))
    for t, s in trainer.pop("streams").items():
        streams[t]._order, streams[t]._pos = s["order"], s["pos"]
        streams[t]._rng.setstate(_as_rng_state(s["rng"]))
    random.setstate(_as_rng_state(trainer.pop("python_rng")))
    return trainer


def _as_rng_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _fmt(d: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in d.items()) or "-"


class _progress:
    """A rich progress bar with a ``losses`` field, shown on the main process only."""

    def __init__(self, accelerator, description: str, total: int):
        self.accelerator, self.description, self.total = accelerator, description, total
        self.bar = None

    def __enter__(self):
        if not self.accelerator.is_main_process:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[losses]}"), transient=True)
        self.bar.__enter__()
        return self.bar, self.bar.add_task(self.description, total=self.total, losses="")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
