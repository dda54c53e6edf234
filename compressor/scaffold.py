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
import random
import re
from pathlib import Path
from string import Template

from compressor.errors import RecipeError

KINDS = ("token", "sequence", "span", "span-pair")


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
    train, dev = _fixture(kind)
    (target / module / "data").mkdir(parents=True, exist_ok=True)
    for split, records in (("train", train), ("dev", dev)):
        (target / module / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return target


# ---- fixtures ---------------------------------------------------------------------------------------------------
_NOUNS = ["cat", "dog", "teacher", "river", "city", "student", "bird", "farmer"]
_VERBS = ["sees", "likes", "finds", "follows", "paints", "visits"]
_ADJS = ["old", "small", "quiet", "bright"]
_MONTHS = ["January", "March", "May", "July", "October", "December"]


def _fixture(kind: str) -> tuple[list[dict], list[dict]]:
    rng = random.Random(7)
    records = []
    for i in range(32):
        subj, obj, verb, adj = rng.choice(_NOUNS), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_ADJS)
        if kind == "token":
            tokens = ["the", adj, subj, verb, "a", obj, "."]
            records.append({"tokens": tokens, "tags": ["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "PUNCT"]})
        elif kind == "sequence":
            happy = i % 2 == 0
            text = f"the {adj} {subj} {verb} a {obj} and it is {'wonderful' if happy else 'terrible'} ."
            records.append({"text": text, "label": "positive" if happy else "negative"})
        elif kind == "span":
            date = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}"
            prefix = f"the {subj} {verb} a {obj} on "
            text = prefix + date + " ."
            records.append({"text": text, "start": len(prefix), "end": len(prefix) + len(date)})
        else:
            text = f"the {subj} {verb} the {obj} ."
            head = [4, 4 + len(subj)]
            tail_start = text.index(f" {obj} .") + 1
            label = "agent" if i % 2 == 0 else "patient"
            h, t = (head, [tail_start, tail_start + len(obj)]) if label == "agent" else \
                ([tail_start, tail_start + len(obj)], head)
            records.append({"text": text, "head": h, "tail": t, "label": label})
    return records[:24], records[24:]


# ---- templates (string.Template: $$ is a literal dollar) --------------------------------------------------------
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

from compressor.testing import contract_test
from $module.task import $Class

DATA = Path(__file__).resolve().parents[1] / "$module" / "data" / "train.jsonl"
RECORDS = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]

test_contract = contract_test($Class, DATA, name="$name"$extra)


def test_reads_the_fixture_and_fits_labels():
    task = $Class("$name")
    examples = task.read(DATA)
    assert len(examples) == len(RECORDS) > 0
    task.labels = task.fit_labels(examples)
    assert task.labels
'''

_READ = '''
def read_jsonl(path: Path, format: str | None, make) -> list:
    """One example per JSON line (``make(record, path, line)`` builds it); errors name the file and line."""
    if format not in (None, "jsonl"):
        raise DataError(path, f"unknown format '{format}'; this plugin reads jsonl")
    examples = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            examples.append(make(record, str(path), n))
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg}", line=n) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"malformed record: {exc}", line=n) from None
    return examples
'''

_HEADER = '''\
"""The `$name` task plugin ($kind). Data: JSON lines (see data/train.jsonl)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compressor.data.collate import pad_inputs
from compressor.errors import DataError
from compressor.tasks import DistillTarget, Encoded, MetricSpec, OnnxInput, OnnxOutput, TaskPlugin

IGNORE = -100  # label of positions the loss skips (special tokens, a word's later sub-tokens, padding)


class Options(BaseModel):
    """What a recipe may set under the task's `options:`."""

    model_config = ConfigDict(extra="forbid")

    dropout: float = Field(0.1, ge=0, lt=1, description="head dropout")
''' + _READ

TOKEN_TASK = _HEADER + '''

@dataclass
class Example:
    tokens: list[str]
    tags: list[str]
    path: str
    line: int


def _example(record: dict, path: str, line: int) -> Example:
    tokens, tags = list(record["tokens"]), list(record["tags"])
    if len(tokens) != len(tags) or not tokens:
        raise ValueError(f"{len(tokens)} tokens and {len(tags)} tags")
    return Example(tokens, tags, path, line)


