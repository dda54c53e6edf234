"""Turn a run's report into a benchmark report under reports/: the multi-task model beside its single-task
twins, task by task, with training cost, data sizes and the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError
from compressor.fsutil import atomic_write_text, portable
from compressor.recipe import Targets, load_recipe
from compressor.report.rows import fmt_value, measured_with, render_markdown
from compressor.rundir import RunDir


def publish_runs(run_dirs: list[Path], to: Path, title: str = "", stages: list[str] | None = None,
                 notes: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``<to>.md`` and ``<to>.json`` with one section per run (e.g. the two-task and four-task teachers).

    ``stages`` keeps only the rows of those stages (e.g. just the teacher and its twins of a longer chain).
    """
    sections = []
    for run_dir in run_dirs:
        report_path = RunDir(run_dir).report_json
        if not report_path.is_file():
            raise CompressorError(f"{run_dir}: no report.json (has the run finished a stage?)")
        data = json.loads(report_path.read_text())
        if stages:
            data["rows"] = [r for r in data["rows"] if r["stage"] in stages]
            data["stages"] = [s for s in data.get("stages", []) if s["name"] in stages]
        data["comparison"] = compare_multi_single(data)
        data["compression"] = compression_table(data)
        data["targets"] = student_targets(data, _run_targets(Path(run_dir)))
        data = portable(data, report_path)  # what is left of the run's paths: relative to it
        data["run_dir"] = portable(os.path.abspath(run_dir))  # relative to the repository
        sections.append(data)
    md, js = Path(f"{to}.md"), Path(f"{to}.json")
    title = title or "Benchmark: " + ", ".join(d["recipe"] for d in sections)
    atomic_write_text(js, json.dumps({"title": title, "notes": notes or [], "runs": sections}, indent=2))
    body = [f"# {title}", ""] + [f"- {n}" for n in notes or []] + ([""] if notes else [])
    for data in sections:
        body += _markdown(data, f"Run `{data['recipe']}`", Path(data["run_dir"])).splitlines()
    atomic_write_text(md, "\n".join(body) + "\n")
    return md, js


def compare_multi_single(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per train stage, task and split: the multi-task value beside the single-task baseline's, and the value of
    the task's model from a finetune stage of the run (fine-tuned from the joint model) when there is one."""
    out = []
    tuned = {(r["task"], r["split"]): r for s in data.get("stages", []) if s["kind"] == "finetune"
             for r in data["rows"] if r["stage"] == s["name"] and r["model"] == f"{s['name']}:{r['task']}"}
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
                "multi_task_metrics": r.get("metrics", {}),
                "single_task_metrics": single.get("metrics", {}) if single else {},
                "delta": (r["value"] - single["value"]) if single else None,
                "multi_task_params": r["params"], "single_task_params": single["params"] if single else None,
                "multi_task_wall_s": training.get(name, {}).get("wall_s"),
                "single_task_wall_s": training.get(f"single:{r['task']}", {}).get("wall_s"),
                "multi_task_epochs": training.get(name, {}).get("epochs_run"),
                "single_task_epochs": training.get(f"single:{r['task']}", {}).get("epochs_run"),
                "fine_tuned": tuned[(r["task"], r["split"])]["value"] if (r["task"], r["split"]) in tuned else None,
                "head_epoch": (training.get(name, {}).get("selection") or {}).get(r["task"], {}).get("head_epoch"),
            })
    return out


def compression_table(data: dict[str, Any], split: str = "test") -> list[dict[str, Any]]:
    """Every non-baseline model of the run against the teacher, per task: size, speed and metric ratios."""
    teacher = data.get("stages", [{}])[0].get("name") if data.get("stages") else None
    ref = {r["task"]: r for r in data["rows"] if r["model"] == teacher and r["split"] == split}
    out = []
    for r in data["rows"]:
        if r["split"] != split or r["model"].startswith("single:") or r["task"] not in ref:
            continue
        t = ref[r["task"]]
        out.append({
            "model": r["model"], "stage": r["stage"], "format": r.get("format", "pytorch"), "task": r["task"],
            "metric": r["metric"], "value": r["value"], "teacher_value": t["value"],
            "retention": r["value"] / t["value"] if t["value"] else None,
            "params": r["params"], "params_ratio": r["params"] / t["params"] if t["params"] else None,
            "size_bytes": r.get("size_bytes"),
            "size_ratio": (t["size_bytes"] / r["size_bytes"]) if r.get("size_bytes") and t.get("size_bytes") else None,
            "latency_ms_p50": r.get("latency_ms_p50"),
            "speedup": (t["latency_ms_p50"] / r["latency_ms_p50"])
            if r.get("latency_ms_p50") and t.get("latency_ms_p50") else None,
        })
    return out


def _run_targets(run_dir: Path) -> Targets:
    """The targets of the run's recipe (``report.targets``); the defaults when its recipe.yaml is unreadable."""
    try:
        return load_recipe(RunDir(run_dir).recipe_path).report.targets
    except CompressorError:
        return Targets()


