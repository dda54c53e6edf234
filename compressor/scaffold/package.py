"""Templates of a scaffolded package's files around its plugin: pyproject.toml, README, __init__, its test
(string.Template: ``$$`` is a literal dollar; ``$name``, ``$module``, ``$Class``, ``$Decoder``, ``$dist``, ``$kind`` are filled in)."""

from __future__ import annotations

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A compressor task plugin: $name ($kind)"
requires-python = ">=3.10"
# compressor (with torch, transformers, numpy) comes from the environment this is installed into
dependencies = []

[project.entry-points."compressor.tasks"]
$name = "$module.task:$Class"

[project.entry-points."compressor.decoders"]
$name = "$module.decoder:$Decoder"

[tool.setuptools]
packages = ["$module"]

[tool.setuptools.package-data]
$module = ["data/*.jsonl"]
'''

README = '''\
# $dist

A compressor task plugin registered as `$name` (kind: $kind), with the torch-free decoder `$name`.

```bash
pip install -e .                 # registers the task and its decoder through entry points
pytest tests                     # the contract kit (compressor.testing) on data/train.jsonl
compressor tasks check $name --data $module/data/train.jsonl
```

In a recipe: `- {name: $name, plugin: $name, data: {train: /abs/path/train.jsonl, dev: /abs/path/dev.jsonl}}`.
See docs/plugins.md of compressor for every part of the contract.
'''

INIT = '''\
"""The `$name` task plugin ($kind) for compressor."""

from $module.task import $Class

__all__ = ["$Class"]
'''

TEST = '''\
"""The plugin passes the compressor contract kit on its own fixture."""

import json
from pathlib import Path

from compressor.data.readers import iter_lines
from compressor.testing import contract_test
from $module.task import $Class

DATA = Path(__file__).resolve().parents[1] / "$module" / "data" / "train.jsonl"
RECORDS = [json.loads(line) for _n, line in iter_lines(DATA) if line.strip()]

test_contract = contract_test($Class, DATA, name="$name"$extra)


def test_reads_the_fixture_and_fits_labels():
    task = $Class("$name")
    examples = task.read(DATA)
    assert len(examples) == len(RECORDS) > 0
    task.labels = task.fit_labels(examples)
    assert task.labels
'''
