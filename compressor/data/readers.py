"""Generic file readers that keep line numbers and record indices, so every error names where it happened.

Task plugins build their formats on these: text lines, JSON Lines, one JSON document, CoNLL column blocks, and
the CoNLL04 joint entity/relation JSON (validated spans, shared by the NER and relation-extraction plugins).
"""

from __future__ import annotations

import codecs
import contextvars
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import DataError

#: the text encoding of data files when a reader is not given one: ``utf-8`` (a BOM is dropped), or what
#: :func:`text_encoding` set for the file being read (``DataStore`` sets a split's ``encoding:`` this way, so every
#: reader built on this module honours it without a change to the plugin's ``read(path, format)``)
DEFAULT_ENCODING = "utf-8"
_ENCODING: contextvars.ContextVar[str | None] = contextvars.ContextVar("compressor_data_encoding", default=None)


@dataclass(frozen=True)
class Location:
    """Where an example came from: a file and a 1-based line or a 0-based record index."""

    path: str
    line: int | None = None
    record: int | None = None

    def error(self, message: str) -> DataError:
        """A ``DataError`` pointing at this location."""
        return DataError(self.path, message, line=self.line, record=self.record)

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.record is not None:
            return f"{self.path} [record {self.record}]"
        return self.path


def example_location(example: Any) -> str | None:
    """Where an example came from, as errors name it (``file:line`` or ``file [record r]``), from what its reader
    kept: a ``source`` (:class:`Location`), a ``where`` string, or ``path`` and ``line`` attributes (as the
    plugins ``compressor tasks new`` writes keep them); ``None`` when it kept none of these."""
    source = getattr(example, "source", None)
    if source is not None and str(source):
        return str(source)
    where = getattr(example, "where", None)
    if isinstance(where, str) and where:
        return where
    path, line = getattr(example, "path", None), getattr(example, "line", None)
    if isinstance(path, (str, Path)) and str(path):
        return f"{path}:{line}" if isinstance(line, int) and not isinstance(line, bool) else str(path)
    return None


@contextmanager
def text_encoding(encoding: str | None) -> Iterator[None]:
    """Read data files in ``encoding`` inside this block (``None``: UTF-8); readers given an explicit
    ``encoding`` argument use that instead."""
    token = _ENCODING.set(encoding)
    try:
        yield
    finally:
        _ENCODING.reset(token)


def current_encoding() -> str:
    """The encoding a reader uses when it is given none: the one :func:`text_encoding` set, else UTF-8."""
    return _ENCODING.get() or DEFAULT_ENCODING


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; ``ValueError`` for an encoding Python does not know."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown text encoding '{encoding}' (e.g. utf-8, latin-1, cp1252, utf-16)") from None


def decode_error(path: Path, raw: bytes, exc: UnicodeDecodeError, encoding: str) -> DataError:
    """A ``DataError`` naming the file, the line and the byte offset where ``raw`` stops being ``encoding``
    text, and suggesting the split's ``encoding:`` option."""
    line = raw[: exc.start].count(b"\n") + 1
    name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    bad = raw[exc.start : exc.start + 4].hex(" ")
    return DataError(path, f"not valid {name} (byte {exc.start}: {bad}); if the file is in another encoding, say so "
                           f"with 'encoding:' on the split, e.g. {{path: {Path(path).name}, encoding: latin-1}}",
                     line=line)


#: leading bytes of binary table files that a text reader must not try to decode
BINARY_MAGIC = {b"PAR1": ("a parquet file", "parquet"), b"ARROW1": ("an Arrow file", "arrow")}


def check_not_binary(path: Path, raw: bytes) -> None:
    """A ``DataError`` for a parquet or Arrow file handed to a text reader (instead of an "invalid UTF-8" that
    misleads): it names the format to give instead."""
    for magic, (what, fmt) in BINARY_MAGIC.items():
        if raw.startswith(magic):
            hint = ("give its save_to_disk directory with format: arrow" if fmt == "arrow" else
                    f"set format: {fmt} on the split or the task (or name the file .{fmt})")
            raise DataError(path, f"is {what}, but it was given to a text reader; {hint}")


def decode_bytes(path: Path, raw: bytes, encoding: str | None = None) -> str:
    """``raw`` decoded as ``encoding`` (default: :func:`current_encoding`); a UTF-8 BOM is dropped; a parquet or
    Arrow file is a ``DataError`` saying which format to give."""
    check_not_binary(path, raw)
    encoding = encoding or current_encoding()
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise decode_error(path, raw, exc, encoding) from None


def read_text(path: Path, encoding: str | None = None) -> str:
    """The whole file as text in ``encoding`` (default: :func:`current_encoding`, UTF-8 unless a split says
    otherwise); a missing or undecodable file is a ``DataError`` naming the byte offset."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, not a text file (a datasets save_to_disk directory is read with "
                              "format: arrow)") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from exc
    return decode_bytes(path, raw, encoding)


def split_lines(text: str) -> list[str]:
    r"""``text`` cut at ``\n`` only (a ``\r`` before it is dropped), never at the other characters
    ``str.splitlines`` breaks at (U+2028, U+2029, U+0085, form feed, ``\x1c``-``\x1e``, a lone ``\r``): those
    stay inside their line. A final newline does not start an empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def iter_lines(path: Path, encoding: str | None = None) -> Iterator[tuple[int, str]]:
    r"""``(line number, line without its newline)`` for every line, numbered from 1 (lines end at ``\n`` or
    ``\r\n`` only, see :func:`split_lines`)."""
    for n, line in enumerate(split_lines(read_text(path, encoding)), start=1):
        yield n, line


