"""Latency and throughput of one candidate at one thread count, on dummy and on real test inputs.

Every timing is one ``run(None, feeds)`` (every task's outputs). Keys, with ``T`` the thread count:

* ``latency_seq_p50_ms_tT`` / ``latency_seq_p95_ms_tT``: batch 1, ``seq_len`` dummy tokens, ``runs`` timed runs;
* ``throughput_seq_tT``: examples/s at batch ``batch`` on ``seq_len`` dummy tokens (median batch time);
* ``latency_real_p50_ms_tT`` / ``latency_real_p95_ms_tT``: batch 1 over the task's first test features, each
  at its own length, each timed once after a short warm-up;
* ``throughput_real_tT``: examples/s over the same features in batches of ``batch`` (padded per batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compressor.measure import ort_latency_ms, percentiles, time_calls
from compressor.runtime.session import build_feeds, latency_inputs
from compressor.runtime.spec import GraphSpec

if TYPE_CHECKING:
    from compressor.bench.candidates import Candidate, TaskInputs

MODEL_KEYS = ("latency_seq_p50_ms", "latency_seq_p95_ms", "throughput_seq")
TASK_KEYS = ("latency_real_p50_ms", "latency_real_p95_ms", "throughput_real")


@dataclass(frozen=True)
class Settings:
    threads: tuple[int, ...]
    batch: int = 32
    runs: int = 20
    seq_len: int = 128
    samples: int = 100
    #: the batch-1 latency is the median of at least ``runs`` runs spanning at least this long
    min_seconds: float = 3.0

    @property
    def warmup(self) -> int:
        return max(1, min(5, self.runs // 4))

    @property
    def batch_runs(self) -> int:
        """Timed runs at batch ``batch`` (each costs ``batch`` single runs)."""
        return max(2, self.runs // 4)


def key(name: str, threads: int) -> str:
    return f"{name}_t{threads}"


def task_feeds(spec: GraphSpec, batch: Mapping[str, np.ndarray], task: str, vocab_size: int) -> dict[str, np.ndarray]:
    """Feeds for a graph from a task's batch. A graph without ``task`` (another single-task model) gets the same
    tokens and lengths, ids clipped into its vocabulary and placeholders for its own extra inputs."""
    if task in spec.tasks:
        return build_feeds(spec, batch, [task])
    clipped = dict(batch)
    clipped["input_ids"] = np.minimum(np.asarray(batch["input_ids"]), vocab_size - 1)
    return build_feeds(spec, clipped, [])


def time_each(runner: Any, feeds: Sequence[Mapping[str, np.ndarray]], warmup: int) -> list[float]:
    """Wall time (ms) of one run per feeds, after ``warmup`` untimed runs of the first ones."""
    for f in list(feeds)[:warmup]:
        runner.run(None, dict(f))
    return [t for f in feeds for t in time_calls(lambda f=f: runner.run(None, dict(f)), runs=1, warmup=0)]


def model_timings(runner: Any, spec: GraphSpec, vocab_size: int, threads: int, settings: Settings) -> dict[str, float]:
    """Dummy-input latency at batch 1 and throughput at batch ``settings.batch``."""
    one = ort_latency_ms(runner, latency_inputs(spec, vocab_size, settings.seq_len, 1), settings.runs,
                         settings.warmup, min_seconds=settings.min_seconds)
    many = ort_latency_ms(runner, latency_inputs(spec, vocab_size, settings.seq_len, settings.batch),
                          settings.batch_runs, 1)
    return {key("latency_seq_p50_ms", threads): one["p50"], key("latency_seq_p95_ms", threads): one["p95"],
            key("throughput_seq", threads): settings.batch * 1000.0 / many["p50"]}


def real_timings(runner: Any, spec: GraphSpec, vocab_size: int, task: str, ones: Sequence[Mapping[str, np.ndarray]],
                 batches: Sequence[Mapping[str, np.ndarray]], threads: int,
                 settings: Settings) -> dict[str, float | None]:
    """Latency over real batch-1 inputs of ``task`` and throughput over its real batches."""
    out: dict[str, float | None] = {key(k, threads): None for k in TASK_KEYS}
    if ones:
        feeds = [task_feeds(spec, b, task, vocab_size) for b in ones]
        lat = percentiles(time_each(runner, feeds, min(settings.warmup, len(feeds))))
        out[key("latency_real_p50_ms", threads)] = lat["p50"]
        out[key("latency_real_p95_ms", threads)] = lat["p95"]
    if batches:
        feeds = [task_feeds(spec, b, task, vocab_size) for b in batches]
        times = time_each(runner, feeds, 1)
        n = sum(int(np.asarray(b["input_ids"]).shape[0]) for b in batches)
        out[key("throughput_real", threads)] = n * 1000.0 / sum(times)
    return out


def combine(parts: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Serving every task with several models: latencies add up, so do per-example times (throughputs combine
    as ``1 / sum(1 / x)``). ``None`` when any part lacks the value."""
    out: dict[str, float | None] = {}
    for k in parts[0]:
        values = [p.get(k) for p in parts]
        if any(v is None for v in values):
            out[k] = None
        elif k.startswith("throughput"):
            out[k] = 1.0 / sum(1.0 / v for v in values)  # type: ignore[operator]
        else:
            out[k] = float(sum(values))  # type: ignore[arg-type]
    return out


