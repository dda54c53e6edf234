"""The run directory (compressor.rundir): layout, state.json as earlier runs wrote it, typed artefact lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.errors import CompressorError, RecipeError
from compressor.rundir import (
    Bundle, Graph, Int8Graph, ModelDir, OnnxGraph, RunDir, SingleTaskStudents, StageRecord, latest, teacher,
)

# a state.json in the format `compressor run` has written all along (paths relative to the run directory)
LEGACY = {"recipe": "chain", "completed": [
    {"name": "teacher", "kind": "train", "outputs": {"baselines": {}, "training": {}},
     "model_dir": "stages/00-teacher/model", "wall_s": 1.0, "notes": []},
    {"name": "distill", "kind": "distill",
     "outputs": {"single_task_students": {"ner": "stages/01-distill/single-ner"}},
     "model_dir": "stages/01-distill/model", "wall_s": 1.0, "notes": []},
    {"name": "export", "kind": "export", "outputs": {
        "onnx": "stages/02-export/model.opt.onnx", "raw": "stages/02-export/model.onnx", "optimized": None,
        "graph": "stages/02-export/graph.json", "model_dir": "stages/01-distill/model"},
     "model_dir": None, "wall_s": 1.0, "notes": []},
    {"name": "quantize", "kind": "quantize", "outputs": {
        "onnx": "stages/03-quantize/model.int8.onnx", "graph": "stages/03-quantize/graph.json",
        "model_dir": "stages/01-distill/model", "passed": True, "fallback_nodes": ["n1", "n2"]},
     "model_dir": None, "wall_s": 1.0, "notes": []},
    {"name": "bundle", "kind": "bundle", "outputs": {"bundle": "stages/04-bundle/bundle", "source_stage": "quantize"},
     "model_dir": None, "wall_s": 1.0, "notes": []},
]}


@pytest.fixture
def run(tmp_path) -> RunDir:
    (tmp_path / "state.json").write_text(json.dumps(LEGACY))
    return RunDir(tmp_path)


def test_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.stage_dir(3, "export") == tmp_path / "stages" / "03-export"
    assert run.partial_dir(3, "export") == tmp_path / "stages" / ".03-export.partial"
    assert run.checkpoint_dir("teacher") == tmp_path / "checkpoints" / "teacher"
    assert (run.state_path, run.recipe_path, run.report_json) == (
        tmp_path / "state.json", tmp_path / "recipe.yaml", tmp_path / "report.json")


def test_an_earlier_state_json_reads_as_typed_artefacts(run):
    root = run.path
    records = RunDir.finished(root).records()
    assert [type(a) for r in records for a in r.artefacts()] == [
        ModelDir, ModelDir, SingleTaskStudents, OnnxGraph, Int8Graph, Bundle]
    assert teacher(records).model_dir == root / "stages/00-teacher/model"
    name, graph = latest(records, OnnxGraph)
    assert name == "export" and graph == OnnxGraph(root / "stages/02-export/model.opt.onnx",
                                                   root / "stages/02-export/graph.json",
                                                   root / "stages/01-distill/model", root / "stages/02-export/model.onnx")
    name, int8 = latest(records, Graph)  # the latest graph of either kind
    assert name == "quantize" and isinstance(int8, Int8Graph) and int8.passed and int8.fallback_nodes == ("n1", "n2")
    assert latest(records, Graph, source="export")[1] == graph
    assert latest(records, Bundle)[1] == Bundle(root / "stages/04-bundle/bundle", "quantize")
    assert latest(records, SingleTaskStudents)[1].models == {"ner": root / "stages/01-distill/single-ner"}
    assert latest(records, ModelDir)[1] == ModelDir(root / "stages/01-distill/model")


def test_write_state_round_trips_with_relative_paths(run):
    state = run.read_state()
    assert state["completed"][0]["model_dir"] == str(run.path / "stages/00-teacher/model")
    run.write_state(state)
    assert json.loads(run.state_path.read_text()) == LEGACY  # relative again, every field kept


def test_lookup_errors_name_the_stage_and_the_kinds(run):
    records = run.records()
    with pytest.raises(RecipeError, match="stage 'q': source 'quantize' is not an earlier stage of kind export"):
        latest(records, OnnxGraph, source="quantize", consumer="q")
    with pytest.raises(RecipeError, match=r"stage 'q': needs an export stage before it \(a stage of kind export\)"):
        latest(records[:2], OnnxGraph, consumer="q")
    with pytest.raises(RecipeError, match="needs an export \\(or quantize\\) stage before it"):
        latest([StageRecord("teacher", "train", {}, Path("m"))], Graph, consumer="b")


def test_a_directory_that_is_not_a_run_is_one_clear_error(tmp_path):
    with pytest.raises(CompressorError, match="run directory does not exist"):
        RunDir.finished(tmp_path / "nope")
    with pytest.raises(CompressorError, match="state.json: not found"):
        RunDir.finished(tmp_path)
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(CompressorError, match=r"state.json:1: invalid JSON"):
        RunDir.finished(tmp_path)
    with pytest.raises(RecipeError, match="unreadable run state"):
        RunDir(tmp_path).read_state()


def test_the_run_enclosing_a_stage_model_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    model = run.stage_dir(0, "teacher") / "model"
    model.mkdir(parents=True)
    assert RunDir.enclosing(model) is None  # no state.json yet: not a run
    run.write_state({"completed": []})
    assert RunDir.enclosing(model).path == run.path
    assert RunDir.enclosing(tmp_path) is None
