"""End to end through the CLI on a tiny random BERT and small fixtures: run, report, evaluate, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"
runner = CliRunner()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tokenizer):
    """A tiny random BERT saved as a local Hugging Face directory (what a user's own encoder path looks like)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe_text(model_path: Path, epochs: int = 2, extra_task: str = "", baselines: bool = True,
                sst_train: str = "sst.train.txt", labels: str = "") -> str:
    return f"""\
name: tiny
seed: 3
data_root: {PIPE}
model: {{encoder: {model_path}, max_length: 32}}
tasks:
  - name: ner
    plugin: ner
    format: conll
    data: {{train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}}
  - name: sst
    plugin: classification
    format: label_text
    {labels}
    data: {{train: {sst_train}, dev: sst.dev.txt, test: sst.test.txt}}
{extra_task}
stages:
  - kind: train
    name: teacher
    epochs: {epochs}
    batch_size: 8
    lr: 3.0e-3
    warmup_ratio: 0.0
    sampling: {{strategy: round_robin}}
    loss_weighting: {{strategy: uncertainty}}
    baselines: {str(baselines).lower()}
report: {{latency_runs: 2, latency_warmup: 1, latency_seq_len: 32}}
"""


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("run")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(recipe_text(tiny_model_path, epochs=3))
    result = invoke("run", recipe, "--out", tmp / "out")
    assert result.exit_code == 0, result.output
    return recipe, tmp / "out"


def test_run_writes_report_with_teacher_and_single_task_rows(finished_run):
    _, out = finished_run
    report = json.loads((out / "report.json").read_text())
    models = {(r["model"], r["task"], r["split"]) for r in report["rows"]}
    for task in ("ner", "sst"):
        for split in ("dev", "test"):
            assert ("teacher", task, split) in models
            assert (f"single:{task}", task, split) in models
    for r in report["rows"]:
        for key in ("model", "stage", "task", "split", "metric", "value", "params", "size_bytes", "latency_ms_p50"):
            assert key in r
        assert 0.0 <= r["value"] <= 1.0 and r["latency_ms_p50"] > 0 and r["size_bytes"] > 0
    teacher_params = {r["params"] for r in report["rows"] if r["model"] == "teacher"}
    single_params = {r["params"] for r in report["rows"] if r["model"] == "single:sst"}
    assert teacher_params.pop() > single_params.pop()  # the teacher carries two heads
    assert report["threads"] >= 1 and report["machine"]["cpu_count"]
    assert (out / "report.md").read_text().startswith("# Report: tiny")
    assert not list(out.glob("stages/.*partial")) and not (out / "checkpoints" / "teacher").exists()


def test_training_lowers_the_loss_and_learns_the_easy_task(finished_run):
    _, out = finished_run
    report = json.loads((out / "report.json").read_text())
    history = report["outputs"]["teacher"]["training"]["teacher"]["history"]
    assert history[-1]["train_loss"]["sst"] < history[0]["train_loss"]["sst"]
    assert history[-1]["train_loss"]["ner"] < history[0]["train_loss"]["ner"]
    weights = history[-1]["task_weights"]
    assert weights["ner"] != 1.0 and weights["sst"] != 1.0  # uncertainty weights moved


