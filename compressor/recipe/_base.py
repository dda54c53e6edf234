"""What every recipe model shares: ``extra="forbid"``, the name pattern, the text-encoding check."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def known_codec(v: str | None) -> str | None:
    if v is not None:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding '{v}' (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return v
