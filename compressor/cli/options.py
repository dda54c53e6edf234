"""Options several commands share, checked the same way: a text encoding and a table's column map."""

from __future__ import annotations

from typing import Any


def encoding_option(encoding: str | None) -> str | None:
    """``--encoding``: a codec Python knows (None: UTF-8); a ``RecipeError`` naming the option otherwise."""
    if encoding is None:
        return None
    from compressor.data.readers import check_encoding
    from compressor.errors import RecipeError

    try:
        check_encoding(encoding)
    except ValueError as exc:
        raise RecipeError(f"--encoding: {exc}") from None
    return encoding


def column_options(pairs: list[str] | None) -> Any:
    """``--column FIELD=COLUMN`` options as a column map (None without any)."""
    from compressor.data.tables import ColumnMap
    from compressor.errors import RecipeError

    columns = {}
    for pair in pairs or []:
        field, sep, col = pair.partition("=")
        if not sep or not field.strip() or not col.strip():
            raise RecipeError(f"--column {pair!r}: expected FIELD=COLUMN, e.g. text=sentence")
        columns[field.strip()] = col.strip()
    return ColumnMap(columns) if columns else None
