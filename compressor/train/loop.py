"""Joint multi-task training on accelerate: task-homogeneous batches, task sampling, loss weighting,
AdamW/SGD with warmup + linear decay, clipping, freezing, early stopping on the mean dev metric, an
epoch checkpoint that ``resume`` continues from.

The same loop trains the multi-task teacher and each single-task baseline (a model with one task).
CPU here; CUDA with bf16 autocast when present; several GPUs with ``accelerate launch`` (each process draws the
same task per step and its own batch, and DDP averages gradients).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
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
from compressor.model.forward import dev_metrics, precision_note, use_bf16
from compressor.model.io import nonfinite
from compressor.model.multitask import MultiTaskModel
from compressor.train.checkpoint import (CHECKPOINT, clear_checkpoint, load_best_heads, load_checkpoint,
                                         save_checkpoint)
from compressor.train.options import TrainOptions
from compressor.train.pcgrad import group_draws, project_conflicts
from compressor.train.pieces import (INDEX_KEY, Objective, ProgressBar, StepModule, build_optimizer, configure, fmt,
                                     schedule)
from compressor.train.selection import head_state, select_heads
from compressor.train.steps import epoch_steps, make_sampler, rank_slice, stop_tasks, task_quotas
from compressor.train.weighting import LossWeighter

__all__ = ["CHECKPOINT", "Engine", "Objective", "Ran", "Scorer", "TrainResult", "build_engine", "clear_checkpoint",
           "dev_score", "epoch_steps", "make_sampler", "task_quotas", "train_model"]

# ranks epochs: (model, dev metric per task) -> (the score, higher is better; fields for the epoch's record)
Scorer = Callable[[MultiTaskModel, dict[str, float]], tuple[float, dict[str, Any]]]


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_score: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: losses, dev metrics, weights
    wall_s: float = 0.0
    device: str = "cpu"
    mixed_precision: str = "no"
    optimizer_steps: int = 0  # schedule steps, one per batch drawn (under pcgrad several batches share a step)
    final_lr: float = 0.0
    examples_per_s: float | None = None  # training examples per second of training (evaluation excluded)
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> the epoch its head came from
    steps_per_epoch: int = 0  # schedule steps of a full epoch (before any task stopped early)


def dev_score(model: MultiTaskModel, tokenizer: Any, data: DataStore, tasks: list[str], max_length: int,
              batch_size: int) -> tuple[float | None, dict[str, float]]:
    """Mean primary dev metric over ``tasks`` (sign-flipped for lower-is-better metrics); None without dev data."""
    per_task = dev_metrics(model, tokenizer, data, tasks, max_length, batch_size)
    model.train()
    if not per_task:
        return None, per_task
    signed = [v if model.tasks[t].metric.higher_is_better else -v for t, v in per_task.items()]
    return float(np.mean(signed)), per_task


@dataclass
class Ran:
    """What :meth:`Engine.run` did: per-task loss sums and step counts, training examples, and (under an
    objective) the sums of its named loss parts."""

    sums: dict[str, float]
    counts: dict[str, int]
    examples: int
    parts: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Mean ``loss`` over the steps and, under an objective, the mean of each of its parts."""
        steps = max(1, sum(self.counts.values()))
        return {"loss": sum(self.sums.values()) / steps, **{k: v / steps for k, v in self.parts.items()}}


