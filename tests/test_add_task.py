"""The add_task stage: a finished student learns a new task on its frozen encoder; every existing output stays
bit-identical in PyTorch and in the re-exported ONNX graph, and export -> quantize -> bundle after it ship the new
output at a small size cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compressor.cli.main import app
from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"
runner = CliRunner()


def _save(path: Path, tokenizer, tasks: dict[str, list[str]], seed: int) -> Path:
    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    plugins = {"ner": "ner", "sst": "classification"}
    encoder = tiny_bert(hidden=32, layers=2, heads=4, ffn=64, seed=seed)
    torch.manual_seed(seed)
    model = MultiTaskModel(encoder, {t: build_task(plugins[t], t, labels) for t, labels in tasks.items()})
    save_model(model, tokenizer, path, 32)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("add-task-models")
    ner_labels = ["Loc", "Org", "Other", "Peop"]
    student = _save(tmp / "student", tokenizer, {"ner": ner_labels}, seed=1)
    teacher = _save(tmp / "teacher", tokenizer, {"ner": ner_labels, "sst": ["0", "1"]}, seed=2)
    return student, teacher


def recipe(tmp: Path, tasks: str, stages: str) -> Path:
    path = tmp / "recipe.yaml"
    ner = "{name: ner, plugin: ner, format: conll, data: {train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}}"
    sst = ("{name: sst, plugin: classification, format: label_text, data: {train: sst.train.txt, dev: sst.dev.txt, "
           "test: sst.test.txt}}")
    task_lines = "\n".join(f"  - {ner if t == 'ner' else sst}" for t in tasks.split())
    path.write_text(f"""\
