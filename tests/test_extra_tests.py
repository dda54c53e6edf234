"""Extra test sets per task (``tests:``): scored by every evaluation as their own split, with retention."""

from __future__ import annotations

import json

from conftest import FIXTURES
from test_pipeline import invoke, recipe_text, tiny_model_path  # noqa: F401  (fixture)

PIPE = FIXTURES / "pipeline"


def _recipe(tmp_path, model_path, tests: str) -> str:
    text = recipe_text(model_path, epochs=1, baselines=False)
    text = text.replace("data: {train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}",
                        f"data: {{train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}}\n    tests: {tests}")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_an_extra_test_set_is_scored_and_reported_as_its_own_split_with_retention(tmp_path, tiny_model_path):
    shifted = tmp_path / "shifted.txt"  # a shifted set: the dev sentences, other labels for half of them
    lines = (PIPE / "sst.dev.txt").read_text().splitlines()
    shifted.write_text("\n".join(("1" if ln[0] == "0" else "0") + ln[1:] if i % 2 else ln
                                 for i, ln in enumerate(lines)) + "\n")
    recipe = _recipe(tmp_path, tiny_model_path, f"{{shifted: {shifted}, same: sst.test.txt}}")
    result = invoke("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {(r["task"], r["split"]): r for r in report["rows"] if r["model"] == "teacher"}
    assert {("sst", "test:shifted"), ("sst", "test:same"), ("sst", "test"), ("sst", "dev")} <= set(rows)
    assert not any(split.startswith("test:") for task, split in rows if task == "ner")
    # the same file as test scores the same; the shifted set scores differently from dev
    assert rows[("sst", "test:same")]["value"] == rows[("sst", "test")]["value"]
    assert rows[("sst", "test:shifted")]["value"] != rows[("sst", "dev")]["value"]
    assert rows[("sst", "test:shifted")].get("retention") in (None, 1.0)
    assert "test:shifted" in (tmp_path / "out" / "report.md").read_text()


def test_an_extra_test_set_with_labels_outside_the_schema_is_named_by_validate(tmp_path, tiny_model_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 fine words\n7 a label the schema lacks\n")
    recipe = _recipe(tmp_path, tiny_model_path, f"{{odd: {bad}}}")
    result = invoke("validate", recipe, "--data")
    assert result.exit_code == 2
    assert str(bad) in result.output and "'7'" in result.output and "test:odd" in result.output


def test_bad_extra_test_set_names_and_missing_files_exit_2(tmp_path, tiny_model_path):
    recipe = _recipe(tmp_path, tiny_model_path, "{'a b': sst.test.txt}")
    result = invoke("validate", recipe)
    assert result.exit_code == 2 and "tests" in result.output and "a b" in result.output
    recipe = _recipe(tmp_path, tiny_model_path, "{gone: nowhere.txt}")
    result = invoke("validate", recipe)
    assert result.exit_code == 2 and "nowhere.txt" in result.output and "tests.gone" in result.output


def test_run_refuses_an_extra_test_set_with_labels_outside_the_schema_before_training(tmp_path, tiny_model_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 fine words\n7 a label the schema lacks\n")
    recipe = _recipe(tmp_path, tiny_model_path, f"{{odd: {bad}}}")
    result = invoke("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert str(bad) in result.output and "'odd'" in result.output and "['7']" in result.output
    assert "epoch" not in result.output and not (tmp_path / "out").exists()