# ---- one candidate, every measurement; the single-task models together -----------------------------------
def measure_candidate(cand: Candidate, inputs: dict[str, TaskInputs], settings: Settings, eval_threads: int) -> dict[str, Any]:
    """Metrics on the candidate's scored tasks (default: every task of ``inputs`` it has) and timings at every
    thread count: dummy-input ones, and real-input ones on every task of ``inputs``. The per-example predictions
    are under ``"predictions"`` ({task: list}, for the paired bootstrap; not written to the report)."""
    scored = [t for t in (cand.scored or inputs) if t in cand.plugins and t in inputs]
    tasks: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[Any]] = {}
    for t in scored:
        metrics, predictions[t] = cand.evaluate(t, inputs[t], eval_threads)
        metric = cand.plugins[t].metric
        tasks[t] = {"split": inputs[t].split, "metric": metric.name, "higher_is_better": metric.higher_is_better,
                    "value": metrics[metric.name], "metrics": metrics}
    timings: dict[str, Any] = {}
    real: dict[str, dict[str, Any]] = {t: {} for t in inputs}
    for threads in settings.threads:
        with cand.runner(threads) as runner:
            timings.update(model_timings(runner, cand.spec, cand.vocab_size, threads, settings))
            for t, ti in inputs.items():
                real[t].update(real_timings(runner, cand.spec, cand.vocab_size, t, ti.ones, ti.batches, threads,
                                            settings))
    for t, ti in inputs.items():
        if t in tasks:
            tasks[t].update({"real_n": len(ti.ones), "real_mean_length": ti.mean_length, "timings": real[t]})
    return {"label": cand.label, "format": cand.format, "size_bytes": cand.size_bytes, "params": cand.params,
            "integer_matmuls": cand.integer_matmuls, "source": cand.source or str(cand.path), "notes": cand.notes,
            "timings": timings, "tasks": tasks, "real_timings": real, "predictions": predictions,
            "real_inputs": {t: {"n": len(ti.ones), "mean_length": ti.mean_length} for t, ti in inputs.items()}}


def combine_singles(cands: Sequence[Candidate], parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Row (d): the single-task models together (sizes, parameters and latencies summed)."""
    tasks: dict[str, dict[str, Any]] = {}
    for part in parts:
        for t, entry in part["tasks"].items():
            tasks[t] = {**entry, "timings": combine([p["real_timings"][t] for p in parts])}
    ints = [c.integer_matmuls for c in cands]
    return {
        "label": f"{len(cands)} single-task student(s)", "format": "+".join(dict.fromkeys(c.format for c in cands)),
        "size_bytes": sum(p["size_bytes"] for p in parts), "params": sum(p["params"] for p in parts),
        "integer_matmuls": None if any(i is None for i in ints) else sum(ints),  # type: ignore[arg-type]
        "source": ", ".join(p["source"] for p in parts), "notes": [],
        "timings": combine([p["timings"] for p in parts]), "tasks": tasks,
        "predictions": {t: preds for p in parts for t, preds in p.get("predictions", {}).items()},
        "parts": [{k: p[k] for k in ("label", "format", "size_bytes", "params", "source", "timings")} for p in parts],
    }
