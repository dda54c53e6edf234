"""A third-party task plugin written only against ``compressor.tasks``: does a sentence contain a digit?

Data: ``label<TAB>text`` lines with labels ``yes`` / ``no`` (``data/train.tsv``, ``data/dev.tsv`` ship with the
package). Head: mean pooling over real tokens, then a linear layer. Metric: accuracy. Registered as ``toy``
through the ``compressor.tasks`` entry-point group, like the built-in plugins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import DataError
from compressor.tasks import DistillTarget, Encoded, MetricSpec, OnnxOutput, TaskPlugin

DATA_DIR = Path(__file__).parent / "data"
LABELS = ("no", "yes")


@dataclass
class ToyExample:
    text: str
    label: str
    path: str
    line: int


class ToyTask(TaskPlugin):
    """Binary sentence classification: ``yes`` if the sentence contains a digit."""

    metric = MetricSpec("accuracy")
    default_labels = LABELS
    description = "Toy third-party task: does the sentence contain a digit?"

    def read(self, path: Path, format: str | None = None) -> list[ToyExample]:
        if format not in (None, "tsv"):
            raise DataError(path, f"unknown toy format '{format}'; expected tsv")
        examples = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            label, sep, text = line.partition("\t")
            if not sep or not text.strip():
                raise DataError(path, "expected 'label<TAB>text'", line=n)
            examples.append(ToyExample(text.strip(), label.strip(), str(path), n))
        return examples

    def fit_labels(self, examples: Sequence[ToyExample]) -> list[str]:
        return sorted({ex.label for ex in examples})

    def encode(self, examples: Sequence[ToyExample], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        index = {label: i for i, label in enumerate(self.labels)}
        for ex in examples:
            if ex.label not in index:
                raise DataError(ex.path, f"label '{ex.label}' is not one of {self.labels}", line=ex.line)
        texts = [ex.text for ex in examples]
        full = tokenizer(texts)["input_ids"]
        enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        pad = tokenizer.pad_token_id or 0
        features = [
            {"input_ids": list(ids), "label": index[ex.label], "example_index": i, "pad_id": pad}
            for i, (ids, ex) in enumerate(zip(enc, examples))
        ]
        truncated = sum(len(a) > len(b) for a, b in zip(full, enc))
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), features[0]["pad_id"], dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[row, : len(f["input_ids"])] = 1
        labels = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}

    def build_head(self, hidden_size: int) -> Any:
        from compressor_toy_task.head import MeanPoolHead

        return MeanPoolHead(hidden_size, len(self.labels))

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs["logits"].float(), batch["labels"])

    def distill_targets(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"])}

    def decode(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               features: Sequence[dict[str, Any]]) -> list[str]:
        return [self.labels[int(i)] for i in np.asarray(outputs["logits"]).argmax(axis=-1)]

    def score(self, predictions: Sequence[str], examples: Sequence[ToyExample]) -> dict[str, float]:
        correct = sum(p == ex.label for p, ex in zip(predictions, examples))
        return {"accuracy": correct / len(examples) if examples else 0.0}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch"})]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "classification", "labels": list(self.labels), "text_pair": False}
