"""Extractive question answering (SQuAD v1.1 style): predict the answer's start and end token in the context."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from compressor.data.collate import pad_inputs
from compressor.errors import DataError, RecipeError
from compressor.runtime.decoding import qa_best_answer, qa_span_candidates
from compressor.tasks import DistillTarget, Encoded, HfHead, MetricSpec, OnnxOutput, TaskPlugin
from compressor_plugins.qa.metrics import squad_scores
from compressor_plugins.qa.reader import QaExample, read_qa

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

_TOKENIZE_CHUNK = 500  # questions per tokenizer call: bounds memory on large files


class QaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doc_stride: int | None = Field(
        None, gt=0, description="tokens shared by consecutive windows of a long context; default max_length // 2")
    max_query_length: int = Field(64, gt=0, description="questions longer than this (in tokens) are truncated")
    max_answer_length: int = Field(30, gt=0, description="longest answer the decoder returns, in tokens")
    n_best: int = Field(20, gt=0, description="candidate spans kept per window")
    dev_articles: int = Field(5, gt=0, description="articles at the end of the file that squad-dev holds out")
    dropout: float = Field(0.1, ge=0, lt=1)


class QaTask(TaskPlugin):
    """Extractive QA: every (question, context) becomes one or more windows of ``max_length`` tokens.

    A context too long for one window is split into overlapping windows (``doc_stride`` shared tokens); a
    training window whose answer is not entirely inside it is labelled with the CLS position (0). Predictions
    take the best span over all windows of a question; the metrics are SQuAD v1.1 exact match and F1 as
    fractions in [0, 1].

    Bad input (see also :mod:`compressor_plugins.qa.reader`):
        * a question longer than ``max_query_length`` tokens (or too long to leave the context room in a window)
          is cut to fit and counted in ``Encoded.truncated``, in training and evaluation alike;
        * training skips, and counts in ``Encoded.skipped``, questions without answers (``no_answer``) and those
          whose ``answers[0].answer_start`` does not point at its text (``answer_start_mismatch``);
        * evaluation needs at least one reference answer per question: a question without one is a
          ``DataError`` naming the file and the question id (a mismatched ``answer_start`` is harmless there:
          scoring compares texts).
    """

    metric = MetricSpec("f1")
    Options = QaOptions
    description = "Extractive question answering (SQuAD v1.1 EM/F1, sliding windows)"

    def __init__(self, name: str, labels: Sequence[str] | None = None, options: Mapping[str, Any] | None = None):
        super().__init__(name, labels, options)
        self._max_length: int | None = None  # the window size of the last encode, for export_spec

    def doc_stride(self, max_length: int) -> int:
        """Tokens shared by consecutive windows: the option, or half a window by default."""
        return self.options.doc_stride or max(1, max_length // 2)

    # ---- data ---------------------------------------------------------------------------------------------
    def read(self, path: Path, format: str | None = None) -> list[QaExample]:
        return read_qa(Path(path), format, self.options.dev_articles)

    def check_split(self, examples: Sequence[QaExample], split: str) -> None:
        """Dev and test questions need a reference answer each (scoring has nothing to compare with otherwise)."""
        if split == "train":
            return
        bad = next((ex for ex in examples if not ex.answers), None)
        if bad is not None:
            raise DataError(bad.where, f"{split} question has no answer; SQuAD v1.1 evaluation needs at least one "
                                       "reference answer (unanswerable questions are not supported)")

    def fit_labels(self, examples: Sequence[QaExample]) -> list[str]:
        return []  # spans have no label schema

    def encode(self, examples: Sequence[QaExample], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        if not getattr(tokenizer, "is_fast", False):
            raise RecipeError(f"task '{self.name}': QA needs a fast tokenizer (offset mappings)")
        stride = self.doc_stride(max_length)
        special = tokenizer.num_special_tokens_to_add(pair=True)
        # the tokenizer needs room for more than `stride` context tokens next to the question
        budget = min(self.options.max_query_length, max_length - special - stride - 1)
        if budget < 1:
            raise RecipeError(f"task '{self.name}': max_length={max_length} leaves no room for a question next to "
                              f"doc_stride={stride} context tokens; lower doc_stride or raise max_length")
        self._max_length = max_length
        skipped: Counter[str] = Counter()
        keep: list[int] = []
        for i, ex in enumerate(examples):
            if not ex.answers:
                if not train:
                    raise DataError(ex.where, "question has no answer; SQuAD v1.1 evaluation needs at least one "
                                              "reference answer (unanswerable questions are not supported)")
                skipped["no_answer"] += 1
            elif train and not ex.answer_ok(0):
                skipped["answer_start_mismatch"] += 1
            else:
                keep.append(i)
        if train and skipped["answer_start_mismatch"]:
            bad = next(ex for ex in examples if ex.answers and not ex.answer_ok(0))
            what = (f"{skipped['answer_start_mismatch']} of {len(examples)} training questions have an answer whose "
                    f"text is not at its answer_start in the context")
            if not keep:
                raise DataError(bad.where, f"task '{self.name}': {what}; no training question is left (first: "
                                           f"answer {bad.answers[0][0]!r} at {bad.answers[0][1]})")
            from compressor.console import say

            say(f"warning: task '{self.name}': {what}; they are skipped (first: {bad.where})")

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features: list[dict[str, Any]] = []
        truncated = 0
        for lo in range(0, len(keep), _TOKENIZE_CHUNK):
            chunk = [examples[i] for i in keep[lo : lo + _TOKENIZE_CHUNK]]
            lengths = tokenizer([ex.question for ex in chunk], add_special_tokens=False)["input_ids"]
            questions = [ex.question if len(n) <= budget else _fit_question(tokenizer, ex.question, budget)
                         for ex, n in zip(chunk, lengths)]
            truncated += sum(q != ex.question for q, ex in zip(questions, chunk))
            enc = tokenizer(questions, [ex.context for ex in chunk], truncation="only_second", max_length=max_length,
                            stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            for w, sample in enumerate(enc["overflow_to_sample_mapping"]):
                ex = chunk[sample]
                seq_ids = enc.sequence_ids(w)
                offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq_ids)]
                feature = {k: list(enc[k][w]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
                feature.update(offsets=offsets, example_index=keep[lo + sample], context=ex.context, pad_id=pad_id)
                if train:
                    text, start = ex.answers[0]
                    feature["start_positions"], feature["end_positions"] = answer_tokens(offsets, start,
                                                                                         start + len(text))
                features.append(feature)
        return Encoded(features, num_examples=len(examples), truncated=truncated, skipped=dict(skipped))

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        batch = pad_inputs(features)
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    # ---- model --------------------------------------------------------------------------------------------
    def build_head(self, hidden_size: int) -> nn.Module:
        from compressor_plugins.qa.head import SpanHead

        return SpanHead(hidden_size, self.options.dropout)

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        start = F.cross_entropy(outputs["start_logits"].float(), batch["start_positions"])
        end = F.cross_entropy(outputs["end_logits"].float(), batch["end_positions"])
        return (start + end) / 2

    def distill_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        # KL runs over the sequence axis of each row; padding is at the masked logit in both models
        return {"start": DistillTarget(outputs["start_logits"]), "end": DistillTarget(outputs["end_logits"])}

    # ---- predictions --------------------------------------------------------------------------------------
    def decode(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], features: Sequence[dict[str, Any]]
    ) -> list[list[tuple[float, int, int]]]:
        """Per window, its ``n_best`` candidates ``(score, start_char, end_char)``."""
        o = self.options
        return [
            qa_span_candidates(outputs["start_logits"][i], outputs["end_logits"][i], f["offsets"],
                               o.max_answer_length, o.n_best)
            for i, f in enumerate(features)
        ]

    def aggregate(self, results: Sequence[Any], encoded: Encoded) -> list[dict[str, Any] | None]:
        """The best span over every window of each question: ``{"text", "start", "end", "score"}``."""
        candidates: dict[int, list[tuple[float, int, int]]] = {}
        contexts: dict[int, str] = {}
        for feature, result in zip(encoded.features, results):
            i = feature["example_index"]
            candidates.setdefault(i, []).extend(result)
            contexts[i] = feature["context"]
        return [qa_best_answer(candidates[i], contexts[i]) if i in contexts else None
                for i in range(encoded.num_examples)]

    def score(self, predictions: Sequence[dict[str, Any] | None], examples: Sequence[QaExample]) -> dict[str, float]:
        """SQuAD v1.1 ``exact_match`` and ``f1`` (fractions), max over each question's reference answers.

        Questions without answers (skipped in training) are left out of the score; so are their predictions.
        """
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        pairs = [((p or {}).get("text", ""), [a for a, _ in ex.answers])
                 for p, ex in zip(predictions, examples) if ex.answers]
        return squad_scores([p for p, _ in pairs], [r for _, r in pairs])

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("start_logits", {0: "batch", 1: "sequence"}),
                OnnxOutput("end_logits", {0: "batch", 1: "sequence"})]

    def hf_head(self) -> HfHead:
        """``Linear(hidden, 2)`` -> start/end logits is transformers' question answering (which leaves padding
        positions unmasked)."""
        return HfHead("question-answering", (), "qa_outputs")

    def export_spec(self) -> dict[str, Any]:
        """``doc_stride``/``max_length`` are those of the last encode; without one, ``doc_stride`` is the option
        (``None`` = ``max_length // 2``) and ``max_length`` is ``None`` (the model's manifest holds it)."""
        o = self.options
        return {
            "decoder": "qa_span", "max_answer_length": o.max_answer_length, "n_best": o.n_best,
            "doc_stride": self.doc_stride(self._max_length) if self._max_length else o.doc_stride,
            "max_length": self._max_length, "max_query_length": o.max_query_length,
        }


def answer_tokens(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions ``(start, end)`` (inclusive) of the answer ``[start_char, end_char)`` in one window.

    ``(0, 0)`` (the CLS position) when the answer is not entirely inside the window's context tokens.
    """
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    start = next((i for i in ctx if offsets[i][1] > start_char), None)
    end = next((i for i in reversed(ctx) if offsets[i][0] < end_char), None)
    if start is None or end is None or end < start:
        return 0, 0
    return start, end


def _fit_question(tokenizer: Any, question: str, budget: int) -> str:
    """``question`` cut at a token boundary so that it tokenises into at most ``budget`` tokens."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    while len(offsets) > budget:
        # re-tokenising a cut word can split it differently, so check again (each cut is strictly shorter)
        question = question[: offsets[budget - 1][1]]
        offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return question