class $Class(TaskPlugin):
    """A label per word, predicted at the word's first sub-token. Metric: word accuracy."""

    metric = MetricSpec("accuracy")
    Options = Options
    description = "$name: a label per word (token classification)"

    def read(self, path: Path, format: str | None = None) -> list[Example]:
        return read_jsonl(path, format, _example)

    def fit_labels(self, examples: Sequence[Example]) -> list[str]:
        return sorted({tag for ex in examples for tag in ex.tags})

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        # tokenizer is a Hugging Face *fast* tokenizer: word_ids() maps sub-tokens to words
        index = {label: i for i, label in enumerate(self.labels)}
        for ex in examples:
            for tag in ex.tags:
                if tag not in index:
                    raise DataError(ex.path, f"label '{tag}' is not one of {self.labels}", line=ex.line)
        enc = tokenizer([ex.tokens for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features, truncated = [], 0
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            labels, seen = [], set()
            for w in word_ids:  # label a word at its first sub-token only
                if w is None or w in seen:
                    labels.append(IGNORE)
                else:
                    seen.add(w)
                    labels.append(index[ex.tags[w]])
            truncated += bool(enc.encodings[i].overflowing)
            feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(labels=labels, word_ids=list(word_ids), num_words=len(ex.tokens), example_index=i,
                           pad_id=pad_id)
            features.append(feature)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_inputs(features, {"labels": IGNORE})

    def build_head(self, hidden_size: int) -> Any:
        from $module.head import Head

        return Head(hidden_size, len(self.labels), self.options.dropout)

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        logits, labels = outputs["logits"], batch["labels"]
        if not bool((labels != IGNORE).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def distill_targets(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"], mask=batch["labels"] != IGNORE)}  # a bool mask

    def decode(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               features: Sequence[dict[str, Any]]) -> list[list[str]]:
        from compressor.runtime.decoding import first_subtoken_word_tags

        ids = np.asarray(outputs["logits"]).argmax(axis=-1)
        return [first_subtoken_word_tags(ids[i], f["word_ids"], f["num_words"], self.labels)
                for i, f in enumerate(features)]

    def score(self, predictions: Sequence[list[str]], examples: Sequence[Example]) -> dict[str, float]:
        total = sum(len(ex.tags) for ex in examples)
        correct = sum(p == g for pred, ex in zip(predictions, examples) for p, g in zip(pred, ex.tags))
        return {"accuracy": correct / total if total else 0.0}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch", 1: "sequence"})]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "labels": list(self.labels)}
'''

SEQUENCE_TASK = _HEADER + '''

@dataclass
class Example:
    text: str
    label: str
    path: str
    line: int


def _example(record: dict, path: str, line: int) -> Example:
    text = str(record["text"])
    if not text.strip():
        raise ValueError("empty text")
    return Example(text, str(record["label"]), path, line)


class $Class(TaskPlugin):
    """A label per text. Metric: accuracy."""

    metric = MetricSpec("accuracy")
    Options = Options
    description = "$name: a label per text (sequence classification)"

    def read(self, path: Path, format: str | None = None) -> list[Example]:
        return read_jsonl(path, format, _example)

    def fit_labels(self, examples: Sequence[Example]) -> list[str]:
        return sorted({ex.label for ex in examples})

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        index = {label: i for i, label in enumerate(self.labels)}
        for ex in examples:
            if ex.label not in index:
                raise DataError(ex.path, f"label '{ex.label}' is not one of {self.labels}", line=ex.line)
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = []
        for i, ex in enumerate(examples):
            feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(labels=index[ex.label], example_index=i, pad_id=pad_id)
            features.append(feature)
        truncated = sum(bool(e.overflowing) for e in enc.encodings)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_inputs(features)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch

    def build_head(self, hidden_size: int) -> Any:
        from $module.head import Head

        return Head(hidden_size, len(self.labels), self.options.dropout)

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs["logits"].float(), batch["labels"])

    def distill_targets(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"])}

    def decode(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               features: Sequence[dict[str, Any]]) -> list[str]:
        return [self.labels[int(i)] for i in np.asarray(outputs["logits"]).argmax(axis=-1)]

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        correct = sum(p == ex.label for p, ex in zip(predictions, examples))
        return {"accuracy": correct / len(examples) if examples else 0.0}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch"})]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "labels": list(self.labels)}
'''

SPAN_TASK = _HEADER + '''

@dataclass
class Example:
    text: str
    start: int  # character offsets of the gold span, end exclusive
    end: int
    path: str
    line: int


def _example(record: dict, path: str, line: int) -> Example:
    text, start, end = str(record["text"]), int(record["start"]), int(record["end"])
    if not 0 <= start < end <= len(text):
        raise ValueError(f"span [{start}, {end}) is outside the text (length {len(text)})")
    return Example(text, start, end, path, line)


class $Class(TaskPlugin):
    """One character span of each text (start and end token logits). Metric: character-overlap F1."""

    metric = MetricSpec("f1")
    Options = Options
    default_labels = ("span",)
    description = "$name: one span of each text (span extraction)"

    def read(self, path: Path, format: str | None = None) -> list[Example]:
        return read_jsonl(path, format, _example)

    def fit_labels(self, examples: Sequence[Example]) -> list[str]:
        return ["span"]

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = []
        for i, ex in enumerate(examples):
            seq_ids = enc.encodings[i].sequence_ids
            offsets = [list(o) if s == 0 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < ex.end and o[1] > ex.start]
            start, end = (inside[0], inside[-1]) if inside else (IGNORE, IGNORE)  # cut off: not trained on
            feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(start_positions=start, end_positions=end, offsets=offsets, example_index=i,
                           pad_id=pad_id)
            features.append(feature)
        truncated = sum(bool(e.overflowing) for e in enc.encodings)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_inputs(features)
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    def build_head(self, hidden_size: int) -> Any:
        from $module.head import Head

        return Head(hidden_size, self.options.dropout)

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        if not bool((batch["start_positions"] != IGNORE).any()):
            return outputs["start_logits"].sum() * 0.0
        return (F.cross_entropy(outputs["start_logits"].float(), batch["start_positions"], ignore_index=IGNORE)
                + F.cross_entropy(outputs["end_logits"].float(), batch["end_positions"], ignore_index=IGNORE)) / 2

    def distill_targets(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, DistillTarget]:
        # softmax over the sequence; the head already pushed padding to -10000
        return {"start": DistillTarget(outputs["start_logits"]), "end": DistillTarget(outputs["end_logits"])}

    def decode(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               features: Sequence[dict[str, Any]]) -> list[tuple[int, int] | None]:
        from compressor.runtime.decoding import qa_span_candidates

        out = []
        for i, f in enumerate(features):
            best = qa_span_candidates(outputs["start_logits"][i], outputs["end_logits"][i],
                                      [tuple(o) if o else None for o in f["offsets"]], 30, 1)
            out.append((best[0][1], best[0][2]) if best else None)
        return out

    def score(self, predictions: Sequence[tuple[int, int] | None], examples: Sequence[Example]) -> dict[str, float]:
        f1s, exact = [], 0
        for pred, ex in zip(predictions, examples):
            if pred is None:
                f1s.append(0.0)
                continue
            overlap = max(0, min(pred[1], ex.end) - max(pred[0], ex.start))
            exact += tuple(pred) == (ex.start, ex.end)
            p, r = overlap / max(1, pred[1] - pred[0]), overlap / (ex.end - ex.start)
            f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        n = len(examples)
        return {"f1": sum(f1s) / n if n else 0.0, "exact": exact / n if n else 0.0}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("start_logits", {0: "batch", 1: "sequence"}),
                OnnxOutput("end_logits", {0: "batch", 1: "sequence"})]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "max_answer_length": 30}
'''

SPAN_PAIR_TASK = _HEADER + '''

@dataclass
class Example:
    text: str
    head: tuple[int, int]  # character offsets, end exclusive
    tail: tuple[int, int]
    label: str
    path: str
    line: int


def _example(record: dict, path: str, line: int) -> Example:
    text = str(record["text"])
    head, tail = tuple(int(x) for x in record["head"]), tuple(int(x) for x in record["tail"])
    for span in (head, tail):
        if len(span) != 2 or not 0 <= span[0] < span[1] <= len(text):
            raise ValueError(f"span {list(span)} is not [start, end) inside the text")
    return Example(text, head, tail, str(record["label"]), path, line)


def token_range(offsets: Sequence, span: Sequence[int]) -> tuple[int, int]:
    """Sub-token range [start, end) covering a character span (``(0, 1)``, the first token, when cut off)."""
    inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < span[1] and o[1] > span[0]]
    return (inside[0], inside[-1] + 1) if inside else (0, 1)


class $Class(TaskPlugin):
    """A label for a pair of spans of a text (e.g. the relation of head to tail). Metric: accuracy."""

    metric = MetricSpec("accuracy")
    Options = Options
    description = "$name: a label per pair of spans (span-pair classification)"

    def read(self, path: Path, format: str | None = None) -> list[Example]:
        return read_jsonl(path, format, _example)

    def fit_labels(self, examples: Sequence[Example]) -> list[str]:
        return sorted({ex.label for ex in examples})

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        index = {label: i for i, label in enumerate(self.labels)}
        for ex in examples:
            if ex.label not in index:
                raise DataError(ex.path, f"label '{ex.label}' is not one of {self.labels}", line=ex.line)
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = []
        for i, ex in enumerate(examples):
            seq_ids = enc.encodings[i].sequence_ids
            offsets = [o if s == 0 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            spans = [*token_range(offsets, ex.head), *token_range(offsets, ex.tail)]
            feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(pair_spans=spans, labels=index[ex.label], example_index=i, pad_id=pad_id)
            features.append(feature)
        truncated = sum(bool(e.overflowing) for e in enc.encodings)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_inputs(features)
        batch["pair_spans"] = torch.tensor([f["pair_spans"] for f in features], dtype=torch.long)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch

    def build_head(self, hidden_size: int) -> Any:
        from $module.head import Head

        return Head(hidden_size, len(self.labels), self.options.dropout)

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs["logits"].float(), batch["labels"])

    def distill_targets(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"])}

    def decode(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               features: Sequence[dict[str, Any]]) -> list[str]:
        return [self.labels[int(i)] for i in np.asarray(outputs["logits"]).argmax(axis=-1)]

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        correct = sum(p == ex.label for p, ex in zip(predictions, examples))
        return {"accuracy": correct / len(examples) if examples else 0.0}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch"})]

    def onnx_inputs(self) -> list[OnnxInput]:
        # [batch, 4]: head start, head end, tail start, tail end (sub-token positions, ends exclusive)
        return [OnnxInput("pair_spans", "int64", {0: "batch"}, example_shape=(4,))]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "labels": list(self.labels)}
'''

TASKS = {"token": TOKEN_TASK, "sequence": SEQUENCE_TASK, "span": SPAN_TASK, "span-pair": SPAN_PAIR_TASK}

_HEAD_HEADER = '''\
"""The head of the `$name` task (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import torch
from torch import nn

'''

HEADS = {
    "token": _HEAD_HEADER + '''
class Head(nn.Module):
    """Dropout + a linear layer over every token: ``{"logits": [batch, sequence, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        return {"logits": self.classifier(self.dropout(hidden_states))}
''',
    "sequence": _HEAD_HEADER + '''
class Head(nn.Module):
    """Mean of the real tokens, dropout, a linear layer: ``{"logits": [batch, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return {"logits": self.classifier(self.dropout(pooled))}
''',
    "span": _HEAD_HEADER + '''
class Head(nn.Module):
    """Start and end logits per token (padding at -10000): ``{"start_logits", "end_logits"}: [batch, sequence]``."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.qa = nn.Linear(hidden_size, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        logits = self.qa(self.dropout(hidden_states))
        pad = attention_mask == 0
        start = logits[..., 0].masked_fill(pad, -10000.0)
        end = logits[..., 1].masked_fill(pad, -10000.0)
        return {"start_logits": start, "end_logits": end}
''',
    "span-pair": _HEAD_HEADER + '''
class Head(nn.Module):
    """The first sub-token of each span, concatenated, dropout, a linear layer: ``{"logits": [batch, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, pair_spans: torch.Tensor,
                **extra: torch.Tensor):
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        head = hidden_states[rows, pair_spans[:, 0]]
        tail = hidden_states[rows, pair_spans[:, 2]]
        return {"logits": self.classifier(self.dropout(torch.cat([head, tail], dim=-1)))}
''',
}

_DEC_HEADER = '''\
"""The torch-free runtime decoder of `$name` (registered as `$name` in the `compressor.decoders` entry-point
group; a bundle's tasks.json names it through the plugin's export_spec). numpy and compressor.runtime only."""

from __future__ import annotations

import numpy as np

'''

DECODERS_ = {
    "token": _DEC_HEADER + '''from compressor.runtime.decoders import WordTagDecoder


class $Decoder(WordTagDecoder):
    """A label per word, read at its first sub-token: ``{"words": [{"text", "label", "start", "end"}], "tags"}``.

    The project's word-level tagging decoder does the work; override ``decode_batch`` to shape the output.
    """
''',
    "sequence": _DEC_HEADER + '''from compressor.runtime.decoders import Decoder, classification


class $Decoder(Decoder):
    """``{"label", "score", "scores": {label: probability}}`` per text."""

    def check(self) -> None:
        if not self.labels():
            raise ValueError("needs 'labels'")

    def decode_batch(self, outputs, encodings, texts):
        logits = np.asarray(self.output(outputs))
        return [{**classification(logits[i], self.labels()), "truncated": bool(enc.overflowing)}
                for i, enc in enumerate(encodings)]

    def describe(self, prediction):
        return f"{prediction['label']} ({prediction['score']:.3f})"
''',
    "span": _DEC_HEADER + '''from compressor.runtime.decoders import Decoder
from compressor.runtime.decoding import qa_best_answer, qa_span_candidates


class $Decoder(Decoder):
    """The best span of each text: ``{"text", "start", "end", "score"}`` (character offsets)."""

    def check(self) -> None:
        if {"start_logits", "end_logits"} - set(self.graph.outputs):
            raise ValueError("needs outputs start_logits and end_logits")

    def decode_batch(self, outputs, encodings, texts):
        out = []
        for i, (enc, text) in enumerate(zip(encodings, texts)):
            offsets = [tuple(o) if s == 0 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
            cands = qa_span_candidates(outputs["start_logits"][i], outputs["end_logits"][i], offsets,
                                       int(self.settings.get("max_answer_length", 30)), 1)
            best = qa_best_answer(cands, text)
            out.append({"text": best["text"], "start": best["start"], "end": best["end"], "score": best["score"],
                        "truncated": bool(enc.overflowing)})
        return out

    def describe(self, prediction):
        return f"{prediction['text']!r} @{prediction['start']}:{prediction['end']}"
''',
    "span-pair": _DEC_HEADER + '''from compressor.runtime.decoders import BundleError, Decoder, classification


class $Decoder(Decoder):
    """A label for two character spans of each text: ``Bundle.predict(texts, spans=[[[hs, he], [ts, te]], ...])``
    gives ``{"label", "score", "scores", "head", "tail"}`` per text."""

    shared = False  # needs the spans of the request

    def check(self) -> None:
        if not self.labels():
            raise ValueError("needs 'labels'")

    def predict(self, bundle, texts, inputs, done):
        spans = inputs.get("spans")
        if spans is None or len(spans) != len(texts):
            raise BundleError(f"task '{self.task}' classifies span pairs: give spans=[[[head_start, head_end], "
                              "[tail_start, tail_end]], ...] (character offsets), one per text")
        out = []
        for lo in range(0, len(texts), bundle.batch_size):
            chunk, pairs = list(texts[lo : lo + bundle.batch_size]), spans[lo : lo + bundle.batch_size]
            encs = bundle.encode(chunk)
            rows = np.zeros((len(chunk), 4), dtype=np.int64)
            for i, (enc, (head, tail)) in enumerate(zip(encs, pairs)):
                offsets = [tuple(o) if s == 0 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
                rows[i] = [*_token_range(offsets, head), *_token_range(offsets, tail)]
            logits = self.output(bundle.run([self.task], {**bundle.pad(encs), "pair_spans": rows})[self.task])
            for i, (enc, text, (head, tail)) in enumerate(zip(encs, chunk, pairs)):
                out.append({**classification(logits[i], self.labels()), "head": text[head[0]:head[1]],
                            "tail": text[tail[0]:tail[1]], "truncated": bool(enc.overflowing)})
        return out

    def describe(self, prediction):
        return f"{prediction['head']} --{prediction['label']}--> {prediction['tail']} ({prediction['score']:.3f})"


def _token_range(offsets, span):
    inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < span[1] and o[1] > span[0]]
    return (inside[0], inside[-1] + 1) if inside else (0, 1)
''',
}
