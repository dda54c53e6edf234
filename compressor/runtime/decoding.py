"""Torch-free decoding primitives shared by the task plugins and the ONNX runtime.

Plugins decode PyTorch outputs with these functions and the runtime decodes ONNX Runtime outputs with the same
ones, so both give identical predictions. Only numpy and the standard library may be imported here.

BIO decoding reads entities the way the field scores them (conlleval, and seqeval's default mode): an entity
starts at ``B-X`` and continues over following ``I-X``; a stray ``I-X`` that does not follow ``B-X``/``I-X`` (after
``O``, at the start, or after another type) starts a new ``X`` entity instead of being dropped. PyTorch decoding
(the plugins) and the torch-free runtime both call :func:`bio_to_spans`, so they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    """Entity spans of an IOB2 tag sequence: ``[(start, end_exclusive, type), ...]`` in order.

    ``I-X`` extends an entity when it follows ``B-X`` or ``I-X``; a stray ``I-X`` (after ``O``, at the start or
    after an entity of another type) ends any open entity and starts a new ``X`` entity, as conlleval and
    seqeval's default mode read it. On well-formed IOB2 this is the same as seqeval's strict mode.
    """
    spans: list[Span] = []
    start, typ = -1, None  # the open entity, if any
    for i, tag in enumerate(tags):
        prefix, t = split_tag(tag)
        if prefix == "I" and typ is not None and t == typ:
            continue
        if typ is not None:
            spans.append((start, i, typ))
        start, typ = (i, t) if prefix in ("B", "I") else (-1, None)
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
    """Word-level entity spans of one sequence from its token logits ``[seq, num_tags]`` (argmax at each word's
    first sub-token, then :func:`bio_to_spans`: a stray ``I-X`` starts an entity)."""
    tag_ids = np.asarray(logits).argmax(axis=-1)
    return bio_to_spans(first_subtoken_word_tags(tag_ids, word_ids, num_words, tags))


# ---- classification ---------------------------------------------------------------------------------------
def classify(logits: np.ndarray, labels: Sequence[str]) -> list[tuple[str, float]]:
    """``[batch, num_labels]`` logits -> ``(label, probability)`` per row (argmax; first label wins ties)."""
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    best = probs.argmax(axis=-1)
    return [(labels[int(b)], float(p[b])) for b, p in zip(best, probs)]


# ---- extractive QA ----------------------------------------------------------------------------------------
QaCandidate = tuple[float, int, int]  # (start logit + end logit, start char, end char exclusive)


def offsets_array(offsets: Sequence[tuple[int, int] | None] | np.ndarray) -> np.ndarray:
    """Character offsets ``[seq, 2]`` (int64) with ``-1`` rows for tokens that cannot be part of an answer."""
    if isinstance(offsets, np.ndarray):
        return offsets.astype(np.int64, copy=False)
    return np.array([(-1, -1) if o is None else (o[0], o[1]) for o in offsets], dtype=np.int64).reshape(-1, 2)


def qa_span_candidates(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence[tuple[int, int] | None] | np.ndarray,
    max_answer_length: int = 30, n_best: int = 20,
) -> list[QaCandidate]:
    """The ``n_best`` answer spans of one window, best first.

    A span runs from a start token to an end token of the context (``offsets`` row not ``None``/negative), with
    ``start <= end < start + max_answer_length`` (in tokens); its score is ``start_logits[start] +
    end_logits[end]``. Every such span is considered (not only the top starts and ends), so the result is exact.
    Ties keep the earlier, then shorter span first.

    Args:
        start_logits, end_logits: ``[seq]`` (positions past ``len(offsets)``, i.e. padding, are ignored).
        offsets: per token ``(start_char, end_char)`` in the context, ``None`` (or ``-1``) for question, special
            and padding tokens.
    """
    offs = offsets_array(offsets)
    ctx = np.flatnonzero(offs[:, 0] >= 0)
    if ctx.size == 0 or max_answer_length < 1 or n_best < 1:
        return []
    s = np.asarray(start_logits, dtype=np.float64)[ctx]
    e = np.asarray(end_logits, dtype=np.float64)[ctx]
    n, width = ctx.size, min(max_answer_length, ctx.size)
    # band[i, d] = score of the span (ctx[i], ctx[i + d]); context tokens of a window are contiguous
    ends = np.arange(n)[:, None] + np.arange(width)[None, :]
    valid = ends < n
    band = np.where(valid, s[:, None] + e[np.minimum(ends, n - 1)], -np.inf)
    flat = band.ravel()
    k = min(n_best, int(valid.sum()))
    top = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
    # stable order: score desc, then start asc, then length asc (flat index = start * width + length)
    top = top[np.isfinite(flat[top])]
    top = top[np.lexsort((top, -flat[top]))][:k]
    out = []
    for idx in top:
        i, d = divmod(int(idx), width)
        out.append((float(flat[idx]), int(offs[ctx[i], 0]), int(offs[ctx[i + d], 1])))
    return out


def qa_best_answer(candidates: Sequence[QaCandidate], context: str) -> dict[str, object]:
    """The best of all candidates of one question (from every window): ``{"text", "start", "end", "score"}``.

    Windows are compared by raw score, as in the reference BERT implementation. No candidate (no context token
    in any window) gives the empty answer with ``score`` ``None``.
    """
    if not candidates:
        return {"text": "", "start": 0, "end": 0, "score": None}
    score, start, end = min(candidates, key=lambda c: (-c[0], c[1], c[2]))
    return {"text": context[start:end], "start": start, "end": end, "score": score}


# ---- relation extraction ----------------------------------------------------------------------------------
NO_RELATION = "no_relation"


def word_token_ranges(word_ids: Sequence[int | None]) -> dict[int, tuple[int, int]]:
    """Word index -> ``(first sub-token, last sub-token + 1)`` for every word present in ``word_ids``."""
    ranges: dict[int, tuple[int, int]] = {}
    for pos, w in enumerate(word_ids):
        if w is None:
            continue
        first = ranges[w][0] if w in ranges else pos
        ranges[w] = (first, pos + 1)
    return ranges


def span_token_range(span: Sequence, ranges: Mapping[int, tuple[int, int]]) -> tuple[int, int] | None:
    """Sub-token range ``[start, end)`` of a word span ``(start_word, end_word_exclusive, ...)``; ``None`` when
    its first or last word was cut off by truncation."""
    first, last = ranges.get(int(span[0])), ranges.get(int(span[1]) - 1)
    if first is None or last is None:
        return None
    return first[0], last[1]


def relation_candidates(
    entities: Sequence[Span], word_ids: Sequence[int | None],
    allowed: Mapping[str, Sequence[Sequence[str]]] | None = None, max_pairs: int | None = None,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The entity pairs to classify in one sentence and their ``re_spans`` graph input.

    Every ordered pair ``(head, tail)`` of distinct entities, in order of head then tail, skipping entities cut
    off by truncation and, when ``allowed`` (relation -> allowed ``[head_type, tail_type]``) is given, pairs whose
    types no relation allows; at most ``max_pairs`` (the first ones).

    Returns:
        ``(pairs, spans)``: ``pairs`` as indices into ``entities``; ``spans`` ``[len(pairs), 4]`` int64 sub-token
        positions ``(head_start, head_end, tail_start, tail_end)``, ends exclusive.
    """
    ranges = word_token_ranges(word_ids)
    tok = [span_token_range(e, ranges) for e in entities]
    type_pairs = None if allowed is None else {(h, t) for pairs in allowed.values() for h, t in pairs}
    pairs: list[tuple[int, int]] = []
    rows: list[tuple[int, int, int, int]] = []
    for i, head in enumerate(entities):
        for j, tail in enumerate(entities):
            if i == j or tok[i] is None or tok[j] is None:
                continue
            if type_pairs is not None and (head[2], tail[2]) not in type_pairs:
                continue
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs, np.array(rows, dtype=np.int64).reshape(-1, 4)
            pairs.append((i, j))
            rows.append((*tok[i], *tok[j]))  # type: ignore[misc]
    return pairs, np.array(rows, dtype=np.int64).reshape(-1, 4)


