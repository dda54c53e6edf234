"""Torch-free decoding primitives shared by the task plugins and the ONNX runtime.

Plugins decode PyTorch outputs with these functions and the runtime decodes ONNX Runtime outputs with the same
ones, so both give identical predictions. Only numpy and the standard library may be imported here.

BIO decoding is strict IOB2 (the ``mode="strict", scheme=IOB2`` of seqeval): an entity starts at ``B-X`` and
continues over following ``I-X``; an ``I-X`` that does not continue an ``X`` entity starts nothing and is dropped
(rather than repaired into ``B-X``), so a model is credited only for well-formed entities, exactly as the metric
counts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Span = tuple[int, int, str]  # (start word, end word exclusive, entity type)


# ---- generic ----------------------------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float32 in, float32 out for float32 input)."""
    x = np.asarray(x)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


# ---- BIO tagging ------------------------------------------------------------------------------------------
def bio_tags(types: Sequence[str]) -> list[str]:
    """The tag set of entity types in its fixed order: ``["O", "B-T1", "I-T1", "B-T2", "I-T2", ...]``."""
    tags = ["O"]
    for t in types:
        tags += [f"B-{t}", f"I-{t}"]
    return tags


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-Loc"`` -> ``("B", "Loc")``; ``"O"`` -> ``("O", None)``. Raises ``ValueError`` for anything else."""
    if tag == "O":
        return "O", None
    prefix, sep, typ = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not typ:
        raise ValueError(f"tag {tag!r} is not IOB2 (expected 'O', 'B-<type>' or 'I-<type>')")
    return prefix, typ


def bio_to_spans(tags: Sequence[str]) -> list[Span]:
    """Entity spans of a strict IOB2 tag sequence: ``[(start, end_exclusive, type), ...]`` in order.

    ``I-X`` extends an entity only when it follows ``B-X`` or ``I-X`` of the same entity; otherwise it is
    dropped and ends any open entity (seqeval strict IOB2).
    """
    spans: list[Span] = []
    start, typ = -1, None  # the open entity, if any
    for i, tag in enumerate(tags):
        prefix, t = split_tag(tag)
        if prefix == "I" and typ is not None and t == typ:
            continue
        if typ is not None:
            spans.append((start, i, typ))
        start, typ = (i, t) if prefix == "B" else (-1, None)
    if typ is not None:
        spans.append((start, len(tags), typ))
    return spans


def spans_to_bio(spans: Sequence[Span], length: int) -> list[str]:
    """IOB2 tags of ``length`` words from non-overlapping spans (the inverse of :func:`bio_to_spans`)."""
    tags = ["O"] * length
    for start, end, typ in spans:
        if not 0 <= start < end <= length:
            raise ValueError(f"span ({start}, {end}, {typ!r}) is outside 0..{length}")
        if any(t != "O" for t in tags[start:end]):
            raise ValueError(f"span ({start}, {end}, {typ!r}) overlaps another span")
        tags[start] = f"B-{typ}"
        for i in range(start + 1, end):
            tags[i] = f"I-{typ}"
    return tags


def repair_iob(tags: Sequence[str]) -> list[str]:
    """IOB1 (or loose IOB2) -> strict IOB2: an ``I-X`` that does not continue an ``X`` entity becomes ``B-X``.

    The identity on valid IOB2; used on gold files so that CoNLL-2003-style IOB1 data reads correctly.
    """
    out: list[str] = []
    prev: str | None = None
    for tag in tags:
        prefix, t = split_tag(tag)
        if prefix == "I" and prev != t:
            tag = f"B-{t}"
        out.append(tag)
        prev = t
    return out


def first_subtoken_word_tags(
    tag_ids: Sequence[int] | np.ndarray, word_ids: Sequence[int | None], num_words: int, tags: Sequence[str]
) -> list[str]:
    """Word-level tags from per-sub-token tag ids, reading each word's tag at its first sub-token.

    Args:
        tag_ids: predicted tag index per sub-token position (at least ``len(word_ids)`` long; padding after).
        word_ids: per sub-token, the word index or ``None`` for special tokens.
        num_words: words in the sentence; words without a sub-token (cut off by truncation) are tagged ``"O"``.
        tags: tag index -> tag string.
    """
    out = ["O"] * num_words
    seen: set[int] = set()
    for pos, word in enumerate(word_ids):
        if word is None or word in seen or word >= num_words:
            continue
        seen.add(word)
        out[word] = tags[int(tag_ids[pos])]
    return out


def bio_decode(
    logits: np.ndarray, word_ids: Sequence[int | None], num_words: int, tags: Sequence[str]
) -> list[Span]:
    """Word-level entity spans of one sequence from its token logits ``[seq, num_tags]`` (argmax, strict IOB2)."""
    tag_ids = np.asarray(logits).argmax(axis=-1)
    return bio_to_spans(first_subtoken_word_tags(tag_ids, word_ids, num_words, tags))


# ---- classification ---------------------------------------------------------------------------------------
def classify(logits: np.ndarray, labels: Sequence[str]) -> list[tuple[str, float]]:
    """``[batch, num_labels]`` logits -> ``(label, probability)`` per row (argmax; first label wins ties)."""
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    best = probs.argmax(axis=-1)
    return [(labels[int(b)], float(p[b])) for b, p in zip(best, probs)]
