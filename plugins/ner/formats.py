"""Readers of NER files into :class:`NerExample`: CoNLL columns, JSON Lines and CoNLL04 JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.data.readers import (
    Location, check_entities, read_conll04, read_conll_blocks, read_jsonl,
)
from compressor.errors import DataError
from compressor.runtime.decoding import bio_to_spans, repair_iob, spans_to_bio, split_tag

FORMATS = ("conll", "jsonl", "conll04")


@dataclass
class NerExample:
    """One sentence: words, their IOB2 tags and the same entities as word spans (end exclusive).

    ``relations`` are kept when the file has them (CoNLL04), as ``(h_start, h_end, t_start, t_end, type)``.
    """

    tokens: list[str]
    tags: list[str]
    entities: list[tuple[int, int, str]]
    source: Location
    relations: list[tuple[int, int, int, int, str]] = field(default_factory=list)


def detect_format(path: Path) -> str:
    """``.json`` -> conll04, ``.jsonl`` -> jsonl, anything else -> conll."""
    suffix = Path(path).suffix.lower()
    return {".json": "conll04", ".jsonl": "jsonl"}.get(suffix, "conll")


def read_ner(path: Path, format: str | None = None, encoding: str | None = None) -> list[NerExample]:
    """Read an NER file in ``format`` (``None``: from the extension, see :func:`detect_format`).

    ``encoding``: the file's text encoding (``None``: the split's, set by ``DataStore``; UTF-8 by default)."""
    fmt = format or detect_format(path)
    if fmt == "conll":
        return read_conll(path, encoding)
    if fmt == "jsonl":
        return read_ner_jsonl(path, encoding)
    if fmt == "conll04":
        return read_ner_conll04(path, encoding)
    raise DataError(path, f"unknown NER format '{fmt}'; expected one of {', '.join(FORMATS)}")


def read_conll(path: Path, encoding: str | None = None) -> list[NerExample]:
    """CoNLL columns: the token first, the tag last; IOB1 tags are converted to IOB2."""
    examples = []
    for block in read_conll_blocks(path, encoding=encoding):
        tokens, tags = [], []
        for row in block:
            if len(row.columns) < 2:
                raise DataError(path, f"expected '<token> ... <tag>' columns, got {' '.join(row.columns)!r}",
                                line=row.line)
            _check_tag(row.columns[-1], Location(str(path), line=row.line))
            tokens.append(row.columns[0])
            tags.append(row.columns[-1])
        examples.append(_from_tags(tokens, tags, Location(str(path), line=block[0].line)))
    return examples


def read_ner_jsonl(path: Path, encoding: str | None = None) -> list[NerExample]:
    """One object per line: ``{"tokens": [...], "tags": [...]}`` or ``{"tokens": [...], "entities": [...]}``."""
    examples = []
    for n, obj in read_jsonl(path, encoding):
        loc = Location(str(path), line=n)
        tokens = obj.get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise loc.error("field 'tokens' must be a non-empty list of strings")
        if "tags" in obj:
            tags = obj["tags"]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise loc.error("field 'tags' must be a list of strings")
            if len(tags) != len(tokens):
                raise loc.error(f"{len(tokens)} tokens but {len(tags)} tags")
            for t in tags:
                _check_tag(t, loc)
            example = _from_tags(tokens, tags, loc)
            if "entities" in obj and _entities(obj["entities"], len(tokens), loc) != example.entities:
                raise loc.error("fields 'tags' and 'entities' disagree; give one of them")
            examples.append(example)
        elif "entities" in obj:
            entities = _entities(obj["entities"], len(tokens), loc)
            examples.append(NerExample(tokens, spans_to_bio(entities, len(tokens)), entities, loc))
        else:
            raise loc.error("expected field 'tags' or 'entities'")
    return examples


def read_ner_conll04(path: Path, encoding: str | None = None) -> list[NerExample]:
    """The CoNLL04 JSON array (``tokens``, ``entities``, ``relations``); tags come from the entities."""
    return [
        NerExample(
            rec["tokens"], spans_to_bio(rec["entities"], len(rec["tokens"])), rec["entities"],
            Location(str(path), record=rec["index"]), rec["relations"],
        )
        for rec in read_conll04(path, encoding)
    ]


def _from_tags(tokens: list[str], tags: list[str], loc: Location) -> NerExample:
    tags = repair_iob(tags)
    return NerExample(tokens, tags, bio_to_spans(tags), loc)


def _check_tag(tag: str, loc: Location) -> None:
    try:
        split_tag(tag)
    except ValueError as exc:
        raise loc.error(str(exc)) from None


def _entities(raw: Any, num_tokens: int, loc: Location) -> list[tuple[int, int, str]]:
    try:
        return check_entities(raw, num_tokens)
    except ValueError as exc:
        raise loc.error(str(exc)) from None


__all__ = ["FORMATS", "NerExample", "detect_format", "read_conll", "read_ner", "read_ner_conll04", "read_ner_jsonl"]
