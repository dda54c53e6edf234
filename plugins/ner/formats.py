"""Readers of NER files into :class:`NerExample`: CoNLL columns, CoNLL04 JSON, and records (JSON lines, CSV,
parquet, ``datasets`` ``save_to_disk`` directories; see :mod:`compressor.data.tables`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.data.readers import Location, check_entities, read_conll04, read_conll_blocks
from compressor.data.tables import RECORD_FORMATS, read_records, table_format
from compressor.errors import DataError
from compressor.runtime.decoding import bio_to_spans, repair_iob, spans_to_bio, split_tag

FORMATS = ("conll", "conll04", *RECORD_FORMATS)


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
    """A table (a directory, ``.jsonl``, ``.csv``, ``.parquet``) -> its format, ``.json`` -> conll04, anything
    else -> conll."""
    return table_format(path) or {".json": "conll04"}.get(Path(path).suffix.lower(), "conll")


def read_ner(path: Path, format: str | None = None, encoding: str | None = None) -> list[NerExample]:
    """Read an NER file in ``format`` (``None``: from the extension, see :func:`detect_format`).

    ``encoding``: the file's text encoding (``None``: the split's, set by ``DataStore``; UTF-8 by default)."""
    fmt = format or detect_format(path)
    if fmt == "conll":
        return read_conll(path, encoding)
    if fmt in RECORD_FORMATS:
        return read_ner_records(path, fmt, encoding)
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
    return read_ner_records(path, "jsonl", encoding)


def read_ner_records(path: Path, fmt: str, encoding: str | None = None) -> list[NerExample]:
    """One sentence per record: ``tokens`` and either ``tags`` (IOB tag names, or integer ids named by a ClassLabel
    feature or the recipe's ``label_names``) or ``entities``; the recipe's ``columns`` map them onto the file's
    columns (CoNLL-2003 from ``datasets``: ``{tags: ner_tags}``)."""
    return [ner_record(loc, obj) for loc, obj in read_records(path, fmt, encoding)]


def ner_record(loc: Location, obj: dict) -> NerExample:
    """The example of one record (see :func:`read_ner_records`)."""
    tokens = obj.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise loc.error("field 'tokens' must be a non-empty list of strings")
    if "tags" in obj:
        tags = obj["tags"]
        if isinstance(tags, list) and any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
            raise loc.error("field 'tags' holds integer ids without names; give them in the recipe: "
                            "label_names: {tags: [O, B-PER, I-PER, ...]} (index = id)")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise loc.error("field 'tags' must be a list of strings")
        if len(tags) != len(tokens):
            raise loc.error(f"{len(tokens)} tokens but {len(tags)} tags")
        for t in tags:
            _check_tag(t, loc)
        example = _from_tags(tokens, tags, loc)
        if "entities" in obj and _entities(obj["entities"], len(tokens), loc) != example.entities:
            raise loc.error("fields 'tags' and 'entities' disagree; give one of them")
        return example
    if "entities" in obj:
        entities = _entities(obj["entities"], len(tokens), loc)
        return NerExample(tokens, spans_to_bio(entities, len(tokens)), entities, loc)
    raise loc.error(f"expected field 'tags' or 'entities' (the record has: {', '.join(list(obj)[:12])}; map one with "
                    "columns: {tags: <column>})")


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


__all__ = ["FORMATS", "NerExample", "detect_format", "ner_record", "read_conll", "read_ner", "read_ner_conll04",
           "read_ner_jsonl", "read_ner_records"]
