"""Per-task selection after joint training: which epoch each task head comes from.

Joint training ends with the weights of the epoch with the best mean dev metric (the shared encoder's epoch).
Tasks peak at different epochs, so during training each task's head is also kept from the epoch where that
task's own dev metric was best. At the end, for every task whose best epoch is not the encoder's, the head of its
own best epoch is tried on the chosen encoder and kept only when it scores better on dev (the task's metric,
averaged with every task that decodes over it, e.g. relations over entities); otherwise the encoder epoch's head
stays. The rule never makes a task worse on dev than the best-mean-epoch model, and the result says which epoch
each part came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from compressor.model.multitask import MultiTaskModel
from compressor.tasks import required_by


def head_state(model: MultiTaskModel, task: str) -> dict[str, torch.Tensor]:
    """A CPU copy of ``task``'s head weights, keyed as in the model's state dict."""
    prefix = f"heads.{task}."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def select_heads(model: MultiTaskModel, encoder_epoch: int, encoder_dev: Mapping[str, float],
                 best_heads: Mapping[str, tuple[int, dict[str, torch.Tensor]]],
                 score: Callable[[list[str]], dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Swap in each task's best-epoch head where that scores better on dev; ``model`` holds the encoder epoch's
    weights on entry and the chosen heads on return.

    ``encoder_dev``: the dev metric of every task at ``encoder_epoch`` (the model as it is on entry);
    ``best_heads``: task -> (its best epoch, its head weights then); ``score(tasks)``: dev metrics of ``tasks`` for
    the model as it is now. Returns, per task, the epoch its head came from, its dev metric, and what was tried.
    """
    current = dict(encoder_dev)
    chosen: dict[str, dict[str, Any]] = {t: {"head_epoch": encoder_epoch, "dev": current.get(t)} for t in model.tasks}
    for task, (epoch, weights) in best_heads.items():
        if task not in model.tasks or epoch == encoder_epoch or not weights or task not in current:
            continue
        affected = [t for t in required_by(model.tasks, task) if t in current]
        before = head_state(model, task)
        model.load_state_dict(weights, strict=False)
        trial = score(affected)
        gain = _mean_signed(model, trial, affected) - _mean_signed(model, current, affected)
        record = {"tried_epoch": epoch, "tried_dev": trial.get(task)}
        if gain > 0:
            current.update(trial)
            chosen[task].update(head_epoch=epoch, dev=trial.get(task), **record)
            for t in affected[1:]:
                chosen[t]["dev"] = trial.get(t)
        else:
            model.load_state_dict(before, strict=False)
            chosen[task].update(record)
    model.eval()
    return chosen


def _mean_signed(model: MultiTaskModel, values: Mapping[str, float], tasks: list[str]) -> float:
    signed = [values[t] if model.tasks[t].metric.higher_is_better else -values[t] for t in tasks if t in values]
    return sum(signed) / len(signed) if signed else 0.0
