"""Reports that cannot mislead: the latency column names its runtime and format, the Pareto plot draws every
trial with the floor and the target, benchmark panels share a y-scale and show the retention target, and no
artefact or report of a run holds the build machine's paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.fsutil import portable
from compressor.report.rows import make_row, measured_with, render_markdown
from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- the run report's latency column --------------------------------------------------------------------------
def _row(label, fmt, latency):
    return make_row(label, label, "sst", "dev", "accuracy", {"accuracy": 0.5}, params=10, task_params=10,
                    size_bytes=1000, latency={"p50": latency, "p95": latency}, fmt=fmt)


def test_latency_column_names_runtime_and_format():
    rows = [_row("teacher", "pytorch", 12.0), _row("export", "onnx", 3.0), _row("quantize", "onnx-int8", 1.5)]
    assert [r["latency_runtime"] for r in rows] == ["pytorch", "onnxruntime", "onnxruntime"]
    md = render_markdown({"recipe": "r", "created": "now", "threads": 1, "latency_seq_len": 32, "rows": rows})
    assert "Latency: PyTorch" not in md
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.split("|")[-2].strip() == "measured with"
    table = [line for line in md.splitlines() if line.startswith("| teacher") or line.startswith("| export")
             or line.startswith("| quantize")]
    assert [line.split("|")[-2].strip() for line in table] == ["PyTorch fp32", "ONNX Runtime fp32",
                                                             "ONNX Runtime INT8"]
    assert measured_with("onnx-int4") == "ONNX Runtime INT4"
    assert make_row("m", "s", "t", "dev", "f1", {"f1": 1.0}, params=1, task_params=1, size_bytes=None, latency=None,
                    fmt="onnx")["latency_runtime"] is None


# ---- the Pareto plot ------------------------------------------------------------------------------------------
def _trial(n, status, retention, latency=None, size=None):
    return {"trial": n, "status": status, "passed": status == "pass", "worst_retention": retention,
            "latency_ms": latency, "size_bytes": size}


def test_pareto_plot_draws_every_trial_with_floor_and_target(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    from compressor.search.evidence import pareto_figure, pareto_plot

    rows = [_trial(0, "pass", 0.99, 2.0, 4e6), _trial(1, "fail", 0.90, 1.0, 2e6),
            *[_trial(n, "early-stopped", 0.5 + n / 100) for n in range(2, 7)],  # stopped before measured
            _trial(7, "early-stopped", 0.80, 1.5, 3e6), _trial(8, "early-stopped", None)]
    fig = pareto_figure(rows, {"ner": 0.95, "sst": 0.95}, 0, "search", target=0.97)
    for ax in fig.axes:
        drawn = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)
                    and "chosen" not in (c.get_label() or ""))
        assert drawn == 8  # every scored trial, measured or not
        labels = ax.get_legend_handles_labels()[1]
        assert "floor" in labels and "target 0.97" in labels
        assert "early-stopped, not measured (5; bottom edge)" in labels
        xs = sorted(line.get_xdata()[0] for line in ax.lines)
        assert xs == [0.95, 0.97]
    assert "9 trial(s)" in fig._suptitle.get_text()
    assert any("trial(s) 8" in t.get_text() for t in fig.texts)  # the unscored one is listed
    plt.close(fig)
    assert pareto_plot(rows, {"ner": 0.95}, None, tmp_path / "p.png", "search", 0.97).stat().st_size > 0


# ---- benchmark plots ------------------------------------------------------------------------------------------
def test_benchmark_panels_share_y_and_show_the_retention_target(tmp_path):
    import matplotlib.pyplot as plt

    from compressor.bench.render import metric_figure, plot

    rows = []
    for task, metric, values in (("ner", "f1", (0.90, 0.85)), ("sst", "accuracy", (0.60, 0.59))):
        for mid, value, size in (("a", values[0], 4e8), ("e-int8", values[1], 3e7)):
            rows.append({"id": mid, "label": mid, "task": task, "metric": metric, "value": value,
                         "higher_is_better": True, "size_bytes": size})
    fig = metric_figure(rows, "size_bytes", "size (MB)", 1e-6, target=0.97)
    axes = fig.axes
    assert len(axes) == 2 and axes[0].get_ylim() == axes[1].get_ylim()
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    for ax, teacher in zip(axes, (0.90, 0.60)):
        targets = [line for line in ax.lines if line.get_label().startswith("target")]
        assert len(targets) == 1 and targets[0].get_ydata()[0] == pytest.approx(0.97 * teacher)
    plt.close(fig)
    assert plot(rows, "size_bytes", "size (MB)", tmp_path / "s.png", 1e-6, 0.97).is_file()


# ---- no build-machine paths -----------------------------------------------------------------------------------
def test_portable_paths(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "stages").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: r\n")
    cwd = os.getcwd()
    elsewhere = tmp_path / "opt" / "models" / "bert"  # paths of this machine outside the run and repository
    elsewhere.mkdir(parents=True)
    Path(f"{run}x/stages").mkdir(parents=True)
    data = {"graph": f"{run}/stages/01-export/model.onnx", "run": str(run), "sibling": f"{run}x/stages/a",
            "note": f"loaded {run}/stages/00-teacher/model; data {cwd}/tests/fixtures", "hub": "bert-base-uncased",
            "elsewhere": str(elsewhere), "home": os.path.expanduser("~/models/x")}
    out = portable(data, run / "stages" / "01-export" / "graph.json")
    assert out["graph"] == "stages/01-export/model.onnx" and out["run"] == "."
    assert out["note"] == "loaded stages/00-teacher/model; data tests/fixtures"
    assert out["hub"] == "bert-base-uncased" and out["elsewhere"] == ".../bert"
    assert out["sibling"] == ".../a"  # another directory that merely shares the prefix is not the run
    assert out["home"] in ("~/models/x", ".../x")


def test_no_artefact_or_report_of_a_run_holds_build_machine_paths(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_PROGRESS", "1")  # and the long steps draw progress bars on stderr
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(f"""name: paths
seed: 3
data_root: {PIPE}
model: {{encoder: {tiny_model_path}, max_length: 32}}
tasks:
  - {{name: sst, plugin: classification, format: label_text,
      data: {{train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}}}}
