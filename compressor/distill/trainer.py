"""A small multi-task distillation loop: task-sampled batches, AdamW/SGD, warmup + linear decay, clipping.

Used by the ``distill`` stage and, for short "recovery" runs between pruning steps, by pruning::

    batches = TaskBatches.from_store(data, list(student.tasks), tokenizer, max_length, batch_size=16)
    parts = distill_steps(student, teacher, batches, steps=200, loss_config=KDConfig(alpha=0.5))

The student is trained in place; the teacher is only read (eval mode, no grad).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from compressor.data.sampling import BatchStream, TaskSampler
from compressor.distill.cache import INDEX_KEY, TeacherCache
from compressor.distill.losses import PARTS, DistillLoss, KDConfig
from compressor.errors import DataError
from compressor.model.forward import autocast, use_bf16
from compressor.model.multitask import MultiTaskModel
from compressor.train.pieces import set_dropout

Batch = Mapping[str, torch.Tensor]


class TaskBatches:
    """Endless ``(task, collated batch)`` pairs: the task drawn by a :class:`TaskSampler`, its batch by a
    per-task :class:`BatchStream` (shuffled, reshuffled after each pass).

    Args:
        features: task -> encoded training features.
        collate: task -> the plugin's ``collate``.
        batch_size: features per batch.
        strategy: ``proportional``, ``temperature`` or ``round_robin`` task sampling.
        tau: temperature of the ``temperature`` strategy.
        seed: seeds task sampling and shuffling.
    """

    def __init__(self, features: Mapping[str, Sequence[dict[str, Any]]],
                 collate: Mapping[str, Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]],
                 batch_size: int, strategy: str = "temperature", tau: float = 2.0, seed: int = 0):
        empty = [t for t, f in features.items() if not f]
        if empty:
            raise ValueError(f"task '{empty[0]}' has no training features")
        self.features = {t: list(f) for t, f in features.items()}
        self.collate = dict(collate)
        self.streams = {t: BatchStream(len(f), batch_size, seed + i) for i, (t, f) in enumerate(self.features.items())}
        self.sampler = TaskSampler({t: len(f) for t, f in self.features.items()}, strategy, tau, seed)

    @classmethod
    def from_store(cls, data: Any, tasks: Sequence[str], tokenizer: Any, max_length: int, batch_size: int,
                   strategy: str = "temperature", tau: float = 2.0, seed: int = 0) -> TaskBatches:
        """Training batches of ``tasks`` from a :class:`~compressor.data.store.DataStore`."""
        features = {}
        for t in tasks:
            features[t] = data.encoded(t, "train", tokenizer, max_length, train=True).features
            if not features[t]:
                raise DataError(data.path(t, "train"), f"task '{t}': no training features after encoding")
        return cls(features, {t: data.tasks[t].collate for t in tasks}, batch_size, strategy, tau, seed)

    def steps_per_epoch(self) -> int:
        """Batches in one pass over every task's features."""
        return sum(s.batches_per_pass() for s in self.streams.values())

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        return self

    def __next__(self) -> tuple[str, dict[str, torch.Tensor]]:
        task = next(self.sampler)
        feats = self.features[task]
        idx = self.streams[task].next()
        batch = self.collate[task]([feats[i] for i in idx])
        batch[INDEX_KEY] = torch.tensor(idx, dtype=torch.long)  # which features: the teacher cache's keys
        return task, batch


