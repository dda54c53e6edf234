"""The benchmark's Markdown report and its two plots (metric vs latency, metric vs size; one panel per task)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.bench.results import ORDER
from compressor.bench.timing import key
from compressor.report.rows import fmt_value

MARKERS = {"a": "s", "b": "D", "c": "v", "d": "P", "e-fp32": "o", "e-int8": "*"}
OFFSETS = {"a": (6, 4), "b": (6, -11), "c": (-14, 6), "d": (6, 4), "e-fp32": (6, 4), "e-int8": (6, -11)}  # labels of
# models that land on one spot (b/c, e-fp32/e-int8) go on opposite sides


def _f(v: Any, digits: int = 2) -> str:
    return fmt_value(v, digits)


def _x(ratio: float | None, smaller_is_better: bool = True) -> str:
    """A ratio value/reference as "N.NNx smaller/faster" (or larger/slower)."""
    if ratio is None:
        return "-"
    if ratio == 1.0:
        return "1.00x"
    if smaller_is_better:
        return f"{1 / ratio:.2f}x smaller" if ratio < 1 else f"{ratio:.2f}x larger"
    return f"{ratio:.2f}x higher" if ratio > 1 else f"{1 / ratio:.2f}x lower"


def _lat(p50: float | None, p95: float | None) -> str:
    return "-" if p50 is None else f"{p50:.2f} / {p95:.2f}"


def model_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per model (model-level numbers are the same on each of its task rows)."""
    seen: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["id"], r)
    return [seen[m] for m in ORDER if m in seen]


def render_markdown(data: Mapping[str, Any]) -> str:
    """The benchmark report as Markdown, from the data written to ``<out>.json``."""
    s = data["settings"]
    threads = s["threads"]
    rows = data["rows"]
    lines = _settings_lines(data)
    lines += _model_lines(data["models"], threads)
    lines += _target_lines(data["targets"])
    lines += _footprint_lines(data.get("footprint") or {})
    lines += _quality_lines(rows)
    lines += _speed_lines(rows, s, threads)
    lines += _real_lines(rows, s, threads)
    plots = data.get("plots") or {}
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({Path(p).name})" for name, p in plots.items()] + [""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)


