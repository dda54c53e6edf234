"""SQuAD v1.1 exact match and F1, as the official evaluation script computes them (as fractions in [0, 1]).

Answers are normalised (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed); each
prediction scores the maximum over its reference answers; the corpus score is the mean over questions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean of per-question max-over-references EM and F1, as fractions.

    Args:
        predictions: one answer text per question.
        references: the reference answer texts of each question (at least one each).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f = 0.0
    for pred, refs in zip(predictions, references):
        if not refs:
            raise ValueError("a question without reference answers cannot be scored (SQuAD v1.1)")
        em += max(exact_match(pred, r) for r in refs)
        f += max(f1(pred, r) for r in refs)
    n = len(predictions)
    return {"exact_match": em / n, "f1": f / n}