def relation_decode(
    logits: np.ndarray, pairs: Sequence[tuple[int, int]], entities: Sequence[Span], classes: Sequence[str],
    allowed: Mapping[str, Sequence[Sequence[str]]] | None = None, no_relation: str = NO_RELATION,
) -> list[tuple[int, int, int, int, str]]:
    """Relations of one sentence from pair logits ``[pairs, classes]`` (rows past ``len(pairs)`` are padding).

    Each pair takes the argmax class; with ``allowed``, a relation whose argument types it does not allow is
    masked out before the argmax (so the pair falls back to its best allowed class). Pairs predicted
    ``no_relation`` give nothing.

    Returns:
        ``(head_start, head_end, tail_start, tail_end, relation)`` word spans, ends exclusive, in pair order.
    """
    if not len(pairs):
        return []
    scores = np.asarray(logits, dtype=np.float64)[: len(pairs)].copy()
    if allowed is not None:
        for c, name in enumerate(classes):
            if name == no_relation:
                continue
            ok = {tuple(p) for p in allowed.get(name, ())}
            for row, (i, j) in enumerate(pairs):
                if (entities[i][2], entities[j][2]) not in ok:
                    scores[row, c] = -np.inf
    best = scores.argmax(axis=-1)
    out = []
    for row, (i, j) in enumerate(pairs):
        name = classes[int(best[row])]
        if name != no_relation:
            h, t = entities[i], entities[j]
            out.append((int(h[0]), int(h[1]), int(t[0]), int(t[1]), name))
    return out
