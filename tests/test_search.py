"""The search stage and `compressor compress` on a tiny trained teacher (random BERT, small fixtures): a search
returns a candidate holding the floor when one exists, refuses (exit 1, every trial reported, near miss named)
when none does, resumes without retraining finished trials, and bad input is a one-line error with exit 2."""

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


TASKS = f"""\
data_root: {PIPE}
model: {{encoder: ENCODER, max_length: 32}}
tasks:
  - {{name: ner, plugin: ner, format: conll, data: {{train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}}}}
  - {{name: sst, plugin: classification, format: label_text, data: {{train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}}}}
report: {{latency_runs: 2, latency_warmup: 1, latency_seq_len: 32, threads: 1}}
"""

# cheap trials: few latency runs, short sequence, magnitude importance
SEARCH_DEFAULTS = ("importance: magnitude, latency_runs: 2, latency_warmup: 0, latency_seq_len: 32, "
                   "recovery: {batch_size: 8, lr: 1.0e-3}")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer):
    """A tiny BERT trained jointly on NER + SST through the pipeline; returns (model dir, tasks block)."""
    tmp = tmp_path_factory.mktemp("search-teacher")
    encoder = tmp / "encoder"
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(encoder)
    tokenizer.save_pretrained(encoder)
    tasks = TASKS.replace("ENCODER", str(encoder))
    recipe = tmp / "teacher.yaml"
    recipe.write_text(f"name: teacher\nseed: 3\n{tasks}stages:\n  - {{kind: train, name: teacher, epochs: 3, "
                      "batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0, sampling: {strategy: round_robin}}\n")
    result = invoke("run", recipe, "--out", tmp / "run")
    assert result.exit_code == 0, result.output
    return tmp / "run" / "stages" / "00-teacher" / "model", tasks


def search_recipe(tmp: Path, teacher, search: str, rest: str = "", name: str = "s") -> Path:
    model_dir, tasks = teacher
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\nseed: 5\n{tasks}stages:\n  - {{kind: load, name: teacher, path: {model_dir}}}\n"
                    f"  - {{kind: search, name: search, {SEARCH_DEFAULTS}, {search}}}\n{rest}")
    return path


def test_search_returns_a_candidate_that_holds_the_floor(tmp_path, teacher):
    """The unpruned setting (layers 2, no head/FFN cut) is in the space, so a candidate holds a 0.8 floor; the
    chosen one is the fastest that does, its model goes on to export -> quantize -> bundle."""
    recipe = search_recipe(tmp_path, teacher, "retention: 0.8, objective: latency, budget: {trials: 4}, "
                           "recovery_steps: 4, full_recovery_steps: 6, "
                           "space: {layers: [1, 2], head_ratio: [0.0, 0.5], ffn_ratio: [0.0], int8: [dynamic]}",
                           "  - {kind: export}\n  - {kind: quantize, tolerance: 1.0}\n  - {kind: bundle}\n")
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    search = report["outputs"]["search"]
    trials = search["trials"]
    assert len(trials) == 4  # the space has exactly four settings: every one trained once
    assert len({json.dumps(t["knobs"], sort_keys=True) for t in trials}) == 4
    passing = [t for t in trials if t["passed"]]
    assert passing, trials
    chosen = search["chosen"]
    assert chosen["passed"] and all(chosen["retention"][t] >= 0.8 for t in ("ner", "sst"))
    assert chosen["latency_ms"] == min(t["latency_ms"] for t in passing)
    for t in trials:  # every trial is measured: per-task dev metric and retention, latency, size
        assert set(t["retention"]) == {"ner", "sst"} and t["latency_ms"] > 0 and t["size_bytes"] > 0
    # the first trial is the source as it is (every layer, nothing cut), not recovered: the reference point
    assert trials[0]["knobs"]["layers"] == 2 and set(trials[0]["knobs"]["head_ratios"]) == {0.0}
    assert trials[0]["params"] == max(t["params"] for t in trials)
    stage_dir = out / "stages" / "01-search"
    assert (stage_dir / "pareto.png").stat().st_size > 1000
    table = (stage_dir / "trials.md").read_text()
    assert "(chosen)" in table and table.count("\n| ") >= 5
    assert "### search" in (out / "report.md").read_text() or "(chosen)" in (out / "report.md").read_text()
    assert (stage_dir / "model" / "manifest.json").is_file()
    # the chosen student is what export, quantize and bundle used
    used = Path(report["outputs"]["export"]["model_dir"])  # stored relative to the run directory
    assert (used if used.is_absolute() else out / used).resolve() == (stage_dir / "model").resolve()
    assert any(r["stage"] == "quantize" and r["format"] == "onnx-int8" for r in report["rows"])
    assert (out / "stages" / "04-bundle" / "bundle" / "model.onnx").is_file()
    assert not (out / "checkpoints" / "search").exists()  # the study moved into the stage directory