class Distiller:
    """Trains ``student`` against ``teacher`` one optimisation step at a time.

    Args:
        student: trained in place (moved to ``device``).
        teacher: frozen; moved to ``device`` and put in eval mode.
        batches: an iterator of ``(task, batch)`` (e.g. :class:`TaskBatches`); batches may live on the CPU.
        loss_config: weights of the loss parts.
        total_steps: length of the learning-rate schedule (warmup then linear decay to 0).
        layer_map: student layer -> teacher layer (0-based); default uniform.
        lr: peak learning rate (student and projections).
        weight_decay: decoupled weight decay (not on biases and LayerNorms).
        warmup_ratio: fraction of ``total_steps`` spent warming up.
        grad_clip: max global gradient norm; ``None`` = no clipping.
        optimizer: ``adamw`` or ``sgd`` (with ``momentum``).
        device: default: where the student is.
        mixed_precision: ``auto`` (bf16 autocast on CUDA only), ``bf16`` (on the CPU too) or ``no``.
        dropout: the student's dropout while it trains (every ``nn.Dropout`` of it, heads included, and the
            attention-dropout rates of HF attention modules); ``None`` keeps the model's own.
        teacher_cache: the teacher's outputs computed once (:mod:`compressor.distill.cache`): filled for every
            feature of ``batches`` (a :class:`TaskBatches`) up to its size cap, then read instead of running the
            teacher; ``None``: the teacher runs on every batch.
    """

    def __init__(self, student: MultiTaskModel, teacher: MultiTaskModel,
                 batches: Iterator[tuple[str, Batch]], loss_config: KDConfig, *, total_steps: int,
                 layer_map: Mapping[int, int] | None = None, lr: float = 5e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.0, grad_clip: float | None = 1.0,
                 optimizer: Literal["adamw", "sgd"] = "adamw", momentum: float = 0.9,
                 device: torch.device | str | None = None, mixed_precision: str = "auto",
                 dropout: float | None = None, teacher_cache: TeacherCache | None = None):
        from transformers import get_linear_schedule_with_warmup

        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.student = student.to(self.device)
        if dropout is not None:
            set_dropout(self.student, dropout)
        self.teacher = teacher.to(self.device).eval()  # read under no_grad; its requires_grad flags stay as they are
        self.batches = batches
        self.loss = DistillLoss(student, teacher, loss_config, layer_map, teacher_cache).to(self.device)
        self.grad_clip = grad_clip
        self.mixed_precision = use_bf16(mixed_precision, self.device)
        if teacher_cache is not None and isinstance(batches, TaskBatches) and loss_config.alpha < 1:
            teacher_cache.prepare(teacher, batches.features, batches.collate, self.loss.needs(), self.device,
                                  lambda: autocast(self.device, self.mixed_precision, cpu=True))
        self.total_steps = total_steps
        groups = _param_groups([self.student, self.loss], weight_decay)
        if optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        else:
            raise ValueError(f"unknown optimizer '{optimizer}'")
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, math.ceil(warmup_ratio * total_steps),
                                                         total_steps)
        self.steps_done = 0
        self.last_task: str | None = None

    def step(self) -> dict[str, float]:
        """One optimisation step on the next batch; returns ``loss``, ``task``, ``kd_logits``, ``kd_hidden`` and
        ``kd_attention`` as floats (the batch's task is in ``self.last_task``)."""
        task, batch = next(self.batches)
        self.last_task = task
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.student.train()
        self.loss.train()
        with autocast(self.device, self.mixed_precision, cpu=True):
            parts = self.loss(self.student, self.teacher, task, batch)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss is {float(loss)} at step {self.steps_done + 1} (task '{task}')")
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        self.optimizer.step()
        if self.steps_done < self.total_steps:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return {k: float(parts[k].detach()) for k in PARTS}

    def run(self, steps: int | None = None,
            on_step: Callable[[int, str, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Run ``steps`` steps (default: the rest of the schedule); returns the mean of each part over them.

        ``on_step(steps_done, task, parts)`` is called after each step (for progress bars).
        """
        steps = self.total_steps - self.steps_done if steps is None else steps
        sums = {k: 0.0 for k in PARTS}
        for _ in range(steps):
            parts = self.step()
            for k in PARTS:
                sums[k] += parts[k]
            if on_step is not None:
                on_step(self.steps_done, self.last_task, parts)
        self.student.eval()
        return {k: v / max(steps, 1) for k, v in sums.items()}


def distill_steps(student: MultiTaskModel, teacher: MultiTaskModel, batches: Iterator[tuple[str, Batch]],
                  steps: int, loss_config: KDConfig | None = None, **kwargs: Any) -> dict[str, float]:
    """Train ``student`` in place for ``steps`` distillation steps; returns the mean loss parts.

    A fresh optimizer and projections each call, so it is safe after the student's shapes changed (pruning).
    ``kwargs`` go to :class:`Distiller` (``lr``, ``layer_map``, ``warmup_ratio``, ``grad_clip``, ``device``...).
    """
    distiller = Distiller(student, teacher, batches, loss_config or KDConfig(), total_steps=steps, **kwargs)
    return distiller.run(steps)


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- from the recipe's options (the distill stage, prune recovery and search recovery share them) -------------
def kd_config(opts: Any) -> KDConfig:
    """The loss weights of a :class:`~compressor.recipe.DistillOptions`."""
    return KDConfig(alpha=opts.alpha, temperature=opts.temperature, logits=opts.weights.logits,
                    hidden=opts.weights.hidden, attention=opts.weights.attention, relation_heads=opts.relation_heads)


def batches_for(data: Any, tasks: Sequence[str], tokenizer: Any, max_length: int, opts: Any, seed: int) -> TaskBatches:
    """Training batches of ``tasks`` with the batch size and task sampling of ``opts`` (a ``DistillOptions``)."""
    return TaskBatches.from_store(data, tasks, tokenizer, max_length, opts.batch_size, opts.sampling.strategy,
                                  opts.sampling.tau, seed)


def distiller_for(student: MultiTaskModel, teacher: MultiTaskModel, batches: Iterator[tuple[str, Batch]], opts: Any,
                  *, total_steps: int, layer_map: Mapping[int, int] | None = None,
                  device: torch.device | str | None = None, teacher_cache: TeacherCache | None = None) -> Distiller:
    """The :class:`Distiller` of a ``DistillOptions``: its loss, optimizer, schedule, precision and dropout."""
    return Distiller(student, teacher, batches, kd_config(opts), total_steps=total_steps, layer_map=layer_map,
                     lr=opts.lr, weight_decay=opts.weight_decay, warmup_ratio=opts.warmup_ratio,
                     grad_clip=opts.grad_clip, optimizer=opts.optimizer, momentum=opts.momentum, device=device,
                     mixed_precision=opts.mixed_precision, dropout=opts.dropout, teacher_cache=teacher_cache)