@dataclass
class Engine:
    """A model being trained: its optimizer, schedule, task sampler and batch streams, prepared by accelerate.
    :meth:`run` takes a number of optimizer steps. :func:`train_model` runs it epoch by epoch (dev scores, best
    epoch, checkpoints); the prune stage's and the search's recovery run it for steps between their own checks.
    Build one with :func:`build_engine`."""

    model: MultiTaskModel
    cfg: TrainOptions
    label: str
    log: Callable[[str], None]
    accelerator: Any
    features: dict[str, list[Any]]
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: TaskSampler | QuotaSampler
    streams: dict[str, BatchStream]
    steps_per_epoch: int
    total_steps: int
    mixed_precision: str = "no"
    max_length: int = 0  # of the encoded inputs, training and dev
    best_heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> its best epoch's head
    core: MultiTaskModel = field(init=False)
    weighter: LossWeighter = field(init=False)
    objective: Objective | None = field(init=False)

    def __post_init__(self) -> None:
        unwrapped = self.accelerator.unwrap_model(self.step_module)
        self.core, self.weighter, self.objective = unwrapped.model, unwrapped.weighter, unwrapped.objective

    @property
    def tasks(self) -> list[str]:
        return list(self.features)

    @property
    def steps_done(self) -> int:
        """Schedule steps taken (one per batch drawn)."""
        return int(self.scheduler.last_epoch)

    def checkpoint_parts(self) -> tuple:
        return self.core, self.weighter, self.optimizer, self.scheduler, self.sampler, self.streams

    def objective_module(self) -> nn.Module | None:
        return self.objective.module if self.objective is not None else None

    def run(self, n_steps: int, description: str | None = None) -> Ran:
        """``n_steps`` optimizer steps (fewer if the schedule ends first); the model is left in train mode."""
        n_steps = min(n_steps, self.total_steps - self.steps_done)
        cfg, accelerator, tasks = self.cfg, self.accelerator, self.tasks
        world, rank = accelerator.num_processes, accelerator.process_index
        self.step_module.train()
        if not any(p.requires_grad for p in self.core.encoder.parameters()):
            self.core.encoder.eval()  # a frozen encoder is a feature extractor: no dropout in it
        ran = Ran({t: 0.0 for t in tasks}, {t: 0 for t in tasks}, 0)
        pcgrad = cfg.loss_weighting.strategy == "pcgrad"
        index = self.objective is not None and self.objective.wants_index
        at_step = getattr(self.objective, "at_step", None)  # optional: an objective that follows the step count
        step, carried = 0, None
        with ProgressBar(accelerator, f"{self.label} {description or 'steps'}", n_steps) as (bar, bar_task):
            while step < n_steps:
                task, carried = carried or next(self.sampler), None
                group = [task]
                if pcgrad:  # one optimizer step per run of different tasks (compressor.train.pcgrad)
                    group, carried = group_draws(task, self.sampler, min(len(tasks), n_steps - step))
                batches = []
                for t in group:
                    idx = rank_slice(self.streams[t].next(), rank, world)
                    ran.examples += len(idx) * world
                    batch = self.core.tasks[t].collate([self.features[t][i] for i in idx])
                    if index:
                        batch[INDEX_KEY] = torch.tensor(idx, dtype=torch.long)
                    batches.append((t, {k: v.to(accelerator.device) for k, v in batch.items()}))
                if at_step is not None:
                    at_step(self.steps_done)
                for t, (value, parts) in _step(self, batches).items():
                    ran.sums[t] += value
                    ran.counts[t] += 1
                    for k, v in (parts or {}).items():
                        ran.parts[k] = ran.parts.get(k, 0.0) + v
                before, step = step, step + len(group)
                if bar is not None:
                    shown = " ".join(f"{t}={ran.sums[t] / ran.counts[t]:.3f}" for t in tasks if ran.counts[t])
                    bar.update(bar_task, advance=len(group), losses=shown)
                    every = max(1, n_steps // 5)
                    if not bar.console.is_terminal and step // every > before // every:
                        self.log(f"[{self.label}] {description or 'step'} {step}/{n_steps} loss {shown}")
        return ran


def build_engine(model: MultiTaskModel, tokenizer: Any, data: DataStore, cfg: TrainOptions, *, seed: int,
                 label: str = "model", log: Callable[[str], None] | None = None,
                 objective: Objective | None = None, tasks: list[str] | None = None,
                 max_length: int | None = None) -> Engine:
    """The :class:`Engine` that trains ``model`` on its tasks' training data with ``cfg``: the task loss, or
    ``objective`` (e.g. distillation). The schedule spans ``cfg.max_steps`` or ``cfg.epochs`` epochs. ``tasks``:
    the tasks that take steps (default every task of the model); ``max_length``: of the encoded inputs (default
    the data's)."""
    accelerator, mixed = _accelerator(model, cfg, label)
    features = _train_features(model, tokenizer, data, tasks or list(model.tasks), max_length or data.max_length)
    engine = _assemble(model, cfg, label, log or say, accelerator, features, seed, objective)
    engine.mixed_precision, engine.max_length = mixed, max_length or data.max_length
    if objective is not None:
        objective.prepare(features, {t: model.tasks[t].collate for t in features}, accelerator)
    return engine


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
    objective: Objective | None = None,
    score: Scorer | None = None,
    tasks: list[str] | None = None,
    max_length: int | None = None,
) -> TrainResult:
    """Train ``model`` on all of its tasks in place; on return it holds the best-dev-epoch weights.

    ``objective``: what a step minimises instead of the task loss (e.g. distillation); ``score``: how an epoch's
    dev metrics rank epochs instead of their mean (e.g. the mean retention of a teacher's dev metrics); ``tasks``:
    the tasks that train and are scored (default all; the others' heads stay as they are); ``max_length``: of the
    encoded inputs (default the data's).

    ``cfg.batch_size`` is the global batch: with N processes (``accelerate launch``) each takes
    ``batch_size / N`` examples of the same batch, so the optimizer steps, the schedule and the result do not
    depend on N. The learning-rate schedule (warmup then linear decay) counts optimizer steps over the run.
    """
    from accelerate.utils import set_seed

    log = log or say
    started = time.perf_counter()
    set_seed(seed)
    loop = build_engine(model, tokenizer, data, cfg, seed=seed, label=label, log=log, objective=objective,
                        tasks=tasks, max_length=max_length)
    accelerator = loop.accelerator
    state: dict[str, Any] = {"epoch": 0, "best_score": None, "best_epoch": 0, "bad_epochs": 0, "history": [],
                             "task_best": {}, "task_bad": {}, "task_best_epoch": {}, "train_s": 0.0, "train_examples": 0}
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and ckpt is not None and (ckpt / "trainer.json").is_file():
        state = {**state, **load_checkpoint(ckpt, *loop.checkpoint_parts(), extra=loop.objective_module())}
        loop.best_heads = load_best_heads(ckpt, list(state["task_best_epoch"]))
        log(f"[{label}] resumed after epoch {state['epoch']}")

    best_state: dict[str, torch.Tensor] | None = None
    patience = cfg.early_stopping_patience or math.inf
    epochs = -(-loop.total_steps // loop.steps_per_epoch) if cfg.max_steps else cfg.epochs
    for epoch in range(state["epoch"] + 1, epochs + 1):
        if state["bad_epochs"] >= patience:
            break
        n_steps = loop.sampler.epoch_steps() if isinstance(loop.sampler, QuotaSampler) else loop.steps_per_epoch
        n_steps = min(n_steps, loop.total_steps - loop.steps_done)
        if n_steps <= 0:
            break
        tic = time.perf_counter()
        ran = loop.run(n_steps, f"epoch {epoch}/{epochs}")
        state["train_s"] += time.perf_counter() - tic
        state["train_examples"] += ran.examples
        improved = _close_epoch(loop, tokenizer, data, state, epoch, ran, tic, score)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in loop.core.state_dict().items()}
        if ckpt is not None and accelerator.is_main_process:
            save_checkpoint(ckpt, *loop.checkpoint_parts(), state, improved, best_heads=loop.best_heads,
                            extra=loop.objective_module())
        accelerator.wait_for_everyone()
    if cfg.keep_best:
        _restore_best(loop.core, best_state, ckpt)
    loop.core.eval()
    selection = _select(loop, tokenizer, data, state) if cfg.keep_best else {}
    return TrainResult(
        epochs_run=state["epoch"], best_epoch=state["best_epoch"], best_score=state["best_score"],
        history=state["history"], wall_s=time.perf_counter() - started, device=str(accelerator.device),
        mixed_precision=loop.mixed_precision, optimizer_steps=loop.steps_done,
        final_lr=float(loop.scheduler.get_last_lr()[0]),
        examples_per_s=round(state["train_examples"] / state["train_s"], 2) if state["train_s"] else None,
        selection=selection, steps_per_epoch=loop.steps_per_epoch,
    )


