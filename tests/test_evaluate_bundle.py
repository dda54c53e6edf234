"""`compressor evaluate BUNDLE`: the shipped graph scored through ONNX Runtime gives the numbers of the run
report's row of that graph, for every built-in task, on a tiny exported bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _export_helpers import PIPE, QA_FILE, RE_FILE, build_run
from compressor.cli.main import app

DEV = {"ner": [RE_FILE], "rel": [RE_FILE], "sst": [PIPE / "sst.dev.txt", "--format", "label_text"], "qa": [QA_FILE]}


@pytest.fixture(scope="module")
def run():
    return build_run()


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("task", ["ner", "rel", "sst", "qa"])
def test_bundle_scores_equal_the_report_row_of_its_graph(run, task):
    bundle = Path(run.outputs["bundle"]["bundle"])
    row = next(r for r in run.reporter.rows if r["stage"] == "quantize" and r["task"] == task and r["split"] == "dev")
    assert row["format"] == "onnx-int8"
    res = _invoke("evaluate", bundle, "--task", task, "--data", *DEV[task], "--threads", 1, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "bundle" and out["runtime"] == "onnxruntime" and out["format"] == "onnx-int8"
    assert out["metric"] == row["metric"]
    assert out["metrics"] == pytest.approx(row["metrics"], abs=1e-9)  # the same numbers, not merely close


def test_bundle_evaluation_text_line_and_errors(run, tmp_path):
    bundle = Path(run.outputs["bundle"]["bundle"])
    res = _invoke("evaluate", bundle, "--task", "sst", "--data", PIPE / "sst.dev.txt", "--format", "label_text")
    assert res.exit_code == 0, res.output
    assert "(ONNX Runtime, onnx-int8): accuracy=" in res.stdout
    res = _invoke("evaluate", bundle, "--task", "sts", "--data", PIPE / "sst.dev.txt")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "did you mean 'sst'" in res.stderr
    assert res.stderr.count("\n") == 1
    res = _invoke("evaluate", bundle, "--task", "sst", "--data", tmp_path / "nope.txt")
    assert res.exit_code == 2 and "nope.txt: data file not found" in res.stderr
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "tokenizer.json").unlink()
    res = _invoke("evaluate", broken, "--task", "sst", "--data", PIPE / "sst.dev.txt")
    assert res.exit_code == 2 and "missing tokenizer.json" in res.stderr


def test_bundle_tasks_json_keeps_plugin_options(run):
    tasks = json.loads((Path(run.outputs["bundle"]["bundle"]) / "tasks.json").read_text())["tasks"]
    assert tasks["qa"]["options"]["doc_stride"] == 16 and tasks["rel"]["options"]["entity_task"] == "ner"
