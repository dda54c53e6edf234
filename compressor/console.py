"""What the user sees while commands run: progress lines (stdout) and progress bars (rich, on stderr).

Bars show on a terminal; ``COMPRESSOR_PROGRESS=1`` forces them (e.g. into a log file), ``COMPRESSOR_PROGRESS=0``
turns them off. Bars opened while another is showing join the same display (one line each), so a stage's bar
can hold a step's bar (the benchmark's models, each quantize mode's attempts).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

#: environment variable: 1 forces progress bars, 0 turns them off (default: on a terminal only)
PROGRESS_ENV = "COMPRESSOR_PROGRESS"

_LIVE: list[Any] = []  # the rich Progress being shown, if any


def say(message: str) -> None:
    """Print a progress line, flushed so it shows up in logs that are files."""
    print(message, flush=True)


def _bars_wanted(console: Any) -> bool:
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return bool(console.is_terminal)


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr for a step that takes a while; yields ``advance(n=1, note=None)``.

    ``total`` None shows a counter without a percentage (e.g. a search bounded by time). Nothing is drawn when
    bars are off, and ``advance`` is then a no-op, so callers need no branches.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    owner = not _LIVE
    if owner:
        console = Console(stderr=True)
        if not _bars_wanted(console):
            yield lambda n=1, note=None: None
            return
        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=console, redirect_stdout=False, redirect_stderr=False)
        bar.start()
        _LIVE.append(bar)
    bar = _LIVE[0]
    task = bar.add_task(description, total=total)

    def advance(n: int = 1, note: str | None = None) -> None:
        bar.update(task, advance=n, description=f"{description}: {note}" if note else description)

    try:
        yield advance
    finally:
        if owner:
            bar.stop()
            _LIVE.clear()
        else:
            bar.remove_task(task)
