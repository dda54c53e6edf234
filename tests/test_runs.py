"""Run directories under change and failure: --resume against a changed recipe, Ctrl-C during the first stage, a
full disk in a stage, file permissions under the user's umask, the load warning beside latencies, and the word
splitter of token tasks at predict time (the same words on the PyTorch and the torch-free side)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
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
    """An (untrained) sentiment model directory: what a load stage starts from."""
    import torch

    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    torch.manual_seed(0)
    model = MultiTaskModel(tiny_bert(hidden=32, layers=2, heads=4, ffn=64),
                           {"sst": build_task("classification", "sst", ["0", "1"])}).eval()
    return save_model(model, tokenizer, tmp_path_factory.mktemp("runs-model") / "model", 32)


def two_loads(tmp: Path, model: Path, dev_limit: int = 6, second_eval: bool = True, latency_runs: int = 2,
              seed: int = 3, sst_dev: Path | str = "sst.dev.txt") -> Path:
    """Two load stages (fast: no training): what each computes depends on seed, data, limits and its fields."""
    recipe = tmp / "two.yaml"
    recipe.write_text(f"""\
name: two
seed: {seed}
data_root: {PIPE}
model: {{max_length: 32}}
tasks:
  - {{name: sst, plugin: classification, format: label_text, labels: ['0', '1'], limit: {{dev: {dev_limit}}},
      data: {{dev: {sst_dev}}}}}
stages:
  - {{kind: load, name: teacher, path: {model}, evaluate: true}}
  - {{kind: load, name: again, path: {model}, evaluate: {str(second_eval).lower()}}}
report: {{latency: false, latency_runs: {latency_runs}}}
""")
    return recipe


# ---- --resume compares the recipe with the run --------------------------------------------------------------
def test_resume_refuses_a_change_to_what_a_completed_stage_computed_naming_the_fields(model_dir, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", two_loads(tmp_path, model_dir), "--out", out).exit_code == 0
    state = json.loads((out / "state.json").read_text())
    assert state["completed"][0]["fingerprint"]["tasks.sst.limit.dev"] == 6
    assert state["completed"][1]["fingerprint"]["stages.again.evaluate"] is True
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    for change, field in [({"dev_limit": 4}, "tasks.sst.limit.dev (6 -> 4)"), ({"seed": 4}, "seed (3 -> 4)"),
                          ({"second_eval": False}, "stages.again.evaluate (true -> false)")]:
        result = invoke("run", two_loads(tmp_path, model_dir, **change), "--out", out, "--resume")
        assert result.exit_code == 2, result.output
        err = result.stderr
        assert err.startswith("error: ") and err.count("\n") == 1 and field in err and "--rerun-from-changed" in err
        assert "state.json" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing changed


def test_resume_sees_a_changed_data_file_by_content_not_by_path(model_dir, tmp_path):
    out = tmp_path / "out"
    dev = tmp_path / "dev.txt"
    dev.write_bytes((PIPE / "sst.dev.txt").read_bytes())
    assert invoke("run", two_loads(tmp_path, model_dir, sst_dev=dev), "--out", out).exit_code == 0
    moved = tmp_path / "moved.txt"  # the same content elsewhere: resumes
    moved.write_bytes(dev.read_bytes())
    result = invoke("run", two_loads(tmp_path, model_dir, sst_dev=moved), "--out", out, "--resume")
    assert result.exit_code == 0 and result.output.count("done earlier, skipped") == 2, result.output
    moved.write_bytes(dev.read_bytes() + b"1 one more line\n")
    result = invoke("run", two_loads(tmp_path, model_dir, sst_dev=moved), "--out", out, "--resume")
    assert result.exit_code == 2 and "tasks.sst.data.dev.sha256" in result.stderr, result.output


def test_fields_that_change_no_completed_stage_do_not_block_resume(model_dir, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", two_loads(tmp_path, model_dir), "--out", out).exit_code == 0
    recipe = two_loads(tmp_path, model_dir, latency_runs=7)  # report fields change what no stage computed
    result = invoke("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert result.output.count("done earlier, skipped") == 2
    assert (out / "recipe.yaml").read_text() == recipe.read_text()  # the recipe as run from now on


def test_rerun_from_changed_runs_again_from_the_first_affected_stage_and_the_report_says_what_ran(model_dir, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", two_loads(tmp_path, model_dir), "--out", out).exit_code == 0
    # a change to the second stage: the first is kept, the second runs again
    recipe = two_loads(tmp_path, model_dir, second_eval=False)
    result = invoke("run", recipe, "--out", out, "--resume", "--rerun-from-changed")
    assert result.exit_code == 0, result.output
    assert "stage teacher: done earlier, skipped" in result.output and "re-running from stage 'again'" in result.output
    report = json.loads((out / "report.json").read_text())
    assert {r["stage"] for r in report["rows"]} == {"teacher"}  # 'again' no longer evaluates
    # a change to the limits: every stage runs again, and the report describes the rows it holds
    recipe = two_loads(tmp_path, model_dir, dev_limit=4)
    result = invoke("run", recipe, "--out", out, "--resume", "--rerun-from-changed")
    assert result.exit_code == 0, result.output
    assert "done earlier" not in result.output and "re-running from stage 'teacher'" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["limits"] == {"sst": {"dev": 4}} and report["data"]["sst"]["dev"]["used"] == 4
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    state = json.loads((out / "state.json").read_text())
    assert [s["fingerprint"]["tasks.sst.limit.dev"] for s in state["completed"]] == [4, 4]


def test_rerun_from_changed_needs_resume(model_dir, tmp_path):
    result = invoke("run", two_loads(tmp_path, model_dir), "--out", tmp_path / "out", "--rerun-from-changed")
    assert result.exit_code == 2 and "--resume" in result.stderr and not (tmp_path / "out").exists()


# ---- Ctrl-C keeps the last epoch checkpoint; its fingerprint guards the resume ------------------------------
def _train_recipe(tmp: Path, encoder: Path, lr: str = "3.0e-3", epochs: int = 3) -> Path:
    recipe = tmp / "train.yaml"
    recipe.write_text(f"""\
