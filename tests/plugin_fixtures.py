"""Contract-test fixtures: registered plugin name -> a small real split that exercises the plugin.

Every plugin in ``TASKS.names()`` needs an entry here, or ``tests/test_contract.py`` fails for it. Adding a plugin
is one line. Keys of an entry:

    path        the fixture file (absolute path)
    format      reader format, or None to let the plugin pick by extension
    options     the plugin's recipe options
    labels      label schema, or None to derive it with ``fit_labels`` on the fixture
    max_length  optional, default 64
    siblings    optional ``{task name: entry + {"plugin": registered name}}``: tasks the plugin needs next to it in
                the same model (found through ``bind``). The task under test is named after its plugin; siblings
                are built, bound and given labels the same way, e.g. a relation plugin that decodes entities
                with an NER task named ``ner``::

                    "relation": {"path": ..., "format": None, "options": {"entity_task": "ner"}, "labels": None,
                                 "siblings": {"ner": {"plugin": "ner", **NER}}},
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"

#: The third-party test distribution, ``compressor-toy``: written by ``compressor tasks new toy --kind sequence``
#: (the scaffold's templates, not a hand-kept copy of them) with its data replaced by these files (JSON lines
#: ``{"text", "label"}``: does the sentence contain a digit, ``yes`` / ``no``).
TOY_DATA_DIR = FIXTURES / "toy"  # train.jsonl, dev.jsonl

#: CoNLL04-style sentences with entities and relations (a relation plugin can read the same file).
NER: dict[str, Any] = {"path": FIXTURES / "ner" / "conll04_tiny.json", "format": None, "options": {}, "labels": None}

PLUGIN_FIXTURES: dict[str, dict[str, Any]] = {
    "ner": NER,
    "classification": {"path": FIXTURES / "classification" / "pairs.tsv", "format": "tsv",
                       "options": {"text_pair": True, "pooling": "mean"}, "labels": None},
    "toy": {"path": TOY_DATA_DIR / "train.jsonl", "format": None, "options": {}, "labels": None},
    "qa": {"path": FIXTURES / "qa_squad.json", "format": None, "options": {"doc_stride": 16}, "labels": None,
           "max_length": 48},
    "relation": {"path": FIXTURES / "re_conll04_tiny.json", "format": None, "options": {"entity_task": "ner"},
                 "labels": None,
                 "siblings": {"ner": {**NER, "plugin": "ner", "path": FIXTURES / "re_conll04_tiny.json"}}},
}


def install_toy(target: Path) -> Path:
    """Scaffold ``compressor-toy`` (plugin ``toy``, kind ``sequence``) into ``target/src`` with the toy data, and
    pip-install it into ``target/site``."""
    from compressor.scaffold import scaffold

    source = scaffold("toy", "sequence", target / "src")
    for data in TOY_DATA_DIR.glob("*.jsonl"):
        shutil.copy2(data, source / "compressor_toy" / "data" / data.name)
    site = target / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip install of {source} failed:\n{proc.stdout}{proc.stderr}")
    return site


def env_with(site: Path) -> dict[str, str]:
    """This process's environment with ``site`` first on ``PYTHONPATH`` (and the hub kept offline)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env