def _settings_lines(data: Mapping[str, Any]) -> list[str]:
    """The title, the machine and the measurement settings."""
    s = data["settings"]
    threads = s["threads"]
    machine = data["machine"]
    lines = [f"# {data['title']}", "",
             f"Measured by `compressor benchmark {data['run']}` on {data['created']}: one command, one process, "
             "one machine, the same test data for every model. Every number below was measured by that command.", "",
             "## Machine and settings", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [f"- ONNX Runtime {data['versions']['onnxruntime']}, PyTorch {data['versions']['torch']}, "
              f"optimum {data['versions']['optimum']}",
              f"- threads: {', '.join(str(t) for t in threads)} (intra-op threads of PyTorch and ONNX Runtime; "
              f"all cores = {s['all_cores']} physical core(s))",
              f"- latency: batch 1; dummy inputs of {s['seq_len']} tokens ({s['runs']} timed runs after "
              f"{s['warmup']} warm-up runs, p50 / p95), and the first {s['samples']} test inputs of each task at "
              "their own length (each timed once)",
              f"- throughput: examples/s at batch {s['batch']} ({s['batch_runs']} timed runs on dummy inputs; one "
              "pass over the same real test inputs)",
              "- every timing answers one request for every task (the encoder once, then every head); size = the "
              "weights file on disk (model.safetensors or the .onnx graph; tokenizer files excluded)", ""]
    return lines


def _model_lines(models: Mapping[str, Any], threads: Sequence[int]) -> list[str]:
    """The models table, and the parts of row (d) (or why it is absent)."""
    lines = ["## Models", "", "| id | model | format | size (MB) | params | integer MatMuls | source |",
             "|---|---|---|---|---|---|---|"]
    for mid, m in models.items():
        lines.append(f"| {mid} | {m['label']} | {m['format']} | {m['size_bytes'] / 1e6:.2f} | {m['params']:,} | "
                     f"{_f(m.get('integer_matmuls'))} | `{m['source']}` |")
    lines.append("")
    if "d" not in models:
        lines += ["Row (d) is absent: no single-task students were given (`--single`) and the run's distill stage "
                  "made none (`single_task_students: true`).", ""]
    else:
        head, sep = "| (d) part | format | size (MB) | params |", "|---|---|---|---|"
        for t in threads:
            head += f" latency {t} thr |"
            sep += "---|"
        lines += ["Row (d) serves every task with these models together (sums below):", "", head, sep]
        for p in models["d"].get("parts", []):
            lines.append(f"| {p['label']} | {p['format']} | {p['size_bytes'] / 1e6:.2f} | {p['params']:,} |" + "".join(
                f" {_lat(p['timings'][key('latency_seq_p50_ms', t)], p['timings'][key('latency_seq_p95_ms', t)])} |"
                for t in threads))
        lines.append("")
    return lines


def _target_lines(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """The targets section: met, MISSED or not measured, with the detail."""
    lines = ["## Targets (INT8 student e-int8)", ""]
    for t in targets:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"- **{state}**: {t['target']}: {t['detail']}")
    lines.append("")
    return lines


def _quality_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The quality table: one line per task and model."""
    lines = ["## Quality (test split)", "",
             "| task | model | metric | value | retention vs (a) [95% interval] | points vs (a) | points vs (c) |",
             "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for r in (r for r in rows if r["task"] == task):
            ret = f"{100 * r['retention']:.1f}%" if r["retention"] is not None else "-"
            ci = r.get("retention_interval")
            if ci and r["retention"] is not None:
                ret += f" [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
            pa = f"{r['points_vs_a']:+.2f}" if r["points_vs_a"] is not None else "-"
            pc = f"{r['points_vs_c']:+.2f}" if r["points_vs_c"] is not None else "-"
            lines.append(f"| {task} | {r['id']} | {r['metric']} ({r['split']}) | {r['value']:.4f} | {ret} | {pa} | "
                         f"{pc} |")
    lines.append("")
    return lines


def _speed_lines(rows: Sequence[Mapping[str, Any]], s: Mapping[str, Any], threads: Sequence[int]) -> list[str]:
    """The size and speed table on dummy inputs: one line per model."""
    lines = [f"## Size and speed (batch 1 latency on {s['seq_len']} tokens, p50 / p95 ms; throughput at batch "
             f"{s['batch']})", ""]
    head = "| model | size (MB) | vs (a) | vs (c) | params |"
    sep = "|---|---|---|---|---|"
    for t in threads:
        head += f" latency {t} thr | speed-up vs (a) | vs (c) | ex/s {t} thr |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    for r in model_rows(rows):
        line = (f"| {r['id']} | {r['size_bytes'] / 1e6:.2f} | {_x(r['vs_a'].get('size_bytes'))} | "
                f"{_x(r['vs_c'].get('size_bytes'))} | {r['params']:,} |")
        for t in threads:
            k = key("latency_seq_p50_ms", t)
            sa = r["vs_a"].get(k)
            sc = r["vs_c"].get(k)
            line += (f" {_lat(r[k], r[key('latency_seq_p95_ms', t)])} | {_f(1 / sa if sa else None)}x | "
                     f"{_f(1 / sc if sc else None)}x | {_f(r[key('throughput_seq', t)], 1)} |")
        lines.append(line)
    lines.append("")
    return lines


def _real_lines(rows: Sequence[Mapping[str, Any]], s: Mapping[str, Any], threads: Sequence[int]) -> list[str]:
    """The real-test-input table: one line per task and model."""
    lines = [f"## Real test inputs (batch 1 latency p50 / p95 ms over each task's first {s['samples']} test "
             f"inputs; throughput at batch {s['batch']})", ""]
    head = "| task | model | inputs | mean tokens |"
    sep = "|---|---|---|---|"
    for t in threads:
        head += f" latency {t} thr | speed-up vs (a) | ex/s {t} thr |"
        sep += "---|---|---|"
    lines += [head, sep]
    for r in rows:
        line = f"| {r['task']} | {r['id']} | {r['real_n']} | {r['real_mean_length']:.1f} |"
        for t in threads:
            k = key("latency_real_p50_ms", t)
            sa = r["vs_a"].get(k)
            line += (f" {_lat(r[k], r[key('latency_real_p95_ms', t)])} | {_f(1 / sa if sa else None)}x | "
                     f"{_f(r[key('throughput_real', t)], 1)} |")
        lines.append(line)
    lines.append("")
    return lines


def plot(rows: Sequence[Mapping[str, Any]], x_key: str, x_label: str, path: Path, scale: float = 1.0,
         target: float | None = None) -> Path:
    """Write :func:`metric_figure` as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    fig = metric_figure(rows, x_key, x_label, scale, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def metric_figure(rows: Sequence[Mapping[str, Any]], x_key: str, x_label: str, scale: float = 1.0,
                  target: float | None = None) -> Any:
    """Metric (y) against ``x_key`` (x, log scale), one panel per task, one labelled point per model.

    The panels share one y-scale (their metrics are all fractions, so heights compare across tasks), and each
    shows the retention ``target`` as a dotted line at that fraction of model (a)'s metric on its task.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task and r.get(x_key) is not None):
            x = r[x_key] * scale
            ax.scatter([x], [r["value"]], marker=MARKERS.get(r["id"], "o"), s=60, label=f"{r['id']}: {r['label']}")
            ax.annotate(r["id"], (x, r["value"]), textcoords="offset points", xytext=OFFSETS.get(r["id"], (6, 4)),
                        fontsize=8)
        ref = next((r for r in rows if r["task"] == task and r["id"] == "a"), None)
        if target is not None and ref is not None and ref.get("value") is not None:
            hib = ref.get("higher_is_better", True)
            ax.axhline(ref["value"] * target if hib else ref["value"] / target, color="tab:purple", linestyle=":",
                       linewidth=1.5, label=f"target: {100 * target:g}% of (a)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        metric = next(r["metric"] for r in rows if r["task"] == task)
        ax.set_title(task)
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.yaxis.set_tick_params(labelleft=True)  # shared scale, but every panel keeps its tick labels
        ax.grid(True, alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:  # a legend entry per model and one for the target line
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * math.ceil(len(labels) / 3), 1, 1))
    return fig


def _footprint_lines(fp: dict[str, Any]) -> list[str]:
    if not fp:
        return []
    lines = ["## Edge footprint (torch-free process: `Bundle.load` + 100 predictions, 1 thread)", "",
             "| model | RSS after imports (MiB) | after load | after predictions | peak (MiB) | load s | predict s | "
             "torch imported |", "|---|---|---|---|---|---|---|---|"]
    for mid, f in fp.items():
        lines.append(f"| {mid} | {f['rss_after_import_mib']:.1f} | {f['rss_after_load_mib']:.1f} | "
                     f"{f['rss_after_predictions_mib']:.1f} | {f['peak_rss_mib']:.1f} | {f['load_s']:.2f} | "
                     f"{f['predict_s']:.2f} | {'yes' if f['heavy_modules'] else 'no'} |")
    if "b" in fp and "e-int8" in fp:
        lines.append(f"\nPeak resident memory: e-int8 {fp['e-int8']['peak_rss_mib']:.1f} MiB vs (b) "
                     f"{fp['b']['peak_rss_mib']:.1f} MiB ({fp['b']['peak_rss_mib'] / fp['e-int8']['peak_rss_mib']:.2f}x "
                     "less).")
    return lines + [""]
