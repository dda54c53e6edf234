"""A plugin from another distribution registers through the entry-point group and passes the contract.

``tests/third_party_plugin`` is a separate installable distribution, ``compressor-toy-task``, registering the task
``toy``. It is installed into a temporary directory (never into the project's environment) and used from
subprocesses whose ``PYTHONPATH`` points there. ``install_toy``, ``env_with`` and ``TOY_DATA_DIR`` (in
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
    """A directory holding the installed ``compressor-toy-task``; put it on PYTHONPATH of a subprocess."""
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
    assert info["source"] == "compressor-toy-task"
    assert info["module"] == "compressor_toy_task"
    assert Path(toy_site, "compressor_toy_task", "data", "train.tsv").is_file()  # package data is installed


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
    lines = (TOY_DATA_DIR / "train.tsv").read_text().splitlines()
    assert len(lines) == 48 and all(line.split("\t")[0] in ("yes", "no") for line in lines)
    assert any(ch.isdigit() for ch in lines[0]) == (lines[0].split("\t")[0] == "yes")
    assert (TOY_DATA_DIR / "dev.tsv").is_file()
