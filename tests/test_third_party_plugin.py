"""A plugin from another distribution registers through the entry-point group and passes the contract.

The third-party distribution, ``compressor-toy`` registering the task ``toy``, is what ``compressor tasks new toy
--kind sequence`` writes, with the toy data of ``tests/fixtures/toy``. It is installed into a temporary directory
(never into the project's environment) and used from subprocesses whose ``PYTHONPATH`` points there. ``install_toy``, ``env_with`` and ``TOY_DATA_DIR`` (in
tests/plugin_fixtures.py) let other tests (e.g. a CLI recipe run) install and use it the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_fixtures import TOY_DATA_DIR, env_with, install_toy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> Path:
    """A directory holding the installed ``compressor-toy``; put it on PYTHONPATH of a subprocess."""
    return install_toy(tmp_path_factory.mktemp("toy"))


def test_toy_is_not_installed_in_this_environment():
    from compressor.tasks import TASKS

    assert "toy" not in TASKS.names()  # only the subprocesses below see it


def test_installed_toy_registers_through_entry_points(toy_site):
    code = (
        "import json, sys; from compressor.tasks import TASKS; "
        "cls = TASKS.get('toy'); "
        "print(json.dumps({'names': TASKS.names(), 'source': TASKS.source('toy'), 'module': cls.__module__, "
        "'torch': 'torch' in sys.modules}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_with(toy_site),
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "toy" in info["names"] and {"ner", "classification"} <= set(info["names"])
    assert info["source"] == "compressor-toy"
    assert info["module"] == "compressor_toy.task"
    assert Path(toy_site, "compressor_toy", "data", "train.jsonl").is_file()  # package data is installed


def test_installed_toy_passes_the_contract(toy_site):
    """read -> encode -> collate -> forward -> loss -> backward -> distill -> decode -> score -> save/load."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py",
         "-k", "test_plugin_contract and toy"],
        capture_output=True, text=True, env=env_with(toy_site), cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_toy_data_is_recipe_friendly():
    records = [json.loads(line) for line in (TOY_DATA_DIR / "train.jsonl").read_text().splitlines()]
    assert len(records) == 48 and all(r["label"] in ("yes", "no") for r in records)
    assert all(any(ch.isdigit() for ch in r["text"]) == (r["label"] == "yes") for r in records)
    assert (TOY_DATA_DIR / "dev.jsonl").is_file()


def test_third_party_task_trains_and_evaluates_through_the_cli(tmp_path):
    """The installed `toy` plugin runs in a recipe like a built-in one: trained, evaluated, reported."""
    import json

    from plugin_fixtures import TOY_DATA_DIR, env_with, install_toy

    site = install_toy(tmp_path / "install")
    model_dir = tmp_path / "tiny"
    build = (
        "import sys; sys.path.insert(0, %r); from conftest import tiny_bert; "
        "from transformers import AutoTokenizer; from compressor.model.multitask import resolve_encoder_path; "
        "tiny_bert().save_pretrained(%r); "
        "AutoTokenizer.from_pretrained(resolve_encoder_path('offline-default')).save_pretrained(%r)"
    ) % (str(Path(__file__).parent), str(model_dir), str(model_dir))
    subprocess.run([sys.executable, "-c", build], check=True, env=env_with(site))
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"""\
name: toy-run
data_root: {TOY_DATA_DIR}
model: {{encoder: {model_dir}, max_length: 32}}
tasks:
  - {{name: digits, plugin: toy, data: {{train: train.jsonl, dev: dev.jsonl, test: dev.jsonl}}}}
stages:
  - {{kind: train, epochs: 3, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0}}
report: {{latency_runs: 2, latency_warmup: 1, latency_seq_len: 16}}
""")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "compressor.cli.main", "run", str(recipe), "--out", str(out)],
                          env=env_with(site), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "report.json").read_text())["rows"]
    test_row = next(r for r in rows if r["task"] == "digits" and r["split"] == "test")
    assert test_row["model"] == "teacher" and 0.0 <= test_row["value"] <= 1.0
