import json

import pytest

from compressor.report.publish import publish_runs


def row(model, stage, task, split, value, params, size, lat, fmt="pytorch"):
    return {"model": model, "stage": stage, "task": task, "split": split, "metric": "f1", "value": value,
            "metrics": {"f1": value, "precision": value}, "params": params, "size_bytes": size,
            "latency_ms_p50": lat, "format": fmt}


@pytest.fixture
def run_dir(tmp_path):
    report = {
        "recipe": "r", "created": "now", "machine": {"processor": "test-cpu"}, "threads": 2,
        "stages": [{"name": "teacher", "kind": "train", "wall_s": 10.0, "notes": []},
                   {"name": "prune", "kind": "prune", "wall_s": 5.0, "notes": []}],
        "outputs": {"teacher": {"training": {"teacher": {"wall_s": 10.0, "epochs_run": 2},
                                             "single:a": {"wall_s": 4.0, "epochs_run": 2}}}},
        "rows": [row("teacher", "teacher", "a", "test", 0.80, 100, 400, 30.0),
                 row("single:a", "teacher", "a", "test", 0.70, 90, 360, 28.0),
                 row("prune", "prune", "a", "test", 0.76, 20, 80, 9.0),
                 row("export", "export", "a", "test", 0.78, 20, 80, 5.0, fmt="onnx")],
        "notes": [],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_publish_compares_twins_and_checks_student_targets(run_dir, tmp_path):
    md, js = publish_runs([run_dir], tmp_path / "out", "T", notes=["context line"])
    data = json.loads(js.read_text())["runs"][0]
    comp = data["comparison"][0]
    assert comp["multi_task"] == 0.80 and comp["single_task"] == 0.70 and comp["delta"] == pytest.approx(0.10)
    pruned = next(c for c in data["compression"] if c["model"] == "prune")
    assert pruned["retention"] == pytest.approx(0.95)
    assert pruned["params_ratio"] == pytest.approx(0.2) and pruned["speedup"] == pytest.approx(30 / 9)
    assert pruned["size_ratio"] == pytest.approx(5.0)
    t = data["targets"]
    assert t["student"] == "prune" and t["params_met"] and t["speedup_met"] and not t["retention_met"]
    text = md.read_text()
    assert text.startswith("# T") and "context line" in text and "test-cpu" in text
    assert "| a | test | f1 | 0.8000 | 0.7000 | +0.1000 |" in text


def test_publish_shows_the_fine_tuned_model_and_where_each_head_came_from(run_dir, tmp_path):
    report = json.loads((run_dir / "report.json").read_text())
    report["stages"].append({"name": "ft", "kind": "finetune", "wall_s": 3.0, "notes": []})
    report["outputs"]["teacher"]["training"]["teacher"]["selection"] = {"a": {"head_epoch": 1, "dev": 0.8}}
    report["rows"].append(row("ft:a", "ft", "a", "test", 0.75, 100, 400, 30.0))
    (run_dir / "report.json").write_text(json.dumps(report))
    md, js = publish_runs([run_dir], tmp_path / "out", "T")
    comp = json.loads(js.read_text())["runs"][0]["comparison"][0]
    assert comp["fine_tuned"] == 0.75 and comp["head_epoch"] == 1
    assert "| a | test | f1 | 0.8000 | 0.7000 | +0.1000 | 0.7500 | +0.0500 | 1 |" in md.read_text()