def test_evaluate_command_reproduces_the_report(finished_run):
    _, out = finished_run
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["rows"] if r["model"] == "teacher" and r["task"] == "sst" and r["split"] == "test")
    result = invoke("evaluate", out / "stages/00-teacher/model", "--task", "sst", "--data", PIPE / "sst.test.txt", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["accuracy"] == pytest.approx(row["value"])


def test_resume_skips_completed_stages(finished_run):
    recipe, out = finished_run
    before = json.loads((out / "report.json").read_text())["rows"]
    result = invoke("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "done earlier, skipped" in result.output
    assert json.loads((out / "report.json").read_text())["rows"] == before


def test_rerun_without_resume_refuses_to_overwrite(finished_run):
    recipe, out = finished_run
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 2 and "--resume" in result.stderr


def _bad_run(tmp_path, text):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = invoke("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return result.stderr


def test_bad_data_inputs_exit_2_naming_the_problem(tmp_path, tiny_model_path):
    base = recipe_text(tiny_model_path, epochs=1, baselines=False)
    # missing data file
    assert "nope.txt" in _bad_run(tmp_path, base.replace("sst.train.txt", "nope.txt"))
    # a line that does not parse: file and line named
    bad = tmp_path / "bad_lines.txt"
    bad.write_text("1 good line\nnolabelhere\n")
    assert f"{bad}:2" in _bad_run(tmp_path, base.replace("sst.train.txt", str(bad)))
    # a label outside the schema
    assert "label" in _bad_run(tmp_path, recipe_text(tiny_model_path, epochs=1, baselines=False,
                                                      labels="labels: ['0']")).lower()
    # an empty split
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _bad_run(tmp_path, base.replace("sst.train.txt", str(empty)))
    # tokens and tags of different lengths
    conll = tmp_path / "bad.conll"
    conll.write_text("John B-Peop\nlives\n\n")
    assert str(conll) in _bad_run(tmp_path, base.replace("ner.train.conll", str(conll)))
    # unknown task plugin and unknown key
    assert "did you mean 'ner'" in _bad_run(tmp_path, base.replace("plugin: ner", "plugin: nre"))
    assert "unknown key" in _bad_run(tmp_path, base.replace("    epochs: 1", "    epochs: 1\n    epoch: 2"))
    assert "malformed YAML" in _bad_run(tmp_path, base + "stages: [\n")


def test_bad_model_dirs_exit_2(tmp_path, finished_run):
    import shutil

    _, out = finished_run
    model = out / "stages/00-teacher/model"
    no_weights = tmp_path / "noweights"
    shutil.copytree(model, no_weights)
    (no_weights / "model.safetensors").unlink()
    r = invoke("evaluate", no_weights, "--task", "sst", "--data", PIPE / "sst.test.txt")
    assert r.exit_code == 2 and "missing weights" in r.stderr
    mismatch = tmp_path / "mismatch"
    shutil.copytree(model, mismatch)
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["architecture"]["layers"][0]["ffn"] = 48
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    r = invoke("evaluate", mismatch, "--task", "sst", "--data", PIPE / "sst.test.txt")
    assert r.exit_code == 2 and "do not match the manifest" in r.stderr and "intermediate" in r.stderr
    r = invoke("evaluate", model, "--task", "sts", "--data", PIPE / "sst.test.txt")
    assert r.exit_code == 2 and "did you mean 'sst'" in r.stderr


def test_in_stage_resume_continues_from_the_epoch_checkpoint(tmp_path, tiny_model_path):
    from compressor.data.store import DataStore
    from compressor.model.multitask import build_model
    from compressor.recipe import load_recipe
    from compressor.train.loop import train_model

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(recipe_text(tiny_model_path, epochs=2, baselines=False))
    recipe = load_recipe(recipe_path)
    data = DataStore(recipe.data_options(), PIPE)
    data.fit_labels()
    cfg = recipe.stages[0]
    logs = []
    model, tok = build_model(str(tiny_model_path), data.tasks)
    first = train_model(model, tok, data, cfg.model_copy(update={"epochs": 1}), seed=1, checkpoint_dir=tmp_path / "ck")
    model2, tok2 = build_model(str(tiny_model_path), data.tasks)
    resumed = train_model(model2, tok2, data, cfg, seed=1, checkpoint_dir=tmp_path / "ck", resume=True, log=logs.append)
    assert any("resumed after epoch 1" in line for line in logs)
    assert resumed.epochs_run == 2 and resumed.history[0] == first.history[0] and len(resumed.history) == 2


def test_help_does_not_import_torch():
    code = ("import sys; from compressor.cli.main import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tasks_list_json_shows_builtin_plugins():
    result = invoke("tasks", "list", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["ner"]["source"] == "compressor" and rows["ner"]["metric"] == "f1"
    assert rows["classification"]["metric"] == "accuracy"


def test_full_chain_to_an_int8_bundle_and_predict(tmp_path, tiny_model_path):
    """teacher -> distill -> prune -> prune_vocab -> export -> quantize -> bundle in one recipe, then predict."""
    text = recipe_text(tiny_model_path, epochs=1, baselines=False).replace(
        "report:", """\
  - {kind: distill, student: {from_teacher: {layers: 1}}, epochs: 1, batch_size: 8, lr: 3.0e-3}
  - {kind: prune, importance: taylor, head_ratio: 0.5, ffn_ratio: 0.5, steps: 2, recovery_steps: 3, importance_batches: 2, batch_size: 8}
  - {kind: prune_vocab}
  - {kind: export}
  - {kind: quantize, tolerance: 1.0}
  - {kind: bundle}
report:""")
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    stages = [s["name"] for s in report["stages"]]
    assert stages == ["teacher", "distill", "prune", "prune_vocab", "export", "quantize", "bundle"]
    by_stage = {}
    for r in report["rows"]:
        by_stage.setdefault(r["stage"], []).append(r)
    assert by_stage["prune"][0]["params"] < by_stage["distill"][0]["params"] < by_stage["teacher"][0]["params"]
    int8 = [r for r in by_stage["quantize"] if r["task"] == "sst" and r["split"] == "test"]
    assert int8 and int8[0]["format"] == "onnx-int8" and int8[0]["retention"] is not None
    bundle = out / "stages" / "06-bundle"
    bundle_dir = next(p.parent for p in bundle.rglob("tasks.json"))
    r = invoke("predict", bundle_dir, "--task", "ner", "--task", "sst", "--json", "John lives in Paris .")
    assert r.exit_code == 0, r.output
    pred = json.loads(r.stdout)
    assert "ner" in json.dumps(pred) and "sst" in json.dumps(pred)


def test_single_task_twin_of_relation_extraction_keeps_its_entity_task(tmp_path, tiny_model_path):
    re_file = FIXTURES / "re_conll04_tiny.json"
    recipe = tmp_path / "re.yaml"
    recipe.write_text(f"""\
name: re-twins
data_root: {FIXTURES}
model: {{encoder: {tiny_model_path}, max_length: 48}}
tasks:
  - {{name: ner, plugin: ner, format: conll04, data: {{train: {re_file}, dev: {re_file}, test: {re_file}}}}}
  - {{name: re, plugin: relation, format: conll04, data: {{train: {re_file}, dev: {re_file}, test: {re_file}}}}}
stages:
  - {{kind: train, epochs: 1, batch_size: 4, baselines: true}}
report: {{latency: false}}
""")
    result = invoke("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {r["task"] for r in report["rows"] if r["model"] == "single:re"} == {"re"}
    assert {r["task"] for r in report["rows"] if r["model"] == "single:ner"} == {"ner"}
    manifest = json.loads((tmp_path / "out/stages/00-teacher/single-re/manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["re", "ner"]


# ---- one run per directory, movable runs, clean stops, strict JSON ------------------------------------------------
def _cli(*args, cwd=None, **kw):
    exe = Path(sys.executable).parent / "compressor"
    return subprocess.Popen([str(exe), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _load_recipe(tmp_path: Path, model: Path, name: str = "load.yaml") -> Path:
    """A recipe whose only stage loads a finished model (fast: no training, no latency)."""
    recipe = tmp_path / name
    recipe.write_text(f"""\
name: loaded
data_root: {PIPE}
model: {{max_length: 32}}
tasks:
  - {{name: sst, plugin: classification, format: label_text, labels: ['0', '1'], data: {{dev: sst.dev.txt}}}}
stages:
  - {{kind: load, path: {model}, evaluate: false}}
report: {{latency: false}}
""")
    return recipe


def test_state_json_paths_are_relative_and_a_moved_run_resumes_from_anywhere(finished_run, tmp_path, monkeypatch):
    recipe, out = finished_run
    text = (out / "state.json").read_text()
    state = json.loads(text)
    assert str(out) not in text and state["completed"][0]["model_dir"] == "stages/00-teacher/model"
    moved = tmp_path / "elsewhere" / "moved-run"
    import shutil

    shutil.copytree(out, moved)
    before = json.loads((moved / "report.json").read_text())["rows"]
    monkeypatch.chdir(tmp_path)  # another working directory, a relative --out
    result = invoke("run", recipe, "--out", Path("elsewhere") / "moved-run", "--resume")
    assert result.exit_code == 0, result.output
    assert "done earlier, skipped" in result.output
    assert json.loads((moved / "report.json").read_text())["rows"] == before
    from compressor.rundir import RunDir

    assert Path(RunDir(moved).read_state()["completed"][0]["model_dir"]) == moved / "stages/00-teacher/model"


def test_a_second_run_into_a_locked_directory_fails_at_once_naming_the_holder(finished_run, tmp_path):
    from compressor.fsutil import DirLock

    model = finished_run[1] / "stages/00-teacher/model"
    out = tmp_path / "out"
    out.mkdir()
    holder = DirLock(out).acquire()
    try:
        result = invoke("run", _load_recipe(tmp_path, model), "--out", out)
        assert result.exit_code == 2 and f"in use by process {os.getpid()}" in result.stderr
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's lock only
    finally:
        holder.release()


def test_a_stale_lock_of_a_dead_run_is_taken_over(finished_run, tmp_path):
    model = finished_run[1] / "stages/00-teacher/model"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(f"{dead.pid}\n")  # what a kill -9 leaves: the file, no flock
    result = invoke("run", _load_recipe(tmp_path, model), "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"took over the lock of process {dead.pid}" in result.output
    assert not (out / ".lock").exists() and (out / "report.json").is_file()


def test_two_concurrent_runs_into_one_directory_one_proceeds_one_is_refused(finished_run, tmp_path):
    model = finished_run[1] / "stages/00-teacher/model"
    recipe = _load_recipe(tmp_path, model)
    out = tmp_path / "out"
    procs = [_cli("run", recipe, "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert refused.startswith("error: ") and refused.count("\n") == 1
    # refused while running (the holder's pid may not be written yet: "another process"), or after it
    assert "run directory is in use by" in refused or "pass --resume" in refused
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["teacher"]  # nothing lost
    assert not (out / ".lock").exists()


def test_sigterm_cleans_up_like_ctrl_c(tiny_model_path, tmp_path):
    import signal
    import time

    recipe = tmp_path / "long.yaml"
    recipe.write_text(recipe_text(tiny_model_path, epochs=100_000, baselines=False))  # outlives any machine
    out = tmp_path / "out"
    proc = _cli("run", recipe, "--out", out)
    deadline = time.time() + 240
    while not list(out.glob("stages/.*partial")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(out.glob("stages/.*partial")), "the train stage never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    # no .00-teacher.partial, no lock; the recipe only beside an epoch checkpoint that --resume continues
    if out.exists():
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "recipe.yaml"]
        assert list(out.glob("checkpoints/teacher/model/last/*.safetensors"))


def test_state_and_report_are_strict_json_without_nan(tmp_path):
    from compressor.fsutil import dumps_strict
    from compressor.report.rows import Reporter
    from compressor.rundir import RunDir

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c} in JSON"))

    RunDir(tmp_path).write_state({"recipe": "x", "completed": [{"name": "t", "outputs": {
        "loss": float("nan"), "hist": [1.0, float("inf")], "model": str(tmp_path / "stages/00-t/model")}}]})
    state = strict((tmp_path / "state.json").read_text())
    assert state["completed"][0]["outputs"] == {"loss": None, "hist": [1.0, None], "model": "stages/00-t/model"}
    assert RunDir(tmp_path).read_state()["completed"][0]["outputs"]["model"] == str(tmp_path / "stages/00-t/model")
    reporter = Reporter("x")
    reporter.add({"model": "teacher", "stage": "t", "task": "sst", "split": "dev", "metric": "accuracy",
                  "value": float("nan"), "params": 1, "size_bytes": 1, "latency_ms_p50": None})
    reporter.write(tmp_path)
    assert strict((tmp_path / "report.json").read_text())["rows"][0]["value"] is None
    assert strict(dumps_strict({"a": float("-inf")})) == {"a": None}


def test_a_model_a_stage_writes_with_nan_weights_is_not_recorded_complete(finished_run, tmp_path, monkeypatch):
    """The check runs after every stage whatever the stage evaluated: a stage that saves a NaN model fails."""
    from safetensors.torch import load_file, save_file

    import compressor.stages.load as load_stage
    from compressor.stages import StageResult

    model = finished_run[1] / "stages/00-teacher/model"

    def nan_stage(ctx):
        import shutil

        dst = ctx.out_dir / "model"
        shutil.copytree(model, dst)
        state = load_file(str(dst / "model.safetensors"))
        next(v for v in state.values() if v.is_floating_point())[0] = float("nan")
        save_file(state, str(dst / "model.safetensors"))
        return StageResult(model_dir=ctx.final_dir / "model")

    monkeypatch.setattr(load_stage, "run", nan_stage)
    out = tmp_path / "out"
    result = invoke("run", _load_recipe(tmp_path, model), "--out", out)
    assert result.exit_code == 2 and "NaN" in result.stderr and not out.exists()


def test_validate_builds_tasks_and_checks_the_chain_and_data(tiny_model_path, tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(recipe_text(tiny_model_path, epochs=1))
    result = invoke("validate", recipe)
    assert result.exit_code == 0 and "6 data file(s) read" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_text(tiny_model_path, epochs=1).replace("report:", "  - {kind: bundle, source: nope}\nreport:"))
    result = invoke("validate", bad)
    assert result.exit_code == 2 and "stages[1].source" in result.stderr and "'nope'" in result.stderr


def test_same_recipe_and_seed_give_the_same_report_rows_in_separate_processes(tiny_model_path, tmp_path):
    """Seeded before anything random is built: two runs of one recipe (two processes) give identical metrics."""
    recipe = tmp_path / "seeded.yaml"
    recipe.write_text(recipe_text(tiny_model_path, epochs=1, baselines=False).replace(
        "report: {latency_runs: 2, latency_warmup: 1, latency_seq_len: 32}", "report: {latency: false}"))
    procs = [_cli("run", recipe, "--out", tmp_path / f"out{i}") for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    keys = ("model", "stage", "task", "split", "metric", "value", "metrics", "params", "size_bytes")
    rows = [sorted((tuple(json.dumps(r[k], sort_keys=True) for k in keys)
                    for r in json.loads((tmp_path / f"out{i}" / "report.json").read_text())["rows"]))
            for i in range(2)]
    assert rows[0] and rows[0] == rows[1]