name: ctrlc
seed: 3
data_root: {PIPE}
model: {{encoder: {encoder}, max_length: 32}}
tasks:
  - {{name: sst, plugin: classification, format: label_text,
      data: {{train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}}}}
stages:
  - {{kind: train, name: teacher, epochs: {epochs}, batch_size: 8, lr: {lr}, warmup_ratio: 0.0}}
report: {{latency: false}}
""")
    return recipe


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("runs-encoder")
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_ctrl_c_keeps_the_last_epoch_checkpoint_and_resume_continues_from_it(encoder_dir, tmp_path):
    out = tmp_path / "out"
    recipe = _train_recipe(tmp_path, encoder_dir, epochs=40)
    exe = Path(sys.executable).parent / "compressor"
    proc = subprocess.Popen([str(exe), "run", str(recipe), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    trainer = out / "checkpoints" / "teacher" / "teacher" / "last" / "trainer.json"
    deadline = time.time() + 240
    while not trainer.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert trainer.is_file(), "no epoch checkpoint was written"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checkpoint is kept" in err and "--resume" in err, err
    # what kill -9 keeps: the checkpoint and the recipe; no partial stage, no lock, no completed stage
    assert trainer.is_file() and (out / "recipe.yaml").is_file()
    assert not (out / ".lock").exists() and not list(out.glob("stages/.*partial")) and not (out / "state.json").exists()
    epoch = json.loads(trainer.read_text())["epoch"]
    assert 1 <= epoch < 40

    # a changed learning rate would continue the checkpoint under other settings: refused, naming the field
    (tmp_path / "changed").mkdir()
    changed = _train_recipe(tmp_path / "changed", encoder_dir, lr="1.0e-2", epochs=40)
    result = invoke("run", changed, "--out", out, "--resume")
    assert result.exit_code == 2 and "stages.teacher.lr (0.003 -> 0.01)" in result.stderr, result.output
    assert trainer.is_file()

    # the same recipe continues after the kept epoch
    result = invoke("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resumed after epoch {epoch}" in result.output
    history = json.loads((out / "report.json").read_text())["outputs"]["teacher"]["training"]["teacher"]["history"]
    assert len(history) == 40 and not (out / "checkpoints").exists()
