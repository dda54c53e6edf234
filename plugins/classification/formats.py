"""Readers of classification files into :class:`TextExample`: ``label text`` lines, TSV, and records (JSON lines,
CSV, parquet, ``datasets`` ``save_to_disk`` directories; see :mod:`compressor.data.tables`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.data.readers import Location, iter_lines
from compressor.data.tables import RECORD_FORMATS, read_records, table_format
from compressor.errors import DataError

FORMATS = ("label_text", "tsv", *RECORD_FORMATS)


@dataclass
class TextExample:
    """One text (or text pair) with its gold label."""

    text: str
    label: str
    source: Location
    text_pair: str | None = None


def detect_format(path: Path) -> str:
    """A table (a directory, ``.jsonl``, ``.csv``, ``.parquet``) -> its format, ``.tsv`` -> tsv, anything else ->
    label_text."""
    return table_format(path) or {".tsv": "tsv"}.get(Path(path).suffix.lower(), "label_text")


def read_classification(path: Path, format: str | None = None, encoding: str | None = None) -> list[TextExample]:
    """Read a classification file in ``format`` (``None``: from the extension, see :func:`detect_format`).

    ``encoding``: the file's text encoding (``None``: the split's, set by ``DataStore``; UTF-8 by default)."""
    fmt = format or detect_format(path)
    if fmt == "label_text":
        return read_label_text(path, encoding)
    if fmt == "tsv":
        return read_tsv(path, encoding)
    if fmt in RECORD_FORMATS:
        return read_text_records(path, fmt, encoding)
    raise DataError(path, f"unknown classification format '{fmt}'; expected one of {', '.join(FORMATS)}")


def read_label_text(path: Path, encoding: str | None = None) -> list[TextExample]:
    """``<label> <text>`` per line (the SST-2 ``stsa.binary.*`` files); blank lines are skipped."""
    examples = []
    for n, line in iter_lines(path, encoding):
        if not line.strip():
            continue
        label, sep, text = line.partition(" ")
        if not sep or not label or not text.strip():
            raise DataError(path, f"expected '<label> <text>', got {_clip(line)!r}", line=n)
        examples.append(TextExample(text.strip(), label, Location(str(path), line=n)))
    return examples


def read_tsv(path: Path, encoding: str | None = None) -> list[TextExample]:
    """``label<TAB>text[<TAB>text_pair]`` per line; blank lines are skipped."""
    examples = []
    for n, line in iter_lines(path, encoding):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (2, 3) or not cols[0].strip() or not cols[1].strip():
            raise DataError(path, f"expected 'label<TAB>text[<TAB>text_pair]', got {len(cols)} column(s): "
                                  f"{_clip(line)!r}", line=n)
        pair = cols[2].strip() if len(cols) == 3 else None
        if pair == "":
            raise DataError(path, "empty text_pair column", line=n)
        examples.append(TextExample(cols[1].strip(), cols[0].strip(), Location(str(path), line=n), pair))
    return examples


def read_text_jsonl(path: Path, encoding: str | None = None) -> list[TextExample]:
    """``{"text": str, "text_pair"?: str, "label": str | int}`` per line."""
    return read_text_records(path, "jsonl", encoding)


def read_text_records(path: Path, fmt: str, encoding: str | None = None) -> list[TextExample]:
    """One example per record with fields ``text``, ``label`` (a name, or an integer id: named by a ClassLabel
    feature or the recipe's ``label_names``, else kept as its digits) and optionally ``text_pair``; the recipe's
    ``columns`` map them onto the file's columns (GLUE's SST-2: ``{text: sentence}``)."""
    return [text_record(loc, obj) for loc, obj in read_records(path, fmt, encoding)]


def text_record(loc: Location, obj: dict) -> TextExample:
    """The example of one record (see :func:`read_text_records`)."""
    text, pair, label = obj.get("text"), obj.get("text_pair"), obj.get("label")
    if not isinstance(text, str) or not text.strip():
        has = ", ".join(list(obj)[:12]) or "nothing"
        missing = "" if "text" in obj else f" (the record has: {has}; map one with columns: {{text: <column>}})"
        raise loc.error(f"field 'text' must be a non-empty string{missing}")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise loc.error("field 'text_pair' must be a non-empty string when given")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise loc.error(f"field 'label' must be a string or an integer, got {label!r}")
    return TextExample(text, str(label), loc, pair)


def _clip(line: str, n: int = 60) -> str:
    return line if len(line) <= n else line[:n] + "..."