def test_search_refuses_when_no_candidate_holds_the_floor(tmp_path, teacher, monkeypatch):
    """Drastic cuts without recovery, and a scorer that gives every candidate at most 60% of the teacher (a tiny
    teacher's dev scores are too noisy to guarantee that a cut loses): exit 1, every trial reported, the near
    miss named, no stage directory."""
    import compressor.search.candidate as candidate

    real = candidate.retention
    monkeypatch.setattr(candidate, "retention", lambda v, ref, hib: 0.6 * real(v, ref, hib))
    recipe = search_recipe(tmp_path, teacher, "retention: {ner: 0.9, sst: 0.7}, objective: size, budget: {trials: 2}, "
                           "recovery_steps: 0, early_stop_margin: null, space: {layers: [1], head_ratio: [0.75], "
                           "ffn_ratio: [0.5, 0.75], int8: [none]}")
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 1, result.output
    assert "no candidate held" in result.stderr and "best near miss: trial" in result.stderr
    evidence = out / "checkpoints" / "search" / "evidence"
    rows = json.loads((evidence / "trials.json").read_text())["trials"]
    assert len(rows) == 2 and not any(r["passed"] for r in rows)
    assert (evidence / "pareto.png").is_file() and (evidence / "trials.md").is_file()
    assert not (out / "stages" / "01-search").exists()  # no half-written stage
    report = json.loads((out / "report.json").read_text())
    assert any("best near miss" in n for n in report["notes"])


