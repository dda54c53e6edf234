"""kill -9 inside every stage of the whole chain, then ``--resume``: the same report as an uninterrupted run.

One test (issue 10's target), on a tiny random BERT and the ``tests/fixtures/pipeline`` data:
train -> distill -> prune -> prune_vocab -> export -> quantize -> bundle with the smallest budgets.

* two uninterrupted runs (separate processes, started together) give the same report and artefacts;
* one run is SIGKILLed inside the teacher stage (after its first epoch checkpoint), resumed and SIGKILLed inside
  distill, resumed and killed inside prune, ... inside bundle, then resumed to the end; it gives the same report
  rows, stage outputs and artefacts (byte for byte) as the uninterrupted runs.

The kill is the pipeline's test-only hook ``$COMPRESSOR_TEST_KILL_IN_STAGE`` (``compressor/pipeline.py``): the
process SIGKILLs itself right after the named stage's first file is in place (checkpoint or saved model), so no
handler, ``finally`` or lock release runs. The chain runs about three times in all (two uninterrupted runs and the
killed-and-resumed one); about 1.5-2 minutes on the 2-core development CPU, most of it process start-up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"
STAGES = ["teacher", "distill", "prune", "prune_vocab", "export", "quantize", "bundle"]
TIMING_KEYS = {"wall_s", "examples_per_s"}  # and every key starting with latency_ms


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-bert-kill")
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe(tmp: Path, model: Path) -> Path:
    recipe = tmp / "chain.yaml"
    recipe.write_text(f"""\
name: killchain
seed: 5
data_root: {PIPE}
model: {{encoder: {model}, max_length: 32}}
tasks:
  - {{name: ner, plugin: ner, format: conll,
      data: {{train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}}}}
  - {{name: sst, plugin: classification, format: label_text,
      data: {{train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}}}}
stages:
  - {{kind: train, name: teacher, epochs: 2, batch_size: 8, lr: 1.0e-2, warmup_ratio: 0.0,
      sampling: {{strategy: round_robin}}, baselines: false}}
  - {{kind: distill, student: {{from_teacher: {{layers: 1}}}}, epochs: 1, batch_size: 8, lr: 3.0e-3}}
  - {{kind: prune, importance: taylor, head_ratio: 0.5, ffn_ratio: 0.5, steps: 2, importance_batches: 1,
      batch_size: 8, recovery_until: {{tolerance: 1.0e-6, eval_every: 1, max_steps: 2}}}}
  - {{kind: prune_vocab, english_words: 200, sizes: [1000]}}
  - {{kind: export, parity_batches: 1}}
  - {{kind: quantize, tolerance: 1.0}}
  - {{kind: bundle}}
report: {{latency: false}}
""")
    return recipe


def _env(kill: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COMPRESSOR_TEST_KILL_IN_STAGE"}
    # one thread in every run: the same arithmetic whatever the machine, and three runs share two cores fairly
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if kill:
        env["COMPRESSOR_TEST_KILL_IN_STAGE"] = kill
    return env


def _start(recipe: Path, out: Path, resume: bool = False, kill: str | None = None) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "compressor"
    args = [str(exe), "run", str(recipe), "--out", str(out), *(["--resume"] if resume else [])]
    return subprocess.Popen(args, env=_env(kill), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _untimed(obj: Any) -> Any:
    """``obj`` without timing-dependent values (wall times, throughput, latency)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING_KEYS and not k.startswith("latency_ms")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"\b\d+(\.\d+)?s\b", "<secs>", obj)  # "best dev epoch 1, 7s"
    return obj


def _summary(out: Path) -> dict[str, Any]:
    """What must not depend on how the run got there: the whole report (rows, notes, stage outputs, split sizes,
    ...) but its creation time and timings, and the bytes of every artefact (with the run directory's own path and
    the creation time, which the bundle's tasks.json records as provenance, replaced by placeholders)."""
    report = _untimed(json.loads((out / "report.json").read_text()))
    del report["created"]
    key = ("model", "stage", "task", "split")
    report["rows"] = sorted(report["rows"], key=lambda r: tuple(r[k] for k in key))
    files = {}
    for f in sorted((out / "stages").rglob("*")):
        if f.is_file():
            data = f.read_bytes().replace(str(out).encode(), b"<run>")
            files[f.relative_to(out).as_posix()] = re.sub(rb'"created": "[^"]*"', b'"created": "<time>"', data)
    return {"report": report, "files": files}


def _assert_same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a["report"]["rows"] == b["report"]["rows"], f"{what}: report rows differ"
    for part in a["report"]:
        assert a["report"][part] == b["report"].get(part), f"{what}: report field '{part}' differs"
    assert sorted(a["files"]) == sorted(b["files"]), f"{what}: different artefact files"
    differ = [f for f in a["files"] if a["files"][f] != b["files"][f]]
    assert not differ, f"{what}: artefacts differ: {differ}"


def _completed(out: Path) -> list[str]:
    state = out / "state.json"
    return [s["name"] for s in json.loads(state.read_text())["completed"]] if state.is_file() else []


def test_kill_9_in_every_stage_then_resume_gives_the_uninterrupted_report(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model)
    # two uninterrupted runs in the background while the killed run is driven through every stage
    clean = [_start(recipe, tmp_path / f"clean{i}") for i in range(2)]

    out = tmp_path / "killed"
    try:
        for i, stage in enumerate(STAGES):
            proc = _start(recipe, out, resume=i > 0, kill=stage)
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == -signal.SIGKILL, f"not killed in stage {stage} (exit {proc.returncode}):\n{log}"
            assert _completed(out) == STAGES[:i], f"killed in {stage}:\n{log}"
            assert (out / "stages" / f".{i:02d}-{stage}.partial").is_dir()  # died mid-stage: its work is left as is
            assert (out / ".lock").is_file()  # a dead holder's lock, taken over by the next resume
            if i:
                assert "took over the lock of process" in log, log
            if stage == "distill":  # the teacher was killed after epoch 1's checkpoint: training continued from it
                assert "[teacher] resumed after epoch 1" in log, log
        proc = _start(recipe, out, resume=True)
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        assert "stage bundle (bundle)" in log and "took over the lock" in log

        for p in clean:
            log, _ = p.communicate(timeout=600)
            assert p.returncode == 0, log
    finally:  # a failure above must not leave the background runs eating the CPU
        for p in clean:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert _completed(out) == STAGES
    # nothing of the killed attempts is left: no partial stage, no checkpoint (nor its temporary copies), no lock
    assert not list(out.glob("stages/.*")) and not [p for p in out.glob("checkpoints/**/*") if p.is_file()]
    assert not (out / ".lock").exists()

    reference = _summary(tmp_path / "clean0")
    assert [s["name"] for s in reference["report"]["stages"]] == STAGES
    assert {r["stage"] for r in reference["report"]["rows"]} == set(STAGES) - {"bundle"}  # bundle adds no rows
    _assert_same(reference, _summary(tmp_path / "clean1"), "two uninterrupted runs")
    _assert_same(reference, _summary(out), "killed in every stage and resumed vs uninterrupted")
