"""The one measuring room: wall-time percentiles, PyTorch and ONNX Runtime latency, dummy inputs, parameter and
size counts. Every latency in the reports, the benchmark and the search comes from :func:`time_calls` and
:func:`percentiles`, so p50/p95 mean the same thing everywhere.

Importing this module imports neither torch nor onnxruntime (the torch-free runtime uses it); the PyTorch
helpers import torch when called.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from compressor.model.multitask import MultiTaskModel


def percentiles(times: Sequence[float]) -> dict[str, float]:
    """Median and p95 (nearest rank) of wall times in ms."""
    ordered = sorted(times)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def time_calls(call: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall time (ms) of ``runs`` calls of ``call`` after ``warmup`` untimed ones (``sync`` waits for a device)."""
    times = []
    for i in range(warmup + runs):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        call()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return times


def ort_latency_ms(session: Any, feeds: Mapping[str, np.ndarray], runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median and p95 wall time (ms) of one ``session.run`` of every output."""
    feeds = dict(feeds)
    return percentiles(time_calls(lambda: session.run(None, feeds), runs, warmup))


def torch_latency_ms(model: MultiTaskModel, task: str, seq_len: int = 128, runs: int = 30, warmup: int = 5,
                     batch: int = 1) -> dict[str, float]:
    """Median and p95 wall time (ms) of one forward pass of ``task`` (eval mode, no grad, full-length input)."""
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in dummy_inputs(model, task, batch, seq_len).items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        times = time_calls(lambda: model.forward_batch(task, inputs), runs, warmup, sync)
    model.train(was_training)
    return percentiles(times)


def dummy_tokens(vocab_size: int, seq_len: int, batch: int = 1) -> dict[str, np.ndarray]:
    """The one dummy-input rule: full-length rows (no padding) of real token ids from the vocabulary (above
    the special and unused ids when the vocabulary is large), segment 0."""
    rng = np.random.default_rng(0)
    low = 1000 if vocab_size > 2000 else 1
    return {
        "input_ids": rng.integers(low, vocab_size, (batch, seq_len), dtype=np.int64),
        "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64),
    }


def dummy_inputs(model: MultiTaskModel, task: str, batch: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """Torch inputs of a full-length batch for ``task``: :func:`dummy_tokens` plus the task's extra inputs."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = model.encoder.get_input_embeddings().num_embeddings
    inputs = {k: torch.from_numpy(v) for k, v in dummy_tokens(vocab, seq_len, batch).items()}
    for spec in model.tasks[task].onnx_inputs():
        shape = (batch, *spec.example_shape)
        if spec.dtype.startswith("int"):
            inputs[spec.name] = torch.randint(0, min(seq_len, 8), shape, generator=g).sort(dim=-1).values
        elif spec.dtype == "bool":
            inputs[spec.name] = torch.ones(shape, dtype=torch.bool)
        else:
            inputs[spec.name] = torch.rand(shape, generator=g)
    return inputs


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def task_parameters(model: MultiTaskModel, task: str) -> int:
    """Parameters that serve one task: the shared encoder plus that task's head."""
    return count_parameters(model.encoder) + count_parameters(model.heads[task])


def size_bytes(path: Path | str) -> int:
    """Bytes on disk of a file, or of every file below a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_threads() -> dict[str, Any]:
    import torch

    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
