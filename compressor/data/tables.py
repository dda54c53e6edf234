"""Records of tabular data files, the ones Hugging Face ``datasets`` writes: JSON lines (``to_json``), CSV
(``to_csv``), parquet (``to_parquet``) and ``save_to_disk`` directories, renamed by a column map and with integer
class ids turned into label names.

A record is one row as a dict, paired with its :class:`~compressor.data.readers.Location` (the line of a JSON-lines
file, the row index of a table). Task plugins build their examples from records (the NER plugin from ``tokens`` and
``tags``, classification from ``text`` and ``label``...), so every plugin that reads through :func:`read_records`
reads every one of these formats with no code of its own.

What the recipe says reaches the reader the way a split's encoding does: ``DataStore`` sets the task's (or the
split's) ``columns`` and ``label_names`` with :func:`column_map` while the plugin's ``read`` runs:

* ``columns: {field: column}``: the plugin's field ``field`` is read from the file's column ``column`` (columns
  not named keep their own names);
* ``label_names: {field: [name, ...]}``: integer ids in ``field`` (or in a list of ids, e.g. NER tags) are the
  index of their name; a ``ClassLabel`` feature of a parquet file or a ``save_to_disk`` directory gives the names
  itself.
"""

from __future__ import annotations

import ast
import contextvars
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.data.readers import Location, current_encoding, read_jsonl
from compressor.errors import DataError

#: formats read with ``datasets`` / pyarrow (``arrow``: a ``save_to_disk`` directory)
TABLE_FORMATS = ("csv", "parquet", "arrow")
#: every format :func:`read_records` reads
RECORD_FORMATS = ("jsonl", *TABLE_FORMATS)
_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class ColumnMap:
    """The recipe's ``columns`` (field -> file column) and ``label_names`` (field or column -> names)."""

    columns: Mapping[str, str] = field(default_factory=dict)
    label_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.columns or self.label_names)


@dataclass
class _Reading:
    columns: ColumnMap
    used: bool = False


_COLUMNS: contextvars.ContextVar[_Reading | None] = contextvars.ContextVar("compressor_columns", default=None)


@contextmanager
def column_map(columns: ColumnMap | None) -> Iterator[_Reading]:
    """Read records with ``columns`` inside this block; the yielded object's ``used`` says whether a reader
    applied them (a plugin that reads without :func:`read_records` cannot)."""
    reading = _Reading(columns or ColumnMap())
    token = _COLUMNS.set(reading)
    try:
        yield reading
    finally:
        _COLUMNS.reset(token)


def table_format(path: Path, fmt: str | None = None) -> str | None:
    """The record format of ``path``: ``fmt`` when it is one, else by the path (a directory -> ``arrow``,
    ``.parquet``, ``.csv``, ``.jsonl``); ``None`` when the file is something else (a plugin's own format)."""
    if fmt is not None:
        return fmt if fmt in RECORD_FORMATS else None
    path = Path(path)
    if path.is_dir():
        return "arrow"
    return _SUFFIXES.get(path.suffix.lower())


def read_records(path: Path, fmt: str, encoding: str | None = None) -> list[tuple[Location, dict[str, Any]]]:
    """Every record of a JSON-lines, CSV, parquet or ``save_to_disk`` file, renamed by the current column map
    and with class ids turned into label names.

    Raises:
        DataError: naming the file (and the line or row) for an unreadable file, a column map naming a column
            the file lacks, a ``ClassLabel`` without names, or an id outside its label names.
    """
    path = Path(path)
    reading = _COLUMNS.get()
    cmap = reading.columns if reading is not None else ColumnMap()
    if reading is not None:
        reading.used = True
    if fmt == "jsonl":
        return [_record(Location(str(path), line=n), obj, cmap, {}) for n, obj in read_jsonl(path, encoding)]
    if fmt not in TABLE_FORMATS:
        raise DataError(path, f"unknown table format '{fmt}'; expected one of {', '.join(RECORD_FORMATS)}")
    ds = {"parquet": _parquet, "csv": _csv, "arrow": _arrow}[fmt](path, encoding)
    have = list(ds.column_names)
    for fld, col in cmap.columns.items():
        if col not in have:
            raise DataError(path, f"columns.{fld} names column '{col}', which the file lacks (it has: "
                                  f"{_listing(have)})")
    names = _class_names(path, ds.features, cmap)
    rows = ds.to_list()
    if fmt == "csv":
        rows = _list_cells(path, rows, have)
    return [_record(Location(str(path), record=i), row, cmap, names) for i, row in enumerate(rows)]


def _record(loc: Location, row: dict[str, Any], cmap: ColumnMap, features: Mapping[str, tuple[str, ...]]
            ) -> tuple[Location, dict[str, Any]]:
    out = dict(row)
    for fld, col in cmap.columns.items():
        if col not in row:
            raise loc.error(f"columns.{fld} names column '{col}', which this record lacks (it has: "
                            f"{_listing(list(row)) or 'nothing'})")
        out[fld] = row[col]
    for key in list(out):
        col = cmap.columns.get(key, key)
        names = cmap.label_names.get(key) or cmap.label_names.get(col) or features.get(col)
        if names:
            out[key] = _named(loc, out[key], names, key)
    return loc, out