def split_columns(line: str) -> list[str]:
    """The space- or tab-separated columns of a line (other Unicode white space, e.g. U+00A0 or U+2028, stays
    inside its column)."""
    return [c for c in re.split(r"[ \t]+", line) if c]


def read_jsonl(path: Path, encoding: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; each line must hold one JSON object."""
    out = []
    for n, line in iter_lines(path, encoding):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=n) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line=n)
        out.append((n, obj))
    return out


def read_json(path: Path, encoding: str | None = None) -> Any:
    """One JSON document."""
    try:
        return json.loads(read_text(path, encoding))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None


@dataclass
class ConllRow:
    line: int
    columns: list[str]


def read_conll_blocks(path: Path, docstart: str = "-DOCSTART-", encoding: str | None = None) -> list[list[ConllRow]]:
    """Sentences of a CoNLL column file: whitespace-separated columns, blank lines between sentences.

    Lines whose first column is ``docstart`` are skipped (they also end a sentence).
    """
    blocks: list[list[ConllRow]] = []
    current: list[ConllRow] = []
    for n, line in iter_lines(path, encoding):
        columns = split_columns(line)
        if not columns or columns[0] == docstart:
            if current:
                blocks.append(current)
                current = []
            continue
        current.append(ConllRow(n, columns))
    if current:
        blocks.append(current)
    return blocks


def read_conll04(path: Path, encoding: str | None = None) -> list[dict[str, Any]]:
    """Records of a CoNLL04-style JSON array, validated.

    Each element must be ``{"tokens": [str], "entities": [[start, end, type]], "relations": [[h_start, h_end,
    t_start, t_end, type]]}`` with token offsets, ``end`` exclusive; ``relations`` may be absent. Entities must
    lie inside the sentence and not overlap; relation arguments must be entities of the sentence.

    Returns:
        one dict per record: ``{"index": i, "tokens": [...], "entities": [(s, e, type)], "relations":
        [(hs, he, ts, te, type)]}`` with entities sorted by start.

    Raises:
        DataError: naming the file and the record index of the first malformed record.
    """
    data = read_json(path, encoding)
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON array of records, got {type(data).__name__}")
    return [_conll04_record(path, i, rec) for i, rec in enumerate(data)]


def _conll04_record(path: Path, index: int, rec: Any) -> dict[str, Any]:
    def fail(message: str) -> DataError:
        return DataError(path, message, record=index)

    if not isinstance(rec, dict):
        raise fail(f"expected an object, got {type(rec).__name__}")
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise fail("field 'tokens' must be a list of strings")
    if not tokens:
        raise fail("field 'tokens' is empty")
    try:
        entities = check_entities(rec.get("entities", []), len(tokens))
    except ValueError as exc:
        raise fail(str(exc)) from None
    spans = {(s, e) for s, e, _ in entities}
    raw_relations = rec.get("relations", [])
    if not isinstance(raw_relations, list):
        raise fail("field 'relations' must be a list")
    relations: list[tuple[int, int, int, int, str]] = []
    for j, rel in enumerate(raw_relations):
        if not (isinstance(rel, list) and len(rel) == 5 and all(_is_int(x) for x in rel[:4])
                and isinstance(rel[4], str) and rel[4]):
            raise fail(f"relations[{j}] must be [head_start, head_end, tail_start, tail_end, type], got {rel!r}")
        for arg, (s, e) in (("head", rel[0:2]), ("tail", rel[2:4])):
            if (s, e) not in spans:
                raise fail(f"relations[{j}] {rel!r}: {arg} span [{s}, {e}) is not an entity of the sentence")
        relations.append(tuple(rel))  # type: ignore[arg-type]
    return {"index": index, "tokens": list(tokens), "entities": entities, "relations": relations}


def check_entities(raw: Any, num_tokens: int) -> list[tuple[int, int, str]]:
    """Validate ``[[start, end_exclusive, type], ...]`` over ``num_tokens`` tokens; sorted tuples out.

    Raises:
        ValueError: a malformed, out-of-range or overlapping span (the caller adds file and line/record).
    """
    if not isinstance(raw, list):
        raise ValueError("field 'entities' must be a list")
    entities: list[tuple[int, int, str]] = []
    for j, ent in enumerate(raw):
        if not (isinstance(ent, (list, tuple)) and len(ent) == 3 and _is_int(ent[0]) and _is_int(ent[1])
                and isinstance(ent[2], str) and ent[2]):
            raise ValueError(f"entities[{j}] must be [start, end, type], got {ent!r}")
        start, end, typ = ent
        if not 0 <= start < end <= num_tokens:
            raise ValueError(
                f"entities[{j}] {list(ent)!r} is outside the sentence of {num_tokens} tokens (end is exclusive)"
            )
        entities.append((start, end, typ))
    entities.sort()
    for a, b in zip(entities, entities[1:]):
        if b[0] < a[1]:
            raise ValueError(f"entities {list(a)} and {list(b)} overlap")
    return entities


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
