"""Measurements of a PyTorch model: parameters, latency, and a numpy forward for task evaluation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from compressor.model.multitask import MultiTaskModel
from compressor.tasks import Forward


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing on CPU (fp32 is faster and exact there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
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


def dummy_inputs(model: MultiTaskModel, task: str, batch: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """Inputs of a full-length batch for ``task`` (real token ids from the vocabulary, no padding)."""
    g = torch.Generator().manual_seed(0)
    vocab = model.encoder.get_input_embeddings().num_embeddings
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq_len), generator=g),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq_len, dtype=torch.long),
    }
    for spec in model.tasks[task].onnx_inputs():
        shape = (batch, *spec.example_shape)
        if spec.dtype.startswith("int"):
            inputs[spec.name] = torch.randint(0, min(seq_len, 8), shape, generator=g).sort(dim=-1).values
        elif spec.dtype == "bool":
            inputs[spec.name] = torch.ones(shape, dtype=torch.bool)
        else:
            inputs[spec.name] = torch.rand(shape, generator=g)
    return inputs


def latency_ms(model: MultiTaskModel, task: str, seq_len: int = 128, runs: int = 30, warmup: int = 5,
               batch: int = 1) -> dict[str, float]:
    """Median and p95 wall time of one forward pass of ``task`` (CPU, eval mode, no grad)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in dummy_inputs(model, task, batch, seq_len).items()}
    was_training = model.training
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.forward_batch(task, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    model.train(was_training)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))]}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def task_parameters(model: MultiTaskModel, task: str) -> int:
    """Parameters that serve one task: the shared encoder plus that task's head."""
    return count_parameters(model.encoder) + count_parameters(model.heads[task])


def describe_threads() -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
