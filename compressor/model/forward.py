"""Running a multi-task model: the autocast rule and a numpy ``Forward`` for task evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from compressor.model.multitask import MultiTaskModel
from compressor.tasks import Forward


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (x86) or the BF16 extension (Arm). Elsewhere bf16 autocast is emulated and many times slower than fp32
    (measured some 40x per training step on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None and probe() for probe in probes):
        return True
    try:  # Arm (and an x86 torch without the probes): the kernel's CPU flags
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def use_bf16(setting: str, device: torch.device) -> bool:
    """The recipes' ``mixed_precision`` rule: ``auto`` bf16 on CUDA only; ``bf16`` wherever the device computes
    bf16 natively (:func:`native_bf16`), fp32 elsewhere (see :func:`precision_note`); ``no`` never."""
    if setting == "bf16":
        return native_bf16(device)
    return setting == "auto" and device.type == "cuda"


def precision_note(setting: str, device: torch.device) -> str | None:
    """What the run should be told when ``mixed_precision: bf16`` falls back to fp32 on ``device``."""
    if setting != "bf16" or native_bf16(device):
        return None
    return (f"mixed_precision bf16 asked, but this {device.type.upper()} has no native bf16 (AVX512-BF16, AMX or "
            "Arm BF16): training in fp32, since emulated bf16 is many times slower")


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
