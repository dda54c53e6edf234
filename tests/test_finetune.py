"""The finetune stage: per-task models fine-tuned from the joint model, scored beside it."""

from __future__ import annotations

import json

from compressor.model.io import load_model
from test_pipeline import invoke, recipe_text, tiny_model_path  # noqa: F401  (fixture)

FINETUNE = """  - kind: finetune
    name: ft
    epochs: 2
    batch_size: 8
    lr: 1.0e-3
    head_lr: 3.0e-3
    sampling: {strategy: round_robin}
"""


def test_finetune_writes_one_model_per_task_scored_beside_the_joint_model(tmp_path, tiny_model_path):
    text = recipe_text(tiny_model_path, epochs=1, baselines=False).replace("report:", FINETUNE + "report:")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "state.json").read_text())
    ft = next(s for s in state["completed"] if s["name"] == "ft")
    assert set(ft["outputs"]["models"]) == {"ner", "sst"} and ft["outputs"]["source"] == "teacher"
    teacher = next(s for s in state["completed"] if s["name"] == "teacher")
    assert ft.get("model_dir") in (None, teacher["model_dir"])  # the run's current model stays the joint one
    for task in ("ner", "sst"):
        model, _, _ = load_model(out / ft["outputs"]["models"][task])
        assert list(model.tasks) == [task]  # only its own head (neither requires another)
        rows = [r for r in report["rows"] if r["model"] == f"ft:{task}"]
        assert {r["task"] for r in rows} == {task} and {r["split"] for r in rows} == {"dev", "test"}
        dev_row = next(r for r in rows if r["split"] == "dev")
        assert dev_row["value"] == ft["outputs"]["dev"][task]
        joint = next(r for r in report["rows"] if r["model"] == "teacher" and r["task"] == task and r["split"] == "dev")
        if joint["value"]:  # retention against the joint teacher's row (none against a zero reference)
            assert dev_row["retention"] == round(dev_row["value"] / joint["value"], 4) or \
                abs(dev_row["retention"] - dev_row["value"] / joint["value"]) < 1e-3


def test_finetune_of_a_task_the_model_lacks_is_a_recipe_error(tmp_path, tiny_model_path):
    text = recipe_text(tiny_model_path, epochs=1, baselines=False).replace(
        "report:", FINETUNE + "    tasks: [ner, qa]\nreport:")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = invoke("validate", recipe)
    assert result.exit_code == 2
    assert "stages[1].tasks" in result.output and "qa" in result.output
