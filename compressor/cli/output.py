"""How commands print: ``--json`` puts one JSON document on stdout and everything else (progress, stage lines,
bars) on stderr, so ``compressor run r.yaml --json | jq`` reads a clean document."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """While active, what the library prints on stdout goes to stderr (the JSON result keeps stdout)."""
    if not active:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit_json(result: Any) -> None:
    """The command's machine-readable result on stdout (strict JSON: NaN becomes null)."""
    from compressor.fsutil import dumps_strict

    typer.echo(dumps_strict(result) if not isinstance(result, str) else json.dumps(result))


def run_result(run_dir: Path) -> dict[str, Any]:
    """The ``--json`` result of a finished run (``run``, ``compress``): where it is and its report."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    return {"run_dir": str(run_dir), "report_json": str(run_dir / "report.json"),
            "report_md": str(run_dir / "report.md"), "report": report}
