"""Named-entity recognition as BIO (IOB2) token tagging with first-sub-token labels."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from compressor.data.collate import pad_inputs
from compressor.errors import RecipeError
from compressor.runtime.decoding import bio_decode, bio_tags, spans_to_bio
from compressor.tasks import DistillTarget, Encoded, HfHead, MetricSpec, OnnxOutput, TaskPlugin
from compressor_plugins.ner.formats import NerExample, read_ner

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

IGNORE = -100  # label of sub-tokens that are not the first of a word, and of special tokens
DEFAULT_DROPOUT = 0.1
_TOKENIZE_CHUNK = 1000  # examples per tokenizer call: bounds memory on large files


class NerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dropout: float | None = Field(None, ge=0, lt=1, description="head dropout; default 0.1")


class NerTask(TaskPlugin):
    """Named-entity recognition: ``labels`` are entity types; the model tags words in IOB2.

    The tag set is ``["O", "B-T1", "I-T1", "B-T2", ...]`` over ``labels`` in order. Each word is labelled (and
    predicted) at its first sub-token. A sentence longer than ``max_length`` is truncated, never dropped; the
    words cut off are predicted ``"O"`` while the gold still counts them.

    Formats: ``conll`` (columns, token first, tag last, IOB1 read as IOB2), ``conll04`` (the CoNLL04 JSON array)
    and records ``{"tokens", "tags"}`` or ``{"tokens", "entities"}``: ``jsonl``, ``csv``, ``parquet``, ``arrow``
    (a ``datasets`` ``save_to_disk`` directory); ``None`` picks by extension.
    """

    metric = MetricSpec("f1")
    Options = NerOptions
    description = "Named-entity recognition (IOB2 tagging, seqeval strict entity F1)"

    def __init__(self, name: str, labels: Sequence[str] | None = None, options: Mapping[str, Any] | None = None):
        super().__init__(name, labels, options)
        if "O" in self.labels or any(lab.startswith(("B-", "I-")) for lab in self.labels):
            raise RecipeError(
                f"task '{name}': NER labels are entity types (e.g. [Loc, Org]), not BIO tags; got {self.labels}"
            )

    @property
    def tags(self) -> list[str]:
        """The tag set, index = class id of the head's logits."""
        return bio_tags(self.labels)

    # ---- data ---------------------------------------------------------------------------------------------
    def read(self, path: Path, format: str | None = None) -> list[NerExample]:
        return read_ner(Path(path), format)

    def fit_labels(self, examples: Sequence[NerExample]) -> list[str]:
        return sorted({typ for ex in examples for _, _, typ in ex.entities})

    def encode(self, examples: Sequence[NerExample], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        if not self.labels:
            raise RecipeError(f"task '{self.name}': no labels (give tasks[].labels or fit them on the training data)")
        if not getattr(tokenizer, "is_fast", False):
            raise RecipeError(f"task '{self.name}': NER needs a fast tokenizer (word ids)")
        index = {tag: i for i, tag in enumerate(self.tags)}
        for ex in examples:
            for tag in ex.tags:
                if tag not in index:
                    raise ex.source.error(f"entity type '{tag[2:]}' is not in the labels of task '{self.name}' "
                                          f"{self.labels}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features: list[dict[str, Any]] = []
        truncated = 0
        for lo in range(0, len(examples), _TOKENIZE_CHUNK):
            chunk = examples[lo : lo + _TOKENIZE_CHUNK]
            enc = tokenizer([ex.tokens for ex in chunk], is_split_into_words=True, truncation=True,
                            max_length=max_length)
            for i, ex in enumerate(chunk):
                word_ids = enc.word_ids(i)
                labels, seen = [], set()
                for w in word_ids:
                    if w is None or w in seen:
                        labels.append(IGNORE)
                    else:
                        seen.add(w)
                        labels.append(index[ex.tags[w]])
                truncated += bool(enc.encodings[i].overflowing)
                feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
                feature.update(labels=labels, word_ids=list(word_ids), num_words=len(ex.tokens),
                               example_index=lo + i, pad_id=pad_id)
                features.append(feature)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_inputs(features, {"labels": IGNORE})

    # ---- model --------------------------------------------------------------------------------------------
    def build_head(self, hidden_size: int) -> nn.Module:
        from compressor_plugins.ner.head import TokenTaggingHead

        if not self.labels:
            raise RecipeError(f"task '{self.name}': cannot build a head without labels")
        dropout = DEFAULT_DROPOUT if self.options.dropout is None else self.options.dropout
        return TokenTaggingHead(hidden_size, len(self.tags), dropout)

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        logits, labels = outputs["logits"], batch["labels"]
        if not bool((labels != IGNORE).any()):
            return logits.sum() * 0.0  # no labelled word: a zero loss that keeps the graph (mean would be NaN)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def distill_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"], mask=batch["labels"] != IGNORE)}

    def transfer_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        """Every real token of another task's input but the first and the last ([CLS] and [SEP] in BERT-style
        inputs), sub-words included: there are no word starts to pick without this task's own encoding."""
        import torch

        mask = batch["attention_mask"].bool().clone()
        mask[:, 0] = False
        last = mask.long().sum(dim=1).clamp(min=1)  # the last real token's position (padding is on the right)
        mask[torch.arange(mask.shape[0], device=mask.device), last] = False
        return {"logits": DistillTarget(outputs["logits"], mask=mask)}

    # ---- predictions --------------------------------------------------------------------------------------
    def decode(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], features: Sequence[dict[str, Any]]
    ) -> list[list[tuple[int, int, str]]]:
        return self.spans_from_logits(outputs["logits"], features)

    def spans_from_logits(
        self, logits: np.ndarray, features: Sequence[dict[str, Any]]
    ) -> list[list[tuple[int, int, str]]]:
        """Word-level entity spans of each feature from token logits.

        Args:
            logits: ``[batch, seq, num_tags]`` (numpy; row ``i`` belongs to ``features[i]``), classes in the order
                of :attr:`tags`.
            features: the features of the batch, as made by :meth:`encode` (``word_ids``, ``num_words``).

        Returns:
            one list per feature of ``(start_word, end_word_exclusive, entity_type)``, decoded by argmax at each
            word's first sub-token; a stray ``I-X`` not continuing an ``X`` entity starts a new one, as conlleval
            and seqeval's default mode read it (``compressor.runtime.decoding.bio_to_spans``, which the torch-free
            runtime uses too).
        """
        tags = self.tags
        return [bio_decode(logits[i], f["word_ids"], f["num_words"], tags) for i, f in enumerate(features)]

    def score(
        self, predictions: Sequence[list[tuple[int, int, str]]], examples: Sequence[NerExample]
    ) -> dict[str, float]:
        """Entity-level micro precision, recall and F1 (seqeval ``mode="strict"``, IOB2).

        Predicted spans are written back as well-formed IOB2 (a stray ``I-X`` already became an entity when it was
        decoded) and gold tags are repaired when read, so strict mode scores the same entities as conlleval.
        """
        from seqeval.metrics import f1_score, precision_score, recall_score
        from seqeval.scheme import IOB2

        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        y_true = [ex.tags for ex in examples]
        y_pred = [spans_to_bio(spans, len(ex.tokens)) for spans, ex in zip(predictions, examples)]
        kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when a side has no entity; zero_division covers it
            return {
                "f1": float(f1_score(y_true, y_pred, **kw)),
                "precision": float(precision_score(y_true, y_pred, **kw)),
                "recall": float(recall_score(y_true, y_pred, **kw)),
            }

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch", 1: "sequence"}, atol=1e-4)]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "bio", "tags": self.tags, "first_subtoken": True}

    def hf_head(self) -> HfHead:
        """Dropout + Linear over every token is transformers' token classification; ``id2label`` is the tag set."""
        return HfHead("token-classification", tuple(self.tags), "classifier")