name: add
seed: 3
data_root: {PIPE}
model: {{max_length: 32}}
tasks:
{task_lines}
stages:
{stages}
report: {{latency: false}}
""")
    return path


def run(path: Path, out: Path):
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), json.loads((out / "state.json").read_text())


@pytest.fixture(scope="module")
def added(tmp_path_factory, models):
    """load teacher -> add_task sst to the ner-only student -> export -> quantize (dynamic) -> bundle."""
    student, teacher = models
    tmp = tmp_path_factory.mktemp("add-task-run")
    stages = f"""\
  - {{kind: load, name: teacher, path: {teacher}}}
  - {{kind: add_task, name: add_sst, task: sst, path: {student}, epochs: 3, batch_size: 8, lr: 0.01}}
  - {{kind: export, name: export, evaluate: false}}
  - {{kind: quantize, name: quantize, mode: dynamic, tolerance: 1.0}}
  - {{kind: bundle, name: bundle}}"""
    report, state = run(recipe(tmp, "ner sst", stages), tmp / "out")
    return tmp / "out", report, state


@pytest.fixture(scope="module")
def previous(tmp_path_factory, models):
    """The student as it was, through the same export and quantize stages."""
    student, _ = models
    tmp = tmp_path_factory.mktemp("add-task-previous")
    stages = f"""\
  - {{kind: load, name: student, path: {student}, evaluate: false}}
  - {{kind: export, name: export, evaluate: false}}
  - {{kind: quantize, name: quantize, mode: dynamic, tolerance: 1.0}}"""
    _, state = run(recipe(tmp, "ner", stages), tmp / "out")
    return tmp / "out", state


def _stage(state: dict, name: str) -> dict:
    return next(s for s in state["completed"] if s["name"] == name)


def _ner_batches(tokenizer) -> list[dict[str, np.ndarray]]:
    from compressor.tasks import build_task

    ner = build_task("ner", "ner", ["Loc", "Org", "Other", "Peop"])
    examples = ner.read(PIPE / "ner.test.conll") + ner.read(PIPE / "ner.dev.conll")
    features = ner.encode(examples, tokenizer, 32, False).features
    return [{k: v.numpy() for k, v in ner.collate(features[i : i + 8]).items()} for i in range(0, len(features), 8)]


def test_existing_task_outputs_are_bit_identical_in_pytorch(added, models, tokenizer):
    from compressor.model.io import load_model
    from compressor.model.forward import torch_forward

    out, report, state = added
    student, _ = models
    record = _stage(state, "add_sst")
    assert record["outputs"]["existing_max_abs_diff"] == {"pytorch": 0.0, "onnx": 0.0}
    old, _, _ = load_model(student)
    new, _, manifest = load_model(out / record["model_dir"])
    assert list(new.tasks) == ["ner", "sst"] and manifest["added_task"]["task"] == "sst"
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    worst = 0.0
    for batch in _ner_batches(tokenizer):
        a, b = torch_forward(old)("ner", batch)["logits"], torch_forward(new)("ner", batch)["logits"]
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst == 0.0


def _graph(out: Path, state: dict, stage: str) -> Path:
    return out / _stage(state, stage)["outputs"]["onnx"]


@pytest.mark.parametrize("stage", ["export", "quantize"])
def test_existing_outputs_of_the_reexported_graph_equal_the_previous_graph(added, previous, tokenizer, stage):
    from compressor.runtime.session import build_feeds, make_session
    from compressor.runtime.spec import GraphSpec

    (out, _, state), (prev_out, prev_state) = added, previous
    new_path, old_path = _graph(out, state, stage), _graph(prev_out, prev_state, stage)
    new_spec = GraphSpec.read(out / _stage(state, "export")["outputs"]["graph"])
    old_spec = GraphSpec.read(prev_out / _stage(prev_state, "export")["outputs"]["graph"])
    assert set(new_spec.output_names) == {"ner.logits", "sst.logits"} and old_spec.output_names == ["ner.logits"]
    new, old = make_session(new_path, 1), make_session(old_path, 1)
    worst = 0.0
    for batch in _ner_batches(tokenizer):
        a = old.run(["ner.logits"], build_feeds(old_spec, batch, ["ner"]))[0]
        b = new.run(["ner.logits"], build_feeds(new_spec, batch, ["ner"]))[0]
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst == 0.0


def test_new_task_is_learned_reported_against_the_teacher_and_bundled_small(added, models):
    from compressor.runtime import Bundle

    out, report, state = added
    _, teacher = models
    outputs = _stage(state, "add_sst")["outputs"]
    history = outputs["history"]
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]
    comparison = outputs["comparison"]
    assert comparison["reference"] == str(teacher)
    teacher_rows = {r["split"]: r["value"] for r in report["rows"] if r["model"] == "teacher" and r["task"] == "sst"}
    for split in ("dev", "test"):
        c = comparison["splits"][split]
        assert c["reference"] == teacher_rows[split] and 0.0 <= c["added"] <= 1.0
        row = next(r for r in report["rows"] if r["model"] == "add_sst" and r["task"] == "sst" and r["split"] == split)
        assert row["value"] == c["added"] and row["retention"] == pytest.approx(c["added"] / teacher_rows[split])
    # rows for the existing task too, and the same metric as the student had (identical outputs)
    assert {(r["task"], r["split"]) for r in report["rows"] if r["model"] == "add_sst"} == {
        ("ner", "dev"), ("ner", "test"), ("sst", "dev"), ("sst", "test")}

    bundle_out = _stage(state, "bundle")["outputs"]
    assert bundle_out["tasks"] == ["ner", "sst"]
    assert 0 < outputs["head_bytes"] < 0.05 * bundle_out["size_bytes"]
    assert outputs["added_file_bytes"] >= outputs["head_bytes"]
    bundle = Bundle.load(out / bundle_out["bundle"])
    prediction = bundle.predict("the film was fun and the cast was superb .", tasks=["sst"])[0]["predictions"]["sst"]
    assert prediction["label"] in ("0", "1")


def test_adding_a_task_the_model_has_or_the_recipe_lacks_is_refused(tmp_path, models):
    student, teacher = models
    path = recipe(tmp_path, "ner sst", f"  - {{kind: add_task, task: ner, path: {teacher}}}")
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "already has task 'ner'" in result.stderr
    assert not (tmp_path / "out").exists()
    path = recipe(tmp_path, "ner", f"  - {{kind: add_task, task: qa, path: {student}}}")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "stages[0].task" in result.stderr and "adds task 'qa'" in result.stderr
    path = recipe(tmp_path, "ner sst", "  - {kind: add_task, task: sst}")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "needs a model from an earlier stage" in result.stderr


def test_source_stage_and_compare_to(tmp_path, models):
    """load the student (the recipe's new task is added later, so load accepts the model without it) -> export ->
    add_task from the model behind that export, compared with a given model directory."""
    student, teacher = models
    stages = f"""\
  - {{kind: load, name: student, path: {student}, evaluate: false}}
  - {{kind: export, name: export0, evaluate: false, optimize: false}}
  - {{kind: add_task, name: add_sst, task: sst, source: export0, compare_to: {teacher}, epochs: 1, batch_size: 8}}"""
    _, state = run(recipe(tmp_path, "ner sst", stages), tmp_path / "out")
    outputs = _stage(state, "add_sst")["outputs"]
    assert outputs["base_model"] == str(student) and outputs["existing_tasks"] == ["ner"]
    assert outputs["comparison"]["reference"] == str(teacher)
    assert set(outputs["comparison"]["splits"]) == {"dev", "test"}
    assert all(c["reference"] is not None for c in outputs["comparison"]["splits"].values())
