"""Readers of classification files into :class:`TextExample`: ``label text`` lines, TSV and JSON Lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.data.readers import Location, iter_lines, read_jsonl
from compressor.errors import DataError

FORMATS = ("label_text", "tsv", "jsonl")


@dataclass
class TextExample:
    """One text (or text pair) with its gold label."""

    text: str
    label: str
    source: Location
    text_pair: str | None = None


def detect_format(path: Path) -> str:
    """``.jsonl`` -> jsonl, ``.tsv`` -> tsv, anything else -> label_text."""
    return {".jsonl": "jsonl", ".tsv": "tsv"}.get(Path(path).suffix.lower(), "label_text")


def read_classification(path: Path, format: str | None = None, encoding: str | None = None) -> list[TextExample]:
    """Read a classification file in ``format`` (``None``: from the extension, see :func:`detect_format`).

    ``encoding``: the file's text encoding (``None``: the split's, set by ``DataStore``; UTF-8 by default)."""
    fmt = format or detect_format(path)
    if fmt == "label_text":
        return read_label_text(path, encoding)
    if fmt == "tsv":
        return read_tsv(path, encoding)
    if fmt == "jsonl":
        return read_text_jsonl(path, encoding)
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
    examples = []
    for n, obj in read_jsonl(path, encoding):
        loc = Location(str(path), line=n)
        text, pair, label = obj.get("text"), obj.get("text_pair"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            raise loc.error("field 'text' must be a non-empty string")
        if pair is not None and (not isinstance(pair, str) or not pair.strip()):
            raise loc.error("field 'text_pair' must be a non-empty string when given")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise loc.error(f"field 'label' must be a string or an integer, got {label!r}")
        examples.append(TextExample(text, str(label), loc, pair))
    return examples


def _clip(line: str, n: int = 60) -> str:
    return line if len(line) <= n else line[:n] + "..."
