"""The run report: ``report.json`` (rows + metadata) and ``report.md``.

Schema of ``report.json``::

    {
      "recipe": str, "created": ISO time, "machine": {...}, "threads": {...},
      "data": {task: {split: {"used", "available", "labels" (the task's label count), "truncated", ...}}},
      "notes": [str],
      "rows": [
        {"model": "teacher" | "single:<task>" | "<stage name>", "stage": stage name, "task": task,
         "split": "dev" | "test", "metric": primary metric name, "value": float, "metrics": {name: float},
         "params": int (whole model), "task_params": int (encoder + this task's head),
         "size_bytes": int | null (weights file on disk), "latency_ms_p50": float | null,
         "latency_ms_p95": float | null, "format": "pytorch" | "onnx" | "onnx-int8" | ...,
         "latency_runtime": "pytorch" | "onnxruntime" | null (what measured the latency), "retention": float | null}
      ]
    }

``retention`` is value / the teacher's value on the same task and split, when the run has a teacher row.
Later stages add rows with the same keys (and may add keys of their own).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.fsutil import atomic_write_text, dumps_strict, portable

ROW_KEYS = ("model", "stage", "task", "split", "metric", "value", "params", "size_bytes", "latency_ms_p50")


def make_row(label: str, stage: str, task: str, split: str, metric: str, metrics: Mapping[str, float], *,
             params: int | None, task_params: int | None, size_bytes: int | None,
             latency: Mapping[str, float] | None, fmt: str, **extra: Any) -> dict[str, Any]:
    """One report row (the schema above), for PyTorch and ONNX evaluations alike; ``extra`` keys are added."""
    return {
        "model": label, "stage": stage, "task": task, "split": split,
        "metric": metric, "value": float(metrics[metric]), "metrics": {k: float(v) for k, v in metrics.items()},
        "params": params, "task_params": task_params, "size_bytes": size_bytes,
        "latency_ms_p50": latency["p50"] if latency else None, "latency_ms_p95": latency["p95"] if latency else None,
        "format": fmt, "latency_runtime": (runtime_of(fmt) if latency else None),
        # beside the latencies it concerns: other processes competed for the cores while they were measured
        **({"latency_warning": latency["load_warning"]} if latency and latency.get("load_warning") else {}),
        **extra,
    }


def runtime_of(fmt: str) -> str:
    """The runtime that runs (and times) a model of format ``fmt``: ONNX graphs in ONNX Runtime, else PyTorch."""
    return "onnxruntime" if str(fmt).startswith("onnx") else "pytorch"


def measured_with(fmt: str | None) -> str:
    """A row's runtime and number format in words (``PyTorch fp32``, ``ONNX Runtime INT8``), for report columns."""
    fmt = fmt or "pytorch"
    if fmt == "pytorch":
        return "PyTorch fp32"
    if fmt.startswith("onnx"):
        kind = fmt[len("onnx"):].lstrip("-").upper() or "fp32"
        return f"ONNX Runtime {kind}"
    return fmt


class Reporter:
    def __init__(self, recipe_name: str, teacher_label: str = "teacher"):
        self.recipe_name = recipe_name
        self.teacher_label = teacher_label
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.meta: dict[str, Any] = {}

    def add(self, row: dict[str, Any]) -> None:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"report row lacks {missing}")
        self.rows = [r for r in self.rows if _key(r) != _key(row)] + [row]

    def extend(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self.add(r)

    def drop_stage(self, stage: str) -> None:
        self.rows = [r for r in self.rows if r["stage"] != stage]

    def with_retention(self) -> list[dict[str, Any]]:
        teacher = {(r["task"], r["split"]): r["value"] for r in self.rows if r["model"] == self.teacher_label}
        out = []
        for r in self.rows:
            ref = teacher.get((r["task"], r["split"]))
            out.append({**r, "retention": (r["value"] / ref) if ref else None})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe_name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.meta,
            "notes": self.notes,
            "rows": self.with_retention(),
        }

    def load(self, path: Path) -> None:
        """Resume: take the rows and notes of an earlier report of the same run."""
        data = json.loads(Path(path).read_text())
        self.rows = [{k: v for k, v in r.items() if k != "retention"} for r in data.get("rows", [])]
        self.notes = list(data.get("notes", []))

    def write(self, run_dir: Path) -> tuple[Path, Path]:
        data = portable(self.to_json(), Path(run_dir) / "report.json")  # paths relative to the run or repository
        js, md = Path(run_dir) / "report.json", Path(run_dir) / "report.md"
        atomic_write_text(js, dumps_strict(data))  # strict JSON: a NaN metric is written as null
        atomic_write_text(md, render_markdown(data))
        return js, md


def _key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["stage"], row["task"], row["split"], row.get("format", "pytorch"))


def fmt_value(v: Any, digits: int = 4) -> str:
    """A report cell: '-' for None, fixed digits for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(data: dict[str, Any]) -> str:
    lines = [f"# Report: {data['recipe']}", "", f"Created {data['created']}.", ""]
    machine = data.get("machine")
    if machine:
        lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()] + [""]
    if data.get("threads"):
        lines += [f"Latency: CPU, batch 1, sequence {data.get('latency_seq_len', 128)}, median after warm-up; "
                  f"threads {data['threads']}. Each row's runtime and format are in the 'measured with' column: "
                  "PyTorch and ONNX Runtime timings are different runtimes, not one model getting faster.", ""]
    rows = data["rows"]
    if rows:
        lines += ["## Results", "",
                  "| model | stage | task | split | metric | value | retention | params | size (MB) | latency p50 (ms) "
                  "| measured with |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            size = f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else "-"
            loaded = " (loaded!)" if r.get("latency_warning") else ""
            lines.append(
                f"| {r['model']} | {r['stage']} | {r['task']} | {r['split']} | {r['metric']} | {fmt_value(r['value'])} | "
                f"{fmt_value(r.get('retention'), 3)} | {r['params']:,} | {size} | "
                f"{fmt_value(r.get('latency_ms_p50'), 2)}{loaded} | {measured_with(r.get('format'))} |"
            )
        lines.append("")
        warned = sorted({(r["model"], r["latency_warning"]) for r in rows if r.get("latency_warning")})
        if warned:
            lines += ["Latencies marked (loaded!):", ""] + [f"- {m}: {w}" for m, w in warned] + [""]
    if data.get("data"):
        lines += ["## Data", "", "| task | split | used | available | labels | truncated | other |",
                  "|---|---|---|---|---|---|---|"]
        for task, splits in data["data"].items():
            for split, d in splits.items():
                other = ", ".join(f"{k}={v}" for k, v in d.items()
                                  if k not in ("used", "available", "labels", "truncated"))
                lines.append(f"| {task} | {split} | {d.get('used', '-')} | {d.get('available', '-')} | "
                             f"{d.get('labels', '-')} | {d.get('truncated', '-')} | {other or '-'} |")
        lines.append("")
    if data.get("stages"):
        lines += ["## Stages", "", "| stage | kind | wall time (s) | notes |", "|---|---|---|---|"]
        for s in data["stages"]:
            lines.append(f"| {s['name']} | {s['kind']} | {fmt_value(s.get('wall_s'), 1)} | {'; '.join(s.get('notes', []))} |")
        lines.append("")
    for name, out in (data.get("outputs") or {}).items():  # a stage's own Markdown (e.g. the search's trial table)
        if isinstance(out, dict) and out.get("report_section"):
            lines += [f"### {name}", "", out["report_section"], ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)
