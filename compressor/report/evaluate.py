"""Evaluate a PyTorch multi-task model on every task and split of a run and turn it into report rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compressor.data.store import DataStore
from compressor.measure import count_parameters, task_parameters, torch_latency_ms
from compressor.model.forward import torch_forward
from compressor.model.io import weights_size
from compressor.model.multitask import MultiTaskModel
from compressor.recipe import ReportSpec
from compressor.report.rows import make_row


def evaluate_rows(
    model: MultiTaskModel,
    tokenizer: Any,
    data: DataStore,
    *,
    label: str,
    stage: str,
    splits: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    model_dir: Path | None = None,
    report: ReportSpec | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One row per (task, split) with the task's primary metric, size, parameters and CPU latency; ``splits``
    default: every split an evaluation scores (dev, test and the task's extra test sets)."""
    report = report or ReportSpec()
    max_length = data.max_length
    forward = torch_forward(model)
    params = count_parameters(model)
    size = weights_size(model_dir) if model_dir is not None else None
    rows = []
    for name in tasks or list(model.tasks):
        plugin = model.tasks[name]
        lat = None
        if report.latency:
            lat = _cpu_latency(model, name, report)
        for split in splits or data.eval_splits(name):
            if not data.has(name, split):
                continue
            encoded = data.encoded(name, split, tokenizer, max_length)
            model.eval()
            metrics, _ = plugin.evaluate(forward, encoded, data.examples(name, split), batch_size)
            rows.append(make_row(label, stage, name, split, plugin.metric.name, metrics, params=params,
                                 task_params=task_parameters(model, name), size_bytes=size, latency=lat,
                                 fmt="pytorch"))
    return rows


def _cpu_latency(model: MultiTaskModel, task: str, report: ReportSpec) -> dict[str, float]:
    """Latency is always measured on the CPU in fp32, so numbers from GPU-trained runs stay comparable."""
    device = next(model.parameters()).device
    threads = torch.get_num_threads()
    if report.threads:
        torch.set_num_threads(report.threads)
    try:
        model.to("cpu")
        return torch_latency_ms(model, task, report.latency_seq_len, report.latency_runs, report.latency_warmup)
    finally:
        model.to(device)
        torch.set_num_threads(threads)
