"""Edge footprint rows of the benchmark: the teacher's fp32 ONNX graph (b) and the INT8 student (e-int8), each
written as an edge bundle by the same writer, loaded and served by a torch-free child process
(:mod:`compressor.runtime.footprint`) on the same real test requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PREDICTIONS = 100


def requests_from(data: Any, tasks: Sequence[str], n: int = PREDICTIONS) -> list[dict[str, str]]:
    """Up to ``n`` raw requests from the tasks' test splits (dev where a task has no test split), taken in turn
    from each task: a ``context``/``text`` (or ``tokens`` joined by spaces) and, when the example has one, its
    ``question``. Examples without text are skipped."""
    pools = []
    for task in tasks:
        split = "test" if data.has(task, "test") else "dev" if data.has(task, "dev") else None
        if split is None:
            continue
        reqs = [r for r in (_request(ex) for ex in data.examples(task, split)) if r is not None]
        if reqs:
            pools.append(reqs)
    out: list[dict[str, str]] = []
    for k in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if k < len(pool) and len(out) < n:
                out.append(pool[k])
    return out


def _request(ex: Any) -> dict[str, str] | None:
    get = ex.get if isinstance(ex, Mapping) else lambda k: getattr(ex, k, None)
    text = get("context") or get("text")
    tokens = get("tokens")
    if not isinstance(text, str) and isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens):
        text = " ".join(tokens)
    if not isinstance(text, str) or not text.strip():
        return None
    question = get("question")
    return {"text": text, **({"question": question} if isinstance(question, str) and question.strip() else {})}


def measure_footprints(graphs: Mapping[str, tuple[Path, Any, Path, int]], requests: Sequence[Mapping[str, str]],
                       work: Path, threads: int = 1) -> dict[str, dict[str, Any]]:
    """``graphs``: model key -> (onnx graph, GraphSpec, tokenizer.json, pad id). Each is bundled under ``work``
    and measured in its own child process; returns model key -> the child's measurements."""
    from compressor.export.bundle import write_bundle
    from compressor.runtime.footprint import measure_footprint

    out = {}
    for key, (graph, spec, tokenizer_file, pad_id) in graphs.items():
        directory = write_bundle(work / f"bundle-{key}", graph, spec, tokenizer_file, pad_id, {"source": key})
        out[key] = measure_footprint(directory, requests, predictions=PREDICTIONS, threads=threads)
    return out
