"""CLI conventions: --version, `compressor env`, and --json results on stdout (progress on stderr) for validate,
run, publish and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    import torch

    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    torch.manual_seed(0)
    model = MultiTaskModel(tiny_bert(hidden=32, layers=2, heads=4, ffn=64),
                           {"sst": build_task("classification", "sst", ["0", "1"])}).eval()
    return save_model(model, tokenizer, tmp_path_factory.mktemp("cli") / "model", 32)


@pytest.fixture(scope="module")
def recipe(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "load.yaml"
    path.write_text(f"""name: cli-json
seed: 1
data_root: {PIPE}
model: {{max_length: 32}}
tasks:
  - name: sst
    plugin: classification
    format: label_text
    labels: ['0', '1']
    data: {{train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}}
stages:
  - {{kind: load, name: teacher, path: {model_dir}}}
report: {{latency: false}}
""")
    return path


def test_version():
    from importlib.metadata import version

    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout == f"compressor {version('compressor')}\n"


def test_env_lists_versions_threads_flags_and_providers():
    res = invoke("env", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    for pkg in ("compressor", "torch", "transformers", "onnxruntime", "optimum", "accelerate", "torch-pruning"):
        assert pkg in info["packages"]
    assert info["packages"]["torch"]
    assert "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    assert info["threads"]["torch_intra_op"] >= 1 and info["cpu"]["logical_cores"] >= 1
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    assert info["cpu"]["flags"] == [f for f in info["cpu"]["flags"] if f in flags]  # only flags the CPU has
    assert ("avx2" in info["cpu"]["flags"]) == ("avx2" in flags)
    assert isinstance(info["gpus"], list)
    text = invoke("env")
    assert text.exit_code == 0 and "onnxruntime providers: " in text.stdout and "cpu flags: " in text.stdout


def test_validate_json(recipe):
    res = invoke("validate", recipe, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out) == 1 and isinstance(out[0].pop("notes"), list)
    assert out == [{"recipe": str(recipe), "ok": True, "tasks": 1, "stages": ["teacher"], "data_files": 3}]
    res = invoke("validate", recipe, "--data", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out[0]["ok"] and out[0]["errors"] == [] and out[0]["splits"] == 3


def test_run_and_publish_json_keep_stdout_for_the_document(recipe, tmp_path):
    res = invoke("run", recipe, "--out", tmp_path / "run", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # nothing but the document on stdout
    assert out["run_dir"] == str(tmp_path / "run")
    rows = out["report"]["rows"]
    assert {(r["model"], r["split"]) for r in rows} == {("teacher", "dev"), ("teacher", "test")}
    assert "teacher" in res.stderr  # the stage's progress lines went to stderr
    res = invoke("publish", tmp_path / "run", "--to", tmp_path / "pub", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"markdown": str(tmp_path / "pub.md"), "json": str(tmp_path / "pub.json")}


def test_evaluate_model_dir_json(model_dir):
    res = invoke("evaluate", model_dir, "--task", "sst", "--data", PIPE / "sst.test.txt", "--format", "label_text",
                 "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "model" and out["runtime"] == "pytorch" and out["metric"] == "accuracy"
    assert out["value"] == out["metrics"]["accuracy"]


def test_progress_bars_go_to_stderr_and_nest(monkeypatch, capsys):
    from compressor.console import progress

    monkeypatch.setenv("COMPRESSOR_PROGRESS", "1")
    with progress("outer step", total=2) as outer:
        with progress("inner step") as inner:
            inner(3, "third")
        outer(2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "outer step" in captured.err and "2/2" in captured.err
    monkeypatch.setenv("COMPRESSOR_PROGRESS", "0")
    with progress("hidden", total=1) as advance:
        advance(1)
    assert capsys.readouterr().err == ""