def _accelerator(model: MultiTaskModel, cfg: TrainOptions, label: str) -> tuple[Any, str]:
    """The accelerator (bf16 autocast: on CUDA under ``auto``, anywhere under ``bf16``) and its precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    mixed = "bf16" if use_bf16(cfg.mixed_precision, device) else "no"
    note = precision_note(cfg.mixed_precision, device)
    if note:
        say(f"[{label}] {note}")
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
        # accelerate keeps one precision per process; a later stage of the same run may ask for another (the
        # process group, in PartialState, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision=mixed,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(model.tasks) > 1)],
    )
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise TrainingError(f"[{label}] batch_size {cfg.batch_size} does not divide among {world} "
                            f"processes; use a multiple of {world}")
    return accelerator, mixed


def _train_features(model: MultiTaskModel, tokenizer: Any, data: DataStore, tasks: list[str],
                    max_length: int) -> dict[str, list[Any]]:
    features = {t: data.encoded(t, "train", tokenizer, max_length, train=True).features for t in tasks}
    for t, f in features.items():
        if not f:
            raise DataError(data.path(t, "train"), f"task '{t}': no training features after encoding")
    return features


def _assemble(model: MultiTaskModel, cfg: TrainOptions, label: str, log: Callable[[str], None], accelerator: Any,
              features: dict[str, list[Any]], seed: int, objective: Objective | None = None) -> Engine:
    """Freezing, optimizer, batch streams, task sampler and schedule, prepared by the accelerator."""
    configure(model, cfg)
    weighter = LossWeighter(list(features), cfg.loss_weighting.strategy, cfg.loss_weighting.weights)
    if objective is not None and objective.module is not None:
        objective.module.to(accelerator.device)
    optimizer = build_optimizer(model, weighter, cfg, objective.module if objective is not None else None)
    # every process draws the same global batches (same seeds) and keeps its own slice of each
    streams = {t: BatchStream(len(f), cfg.batch_size, seed=seed + i, lengths=[len(x["input_ids"]) for x in f])
               for i, (t, f) in enumerate(features.items())}
    sizes = {t: len(f) for t, f in features.items()}
    sampler = make_sampler(cfg, sizes, seed)
    steps_per_epoch = epoch_steps(cfg, sizes)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    # not passed to accelerator.prepare: a prepared scheduler steps once per process per optimizer step
    scheduler = schedule(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    step_module, optimizer = accelerator.prepare(StepModule(model, weighter, objective), optimizer)
    return Engine(model=model, cfg=cfg, label=label, log=log, accelerator=accelerator, features=features,
                  step_module=step_module, optimizer=optimizer, scheduler=scheduler, sampler=sampler, streams=streams,
                  steps_per_epoch=steps_per_epoch, total_steps=total)


def _step(loop: Engine, batches: list[tuple[str, dict[str, torch.Tensor]]],
          ) -> dict[str, tuple[float, dict[str, float] | None]]:
    """One optimizer step on the batches of one or more tasks (several: PCGrad); each task's (unweighted) loss and,
    under an objective, its named parts. The schedule advances once per batch."""
    cfg, accelerator = loop.cfg, loop.accelerator
    shared = [p for p in loop.core.encoder.parameters() if p.requires_grad] if len(batches) > 1 else []
    values, grads = {}, []
    for task, batch in batches:
        with accelerator.autocast():
            loss, total_loss, parts = loop.step_module(task, batch)
        value = float(loss.detach())
        values[task] = (value, {k: float(v) for k, v in parts.items()} if parts is not None else None)
        if not math.isfinite(value):
            raise TrainingError(
                f"[{loop.label}] task '{task}': the loss is {value} at step {loop.steps_done + 1}; training "
                f"diverged (is lr {cfg.lr:g} / head_lr {cfg.head_lr:g} too high?); the last good checkpoint is kept")
        if total_loss.requires_grad:  # an objective may have nothing to learn on a batch (all its terms off)
            accelerator.backward(total_loss)
        if shared:  # keep this task's encoder gradient apart; heads keep accumulating their own
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                    for p in shared]).float())
            for p in shared:
                p.grad = None
    if grads:
        summed = project_conflicts(grads, random.Random(loop.steps_done))
        offset = 0
        for p in shared:
            p.grad = summed[offset: offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(loop.step_module.parameters(), cfg.grad_clip)
    loop.optimizer.step()
    for _ in batches:
        loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return values


def _close_epoch(loop: Engine, tokenizer: Any, data: DataStore, state: dict[str, Any], epoch: int, ran: Ran,
                 tic: float, score_fn: Scorer | None) -> bool:
    """Check the weights, score dev, record the epoch in ``state`` and log it; whether dev improved."""
    patience = loop.cfg.early_stopping_patience or math.inf
    bad = nonfinite(dict(loop.core.named_parameters()))
    if bad:
        raise TrainingError(f"[{loop.label}] weight '{bad[0]}' is not finite after epoch {epoch}; training diverged "
                            "(lower lr / head_lr); the last good checkpoint is kept")
    score, per_task = dev_score(loop.core, tokenizer, data, loop.tasks, loop.max_length, loop.cfg.eval_batch_size)
    record = {
        "epoch": epoch,
        "train_loss": {t: ran.sums[t] / ran.counts[t] for t in loop.tasks if ran.counts[t]},
        "steps": dict(ran.counts),
        "steps_done": loop.steps_done,
        "lr": loop.scheduler.get_last_lr()[0],
        "dev": per_task,
        "dev_mean": score,
        "task_weights": loop.weighter.current(),
        "examples_per_s": round(ran.examples / max(time.perf_counter() - tic, 1e-9), 2),
    }
    if ran.parts:
        record["loss_parts"] = {k: v for k, v in ran.means().items()}
    if score_fn is not None and per_task:
        score, extra = score_fn(loop.core, per_task)
        record.update(extra)
    improved = score is None or state["best_score"] is None or score > state["best_score"]
    if improved:
        state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    record["stopped"] = stop_tasks(loop.sampler, state, per_task, loop.model,
                                   patience if loop.cfg.per_task_stopping else math.inf)
    for task in per_task:
        if state["task_bad"].get(task) == 0:  # this epoch is the task's best so far: keep its head
            state["task_best_epoch"][task] = epoch
            loop.best_heads[task] = head_state(loop.core, task)
    state["history"].append(record)
    state["epoch"] = epoch
    loop.log(f"[{loop.label}] epoch {epoch}: loss {fmt(record['train_loss'])} dev {fmt(per_task)}"
             + (" *" if improved else "")
             + (f" (stopped: {', '.join(record['stopped'])})" if record["stopped"] else ""))
    return improved


def _select(loop: Engine, tokenizer: Any, data: DataStore, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-task head selection (``cfg.head_selection``) on the restored best-mean-epoch model."""
    best_epoch = state["best_epoch"]
    if not best_epoch or not state["history"]:
        return {}
    encoder_dev = state["history"][best_epoch - 1]["dev"]
    if loop.cfg.head_selection != "per_task" or not encoder_dev:
        return {t: {"head_epoch": best_epoch, "dev": encoder_dev.get(t)} for t in loop.tasks}
    best = {t: (state["task_best_epoch"][t], loop.best_heads.get(t, {})) for t in state["task_best_epoch"]}

    def score(tasks: list[str]) -> dict[str, float]:
        return dev_metrics(loop.core, tokenizer, data, tasks, loop.max_length, loop.cfg.eval_batch_size)

    chosen = select_heads(loop.core, best_epoch, encoder_dev, best, score)
    moved = {t: c["head_epoch"] for t, c in chosen.items() if c["head_epoch"] != best_epoch}
    loop.log(f"[{loop.label}] encoder from epoch {best_epoch}; "
             + (", ".join(f"{t} head from epoch {e}" for t, e in moved.items()) if moved
                else "every head from the same epoch (no other epoch's head scored better on dev)"))
    return chosen


def _restore_best(core: MultiTaskModel, best_state: dict[str, torch.Tensor] | None, ckpt: Path | None) -> None:
    """Load the best epoch's weights (kept in memory, else from the checkpoint of a resumed run) and eval()."""
    if best_state is None and ckpt is not None and (ckpt / "best.safetensors").is_file():
        from safetensors.torch import load_file

        best_state = load_file(str(ckpt / "best.safetensors"))
    if best_state is not None:
        core.load_state_dict(best_state, strict=True)
    core.eval()