def _named(loc: Location, value: Any, names: tuple[str, ...], fld: str) -> Any:
    if isinstance(value, list):
        return [_named(loc, v, names, fld) for v in value]
    if isinstance(value, bool) or not isinstance(value, int):
        return value  # already a name
    if value == -1:
        raise loc.error(f"field '{fld}': id -1 marks an unlabelled example (as in a GLUE test split); give a "
                        "labelled split")
    if not 0 <= value < len(names):
        raise loc.error(f"field '{fld}': id {value} is outside its {len(names)} label names {list(names)}")
    return names[value]


def _class_names(path: Path, features: Any, cmap: ColumnMap) -> dict[str, tuple[str, ...]]:
    """Column -> label names of every ``ClassLabel`` column (or list of them); a ``ClassLabel`` whose names are
    only its ids is an error unless the recipe names them."""
    from datasets import ClassLabel

    out: dict[str, tuple[str, ...]] = {}
    for col, feat in (features or {}).items():
        inner = feat[0] if isinstance(feat, list) and feat else getattr(feat, "feature", feat)
        if not isinstance(inner, ClassLabel):
            continue
        names = tuple(inner.names or ())
        if not names or names == tuple(str(i) for i in range(len(names))):
            fields = [f for f, c in cmap.columns.items() if c == col] + [col]
            if not any(f in cmap.label_names for f in fields):
                raise DataError(path, f"column '{col}' is a ClassLabel without names ({inner.num_classes} "
                                      f"class(es) known only by their ids); give them in the recipe: "
                                      f"label_names: {{{fields[0]}: [name0, name1, ...]}}")
            continue
        out[col] = names
    return out


def _parquet(path: Path, encoding: str | None) -> Any:
    import pyarrow.parquet as pq
    from datasets import Dataset

    _is_file(path, "parquet")
    try:
        return Dataset(pq.read_table(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise DataError(path, f"not a readable parquet file ({_first(exc)})") from None


def _csv(path: Path, encoding: str | None) -> Any:
    import pyarrow.csv as pcsv
    from datasets import Dataset

    _is_file(path, "csv")
    codec = encoding or current_encoding()
    try:
        table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(encoding=codec),
                              parse_options=pcsv.ParseOptions(newlines_in_values=True))
    except Exception as exc:  # noqa: BLE001 - pyarrow.lib.ArrowInvalid and decoding errors
        raise DataError(path, f"not a readable CSV file in {codec} ({_first(exc)})") from None
    twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if twice:
        raise DataError(path, f"the CSV header names column(s) {', '.join(repr(c) for c in twice)} twice")
    return Dataset(table)


def _arrow(path: Path, encoding: str | None) -> Any:
    if not path.is_dir():
        raise DataError(path, "format 'arrow' reads a datasets save_to_disk directory; this is not a directory")
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(path, f"is a DatasetDict ({', '.join(splits)}); give one split's directory, e.g. "
                              f"{path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise DataError(path, "is a directory but not a datasets save_to_disk directory (no state.json)")
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for a damaged directory
        raise DataError(path, f"not a readable save_to_disk directory ({_first(exc)})") from None


def _is_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise DataError(path, f"is a directory, not a {what} file (a save_to_disk directory is format: arrow)")
    if not path.is_file():
        raise DataError(path, "file not found")


def _listing(names: list[str], most: int = 12) -> str:
    shown = ", ".join(str(n)[:40] for n in names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.split("\n", 1)[0][:200] if text else type(exc).__name__)


# ---- CSV cells holding lists ---------------------------------------------------------------------------------
_STR = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_NUMPY_STRS = re.compile(rf"\s*{_STR}(?:\s+{_STR})*\s*", re.S)
_STR_TOKEN = re.compile(_STR, re.S)
_NUMPY_INTS = re.compile(r"\s*-?\d+(?:\s+-?\d+)*\s*")


def parse_list_cell(cell: str) -> list[Any] | None:
    """The list a CSV cell holds, as ``datasets``' ``to_csv`` writes a sequence column (numpy's
    ``['EU' 'rejects']`` / ``[3 0 7]``) or as JSON / Python (``["EU", "rejects"]``); ``None`` when the cell is
    not such a list. A list numpy shortened with ``...`` is a ``ValueError``."""
    s = cell.strip()
    if not (s.startswith("[") and s.endswith("]")):
        return None
    inner = s[1:-1]
    if not inner.strip():
        return []
    if _NUMPY_STRS.fullmatch(inner):
        return [ast.literal_eval(t) for t in _STR_TOKEN.findall(inner)]
    if _NUMPY_INTS.fullmatch(inner):
        return [int(t) for t in inner.split()]
    if re.fullmatch(r"[\s\d\-]*\.\.\.[\s\d\-]*", inner) or "' ... '" in inner:
        raise ValueError("numpy shortened this list with '...'; write the file with to_json or to_parquet")
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(s)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        return value if isinstance(value, list) else None
    return None


def _list_cells(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Rows with every string column whose cells all hold lists read as lists (a column of texts where only
    some cells look like lists is left alone)."""
    for col in columns:
        cells = [row[col] for row in rows if row[col] is not None]
        if not cells or not all(isinstance(c, str) and c.strip().startswith("[") for c in cells):
            continue
        parsed = []
        for i, row in enumerate(rows):
            if row[col] is None:
                parsed.append(None)
                continue
            try:
                value = parse_list_cell(row[col])
            except ValueError as exc:
                raise DataError(path, f"column '{col}': {exc}", record=i) from None
            if value is None:
                break
            parsed.append(value)
        else:
            for row, value in zip(rows, parsed):
                row[col] = value
    return rows
