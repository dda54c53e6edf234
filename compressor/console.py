"""Progress lines for the user."""

from __future__ import annotations


def say(message: str) -> None:
    """Print a progress line, flushed so it shows up in logs that are files."""
    print(message, flush=True)
