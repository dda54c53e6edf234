"""The parts the training loop is assembled from: the DDP step module, freezing and dropout, the optimizer's
parameter groups, the schedule and the progress bar."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from compressor.errors import TrainingError
from compressor.model.architecture import encoder_layers
from compressor.model.multitask import MultiTaskModel
from compressor.train.options import TrainOptions
from compressor.train.weighting import LossWeighter


INDEX_KEY = "feature_index"  # under an objective that wants it: the batch tensor of each row's feature index


class Objective(Protocol):
    """What a training step minimises, when it is not the task loss: e.g. knowledge distillation
    (:class:`compressor.distill.objective.Distillation`).

    ``module``: trainable parameters of the objective itself (e.g. hidden-state projections), trained, synced
    across processes and checkpointed with the model; None when it has none. ``wants_index``: batches carry
    the indices of their features (key ``feature_index``), e.g. for a cache of the teacher's outputs.
    ``prepare`` runs once before the first step, with every task's training features and the run's accelerate
    ``Accelerator`` (its device, autocast and processes). ``__call__`` returns the named, detached parts of the
    loss on one batch plus ``loss`` (to back-propagate). An objective may also define ``at_step(steps_done)``,
    called before each optimizer step with the schedule steps done so far.
    """

    module: nn.Module | None
    wants_index: bool

    def prepare(self, features: Mapping[str, list[Any]], collate: Mapping[str, Callable[..., Any]],
                accelerator: Any) -> None: ...

    def __call__(self, model: MultiTaskModel, task: str,
                 batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class StepModule(nn.Module):
    """Model + loss weighter (+ the objective's own parameters) as one module, so DDP syncs them together.

    ``forward`` returns the task's loss (for the logs), the loss to back-propagate and, under an objective, its
    named parts (detached) for the logs."""

    def __init__(self, model: MultiTaskModel, weighter: LossWeighter, objective: Objective | None = None):
        super().__init__()
        self.model = model
        self.weighter = weighter
        if objective is not None and objective.module is not None:
            self.objective_module = objective.module
        self._objective = [objective]  # a plain list: the objective (its teachers) is not part of this module

    @property
    def objective(self) -> Objective | None:
        return self._objective[0]

    def forward(self, task: str, batch: Mapping[str, torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.objective is not None:
            parts = self.objective(self.model, task, batch)
            loss = parts["loss"]
            return loss.detach(), self.weighter.weighted(task, loss), {k: v for k, v in parts.items() if k != "loss"}
        out = self.model.forward_batch(task, batch)
        loss = self.model.tasks[task].loss(out.outputs, batch)
        return loss, self.weighter.weighted(task, loss), None


_DROPOUT_ATTRS = ("dropout_prob", "attention_dropout")  # float rates HF attention passes to SDPA / eager kernels


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of ``model`` to ``p`` while it trains: each ``nn.Dropout`` and the float attention-dropout
    rates that Hugging Face attention modules hand to their kernels (BERT's SDPA path reads ``dropout_prob``, not
    an ``nn.Dropout``). Weights and the saved config are untouched."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)


def snap_word_table(model: MultiTaskModel, block_size: int) -> None:
    """Put the word-embedding table on the INT4 grid of the quantize stage's ``embedding: int4_block`` (the very
    function the export uses, so quantizing it again is exact) and freeze it."""
    from compressor.export.embedding_rows import check_int4_block_size, int4_blocks

    check_int4_block_size(block_size)
    table = model.encoder.get_input_embeddings().weight
    w = table.detach().float().cpu().numpy()
    _, _, snapped = int4_blocks(w, block_size)
    with torch.no_grad():
        table.copy_(torch.from_numpy(snapped).to(table.device, table.dtype))
    table.requires_grad_(False)


def configure(model: MultiTaskModel, cfg: TrainOptions) -> None:
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if cfg.freeze_embeddings:
        for p in model.encoder.embeddings.parameters():
            p.requires_grad_(False)
    if cfg.word_table_int4 is not None:
        snap_word_table(model, cfg.word_table_int4)
    if cfg.freeze_layers:
        layers = encoder_layers(model.encoder)
        if cfg.freeze_layers > len(layers):
            raise TrainingError(f"freeze_layers={cfg.freeze_layers} but the encoder has {len(layers)} layers")
        for layer in layers[: cfg.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def build_optimizer(model: MultiTaskModel, weighter: LossWeighter, cfg: TrainOptions,
                    extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD): the encoder at ``lr``, the heads at ``head_lr``, no weight decay on biases and LayerNorms;
    ``extra`` (an objective's own parameters) at ``lr``."""
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    named = list(model.named_parameters()) + (list(extra.named_parameters()) if extra is not None else [])
    for name, p in named:
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
    # the fused kernel updates every parameter in one pass: on a 2-core CPU it took an AdamW step of the MiniLM
    # encoder from 2.0 s to 0.27 s (the per-tensor loop torch uses on the CPU by default)
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)


def schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def fmt(d: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in d.items()) or "-"


class ProgressBar:
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