def student_targets(data: dict[str, Any], targets: Targets | None = None) -> dict[str, Any] | None:
    """The distillation/pruning targets, checked on the last PyTorch model of the run (before quantization)."""
    tg = targets or Targets()
    comp = [c for c in data.get("compression", []) if c["format"] == "pytorch"]
    stages = [s["name"] for s in data.get("stages", [])]
    if len(stages) < 2 or not comp:
        return None
    last = max((c for c in comp), key=lambda c: stages.index(c["stage"]) if c["stage"] in stages else -1)
    rows = [c for c in comp if c["stage"] == last["stage"]]
    worst = min(rows, key=lambda c: c["retention"] if c["retention"] is not None else 1.0)
    slowest = min(rows, key=lambda c: c["speedup"] or 0.0)
    return {
        "student": last["stage"],
        "params_ratio": last["params_ratio"], "params_target": tg.student_params_ratio,
        "params_met": last["params_ratio"] <= tg.student_params_ratio,
        "min_speedup": slowest["speedup"], "speedup_target": tg.student_speedup,
        "speedup_met": bool(slowest["speedup"] and slowest["speedup"] >= tg.student_speedup),
        "min_retention": worst["retention"], "min_retention_task": worst["task"], "retention_target": tg.retention,
        "retention_met": all(c["retention"] is not None and c["retention"] >= tg.retention for c in rows),
    }


def _markdown(data: dict[str, Any], title: str, run_dir: Path) -> str:
    lines = [f"## {title}", "", f"Measured by `compressor run` into `{run_dir}` ({data['created']}); "
             "this file was written by `compressor publish` from that run's report.json.", ""]
    comp = data["comparison"]
    if comp:
        tuned = any(c.get("fine_tuned") is not None for c in comp)
        lines += ["### Multi-task vs single-task", "",
                  "| task | split | metric | multi-task | single-task | delta |"
                  + (" fine-tuned from multi-task | delta (fine-tuned - single) |" if tuned else "")
                  + " head epoch | wall s (multi / single) | epochs (multi / single) | other metrics (multi / single) |",
                  "|---|---|---|---|---|---|" + ("---|---|" if tuned else "") + "---|---|---|---|"]
        for c in comp:
            single = f"{c['single_task']:.4f}" if c["single_task"] is not None else "-"
            delta = f"{c['delta']:+.4f}" if c["delta"] is not None else "-"
            ft = ""
            if tuned:
                value, ref = c.get("fine_tuned"), c["single_task"]
                ft = (f" {value:.4f} |" if value is not None else " - |") + (
                    f" {value - ref:+.4f} |" if value is not None and ref is not None else " - |")
            lines.append(f"| {c['task']} | {c['split']} | {c['metric']} | {c['multi_task']:.4f} | {single} | {delta} |"
                         f"{ft} {c.get('head_epoch') or '-'} | {c['multi_task_wall_s']} / {c['single_task_wall_s']} | "
                         f"{c['multi_task_epochs']} / {c['single_task_epochs']} | {_others(c)} |")
        lines += ["", "The multi-task wall time trains one model for all tasks; each single-task wall time trains one "
                  "model for one task. One multi-task model serves every task with one encoder; serving the "
                  "single-task models needs one encoder per task.", ""]
        gpu = (data.get("machine") or {}).get("cuda")
        lines += [f"GPU: {gpu}" if gpu else "GPU: none was available for this run (CPU only); no GPU epoch time "
                  "was measured.", ""]
    if data.get("compression") and len({c["stage"] for c in data["compression"]}) > 1:
        lines += ["### Teacher vs compressed models (test split)", "",
                  "| model | measured with | task | metric | value | retention | params | params ratio | size (MB) | "
                  "size ratio (teacher / model) | latency p50 (ms) | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        runtimes = {measured_with(c["format"]).split(" ")[0] for c in data["compression"]}
        for c in data["compression"]:
            size = f"{c['size_bytes'] / 1e6:.1f}" if c.get("size_bytes") else "-"
            lines.append(f"| {c['model']} | {measured_with(c['format'])} | {c['task']} | {c['metric']} | {c['value']:.4f} | "
                         f"{_r(c['retention'])} | {c['params']:,} | {_r(c['params_ratio'])} | {size} | "
                         f"{_r(c['size_ratio'])}x | {_r(c['latency_ms_p50'], 2)} | {_r(c['speedup'], 2)}x |")
        lines.append("")
        if len(runtimes) > 1:
            lines += ["Speed-up divides the teacher's latency by the row's; where the two were measured with different "
                      "runtimes (see 'measured with') it compares runtimes as well as models.", ""]
    t = data.get("targets")
    if t:
        lines += [f"### Targets for the student before quantization (`{t['student']}`)", "",
                  f"- parameters at most {_r(t['params_target'])} of the teacher's: {_r(t['params_ratio'])} of the "
                  f"teacher -> {'met' if t['params_met'] else 'missed by ' + _r(t['params_ratio'] - t['params_target'])}",
                  f"- at least {t['speedup_target']:g}x lower PyTorch CPU latency (batch 1, seq "
                  f"{data.get('latency_seq_len', 128)}): lowest speed-up over tasks {_r(t['min_speedup'], 2)}x -> "
                  f"{'met' if t['speedup_met'] else 'missed'}",
                  f"- at least {100 * t['retention_target']:g}% of the teacher's metric on every task: lowest "
                  f"retention {_r(t['min_retention'])} ({t['min_retention_task']}) -> "
                  f"{'met' if t['retention_met'] else 'missed'}", ""]
    body = render_markdown(data)
    # the generic report without its title, one heading level down
    lines += ["#" + line if line.startswith("## ") else line for line in body.split("\n", 2)[2].splitlines()]
    return "\n".join(lines) + "\n"


def _r(v: float | None, digits: int = 3) -> str:
    return fmt_value(v, digits)


def _others(c: dict[str, Any]) -> str:
    keys = [k for k in c["multi_task_metrics"] if k != c["metric"]]
    single = c["single_task_metrics"]
    return "; ".join(f"{k} {c['multi_task_metrics'][k]:.3f} / " + (f"{single[k]:.3f}" if k in single else "-")
                     for k in keys) or "-"
