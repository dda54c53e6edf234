"""Templates of the plugin class (``task.py``) of the ``token`` and ``sequence`` kinds, and the header and JSON-lines
reader every kind shares (string.Template: ``$$`` is a literal dollar; ``$name``, ``$module``, ``$Class``, ``$Decoder``, ``$dist``, ``$kind`` are filled in)."""

from __future__ import annotations

_READ = '''
def read_jsonl(path: Path, format: str | None, make) -> list:
    """One example per JSON line (``make(record, path, line)`` builds it); errors name the file and line."""
    if format not in (None, "jsonl"):
        raise DataError(path, f"unknown format '{format}'; this plugin reads jsonl")
    examples = []
    for n, line in iter_lines(path):  # cut at line feeds only, decoded in the split's encoding
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

TASK_HEADER = '''\
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
from compressor.data.readers import iter_lines
from compressor.errors import DataError
from compressor.tasks import DistillTarget, Encoded, MetricSpec, OnnxInput, OnnxOutput, TaskPlugin

IGNORE = -100  # label of positions the loss skips (special tokens, a word's later sub-tokens, padding)


class Options(BaseModel):
    """What a recipe may set under the task's `options:`."""

    model_config = ConfigDict(extra="forbid")

    dropout: float = Field(0.1, ge=0, lt=1, description="head dropout")
''' + _READ

TOKEN_TASK = TASK_HEADER + '''

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

#: the methods of a plugin with one label per example (``sequence`` and ``span-pair``), from build_head to
#: onnx_outputs
ONE_LABEL_METHODS = '''    def build_head(self, hidden_size: int) -> Any:
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
'''

SEQUENCE_TASK = TASK_HEADER + '''

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

''' + ONE_LABEL_METHODS + '''
    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "labels": list(self.labels)}
'''

