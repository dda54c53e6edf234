"""Distillation as an objective of the training engine (:mod:`compressor.train.loop`): the student learns from
its teacher(s) with the loss of :mod:`compressor.distill.losses`, on the engine's batches, optimizer, schedule,
precision, processes and checkpoints.

The distill stage trains with it epoch by epoch (``train_model(..., objective=Distillation(...))``); the prune
stage's and the search's recovery take steps with it between their own checks (:func:`recovery_engine`)::

    objective = Distillation(student, teacher, kd_config(opts), layer_map=..., teacher_cache=cache)
    engine = build_engine(student, tokenizer, data, train_options(opts, max_steps=200), seed=0, objective=objective)
    engine.run(200).means()   # {"loss": ..., "task": ..., "kd_logits": ..., "kd_hidden": ..., "kd_attention": ...}
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

from compressor.distill.cache import TeacherCache
from compressor.distill.losses import DistillLoss, KDConfig
from compressor.model.multitask import MultiTaskModel
from compressor.train.loop import Engine, build_engine
from compressor.train.options import LossWeighting, TrainOptions


class Distillation:
    """The engine's objective of knowledge distillation: ``student`` learns task t from ``teachers[t]`` (default
    ``teacher``), with the loss weights of ``config``; teachers are frozen and read under no_grad, from their
    caches where a cache is given (filled once, by the main process first, in :meth:`prepare`).

    Raises:
        RecipeError: a layer map naming a layer that does not exist, a teacher without one of the student's tasks.
    """

    def __init__(self, student: MultiTaskModel, teacher: MultiTaskModel, config: KDConfig, *,
                 layer_map: Mapping[int, int] | None = None, teacher_cache: TeacherCache | None = None,
                 teachers: Mapping[str, MultiTaskModel] | None = None,
                 teacher_caches: Mapping[str, TeacherCache] | None = None,
                 unlabeled: Mapping[str, list[dict[str, Any]]] | None = None, batch_size: int = 16, seed: int = 0):
        self.teacher = teacher.eval()
        self.teachers = {t: m.eval() for t, m in (teachers or {}).items() if t in student.tasks}
        config = _transfer_within(config, student, unlabeled or {})
        self.loss = DistillLoss(student, teacher, config, layer_map, teacher_cache, self.teachers,
                                {t: c for t, c in (teacher_caches or {}).items() if t in student.tasks},
                                unlabeled=list(unlabeled or {}))
        self.module = self.loss  # its hidden-state projections train with the student
        self.wants_index = config.alpha < 1 and any(self.loss.cache_for(t) is not None for t in student.tasks)
        # unlabeled text sets that teach some head (drawn in turn, one batch per step: see _unlabeled_batch)
        self.unlabeled = {n: f for n, f in (unlabeled or {}).items() if n in self.loss.transfer_heads
                          and config.alpha < 1 and config.transfer_weight > 0}
        self.batch_size, self.seed = batch_size, seed
        self.step: int | None = None
        self._orders: dict[str, tuple[int, list[int]]] = {}  # text set -> (pass, its order), the latest pass only
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    def teacher_of(self, task: str) -> MultiTaskModel:
        return self.teachers.get(task, self.teacher)

    def prepare(self, features: Mapping[str, list[Any]], collate: Mapping[str, Callable[..., Any]],
                accelerator: Any) -> None:
        """Teachers onto the training device; each teacher's cache filled with the features of its tasks."""
        device = accelerator.device
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, device
        for model in {id(m): m for m in (self.teacher, *self.teachers.values())}.values():
            model.to(device)
        if not self.wants_index:
            return
        by_cache: dict[int, tuple[TeacherCache, MultiTaskModel, list[str]]] = {}
        for task in features:
            cache = self.loss.cache_for(task)
            if cache is not None:
                by_cache.setdefault(id(cache), (cache, self.teacher_of(task), []))[2].append(task)
        with accelerator.main_process_first():  # one process computes; the others read what it wrote
            for cache, teacher, tasks in by_cache.values():
                cache.prepare(teacher, {t: features[t] for t in tasks}, collate, self.loss.needs(), device,
                              accelerator.autocast)

    def at_step(self, steps_done: int) -> None:
        """The engine tells the objective which step comes next (the unlabeled batches are a function of it, so a
        resumed run draws what an uninterrupted one would)."""
        self.step = steps_done

    def __call__(self, model: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = self.loss(model, self.teacher_of(task), task, batch)
        if self.unlabeled and self.step is not None:
            name, texts = self._unlabeled_batch(self.step)
            term = self.loss.transfer_on(model, texts, self.loss.transfer_heads[name])
            cfg = self.loss.config
            parts["loss"] = parts["loss"] + (1.0 - cfg.alpha) * cfg.transfer_weight * term
            parts["kd_transfer"] = parts["kd_transfer"] + term.detach()
        return parts

    def _order(self, name: str, n_pass: int) -> list[int]:
        """The seeded order of text set ``name`` in pass ``n_pass``, shuffled once per pass (not per row)."""
        if self._orders.get(name, (None,))[0] != n_pass:
            n = len(self.unlabeled[name])
            self._orders[name] = (n_pass, random.Random(f"{self.seed}:{name}:{n_pass}").sample(range(n), n))
        return self._orders[name][1]

    def _unlabeled_batch(self, step: int) -> tuple[str, dict[str, torch.Tensor]]:
        """Step ``step``'s batch of unlabeled text: the sets in turn, each read in a seeded shuffled order pass
        after pass, this process's share of it."""
        from compressor.data.collate import pad_inputs
        from compressor.train.steps import rank_slice

        names = sorted(self.unlabeled)
        name = names[step % len(names)]
        feats = self.unlabeled[name]
        start = (step // len(names)) * self.batch_size
        idx = []
        for k in range(start, start + self.batch_size):
            n_pass, pos = divmod(k, len(feats))
            idx.append(self._order(name, n_pass)[pos])
        batch = pad_inputs([feats[i] for i in rank_slice(idx, self.rank, self.world)])
        return name, {k: v.to(self.device) for k, v in batch.items()}


def _transfer_within(config: KDConfig, student: MultiTaskModel, unlabeled: Mapping[str, Any]) -> KDConfig:
    """``config.transfer`` cut to what ``student`` has: a single-task student (or one with fewer tasks) keeps the
    transfer of its own heads from its own tasks and the text sets (the recipe checked every name)."""
    from dataclasses import replace

    kept = {}
    for head, sources in config.transfer.items():
        if head not in student.tasks:
            continue
        if sources != "all":
            sources = tuple(s for s in sources if s in student.tasks or s in unlabeled)
        if sources:
            kept[head] = sources
    return replace(config, transfer=kept)


# ---- from the recipe's options (the distill stage, prune recovery and search recovery share them) -------------
def kd_config(opts: Any) -> KDConfig:
    """The loss weights of a :class:`~compressor.recipe.DistillOptions`."""
    return KDConfig(alpha=opts.alpha, temperature=opts.temperature, logits=opts.weights.logits,
                    hidden=opts.weights.hidden, attention=opts.weights.attention, relation_heads=opts.relation_heads,
                    transfer={h: tuple(t) if t != "all" else "all" for h, t in opts.transfer.items()},
                    transfer_weight=opts.weights.transfer)


def train_options(opts: Any, **overrides: Any) -> TrainOptions:
    """The engine options of a :class:`~compressor.recipe.DistillOptions` (distill stage, prune or search
    recovery): its batch size, optimizer, schedule, sampling, precision and dropout; heads learn at the
    encoder's rate (they start from the teacher's, not from scratch), task losses are not re-weighted, every
    task keeps taking steps to the end, and the best epoch is kept whole (``head_selection: best_mean``). ``overrides``: epochs, max_steps, steps_per_epoch,
    early_stopping_patience, keep_best, eval_batch_size."""
    fields = {"batch_size": opts.batch_size, "lr": opts.lr, "head_lr": opts.lr, "weight_decay": opts.weight_decay,
              "warmup_ratio": opts.warmup_ratio, "optimizer": opts.optimizer, "momentum": opts.momentum,
              "grad_clip": opts.grad_clip, "dropout": opts.dropout, "sampling": opts.sampling,
              "word_table_int4": opts.word_table_int4,
              "mixed_precision": opts.mixed_precision, "loss_weighting": LossWeighting(strategy="uniform"),
              "head_selection": "best_mean", "per_task_stopping": False, "epochs": 1}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return TrainOptions.model_validate(fields)


def unlabeled_features(opts: Any, data: Any, tokenizer: Any, max_length: int) -> dict[str, list[dict[str, Any]]]:
    """The texts of every ``opts.unlabeled`` set (one per line, blank lines skipped, paths relative to the data
    root), tokenized as plain inputs. Raises DataError naming the file when it holds no text."""
    from compressor.data.readers import iter_lines
    from compressor.errors import DataError

    out = {}
    for name, spec in opts.unlabeled.items():
        path = data.resolve(spec.path, f"unlabeled.{name}")
        texts = [line.strip() for _, line in iter_lines(path, spec.encoding) if line.strip()][: spec.limit]
        if not texts:
            raise DataError(path, f"unlabeled.{name}: no text in the file (one text per line expected)")
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        out[name] = [{**{k: list(enc[k][i]) for k in keys}, "pad_id": tokenizer.pad_token_id or 0}
                     for i in range(len(texts))]
    return out


def recovery_engine(model: MultiTaskModel, teacher: MultiTaskModel, tokenizer: Any, data: Any, opts: Any, *,
                    steps: int, seed: int, layer_map: Mapping[int, int] | None = None,
                    teacher_cache: TeacherCache | None = None, label: str = "recovery") -> Engine:
    """An engine that distils ``model`` from ``teacher`` for ``steps`` steps in all with the options ``opts`` (a
    ``DistillOptions``): the recovery of a pruned model. ``engine.run(n)`` takes the next ``n`` of them."""
    objective = Distillation(model, teacher, kd_config(opts), layer_map=layer_map, teacher_cache=teacher_cache,
                             unlabeled=unlabeled_features(opts, data, tokenizer, data.max_length),
                             batch_size=opts.batch_size, seed=seed)
    cfg = train_options(opts, max_steps=steps, steps_per_epoch=steps)
    torch.manual_seed(seed)
    return build_engine(model, tokenizer, data, cfg, seed=seed, label=label, objective=objective)
