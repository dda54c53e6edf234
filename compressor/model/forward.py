"""Running a multi-task model: the autocast rule and a numpy ``Forward`` for task evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from compressor.model.multitask import MultiTaskModel
from compressor.tasks import Forward


def use_bf16(setting: str, device: torch.device) -> bool:
    """The recipes' ``mixed_precision`` rule: ``bf16`` on any device, ``auto`` on CUDA only, ``no`` never."""
    return setting == "bf16" or (setting == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool = True, *, cpu: bool = False):
    """bf16 autocast on CUDA; on the CPU only when ``cpu`` (a training choice: evaluation stays fp32 and exact)."""
    if enabled and (device.type == "cuda" or cpu):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def torch_forward(model: MultiTaskModel, device: torch.device | str | None = None) -> Forward:
    """A ``Forward`` over a PyTorch model: numpy batch in, float32 numpy outputs out."""
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def forward(task: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
        with torch.no_grad(), autocast(device):
            out = model.forward_batch(task, tensors).outputs
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    return forward


def dev_metrics(model: MultiTaskModel, tokenizer: Any, data: Any, tasks: Sequence[str], max_length: int,
                batch_size: int = 64, predictions: dict[str, list[Any]] | None = None) -> dict[str, float]:
    """Primary dev metric of every task in ``tasks`` that has a dev split (``data``: a ``DataStore``); the model is
    left in eval mode. ``predictions``, given, receives each task's predictions (one per dev example)."""
    model.eval()
    forward = torch_forward(model)
    out: dict[str, float] = {}
    for name in tasks:
        if not data.has(name, "dev"):
            continue
        plugin = model.tasks[name]
        encoded = data.encoded(name, "dev", tokenizer, max_length)
        with torch.no_grad():
            metrics, preds = plugin.evaluate(forward, encoded, data.examples(name, "dev"), batch_size)
        out[name] = float(metrics[plugin.metric.name])
        if predictions is not None:
            predictions[name] = preds
    return out
