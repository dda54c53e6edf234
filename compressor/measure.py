"""The one measuring room: wall-time percentiles, PyTorch and ONNX Runtime latency, dummy inputs, parameter and
size counts. Every latency in the reports, the benchmark and the search comes from :func:`time_calls` and
:func:`percentiles`, so p50/p95 mean the same thing everywhere.

Importing this module imports neither torch nor onnxruntime (the torch-free runtime uses it); the PyTorch
helpers import torch when called.
"""

from __future__ import annotations

import os
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


def time_calls(call: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] | None = None,
               min_seconds: float = 0.0) -> list[float]:
    """Wall time (ms) of ``runs`` calls of ``call`` after ``warmup`` untimed ones (``sync`` waits for a device);
    with ``min_seconds``, more calls until the timed ones span that long (a median over a window of seconds, not
    of a tenth of one, so a burst of other load on a shared machine moves a fast model's median less)."""
    times: list[float] = []
    i = 0
    while i < warmup + runs or sum(times) < 1000 * min_seconds:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        call()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
        i += 1
    return times


# ---- how loaded the machine was while measuring -------------------------------------------------------------
def cpu_times() -> tuple[float, float] | None:
    """``(busy, total)`` CPU time of the whole machine so far (all cores, in clock ticks) from ``/proc/stat``;
    None where there is no such file."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadWatch:
    """Measures, around a latency measurement, how many cores other processes kept busy. ``warning`` is a
    sentence when they competed for the cores the measurement used (``threads``; None: all), else None.

    A machine with ``n`` cores where others use ``o`` cores leaves ``n - o``; the measurement is suspect when
    ``o`` is at least half a core and ``n - o`` is fewer than the cores it used.
    """

    def __init__(self, threads: int | None = None):
        self.cores = os.cpu_count() or 1
        self.threads = min(int(threads), self.cores) if threads else self.cores
        self.warning: str | None = None
        self.others: float | None = None

    def __enter__(self) -> LoadWatch:
        self._stat, self._own, self._wall = cpu_times(), _own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        stat, own, wall = cpu_times(), _own_cpu(), time.perf_counter()
        elapsed = wall - self._wall
        if elapsed <= 0:
            return
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if stat is not None and self._stat is not None and stat[1] > self._stat[1]:
            busy_cores = (stat[0] - self._stat[0]) / (stat[1] - self._stat[1]) * self.cores
            others = busy_cores - (own - self._own) / elapsed
        elif load is not None:
            others = load - self.threads  # the load average counts this process's busy threads too
        else:
            return
        self.others = max(0.0, others)
        self.warning = load_warning(self.others, self.cores, self.threads, load)


def load_warning(others: float, cores: int, threads: int, load: float | None = None) -> str | None:
    """The sentence written beside latencies measured while other processes kept ``others`` of ``cores`` cores
    busy and the measurement used ``threads``; None when they did not compete."""
    if others < 0.5 or cores - others >= threads:
        return None
    avg = f", load average {load:.1f}" if load is not None else ""
    return (f"measured on a loaded machine: other processes kept {others:.1f} of {cores} CPU core(s) busy{avg} "
            f"while the measurement used {threads}; these latencies may be inflated")


def ort_latency_ms(session: Any, feeds: Mapping[str, np.ndarray], runs: int = 30, warmup: int = 5,
                   threads: int | None = None, min_seconds: float = 0.0) -> dict[str, Any]:
    """Median and p95 wall time (ms) of one ``session.run`` of every output (at least ``runs`` runs spanning at
    least ``min_seconds``), with ``load_warning`` when other processes competed for the cores
    (:class:`LoadWatch`; ``threads``: the session's intra-op threads)."""
    feeds = dict(feeds)
    if threads is None:
        try:
            threads = int(session.get_session_options().intra_op_num_threads) or None
        except Exception:  # noqa: BLE001 - a stand-in session without options
            threads = None
    with LoadWatch(threads) as watch:
        out: dict[str, Any] = percentiles(time_calls(lambda: session.run(None, feeds), runs, warmup,
                                                     min_seconds=min_seconds))
    if watch.warning:
        out["load_warning"] = watch.warning
    return out


def torch_latency_ms(model: MultiTaskModel, task: str, seq_len: int = 128, runs: int = 30, warmup: int = 5,
                     batch: int = 1) -> dict[str, Any]:
    """Median and p95 wall time (ms) of one forward pass of ``task`` (eval mode, no grad, full-length input),
    with ``load_warning`` when other processes competed for torch's threads (:class:`LoadWatch`)."""
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in dummy_inputs(model, task, batch, seq_len).items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    with torch.inference_mode(), LoadWatch(torch.get_num_threads() if device.type == "cpu" else 1) as watch:
        times = time_calls(lambda: model.forward_batch(task, inputs), runs, warmup, sync)
    model.train(was_training)
    out: dict[str, Any] = percentiles(times)
    if watch.warning:
        out["load_warning"] = watch.warning
    return out


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
