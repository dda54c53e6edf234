"""The train loop under ``accelerate launch --num_processes 2`` on CPU (gloo) takes the same optimizer steps
and ends at the same learning rate as one process (the batch is global: each process takes half of it), and
the model it saves reloads; the same for distillation (the engine with the distillation objective and a teacher
cache that one process fills and both read)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, tiny_bert

SCRIPT = Path(__file__).parent / "_ddp_train.py"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ddp-bert")
    tiny_bert(hidden=32, layers=1, heads=2, ffn=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def launch(out: Path, model_path: Path, processes: int, mode: str = "train") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # --multi_gpu is accelerate's torchrun launcher; with no GPU the loop's Accelerator(cpu=True) joins a gloo group
    launcher = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000),
           str(SCRIPT), str(out), str(model_path), str(FIXTURES / "pipeline"), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("mode", ["train", "distill"])
def test_two_processes_take_the_same_steps_and_schedule_as_one(tmp_path, model_path, mode):
    from compressor.model.io import load_model

    one = launch(tmp_path / "one", model_path, 1, mode)
    two = launch(tmp_path / "two", model_path, 2, mode)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["optimizer_steps"] == one["optimizer_steps"] > 0
    assert two["steps"] == one["steps"]
    assert two["final_lr"] == pytest.approx(one["final_lr"], abs=1e-12)
    assert one["final_lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay reaches 0 at the last planned step
    model, _, _ = load_model(tmp_path / "two" / "model")
    assert set(model.tasks) == {"ner", "sst"}
    if mode == "distill":  # one process filled the cache, the other read it: every training feature, once
        assert two["cache"]["built"] + two["cache"]["loaded"] == one["cache"]["built"] > 0
