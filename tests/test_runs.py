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


def test_an_option_a_newer_version_added_at_its_default_is_no_change_but_a_set_one_is():
    from compressor.recipe import TrainStage
    from compressor.resume import changed_fields, stage_defaults, stage_fields

    stage = TrainStage.model_validate({"kind": "train", "name": "teacher", "epochs": 2})
    new = stage_fields(stage)
    old = {k: v for k, v in new.items() if k != "stages.teacher.keep_best"}  # written before the field existed
    assert changed_fields(old, new, stage_defaults(stage)) == []
    assert changed_fields(old, new) == ["stages.teacher.keep_best"]  # without the defaults: refused as before
    kept_last = stage_fields(stage.model_copy(update={"keep_best": False}))
    assert changed_fields(old, kept_last, stage_defaults(stage)) == ["stages.teacher.keep_best"]


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
    recipe = _train_recipe(tmp_path, encoder_dir, epochs=8)
    exe = Path(sys.executable).parent / "compressor"
    # a background job of a non-interactive shell inherits SIGINT ignored; a terminal's Ctrl-C is not
    proc = subprocess.Popen([str(exe), "run", str(recipe), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    trainer = out / "checkpoints" / "teacher" / "model" / "last" / "trainer.json"
    deadline = time.time() + 240
    while not trainer.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert trainer.is_file(), "no epoch checkpoint was written"
    proc.send_signal(signal.SIGINT)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checkpoint is kept" in said + err and "--resume" in said + err, said + err
    # what kill -9 keeps: the checkpoint and the recipe; no partial stage, no lock, no completed stage
    assert trainer.is_file() and (out / "recipe.yaml").is_file()
    assert not (out / ".lock").exists() and not list(out.glob("stages/.*partial")) and not (out / "state.json").exists()
    epoch = json.loads(trainer.read_text())["epoch"]
    assert 1 <= epoch < 8

    # a changed learning rate would continue the checkpoint under other settings: refused, naming the field
    (tmp_path / "changed").mkdir()
    changed = _train_recipe(tmp_path / "changed", encoder_dir, lr="1.0e-2", epochs=8)
    result = invoke("run", changed, "--out", out, "--resume")
    assert result.exit_code == 2 and "stages.teacher.lr (0.003 -> 0.01)" in result.stderr, result.output
    assert trainer.is_file()

    # the same recipe continues after the kept epoch
    result = invoke("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resumed after epoch {epoch}" in result.output
    history = json.loads((out / "report.json").read_text())["outputs"]["teacher"]["training"]["teacher"]["history"]
    assert len(history) == 8 and not (out / "checkpoints").exists()


# ---- a full disk fails the stage it happens in, naming the path; nothing degraded is recorded complete --------
def _chain(tmp: Path, model: Path) -> Path:
    recipe = tmp / "chain.yaml"
    recipe.write_text(f"""\
name: chain
seed: 3
data_root: {PIPE}
model: {{max_length: 32}}
tasks:
  - {{name: sst, plugin: classification, format: label_text, labels: ['0', '1'], data: {{dev: sst.dev.txt}}}}
stages:
  - {{kind: load, name: teacher, path: {model}, evaluate: false}}
  - {{kind: export, parity_batches: 1, evaluate: false}}
  - {{kind: quantize, tolerance: 1.0, max_iterations: 1, calibration: {{split: dev, samples: 8}}}}
  - {{kind: bundle}}
report: {{latency: false}}
""")
    return recipe


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _completed(out: Path) -> list[str]:
    return [s["name"] for s in json.loads((out / "state.json").read_text())["completed"]]


def test_a_full_disk_fails_the_stage_naming_the_path_and_resume_finishes_the_run(model_dir, tmp_path, monkeypatch):
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel
    from optimum.onnxruntime import ORTQuantizer

    # the class the fusion optimiser saves with (ORT imports it as a top-level `onnx_model` module too)
    OnnxModel = next(c for c in BertOnnxModel.__mro__ if c.__name__ == "OnnxModel")

    recipe, out = _chain(tmp_path, model_dir), tmp_path / "out"
    # export: the optimised graph cannot be saved. Today's fallback to the raw graph would record the stage
    # complete without its optimised graph; a full disk is not a property of the model, so the stage fails
    with monkeypatch.context() as m:
        m.setattr(OnnxModel, "save_model_to_file", _enospc)
        result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith("error: stage 'export': ") and err.count("\n") == 1, err
    assert "model.opt.onnx: No space left on device" in err and "--resume" in err
    assert _completed(out) == ["teacher"] and not list(out.glob("stages/*export*"))

    # quantize: the quantizer's write names no file; the error names the run directory it was writing under
    with monkeypatch.context() as m:
        m.setattr(ORTQuantizer, "quantize", _enospc)
        result = invoke("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: stage 'quantize': writing under {out}: No space left on device")
    assert _completed(out) == ["teacher", "export"] and not list(out.glob("stages/*quantize*"))
    export = json.loads((out / "state.json").read_text())["completed"][1]["outputs"]
    assert export["optimized"] and Path(out / export["optimized"]).is_file()  # the optimised graph is there

    result = invoke("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert _completed(out) == ["teacher", "export", "quantize", "bundle"]


def test_a_full_disk_while_training_names_the_run_and_leaves_nothing(encoder_dir, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "out"
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)  # the first epoch checkpoint
    result = invoke("run", _train_recipe(tmp_path, encoder_dir, epochs=1), "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: stage 'teacher': writing under {out}: No space left on device")
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_os_errors_are_told_from_other_failures():
    from compressor.errors import os_failure
    from compressor.pipeline_checks import stage_os_error

    assert os_failure(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space'
                           ' left on device" })')  # how safetensors words it
    assert os_failure(wrapped) == "No space left on device"
    assert os_failure(ValueError("shape mismatch")) is None and os_failure(KeyboardInterrupt()) is None
    err = stage_os_error(PermissionError(errno.EACCES, "Permission denied", "/x/y.onnx"), "export", Path("/x"))
    assert str(err) == "stage 'export': /x/y.onnx: Permission denied"


# ---- files follow the user's umask ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_run_outputs_and_the_bundle_follow_the_umask(model_dir, tmp_path, umask, file_mode, dir_mode):
    recipe = tmp_path / "bundle.yaml"
    recipe.write_text(f"""\
name: perms
data_root: {PIPE}
model: {{max_length: 32}}
tasks:
  - {{name: sst, plugin: classification, format: label_text, labels: ['0', '1'], data: {{dev: sst.dev.txt}}}}
stages:
  - {{kind: load, path: {model_dir}, evaluate: false}}
  - {{kind: export, optimize: false, evaluate: false, parity_batches: 1}}
  - {{kind: bundle}}
report: {{latency: false}}
""")
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        result = invoke("run", recipe, "--out", out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    bundle = next(out.glob("stages/*-bundle/bundle"))
    assert {"model.onnx", "tokenizer.json", "tasks.json", "config.json"} <= {p.name for p in bundle.iterdir()}
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (dir_mode if p.is_dir() else file_mode), f"{p}: {oct(mode)}"


# ---- latencies measured on a loaded machine carry a warning --------------------------------------------------
def test_load_warning_when_others_compete_for_the_cores_used():
    from compressor.measure import load_warning

    assert load_warning(1.7, 2, 1, 3.2).startswith("measured on a loaded machine: other processes kept 1.7 of 2")
    assert load_warning(1.7, 16, 1) is None  # plenty of free cores
    assert load_warning(0.2, 2, 2) is None  # noise
    assert load_warning(1.0, 4, 4) is not None


def test_busy_processes_during_a_measurement_put_a_warning_beside_the_latency(tmp_path):
    from compressor.measure import ort_latency_ms
    from compressor.report.rows import make_row, render_markdown

    class Session:  # ~2 ms of pure-Python work per run, on one core
        def run(self, *_):
            t = time.perf_counter()
            while time.perf_counter() - t < 0.002:
                pass

    quiet = ort_latency_ms(Session(), {}, runs=5, warmup=0, threads=1)
    assert set(quiet) >= {"p50", "p95"}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        loaded = ort_latency_ms(Session(), {}, runs=200, warmup=0, threads=1)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert "loaded machine" in loaded.get("load_warning", ""), loaded
    row = make_row("m", "s", "sst", "dev", "accuracy", {"accuracy": 1.0}, params=1, task_params=1, size_bytes=1,
                   latency=loaded, fmt="onnx")
    assert row["latency_warning"] == loaded["load_warning"] and isinstance(row["latency_ms_p50"], float)
    md = render_markdown({"recipe": "x", "created": "now", "rows": [row]})
    assert "(loaded!)" in md and loaded["load_warning"] in md


# ---- the word splitter: one documented option, the same words on both sides -----------------------------------
TEXTS = ["I didn't see Anna-Maria in New York's U.S. office.", "Preis: 3,50 € (ca.) - ok?"]


@pytest.mark.parametrize("splitter", ["punct", "whitespace", r"regex:\w+(?:'\w+)?|[^\w\s]"])
def test_the_word_splitter_gives_pytorch_and_the_bundle_the_same_words(splitter, tokenizer):
    """The PyTorch side splits with ``split_words`` and encodes the words as training data is encoded
    (``is_split_into_words``); the bundle encodes the raw text with its splitter: same ids, same words."""
    from compressor.runtime.words import encode_words, plain_tokenizer, split_words

    tok = plain_tokenizer(tokenizer)
    for text in TEXTS:
        spans = split_words(text, splitter, tok)
        words = [text[s:e] for s, e in spans]
        torch_side = tokenizer(words, is_split_into_words=True)
        enc = encode_words(tok, [text], splitter)[0]
        assert enc.ids == torch_side["input_ids"]
        assert enc.word_ids == torch_side.word_ids()
        from compressor.runtime.decoders import word_chars

        assert [word_chars(enc)[w] for w in range(len(words))] == spans  # character spans of the whole text
    whole = {"punct": False, "whitespace": True}.get(splitter, True)
    assert ("didn't" in [TEXTS[0][s:e] for s, e in split_words(TEXTS[0], splitter, tok)]) == whole


def test_bundle_predictions_use_its_word_splitter(tmp_path, tokenizer):
    """NER over a bundle: ``didn't`` is one word under whitespace, three under punct, on the PyTorch model too."""
    import numpy as np
    import torch

    from compressor.export.onnx_export import graph_spec
    from compressor.model.multitask import MultiTaskModel
    from compressor.runtime.bundle import Bundle
    from compressor.runtime.words import plain_tokenizer, split_words
    from compressor.tasks import build_task
    from compressor.testing.runtime import TorchSession

    torch.manual_seed(0)
    ner = build_task("ner", "ner", ["Loc", "Peop"])
    model = MultiTaskModel(tiny_bert(hidden=32, layers=2, heads=4, ffn=64), {"ner": ner}).eval()
    spec = graph_spec(model, 32)
    tok = plain_tokenizer(tokenizer)
    text = "Anna didn't go to Oslo ."
    for splitter in ("punct", "whitespace"):
        spec.metadata["word_splitter"] = splitter
        bundle = Bundle(Path("<mem>"), spec, tok, TorchSession(model, spec))
        pred = bundle.predict(text, tasks=["ner"])[0]["predictions"]["ner"]
        # the PyTorch side: the same words, encoded as training data, decoded by the plugin
        words = [text[s:e] for s, e in split_words(text, splitter, tok)]
        enc = tokenizer([words], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            logits = model.forward_batch("ner", {k: v for k, v in enc.items()}).outputs["logits"][0].numpy()
        from compressor.runtime.decoding import bio_decode

        spans = bio_decode(np.asarray(logits), enc.word_ids(0), len(words), ner.tags)
        assert [(e["start"], e["end"]) for e in pred["entities"]] == [
            (split_words(text, splitter, tok)[s][0], split_words(text, splitter, tok)[e - 1][1]) for s, e, _ in spans]
    assert len(split_words(text, "whitespace")) == 6 and len(split_words(text, "punct", tok)) == 8
