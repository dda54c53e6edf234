"""``compressor tasks new NAME --kind KIND``: write a task-plugin package that installs and passes its own tests.

Kinds: ``token`` (a label per word, e.g. part-of-speech tags), ``sequence`` (a label per text), ``span`` (one
character span of the text, e.g. the date in a sentence), ``span-pair`` (a label for two given spans of a text,
e.g. the relation between them). Each package holds ``pyproject.toml`` (entry points ``compressor.tasks`` and
``compressor.decoders``), the plugin class (``task.py``), its head (``head.py``), its torch-free runtime decoder
(``decoder.py``), a small fixture (``data/train.jsonl``, ``data/dev.jsonl``) and a test that runs
``compressor.testing`` on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template

from compressor.errors import RecipeError
from compressor.scaffold.fixtures import fixture_records
from compressor.scaffold.models import DECODERS_, HEADS
from compressor.scaffold.package import INIT, PYPROJECT, README, TEST
from compressor.scaffold.span_tasks import SPAN_PAIR_TASK, SPAN_TASK
from compressor.scaffold.label_tasks import SEQUENCE_TASK, TOKEN_TASK

KINDS = ("token", "sequence", "span", "span-pair")
TASKS = {"token": TOKEN_TASK, "sequence": SEQUENCE_TASK, "span": SPAN_TASK, "span-pair": SPAN_PAIR_TASK}


def scaffold(name: str, kind: str, out: Path | None = None) -> Path:
    """Write the package for plugin ``name`` of ``kind`` into ``out`` (default ``./compressor-<name>``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
        raise RecipeError(f"plugin name {name!r}: use lower-case letters, digits and '_' (a Python identifier)")
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown kind '{kind}'{hint} (kinds: {', '.join(KINDS)})")
    target = Path(out) if out is not None else Path.cwd() / f"compressor-{name.replace('_', '-')}"
    if target.exists() and any(target.iterdir()):
        raise RecipeError(f"{target}: exists and is not empty; choose another --out")
    module = f"compressor_{name}"
    cls = "".join(p.capitalize() for p in name.split("_")) + "Task"
    values = {"name": name, "module": module, "Class": cls, "Decoder": cls.removesuffix("Task") + "Decoder",
              "dist": f"compressor-{name.replace('_', '-')}", "kind": kind}
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{module}/__init__.py": INIT,
        f"{module}/task.py": TASKS[kind],
        f"{module}/head.py": HEADS[kind],
        f"{module}/decoder.py": DECODERS_[kind],
        f"tests/test_{name}.py": TEST,
    }
    extra = {"span-pair": ', runtime_inputs={"texts": [RECORDS[0]["text"]], '
                          '"spans": [[RECORDS[0]["head"], RECORDS[0]["tail"]]]}'}.get(kind, "")
    values["extra"] = extra
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values), encoding="utf-8")
    train, dev = fixture_records(kind)
    (target / module / "data").mkdir(parents=True, exist_ok=True)
    for split, records in (("train", train), ("dev", dev)):
        (target / module / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return target

