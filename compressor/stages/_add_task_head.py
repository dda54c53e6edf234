"""Training the ``add_task`` stage's new head on the frozen shared encoder.

Split out of :mod:`compressor.stages.add_task`, which re-exports :func:`train_head`.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from compressor.errors import DataError, TrainingError
from compressor.recipe import AddTaskStage


def train_head(model: Any, tokenizer: Any, data: Any, cfg: AddTaskStage, max_length: int,
               seed: int) -> list[dict[str, Any]]:
    """Train ``model.heads[cfg.task]`` (the only parameters with ``requires_grad``) on the task's training split;
    the model ends with the head of the best dev epoch (the last epoch without a dev split). Per-epoch history."""
    task = cfg.task
    head = model.heads[task]
    features = data.encoded(task, "train", tokenizer, max_length, train=True).features
    if not features:
        raise DataError(data.path(task, "train"), f"task '{task}': no training features after encoding")
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = cfg.steps or per_epoch * cfg.epochs
    epochs = math.ceil(total / per_epoch)
    optimizer, scheduler = _optimizer(head, cfg, total)
    has_dev = data.has(task, "dev")
    rng = random.Random(seed)
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] | None = None
    bad = 0
    step = 0
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        order = list(range(len(features)))
        rng.shuffle(order)
        losses, step = _train_epoch(model, features, order, cfg, optimizer, scheduler, step, total, epoch)
        model.eval()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": sum(losses) / max(1, len(losses)), "steps": len(losses),
                                  "wall_s": round(time.perf_counter() - tic, 2)}
        score = _dev_score(model, tokenizer, data, cfg, max_length, record) if has_dev else None
        history.append(record)
        if score is None or best is None or score > best[0]:
            best = (score if score is not None else -math.inf,
                    {k: v.detach().clone() for k, v in head.state_dict().items()})
            bad = 0
        else:
            bad += 1
            if cfg.early_stopping_patience and bad >= cfg.early_stopping_patience:
                break
        if step >= total:
            break
    if best is not None and has_dev:
        head.load_state_dict(best[1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return history


def _optimizer(head: Any, cfg: AddTaskStage, total: int) -> tuple[Any, Any]:
    """AdamW over the head (no weight decay on biases and LayerNorm) and its linear warmup / decay schedule."""
    import torch

    decay = [p for n, p in head.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    plain = [p for n, p in head.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = math.ceil(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else
                                                  max(0.0, (total - s) / max(1, total - warmup)))
    return optimizer, scheduler


def _train_epoch(model: Any, features: list[Any], order: list[int], cfg: AddTaskStage, optimizer: Any,
                 scheduler: Any, step: int, total: int, epoch: int) -> tuple[list[float], int]:
    """One epoch over ``order`` (stopping at ``total`` steps); returns the batch losses and the step reached."""
    import torch

    task = cfg.task
    plugin, head = model.tasks[task], model.heads[task]
    model.eval()  # the frozen encoder runs as at inference (no dropout); only the head trains
    head.train()
    losses = []
    for start in range(0, len(order), cfg.batch_size):
        if step >= total:
            break
        batch = plugin.collate([features[i] for i in order[start : start + cfg.batch_size]])
        loss = plugin.loss(model.forward_batch(task, batch).outputs, batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"task '{task}': the loss is {float(loss)} at epoch {epoch}; lower the add_task "
                                f"lr ({cfg.lr:g})")
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
    return losses, step


def _dev_score(model: Any, tokenizer: Any, data: Any, cfg: AddTaskStage, max_length: int,
               record: dict[str, Any]) -> float:
    """The task's dev metric, put into the epoch's ``record``; returned signed so that higher is better."""
    from compressor.model.forward import torch_forward

    task = cfg.task
    plugin = model.tasks[task]
    metrics, _ = plugin.evaluate(torch_forward(model), data.encoded(task, "dev", tokenizer, max_length),
                                 data.examples(task, "dev"), cfg.eval_batch_size)
    value = float(metrics[plugin.metric.name])
    record["dev"] = value
    return value if plugin.metric.higher_is_better else -value
