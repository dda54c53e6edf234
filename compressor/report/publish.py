"""Turn a run's report into a benchmark report under reports/: the multi-task model beside its single-task
twins, task by task, with training cost, data sizes and the machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError
from compressor.fsutil import atomic_write_text
from compressor.report.rows import render_markdown


def publish_run(run_dir: Path, to: Path, title: str = "") -> tuple[Path, Path]:
    report_path = Path(run_dir) / "report.json"
    if not report_path.is_file():
        raise CompressorError(f"{run_dir}: no report.json (has the run finished a stage?)")
    data = json.loads(report_path.read_text())
    data["comparison"] = compare_multi_single(data)
    md, js = Path(f"{to}.md"), Path(f"{to}.json")
    atomic_write_text(js, json.dumps(data, indent=2))
    atomic_write_text(md, _markdown(data, title or f"Benchmark: {data['recipe']}", Path(run_dir)))
    return md, js


def compare_multi_single(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per train stage, task and split: the multi-task value beside the single-task baseline's."""
    out = []
    for stage in data.get("stages", []):
        if stage["kind"] != "train":
            continue
        name = stage["name"]
        rows = [r for r in data["rows"] if r["stage"] == name]
        training = data.get("outputs", {}).get(name, {}).get("training", {})
        for r in rows:
            if r["model"] != name:
                continue
            single = next((s for s in rows if s["model"] == f"single:{r['task']}" and s["split"] == r["split"]), None)
            out.append({
                "stage": name, "task": r["task"], "split": r["split"], "metric": r["metric"],
                "multi_task": r["value"], "single_task": single["value"] if single else None,
                "delta": (r["value"] - single["value"]) if single else None,
                "multi_task_params": r["params"], "single_task_params": single["params"] if single else None,
                "multi_task_wall_s": training.get(name, {}).get("wall_s"),
                "single_task_wall_s": training.get(f"single:{r['task']}", {}).get("wall_s"),
                "multi_task_epochs": training.get(name, {}).get("epochs_run"),
                "single_task_epochs": training.get(f"single:{r['task']}", {}).get("epochs_run"),
            })
    return out


def _markdown(data: dict[str, Any], title: str, run_dir: Path) -> str:
    lines = [f"# {title}", "", f"Measured by `compressor run` into `{run_dir}` ({data['created']}); "
             "this file was written by `compressor publish` from that run's report.json.", ""]
    comp = data["comparison"]
    if comp:
        lines += ["## Multi-task vs single-task", "",
                  "| task | split | metric | multi-task | single-task | delta | wall s (multi / single) | epochs (multi / single) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comp:
            single = f"{c['single_task']:.4f}" if c["single_task"] is not None else "-"
            delta = f"{c['delta']:+.4f}" if c["delta"] is not None else "-"
            lines.append(f"| {c['task']} | {c['split']} | {c['metric']} | {c['multi_task']:.4f} | {single} | {delta} | "
                         f"{c['multi_task_wall_s']} / {c['single_task_wall_s']} | "
                         f"{c['multi_task_epochs']} / {c['single_task_epochs']} |")
        lines += ["", "The multi-task wall time trains one model for all tasks; each single-task wall time trains one "
                  "model for one task. One multi-task model serves every task with one encoder; serving the "
                  "single-task models needs one encoder per task.", ""]
        gpu = (data.get("machine") or {}).get("cuda")
        lines += [f"GPU: {gpu}" if gpu else "GPU: none was available for this run (CPU only); no GPU epoch time "
                  "was measured.", ""]
    body = render_markdown(data)
    lines += body.split("\n", 2)[2].splitlines()  # drop the generic title
    return "\n".join(lines) + "\n"