stages:
  - {{kind: train, name: teacher, epochs: 1, batch_size: 8, baselines: false}}
  - {{kind: export}}
  - {{kind: quantize, tolerance: 1.0}}
  - {{kind: bundle}}
report: {{latency_runs: 2, latency_warmup: 1, latency_seq_len: 16}}
""")
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(recipe), "--out", str(run)])
    assert res.exit_code == 0, res.output
    for bar in ("export: export", "quantize: INT8 dynamic, graphs evaluated"):
        assert bar in res.stderr and bar not in res.stdout
    res = runner.invoke(app, ["publish", str(run), "--to", str(tmp_path / "published")])
    assert res.exit_code == 0, res.output
    checked = []
    for path in [*run.rglob("*.json"), *run.rglob("*.md"), tmp_path / "published.md", tmp_path / "published.json"]:
        if "checkpoints" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for root in (str(run), str(tmp_path), os.getcwd(), str(tiny_model_path)):
            assert root not in text, f"{path} holds {root}"
        checked.append(path.name)
    for name in ("manifest.json", "graph.json", "quantization.json", "tasks.json", "report.json", "report.md",
                 "state.json", "published.md", "published.json"):
        assert name in checked
    tasks = json.loads(next(run.rglob("bundle/tasks.json")).read_text())
    assert tasks["metadata"]["graph_source"] == "stages/02-quantize/model.int8.onnx"
    assert tasks["metadata"]["source_model"] == "stages/00-teacher/model"


def test_portable_keeps_graph_node_names_that_only_look_like_paths(tmp_path):
    from compressor.fsutil import portable

    model = tmp_path / "elsewhere" / "bert"
    model.mkdir(parents=True)
    out = portable({"node": "/encoder/layer.0/attention/self/MatMul", "model": str(model)}, None)
    assert out["node"] == "/encoder/layer.0/attention/self/MatMul"
    assert out["model"] == ".../bert"
