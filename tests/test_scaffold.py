"""``compressor tasks new`` writes plugin packages that pass the contract kit; the scaffolded token plugin installs,
passes its own tests and is decoded by its own decoder through ``compressor predict``. Also ``compressor tasks
check`` and ``compressor tasks list`` with a broken plugin."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.runtime.decoders import DECODERS
from compressor.scaffold import KINDS
from compressor.testing import check_plugin

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, shared cores


@pytest.mark.parametrize("kind", KINDS)
def test_scaffolded_plugin_passes_the_kit_with_its_own_decoder(kind, tmp_path, tokenizer, monkeypatch):
    name = "sc_" + kind.replace("-", "_")
    out = tmp_path / name
    res = CliRunner().invoke(app, ["tasks", "new", name, "--kind", kind, "--out", str(out)])
    assert res.exit_code == 0, res.output
    module = f"compressor_{name}"
    for rel in ("pyproject.toml", f"{module}/task.py", f"{module}/head.py", f"{module}/decoder.py",
                f"{module}/data/train.jsonl", f"{module}/data/dev.jsonl", f"tests/test_{name}.py"):
        assert (out / rel).is_file(), rel
    project = tomllib.loads((out / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"]
    assert eps["compressor.tasks"] == {name: f"{module}.task:{name.title().replace('_', '')}Task"}
    assert list(eps["compressor.decoders"]) == [name]

    monkeypatch.syspath_prepend(str(out))
    task_cls = getattr(importlib.import_module(f"{module}.task"), eps["compressor.tasks"][name].split(":")[1])
    decoder_cls = getattr(importlib.import_module(f"{module}.decoder"), eps["compressor.decoders"][name].split(":")[1])
    DECODERS.register(name, decoder_cls)
    try:
        data = out / module / "data" / "train.jsonl"
        inputs = None
        if kind == "span-pair":
            rec = json.loads(data.read_text().splitlines()[0])
            inputs = {"texts": [rec["text"]], "spans": [[rec["head"], rec["tail"]]]}
        report = check_plugin(task_cls, data, name=name, tokenizer=tokenizer, runtime_inputs=inputs)
        assert "runtime decoder" in report.checked and "save/load" in report.checked
        assert ("first-sub-token labels" in report.checked) == (kind == "token")
    finally:
        DECODERS.unregister(name)


def test_new_refuses_bad_names_kinds_and_non_empty_directories(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "new", "pos", "--kind", "tokn", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "unknown kind 'tokn'; did you mean 'token'?" in res.output
    res = runner.invoke(app, ["tasks", "new", "Bad-Name", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "plugin name 'Bad-Name'" in res.output
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    res = runner.invoke(app, ["tasks", "new", "pos", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "exists and is not empty" in res.output


def test_scaffolded_package_installs_passes_its_tests_and_predicts_through_the_cli(tmp_path, tokenizer):
    """pip install (into a target directory), its own pytest, then a bundle decoded by its own decoder."""
    pkg = tmp_path / "compressor-pos"
    assert CliRunner().invoke(app, ["tasks", "new", "pos", "--kind", "token", "--out", str(pkg)]).exit_code == 0
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", "--target", str(site), str(pkg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**__import__("os").environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                          capture_output=True, text=True, env=env, cwd=pkg, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout

    bundle = tmp_path / "bundle"
    script = f"""
import sys, json
sys.path.insert(0, {str(REPO / 'tests')!r})
from conftest import tiny_bert
from transformers import AutoTokenizer
from compressor.model.multitask import MultiTaskModel, resolve_encoder_path
from compressor.export.onnx_export import export_onnx, graph_spec
from compressor.export.bundle import write_bundle
from compressor.tasks import TASKS, build_task
assert TASKS.source("pos") == "compressor-pos"
task = build_task("pos", "pos")
task.labels = task.fit_labels(task.read({str(pkg / 'compressor_pos' / 'data' / 'train.jsonl')!r}))
model = MultiTaskModel(tiny_bert(seed=2), {{"pos": task}}).eval()
tok = AutoTokenizer.from_pretrained(resolve_encoder_path("offline-default"))
tok.save_pretrained({str(tmp_path / 'tok')!r})
spec = graph_spec(model, 32)
graph = export_onnx(model, {str(tmp_path / 'model.onnx')!r}, spec)
write_bundle({str(bundle)!r}, graph, spec, {str(tmp_path / 'tok' / 'tokenizer.json')!r}, tok.pad_token_id)
print(json.dumps(task.labels))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((bundle / "tasks.json").read_text())["tasks"]["pos"]["decoder"]["decoder"] == "pos"
    proc = subprocess.run([sys.executable, "-m", "compressor.cli.main", "predict", str(bundle),
                           "the old cat sees a dog .", "-t", "pos", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = json.loads(proc.stdout)[0]["predictions"]["pos"]
    assert [w["text"] for w in pred["words"]] == ["the", "old", "cat", "sees", "a", "dog", "."]
    assert all(w["label"] in labels for w in pred["words"])
    # without the package the bundle names the missing decoder
    proc = subprocess.run([sys.executable, "-m", "compressor.cli.main", "predict", str(bundle), "x", "-t", "pos"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert f"{bundle / 'tasks.json'}: task 'pos' uses unknown decoder 'pos'" in proc.stderr


def test_tasks_check_runs_the_kit_from_the_cli():
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "check", "ner", "--data", str(REPO / "tests/fixtures/ner/conll04_tiny.json")])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("plugin 'ner': contract ok")
    res = runner.invoke(app, ["tasks", "check", "relation", "--data", str(REPO / "tests/fixtures/re_conll04_tiny.json"),
                              "--sibling", "ner=ner", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True
    res = runner.invoke(app, ["tasks", "check", "relation", "--data", str(REPO / "tests/fixtures/re_conll04_tiny.json")])
    assert res.exit_code == 2 and "plugin 'relation': requires: needs task(s) ner beside it" in res.output


def test_tasks_check_reads_the_data_in_its_encoding(tmp_path):
    """A latin-1 file passes the kit with --encoding latin-1, its accents read as written; without it, one line
    naming the file and line."""
    text = (REPO / "tests/fixtures/classification/sst_tiny.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    lines[0] = lines[0] + " caf\u00e9"
    data = tmp_path / "latin1.txt"
    data.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "check", "classification", "--data", str(data), "--format", "label_text",
                              "--encoding", "latin-1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True
    from compressor.data.store import read_split
    from compressor.tasks import build_task

    first = read_split(build_task("classification", "c"), data, "label_text", "latin-1")[0]
    assert first.text.endswith("caf\u00e9")
    res = runner.invoke(app, ["tasks", "check", "classification", "--data", str(data), "--format", "label_text"])
    assert res.exit_code == 2 and f"{data}:1: not valid UTF-8" in res.stderr, res.output


def test_tasks_list_shows_a_broken_plugin_and_the_rest():
    from compressor.tasks import TASKS

    TASKS.register("brokn", "compressor_no_such_module:Task", source="compressor-brokn")
    try:
        res = CliRunner().invoke(app, ["tasks", "list", "--json"])
        assert res.exit_code == 0, res.output
        rows = {r["name"]: r for r in json.loads(res.output)}
        assert rows["brokn"]["status"] == "broken" and "cannot load 'compressor_no_such_module:Task'" in rows["brokn"]["error"]
        assert rows["ner"]["status"] == "ok" and rows["ner"]["metric"] == "f1"
        res = CliRunner().invoke(app, ["tasks", "list"])
        assert res.exit_code == 0 and "BROKEN" in res.output and "classification" in res.output
    finally:
        TASKS.unregister("brokn")
