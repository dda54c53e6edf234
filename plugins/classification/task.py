"""Text (or text-pair) classification with a pooled linear head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.data.collate import pad_inputs
from compressor.errors import RecipeError
from compressor.runtime.decoding import classify
from compressor.tasks import DistillTarget, Encoded, HfHead, MetricSpec, OnnxOutput, TaskPlugin
from compressor_plugins.classification.formats import TextExample, read_classification

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

DEFAULT_DROPOUT = 0.1
_TOKENIZE_CHUNK = 1000


class ClassificationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pooling: Literal["cls", "mean"] = Field("cls", description="first-token state or mean over real tokens")
    dropout: float | None = Field(None, ge=0, lt=1, description="head dropout; default 0.1")
    text_pair: bool = Field(False, description="examples are (text, text_pair); every record must have both")
    label_before: str | None = Field(None, min_length=1, description="keep the part of each label before this "
                                     "separator (TREC's 'DESC:manner' -> 'DESC' with ':')")
    label_map: dict[str, str] = Field({}, description="rename labels (after label_before): {read: used}; labels "
                                      "not in the table are kept")

    def map_label(self, label: str) -> str:
        """A label as read -> the label the task trains and scores on."""
        if self.label_before is not None:
            label = label.split(self.label_before, 1)[0] or label
        return self.label_map.get(label, label)


class ClassificationTask(TaskPlugin):
    """Single-text or text-pair classification; ``labels`` are label strings (``fit_labels``: sorted unique).

    Formats: ``label_text`` (``<label> <text>`` lines, as SST-2's ``stsa.binary.*``), ``tsv``
    (``label<TAB>text[<TAB>text_pair]``) and records with fields ``text``, ``text_pair``?, ``label``: ``jsonl``,
    ``csv``, ``parquet``, ``arrow`` (a ``datasets`` ``save_to_disk`` directory); ``None`` picks by extension.
    Labels pass through the options ``label_before`` and ``label_map`` as they are read. Texts longer than
    ``max_length`` are truncated (longest side first for pairs) and counted.
    """

    metric = MetricSpec("accuracy")
    Options = ClassificationOptions
    description = "Text / text-pair classification (accuracy, macro-F1)"

    # ---- data ---------------------------------------------------------------------------------------------
    def read(self, path: Path, format: str | None = None) -> list[TextExample]:
        examples = read_classification(Path(path), format)
        mapped = self.options.label_before is not None or self.options.label_map
        for ex in examples:
            if mapped:
                ex.label = self.options.map_label(ex.label)
            if self.options.text_pair and ex.text_pair is None:
                raise ex.source.error(f"task '{self.name}' has option text_pair: true but this record has no text pair")
            if not self.options.text_pair and ex.text_pair is not None:
                raise ex.source.error(f"this record has a text pair but task '{self.name}' has option text_pair: "
                                      "false (set it to true)")
        return examples

    def fit_labels(self, examples: Sequence[TextExample]) -> list[str]:
        return sorted({ex.label for ex in examples})

    def encode(self, examples: Sequence[TextExample], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        if not self.labels:
            raise RecipeError(f"task '{self.name}': no labels (give tasks[].labels or fit them on the training data)")
        index = {label: i for i, label in enumerate(self.labels)}
        for ex in examples:
            if ex.label not in index:
                raise ex.source.error(f"label '{ex.label}' is not in the labels of task '{self.name}' {self.labels}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features: list[dict[str, Any]] = []
        truncated = 0
        for lo in range(0, len(examples), _TOKENIZE_CHUNK):
            chunk = examples[lo : lo + _TOKENIZE_CHUNK]
            texts = [ex.text for ex in chunk]
            pairs = [ex.text_pair for ex in chunk] if self.options.text_pair else None
            enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
            for i, ex in enumerate(chunk):
                if enc.encodings and enc.encodings[i].overflowing:
                    truncated += 1
                feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
                feature.update(labels=index[ex.label], example_index=lo + i, pad_id=pad_id)
                features.append(feature)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        batch = pad_inputs(features)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch

    # ---- model --------------------------------------------------------------------------------------------
    def build_head(self, hidden_size: int) -> nn.Module:
        from compressor_plugins.classification.head import SequenceClassificationHead

        if not self.labels:
            raise RecipeError(f"task '{self.name}': cannot build a head without labels")
        dropout = DEFAULT_DROPOUT if self.options.dropout is None else self.options.dropout
        return SequenceClassificationHead(hidden_size, len(self.labels), dropout, self.options.pooling)

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(outputs["logits"].float(), batch["labels"])

    def distill_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"])}

    def transfer_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"])}  # any text is a sentence to classify

    # ---- predictions --------------------------------------------------------------------------------------
    def decode(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        """The predicted label of each feature (argmax)."""
        return [label for label, _prob in classify(outputs["logits"], self.labels)]

    def score(self, predictions: Sequence[str], examples: Sequence[TextExample]) -> dict[str, float]:
        """Accuracy and macro-F1 (unweighted mean F1 over the labels seen in gold or predictions)."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        gold = [ex.label for ex in examples]
        return {"accuracy": accuracy(predictions, gold), "macro_f1": macro_f1(predictions, gold)}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch"}, atol=1e-4)]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "classification", "labels": list(self.labels), "text_pair": self.options.text_pair}

    def hf_head(self) -> HfHead | None:
        """First-token pooling + Linear is sequence classification; mean pooling has no transformers class."""
        if self.options.pooling != "cls":
            return None
        return HfHead("sequence-classification", tuple(self.labels), "classifier")


def accuracy(predictions: Sequence[str], gold: Sequence[str]) -> float:
    """Fraction of exact matches (0.0 for no examples)."""
    return sum(p == g for p, g in zip(predictions, gold)) / len(gold) if gold else 0.0


def macro_f1(predictions: Sequence[str], gold: Sequence[str]) -> float:
    """Mean per-label F1 over labels in ``gold`` or ``predictions``; a label with no support on one side scores 0.

    Equals ``sklearn.metrics.f1_score(gold, predictions, average="macro", zero_division=0)``.
    """
    labels = sorted(set(gold) | set(predictions))
    if not labels:
        return 0.0
    total = 0.0
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predictions, gold))
        fp = sum(p == label and g != label for p, g in zip(predictions, gold))
        fn = sum(p != label and g == label for p, g in zip(predictions, gold))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)
