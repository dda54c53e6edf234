"""Relation extraction as entity-pair classification, decoded end to end over a sibling NER task's entities."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.data.collate import pad_inputs
from compressor.errors import RecipeError
from compressor.runtime.decoding import (
    NO_RELATION, relation_candidates, relation_decode, span_token_range, word_token_ranges,
)
from compressor.tasks import BASE_INPUTS, DistillTarget, Encoded, Forward, MetricSpec, OnnxInput, OnnxOutput, TaskPlugin
from compressor_plugins.relation.metrics import strict_scores
from compressor_plugins.relation.reader import ReExample, read_relations

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

IGNORE = -100  # label of padding pairs
_TOKENIZE_CHUNK = 1000


class RelationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entity_task: str = Field("ner", description="the task whose predicted entities relations are decoded over")
    negatives_per_sentence: int = Field(
        20, ge=0, description="entity pairs without a relation sampled per training sentence (seeded)")
    max_pairs: int = Field(256, gt=0, description="most entity pairs classified per sentence (the first ones)")
    type_constraints: bool = Field(
        True, description="only classify pairs, and predict relations, whose argument types the training data has")
    allowed_pairs: dict[str, list[tuple[str, str]]] | None = Field(
        None, description="relation -> allowed [head type, tail type]; learned from the training data when unset")
    classifier: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax: one class per relation type plus no_relation (ahead on CoNLL04 dev in "
        "reports/teacher.md); sigmoid: one binary logit per relation type and a threshold (SpERT)")
    threshold: float = Field(0.4, gt=0, lt=1, description="sigmoid: least probability of a predicted relation")
    dropout: float = Field(0.1, ge=0, lt=1)
    width: int | None = Field(None, gt=0, description="hidden width of the pair MLP; default the encoder's")
    seed: int = Field(0, description="seed of negative sampling")


class RelationTask(TaskPlugin):
    """Relation extraction (CoNLL04 style): ``labels`` are relation types; the head adds ``no_relation``.

    Training classifies the gold relation pairs of each sentence plus up to ``negatives_per_sentence`` sampled
    pairs of its gold entities that have no relation. Evaluation is end to end: the entity task (``entity_task``,
    found through :meth:`bind`) predicts entities, every ordered pair of them is classified, and a relation counts
    only when both arguments' boundaries and types and the relation type are right (SpERT's strict micro F1).
    ``f1_gold_entities`` classifies the pairs of the gold entities instead.

    Class ``0`` of the head is ``no_relation``, class ``i + 1`` is ``labels[i]``.

    With ``type_constraints`` (default), the allowed ``(head type, tail type)`` of each relation are learned from
    the training data (:meth:`fit_labels`, or the first training :meth:`encode`) and stored in the options (so in
    the model manifest); at inference pairs no relation allows are not classified, and a relation is never
    predicted for argument types it does not allow.

    Bad input: everything :func:`read_relations` rejects is a ``DataError`` naming the file and record (spans
    outside the sentence, overlapping entities, relation arguments that are not entities of the sentence, self
    relations, repeated relations), and so is a relation type outside ``labels``. One entity pair with two
    relation types cannot be learnt by a single-label head: training keeps its first relation and counts the
    others in ``Encoded.skipped`` (``extra_relation_of_pair``); evaluation counts every gold relation. Entities cut
    off by truncation to ``max_length`` are not paired (their gold relations still count as missed).
    """

    metric = MetricSpec("f1")
    Options = RelationOptions
    description = "Relation extraction over entity pairs, end to end with an NER task (strict micro F1)"

    def __init__(self, name: str, labels: Sequence[str] | None = None, options: Mapping[str, Any] | None = None):
        super().__init__(name, labels, options)
        if NO_RELATION in self.labels:
            raise RecipeError(f"task '{name}': '{NO_RELATION}' is added by the plugin; leave it out of the labels")
        self._entity: TaskPlugin | None = None

    @property
    def classes(self) -> list[str]:
        """The head's classes: ``no_relation`` then the relation types."""
        return [NO_RELATION, *self.labels]

    def requires(self) -> list[str]:
        return [self.options.entity_task]

    def bind(self, tasks: Mapping[str, TaskPlugin]) -> None:
        """Keep the entity task; a ``RecipeError`` when it is missing or cannot decode entities."""
        name = self.options.entity_task
        task = tasks.get(name)
        if task is None:
            raise RecipeError(f"task '{self.name}': its entity_task '{name}' is not a task of this model (tasks: "
                              f"{', '.join(sorted(tasks))}); add an NER task named '{name}' or set "
                              f"options.entity_task")
        if not callable(getattr(task, "spans_from_logits", None)):
            raise RecipeError(f"task '{self.name}': entity_task '{name}' (plugin {task.plugin_name}) cannot decode "
                              "entities: its plugin has no spans_from_logits(logits, features)")
        self._entity = task

    def allowed(self) -> dict[str, list[tuple[str, str]]] | None:
        """The type constraints applied at inference, or ``None`` (off, or not learned yet)."""
        return self.options.allowed_pairs if self.options.type_constraints else None

    # ---- data ---------------------------------------------------------------------------------------------
    def read(self, path: Path, format: str | None = None) -> list[ReExample]:
        return read_relations(Path(path), format)

    def fit_labels(self, examples: Sequence[ReExample]) -> list[str]:
        """Relation types of the training data (sorted); also learns the type constraints when unset."""
        self._learn_constraints(examples)
        return sorted({r[4] for ex in examples for r in ex.relations})

    def _learn_constraints(self, examples: Sequence[ReExample]) -> None:
        if self.options.allowed_pairs is not None or not self.options.type_constraints:
            return
        seen: dict[str, set[tuple[str, str]]] = {}
        for ex in examples:
            for hs, he, ts, te, rel in ex.relations:
                seen.setdefault(rel, set()).add((ex.entity_type(hs, he), ex.entity_type(ts, te)))
        self.options.allowed_pairs = {rel: sorted(pairs) for rel, pairs in sorted(seen.items())}

    def encode(self, examples: Sequence[ReExample], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        if not self.labels:
            raise RecipeError(f"task '{self.name}': no labels (give tasks[].labels or fit them on the training data)")
        if not getattr(tokenizer, "is_fast", False):
            raise RecipeError(f"task '{self.name}': relation extraction needs a fast tokenizer (word ids)")
        index = {c: i for i, c in enumerate(self.classes)}
        for ex in examples:
            for j, rel in enumerate(ex.relations):
                if rel[4] not in index:
                    raise ex.source.error(f"relations[{j}]: relation type '{rel[4]}' is not in the labels of task "
                                          f"'{self.name}' {self.labels}")
        if train:
            self._learn_constraints(examples)
        allowed = self.allowed()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        skipped: Counter[str] = Counter()
        features: list[dict[str, Any]] = []
        truncated = 0
        for lo in range(0, len(examples), _TOKENIZE_CHUNK):
            chunk = examples[lo : lo + _TOKENIZE_CHUNK]
            enc = tokenizer([ex.tokens for ex in chunk], is_split_into_words=True, truncation=True,
                            max_length=max_length)
            for i, ex in enumerate(chunk):
                word_ids = list(enc.word_ids(i))
                truncated += bool(enc.encodings[i].overflowing)
                gold = {(ex.entity_index(*r[0:2]), ex.entity_index(*r[2:4])): r[4] for r in reversed(ex.relations)}
                if train:
                    skipped["extra_relation_of_pair"] += len(ex.relations) - len(gold)
                    pairs = self._training_pairs(ex, word_ids, gold, allowed, lo + i)
                    ranges = word_token_ranges(word_ids)
                    spans = [[*span_token_range(ex.entities[h], ranges), *span_token_range(ex.entities[t], ranges)]
                             for h, t in pairs]
                else:
                    pairs, arr = relation_candidates(ex.entities, word_ids, allowed, self.options.max_pairs)
                    spans = arr.tolist()
                feature = {k: list(enc[k][i]) for k in BASE_INPUTS if k in enc}
                feature.update(
                    word_ids=word_ids, num_words=len(ex.tokens), example_index=lo + i, pad_id=pad_id,
                    re_entities=list(ex.entities), re_pairs=pairs, re_spans=spans,
                    re_labels=[index[gold[p]] if p in gold else 0 for p in pairs],
                )
                features.append(feature)
        return Encoded(features, num_examples=len(examples), truncated=truncated,
                       skipped={k: v for k, v in skipped.items() if v})

    def _training_pairs(self, ex: ReExample, word_ids: list[int | None], gold: Mapping[tuple[int, int], str],
                        allowed: Mapping | None, example_index: int) -> list[tuple[int, int]]:
        """Gold relation pairs (those whose entities survived truncation), then seeded negative samples."""
        candidates, _ = relation_candidates(ex.entities, word_ids, allowed)
        ranges = word_token_ranges(word_ids)
        positives = [p for p in sorted(gold) if all(span_token_range(ex.entities[k], ranges) for k in p)]
        negatives = [p for p in candidates if p not in gold]
        room = max(0, min(self.options.negatives_per_sentence, self.options.max_pairs - len(positives)))
        if len(negatives) > room:
            rng = random.Random(f"{self.options.seed}:{example_index}")
            negatives = sorted(rng.sample(negatives, room))
        return positives + negatives

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Model inputs, ``re_spans [batch, pairs, 4]``, ``re_labels`` (-100 pads) and ``re_pair_mask``."""
        import torch

        batch = pad_inputs(features)
        pairs = max(len(f["re_spans"]) for f in features)
        spans = torch.zeros(len(features), pairs, 4, dtype=torch.long)
        labels = torch.full((len(features), pairs), IGNORE, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["re_spans"])
            if n:
                spans[i, :n] = torch.tensor(f["re_spans"], dtype=torch.long)
                labels[i, :n] = torch.tensor(f["re_labels"], dtype=torch.long)
        batch.update(re_spans=spans, re_labels=labels, re_pair_mask=labels != IGNORE)
        return batch

    # ---- model --------------------------------------------------------------------------------------------
    def build_head(self, hidden_size: int) -> nn.Module:
        from compressor_plugins.relation.head import PairHead

        if not self.labels:
            raise RecipeError(f"task '{self.name}': cannot build a head without labels")
        o = self.options
        return PairHead(hidden_size, len(self.classes), o.dropout, o.width, classifier=o.classifier,
                        threshold=o.threshold)

    def onnx_inputs(self) -> list[OnnxInput]:
        return [OnnxInput("re_spans", "int64", {0: "batch", 1: "pairs"}, example_shape=(3, 4))]

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        logits, labels = outputs["logits"], batch["re_labels"]
        if not bool((labels != IGNORE).any()):
            return logits.sum() * 0.0  # no pair in the batch: a zero loss that keeps the graph
        if self.options.classifier == "softmax":
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        # sigmoid: a binary decision per relation type (column 0 is the constant threshold logit); the loss sums
        # over types and averages over real pairs, as SpERT's
        mask = labels != IGNORE
        targets = F.one_hot(labels.clamp(min=0), logits.shape[-1])[..., 1:].float()
        per_pair = F.binary_cross_entropy_with_logits(logits[..., 1:].float(), targets, reduction="none").sum(-1)
        return per_pair[mask].mean()

    def distill_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        return {"logits": DistillTarget(outputs["logits"], mask=batch["re_pair_mask"])}

    # ---- predictions --------------------------------------------------------------------------------------
    def decode(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], features: Sequence[dict[str, Any]]
    ) -> list[dict[str, list]]:
        """Relations among each feature's own pairs (the gold entities' pairs that :meth:`encode` made):
        ``{"entities": [(s, e, type)], "relations": [(hs, he, ts, te, type)]}``."""
        classes, allowed = self.classes, self.allowed()
        return [
            {"entities": list(map(tuple, f["re_entities"])),
             "relations": relation_decode(outputs["logits"][i], f["re_pairs"], f["re_entities"], classes, allowed)}
            for i, f in enumerate(features)
        ]

    def evaluate(
        self, forward: Forward, encoded: Encoded, examples: Sequence[ReExample], batch_size: int = 32
    ) -> tuple[dict[str, float], list[dict[str, list]]]:
        """End-to-end scores (entities from the entity task) plus ``*_gold_entities`` (pairs of gold entities).

        Two forward passes per batch: the entity task's, then this task's over the union of the predicted
        entities' pairs and the gold entities' pairs.

        Returns:
            metrics (``f1``, ``precision``, ``recall``, ``entity_f1``, ``entity_precision``, ``entity_recall``,
            ``f1_gold_entities``, ``precision_gold_entities``, ``recall_gold_entities``) and the end-to-end
            predictions, one ``{"entities", "relations"}`` per example.
        """
        import numpy as np

        entity = self._bound_entity()
        entity_output = entity.onnx_outputs()[0].name
        classes, allowed, max_pairs = self.classes, self.allowed(), self.options.max_pairs
        e2e: list[dict[str, list] | None] = [None] * encoded.num_examples
        gold: list[dict[str, list] | None] = [None] * encoded.num_examples
        for lo in range(0, len(encoded.features), batch_size):
            feats = encoded.features[lo : lo + batch_size]
            batch = {k: v.numpy() for k, v in self.collate(feats).items()}
            base = {k: batch[k] for k in BASE_INPUTS if k in batch}
            entities = entity.spans_from_logits(forward(entity.name, base)[entity_output], feats)
            union_rows, predicted, golden = [], [], []
            for f, ents in zip(feats, entities):
                pairs, spans = relation_candidates(ents, f["word_ids"], allowed, max_pairs)
                rows: dict[tuple[int, ...], int] = {}
                p_idx = [rows.setdefault(tuple(s), len(rows)) for s in spans.tolist()]
                g_idx = [rows.setdefault(tuple(s), len(rows)) for s in f["re_spans"]]
                union_rows.append(list(rows))
                predicted.append((ents, pairs, p_idx))
                golden.append((f["re_entities"], f["re_pairs"], g_idx))
            width = max(len(r) for r in union_rows)
            re_spans = np.zeros((len(feats), width, 4), dtype=np.int64)
            for i, rows in enumerate(union_rows):
                if rows:
                    re_spans[i, : len(rows)] = rows
            logits = forward(self.name, {**base, "re_spans": re_spans})["logits"]
            for i, f in enumerate(feats):
                for out, (ents, pairs, idx) in ((e2e, predicted[i]), (gold, golden[i])):
                    rels = relation_decode(logits[i][idx], pairs, ents, classes, allowed)
                    out[f["example_index"]] = {"entities": [tuple(e) for e in ents], "relations": rels}
        metrics = self.score(e2e, examples)
        on_gold = self.score(gold, examples)
        metrics.update({f"{k}_gold_entities": on_gold[k] for k in ("f1", "precision", "recall")})
        return metrics, e2e

    def _bound_entity(self) -> TaskPlugin:
        if self._entity is None:
            raise RecipeError(f"task '{self.name}': not bound to its entity task '{self.options.entity_task}' "
                              "(build it through a MultiTaskModel or DataStore, which call bind)")
        return self._entity

    def score(self, predictions: Sequence[dict[str, list] | None], examples: Sequence[ReExample]) -> dict[str, float]:
        """Strict micro scores (see :func:`compressor_plugins.relation.metrics.strict_scores`) of predictions
        ``{"entities", "relations"}`` against the gold; an example without a prediction predicts nothing."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        preds = [p or {"entities": [], "relations": []} for p in predictions]
        return strict_scores([p["entities"] for p in preds], [p["relations"] for p in preds],
                             [ex.entities for ex in examples], [ex.relations for ex in examples])

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("logits", {0: "batch", 1: "pairs"}, atol=1e-4)]

    def export_spec(self) -> dict[str, Any]:
        allowed = self.allowed()
        return {
            "decoder": "relation", "entity_task": self.options.entity_task, "labels": list(self.labels),
            "classes": self.classes, "no_relation": NO_RELATION, "max_pairs": self.options.max_pairs,
            "type_constraints": {r: [list(p) for p in ps] for r, ps in allowed.items()} if allowed else None,
        }