def test_search_resumes_without_repeating_finished_trials(tmp_path, teacher, monkeypatch):
    """Budget 2, then a kill in the middle of trial 3, then a resume with budget 4: trials 0-1 are never trained
    again, the killed setting is retried, and exactly 2 more are trained."""
    from compressor.search.candidate import CandidateBuilder

    trained: list[tuple] = []
    original = CandidateBuilder.trial

    def counting(self, knobs, seed, floors, workdir=None):
        trained.append((knobs, seed))
        if kill["at"] is not None and len(trained) == kill["at"]:
            raise KeyboardInterrupt  # what Ctrl-C / SIGTERM does to a run
        return original(self, knobs, seed, floors, workdir)

    kill = {"at": None}
    monkeypatch.setattr(CandidateBuilder, "trial", counting)
    space = ("retention: 0.1, objective: size, recovery_steps: 2, full_recovery_steps: 2, "
             "space: {layers: [1, 2], head_ratio: [0.0, 0.5], ffn_ratio: [0.0, 0.5], int8: [none]}")
    out = tmp_path / "out"
    # session 1: budget 2 -> two trials trained; the stage succeeds and keeps its study
    first = search_recipe(tmp_path, teacher, f"{space}, budget: {{trials: 2}}", name="first")
    result = invoke("run", first, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(trained) == 2
    study = out / "stages" / "01-search" / "study.db"
    # a bigger budget on the same study: simulate what a killed run leaves (the study in the checkpoint dir)
    ckpt = out / "checkpoints" / "search"
    ckpt.mkdir(parents=True)
    import shutil

    shutil.copyfile(study, ckpt / "study.db")
    shutil.copyfile(out / "stages" / "01-search" / "trials.json", tmp_path / "first-trials.json")
    state = json.loads((out / "state.json").read_text())
    state["completed"] = [s for s in state["completed"] if s["name"] != "search"]
    (out / "state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "stages" / "01-search")
    bigger = search_recipe(tmp_path, teacher, f"{space}, budget: {{trials: 4}}", name="first")
    # session 2: killed in the middle of its second trial (the 4th overall)
    kill["at"] = 4
    result = invoke("run", bigger, "--out", out, "--resume")
    assert result.exit_code != 0
    killed = trained[3][0]
    # session 3: resume; the killed setting is retried, nothing finished is trained again
    kill["at"] = None
    result = invoke("run", bigger, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert len(trained) == 5  # 2 (session 1) + 1 finished + 1 killed (session 2) + 1 retried (session 3)
    settings = [k for k, _ in trained]
    assert settings[4] == killed
    assert len(set(settings[:3])) == 3 and killed not in settings[:3]  # no finished trial trained twice
    rows = json.loads((out / "stages" / "01-search" / "trials.json").read_text())["trials"]
    assert len(rows) == 4 and len({json.dumps(r["knobs"], sort_keys=True) for r in rows}) == 4


@pytest.mark.parametrize("field, value, expect", [
    ("retention", "1.5", "must be in (0, 1]"),
    ("retention", "0", "must be in (0, 1]"),
    ("objective", "accuracy", "objective"),
    ("budget", "{trials: 0}", "budget.trials"),
    ("space", "{head_ratio: [1.0]}", "space.head_ratio"),
])
def test_bad_search_fields_exit_2_and_write_nothing(tmp_path, teacher, field, value, expect):
    recipe = search_recipe(tmp_path, teacher, f"{field}: {value}")
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 2, result.output
    assert expect in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


def test_space_without_candidate_and_task_without_dev_exit_2(tmp_path, teacher):
    # 0.6 of 4 heads rounds to 2... 0.9 rounds to 4: every head of every layer
    recipe = search_recipe(tmp_path, teacher, "space: {head_ratio: [0.9]}")
    result = invoke("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "space.head_ratio" in result.stderr and "no candidate" in result.stderr
    assert not (tmp_path / "out").exists()  # checked against the loaded teacher before anything is written
    model_dir, tasks = teacher
    no_dev = search_recipe(tmp_path, (model_dir, tasks.replace("dev: sst.dev.txt, ", "")), "retention: 0.9")
    result = invoke("run", no_dev, "--out", tmp_path / "out2")
    assert result.exit_code == 2 and "tasks[1].data.dev" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_compress_shortcut_validates_its_options(tmp_path, teacher):
    model_dir, _ = teacher
    for args, expect in ((["--retention", "1.2"], "--retention"), (["--objective", "speed"], "--objective"),
                         (["--budget", "0"], "--budget")):
        result = invoke("compress", model_dir, *args, "--out", tmp_path / "c")
        assert result.exit_code == 2, result.output
        assert expect in result.stderr and not (tmp_path / "c").exists()


def test_compress_shortcut_writes_and_runs_the_recipe(tmp_path, teacher):
    model_dir, _ = teacher
    out = tmp_path / "c"
    result = invoke("compress", model_dir, "--retention", "0.5", "--objective", "size", "--budget", "2",
                    "--out", out, "--set", "recovery_steps=2", "--set", "full_recovery_steps=2",
                    "--set", "latency_runs=2", "--set", "importance=magnitude")
    assert result.exit_code == 0, result.output
    written = (out / "recipe.yaml").read_text()
    assert "kind: load" in written and "kind: search" in written and "kind: bundle" in written
    report = json.loads((out / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["load", "search", "export", "quantize", "bundle"]
    assert len(report["outputs"]["search"]["trials"]) == 2
    assert "mode: search" in written  # the quantize stage takes the INT8 mode the trials were measured with
    quantization = json.loads(next((out / "stages").glob("*-quantize")).joinpath("quantization.json").read_text())
    assert quantization["requested_mode"] == "search"
    assert quantization["mode"] == report["outputs"]["search"]["int8"] == "dynamic"


def test_a_trial_left_running_by_sigkill_is_retried_once_and_finished_ones_never(tmp_path):
    """The study level of resume, without training: a trial that never finished (SIGKILL leaves it RUNNING) is
    failed and its setting enqueued on reopening; finished settings are not proposed for training again."""
    from compressor.model.architecture import LayerArch
    from compressor.recipe import SearchBudget, SearchSpace
    from compressor.search.candidate import Measured
    from compressor.search.space import Space
    from compressor.search.study import SearchLoop, open_study

    space = Space(SearchSpace(layers=[1, 2], head_ratio=[0.0, 0.5], ffn_ratio=[0.0], int8=["none"]),
                  [LayerArch(4, 8, 64), LayerArch(4, 8, 64)], "stages[1].space")
    assert space.size == 4
    calls = []

    def evaluate(number, knobs):
        calls.append(knobs)
        return Measured({"a": 1.0}, {"a": 1.0}, float(knobs.layers), 1.0, 100 * knobs.layers, 10, 5)

    def loop(study, trials):
        return SearchLoop(study, space, evaluate, lambda m: (m.latency_ms, 0.0), lambda m: {"retention": m.retention},
                          lambda e: {}, SearchBudget(trials=trials), log=lambda line: None)

    db = tmp_path / "study.db"
    study = open_study(db, {"x": 1}, "tpe", 0)
    loop(study, 2).run()
    assert len(calls) == 2
    killed = study.ask(space.distributions())  # a trial in flight when the process died: stays RUNNING
    killed_knobs = space.knobs(killed.params)
    del study
    study = open_study(db, {"x": 1}, "tpe", 0)
    stats = loop(study, 4).run()
    assert stats["trained_total"] == 4 and len(calls) == 4
    assert len(set(calls)) == 4  # every setting trained exactly once
    if killed_knobs not in calls[:2]:
        assert calls[2] == killed_knobs  # the interrupted setting is retried first
    # the space is exhausted: a bigger budget trains nothing more
    assert loop(open_study(db, {"x": 1}, "tpe", 0), 10).run()["stopped_by"] == "space exhausted"
    assert len(calls) == 4
    with pytest.raises(Exception, match="another space"):
        open_study(db, {"x": 2}, "tpe", 0)
