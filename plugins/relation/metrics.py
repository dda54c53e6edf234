"""Strict (SpERT-style) micro precision, recall and F1 of entities and relations."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts (0 where undefined)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def typed_relations(entities: Iterable[Sequence], relations: Iterable[Sequence]) -> set[tuple]:
    """Relations with both arguments' types: ``(hs, he, h_type, ts, te, t_type, relation)``.

    A relation whose argument is not among ``entities`` gets type ``None``, so it can never match a gold one.
    """
    types = {(int(s), int(e)): t for s, e, t in entities}
    return {(hs, he, types.get((hs, he)), ts, te, types.get((ts, te)), r) for hs, he, ts, te, r in relations}


def strict_scores(
    pred_entities: Sequence[Iterable[Sequence]], pred_relations: Sequence[Iterable[Sequence]],
    gold_entities: Sequence[Iterable[Sequence]], gold_relations: Sequence[Iterable[Sequence]],
) -> dict[str, float]:
    """Micro scores over sentences; a relation counts only if both arguments' boundaries and types and the
    relation type are all right, an entity only if its boundaries and type are.

    Returns:
        ``f1``, ``precision``, ``recall`` (relations) and ``entity_f1``, ``entity_precision``, ``entity_recall``.
    """
    tp = n_pred = n_gold = etp = en_pred = en_gold = 0
    for pe, pr, ge, gr in zip(pred_entities, pred_relations, gold_entities, gold_relations, strict=True):
        pe, ge = {tuple(e) for e in pe}, {tuple(e) for e in ge}
        etp, en_pred, en_gold = etp + len(pe & ge), en_pred + len(pe), en_gold + len(ge)
        p, g = typed_relations(pe, pr), typed_relations(ge, gr)
        tp, n_pred, n_gold = tp + len(p & g), n_pred + len(p), n_gold + len(g)
    p, r, f = prf(tp, n_pred, n_gold)
    ep, er, ef = prf(etp, en_pred, en_gold)
    return {"f1": f, "precision": p, "recall": r, "entity_f1": ef, "entity_precision": ep, "entity_recall": er}
