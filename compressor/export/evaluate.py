"""Task metrics, size and latency of an ONNX graph through ONNX Runtime, as report rows.

Rows have the keys of ``compressor.report.evaluate.evaluate_rows`` plus ``threads`` (ORT intra-op threads),
``latency_batch`` and ``latency_seq_len``. Latency is one ``session.run`` of the whole multi-head graph (every
task's outputs) at batch 1 and the report's sequence length, on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.measure import ort_latency_ms
from compressor.runtime.session import OrtForward, build_feeds, latency_inputs, make_session
from compressor.runtime.spec import GraphSpec
from compressor.tasks import TaskPlugin


def evaluate_split(forward: OrtForward, plugins: Mapping[str, TaskPlugin], data: Any, tokenizer: Any,
                   max_length: int, split: str, tasks: Sequence[str] | None = None, batch_size: int = 64,
                   predictions: dict[str, list[Any]] | None = None) -> dict[str, dict[str, float]]:
    """{task: metrics} on one split for every task that has it; ``predictions``, given, receives each task's
    predictions (one per example)."""
    out: dict[str, dict[str, float]] = {}
    for name in tasks or list(plugins):
        if not data.has(name, split):
            continue
        encoded = data.encoded(name, split, tokenizer, max_length)
        metrics, preds = plugins[name].evaluate(forward, encoded, data.examples(name, split), batch_size)
        out[name] = {k: float(v) for k, v in metrics.items()}
        if predictions is not None:
            predictions[name] = preds
    return out


def onnx_rows(path: Path, spec: GraphSpec, plugins: Mapping[str, TaskPlugin], data: Any, tokenizer: Any, *,
              label: str, stage: str, fmt: str, report: Any, threads: int | None,
              splits: Sequence[str] | None = None, batch_size: int = 64,
              extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (task, split) of the graph at ``path`` (metrics, params, size on disk, ORT latency); ``splits``
    default: every split an evaluation scores (dev, test and each task's extra test sets)."""
    from compressor.export.onnx_export import onnx_param_count
    from compressor.report.rows import make_row

    path = Path(path)
    session = make_session(path, threads)
    forward = OrtForward(session, spec)
    lat = None
    if report.latency:
        feeds = latency_inputs(spec, int(spec.metadata.get("vocab_size", 30522)), report.latency_seq_len)
        lat = ort_latency_ms(session, feeds, report.latency_runs, report.latency_warmup)
    params = onnx_param_count(path)
    size = path.stat().st_size
    rows = []
    if splits is None:
        splits = list(dict.fromkeys(s for name in plugins if name in data.tasks for s in data.eval_splits(name)))
    for split in splits:
        for name, metrics in evaluate_split(forward, plugins, data, tokenizer, spec.max_length, split,
                                            batch_size=batch_size).items():
            rows.append(make_row(
                label, stage, name, split, plugins[name].metric.name, metrics, params=params,
                task_params=spec.metadata.get("task_params", {}).get(name), size_bytes=size, latency=lat, fmt=fmt,
                threads=threads, latency_batch=1, latency_seq_len=report.latency_seq_len if lat else None,
                **(extra or {})))
    return rows


def calibration_feeds(spec: GraphSpec, plugins: Mapping[str, TaskPlugin], data: Any, tokenizer: Any,
                      split: str = "train", samples: int = 64, batch_size: int = 8,
                      fallback_splits: Sequence[str] = ("dev", "test")) -> list[dict[str, np.ndarray]]:
    """Graph feeds of up to ``samples`` features per task (``split``, else the first fallback split it has)."""
    out: list[dict[str, np.ndarray]] = []
    for name, plugin in plugins.items():
        use = next((s for s in (split, *fallback_splits) if data.has(name, s)), None)
        if use is None:
            continue
        features = data.encoded(name, use, tokenizer, spec.max_length).features
        features = features[:: max(1, len(features) // samples)][:samples]  # spread over the split
        for start in range(0, len(features), batch_size):
            batch = {k: v.numpy() for k, v in plugin.collate(features[start : start + batch_size]).items()}
            out.append(build_feeds(spec, batch, [name]))
    return out


def bundle_plugins(spec: GraphSpec, source: Path) -> dict[str, TaskPlugin]:
    """The task plugins of a bundle's ``tasks.json`` (plugin, labels and options of each task), bound to each
    other as the run's plugins were; ``source`` names errors."""
    from compressor.errors import CompressorError, ModelDirError
    from compressor.tasks import build_task

    tasks: dict[str, TaskPlugin] = {}
    for name, graph in spec.tasks.items():
        try:
            tasks[name] = build_task(graph.plugin, name, graph.labels, graph.options)
        except CompressorError as exc:
            raise ModelDirError(f"{source}: task '{name}': {exc}") from exc
    for task in tasks.values():
        task.bind(tasks)
    return tasks


def bundle_tokenizer(directory: Path, pad_id: int) -> Any:
    """The bundle's ``tokenizer.json`` as a transformers fast tokenizer (what the plugins encode with); the
    bundle's ``tokenizer_config.json``, where there is one, sets its special tokens as the model directory's did."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=backend.id_to_token(int(pad_id)))


def evaluate_bundle(directory: Path, task: str, data: Path, fmt: str | None = None, encoding: str | None = None,
                    batch_size: int = 64, threads: int | None = None) -> dict[str, Any]:
    """Score an edge bundle's ``model.onnx`` on one data file of ``task`` the way the run report scores a graph
    (:func:`onnx_rows`): the task's plugin reads and encodes the examples, ONNX Runtime runs the graph, the plugin
    decodes and scores. ``batch_size`` matches the stage's ``eval_batch_size`` (64 by default): dynamic INT8
    quantizes each batch with its own scale, so other batch sizes can move the last digits.

    Raises:
        BundleError: the bundle does not load (missing or inconsistent files) or has no task ``task``.
        DataError: the data file is missing, malformed or empty.
    """
    import difflib

    from compressor.data.store import read_split
    from compressor.errors import DataError
    from compressor.runtime import Bundle, BundleError

    bundle = Bundle.load(directory, threads=threads)  # checks the three files against each other
    spec = bundle.spec
    if task not in spec.tasks:
        close = difflib.get_close_matches(task, list(spec.tasks), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"it has: {', '.join(spec.tasks)}"
        raise BundleError(f"{directory}: no task '{task}'; {hint}")
    data = Path(data)
    if not data.is_file():
        raise DataError(data, "data file not found")
    plugins = bundle_plugins(spec, Path(directory) / "tasks.json")
    plugin = plugins[task]
    examples = read_split(plugin, data, fmt, encoding)
    if not examples:
        raise DataError(data, "no examples")
    encoded = plugin.encode(examples, bundle_tokenizer(directory, bundle.pad_id), spec.max_length, False)
    metrics, _ = plugin.evaluate(OrtForward(bundle.session, spec), encoded, examples, batch_size)
    return {"task": task, "examples": len(examples), "truncated": encoded.truncated, "metric": plugin.metric.name,
            "value": float(metrics[plugin.metric.name]), "metrics": {k: float(v) for k, v in metrics.items()},
            "runtime": "onnxruntime", "format": spec.metadata.get("format", "onnx"), "batch_size": batch_size}
