"""scripts/recovery_ab.py reads the teacher and its dev metrics from a finished run, never from numbers of its own."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from compressor.errors import CompressorError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recovery_ab.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("recovery_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(root: Path, rows: list[dict]) -> Path:
    (root / "stages/00-teacher/model").mkdir(parents=True)
    (root / "state.json").write_text(json.dumps({"recipe": "x", "completed": [
        {"name": "teacher", "kind": "train", "model_dir": "stages/00-teacher/model", "outputs": {}}]}))
    (root / "report.json").write_text(json.dumps({"rows": rows}))
    return root


def test_the_teacher_and_its_dev_metrics_come_from_the_run(script, tmp_path):
    run = _run_dir(tmp_path / "run", [
        {"model": "teacher", "task": "ner", "split": "dev", "value": 0.79},
        {"model": "teacher", "task": "ner", "split": "test", "value": 0.80},
        {"model": "single:ner", "task": "ner", "split": "dev", "value": 0.70},
        {"model": "teacher", "task": "sst2", "split": "dev", "value": 0.88}])
    model_dir, dev = script.teacher_of(run)
    assert model_dir == run / "stages/00-teacher/model"
    assert dev == {"ner": 0.79, "sst2": 0.88}


def test_a_run_without_teacher_rows_is_one_error(script, tmp_path):
    run = _run_dir(tmp_path / "run", [{"model": "distill", "task": "ner", "split": "dev", "value": 0.5}])
    with pytest.raises(CompressorError, match="no dev rows of model 'teacher'"):
        script.teacher_of(run)
    with pytest.raises(CompressorError, match="run directory does not exist"):
        script.teacher_of(tmp_path / "nope")


def test_variants_and_the_table(script, capsys, tmp_path):
    assert script.recovery_settings("drop0-warm") == {"dropout": 0.0, "warmup_ratio": 0.1}
    assert script.recovery_settings("base") == {"dropout": None}
    with pytest.raises(SystemExit):
        script.recovery_settings("drop1")
    results = tmp_path / "ab.jsonl"
    results.write_text(json.dumps({"variant": "drop0", "ffn": 0.25, "heads": 0.0, "steps": 60,
                                   "retention": {"ner": 0.991, "qa": 0.966}}) + "\n")
    assert script.main(["table", str(results)]) == 0
    assert "| drop0 | 0.25 | 0 | 60 | 0.991 | 0.966 | 0.966 |" in capsys.readouterr().out
