"""``compressor tasks list | check | new``: the task plugins installed, the contract kit, a new plugin package.

Registered by ``compressor.cli.main`` under its error boundary; heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def tasks_list(json_out: JsonOut = False) -> None:
    """Registered task plugins with their source distribution, label count and metric; a plugin whose entry
    point cannot be loaded is listed as broken (with why) and the others still are."""
    from compressor.tasks import TASKS

    rows: list[dict[str, Any]] = []
    for name in TASKS.names():
        try:
            cls = TASKS.get(name)
        except Exception as exc:  # noqa: BLE001 - an import error inside a plugin is that plugin's problem
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            rows.append({"name": name, "source": TASKS.source(name), "status": "broken", "error": first})
            continue
        rows.append({
            "name": name, "source": TASKS.source(name), "status": "ok",
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "labels": len(cls.default_labels) if cls.default_labels else None,
            "metric": cls.metric.name, "higher_is_better": cls.metric.higher_is_better,
            "description": cls.description,
        })
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "source", "labels", "metric", "description")
    for r in rows:
        if r["status"] == "broken":
            table.add_row(r["name"], r["source"], "-", "-", f"BROKEN: {r['error']}")
            continue
        table.add_row(r["name"], r["source"], str(r["labels"]) if r["labels"] is not None else "from data",
                      r["metric"] + (" (higher is better)" if r["higher_is_better"] else " (lower is better)"),
                      r["description"])
    Console(width=200).print(table)


def _options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    import yaml

    from compressor.errors import RecipeError

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"{what} {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def tasks_check(
    name: Annotated[str, typer.Argument(help="Registered plugin name.")],
    data: Annotated[Path, typer.Option("--data", help="A small data file the plugin reads (absolute or relative).")],
    format: Annotated[Optional[str], typer.Option("--format", help="Reader format (default: the plugin's).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Plugin option KEY=VALUE "
                                                        "(YAML value; repeatable).")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Comma-separated label schema (default: "
                                                  "fit_labels on the data).")] = None,
    sibling: Annotated[Optional[list[str]], typer.Option("--sibling", help="A task the plugin needs beside it, "
                                                         "NAME=PLUGIN, read from the same file (repeatable).")] = None,
    max_length: Annotated[int, typer.Option("--max-length", min=8)] = 64,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of the data file "
                                                    "(default utf-8), e.g. latin-1, cp1252.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Run a plugin through the whole contract (compressor.testing.check_plugin) on a data file."""
    from compressor.cli.options import encoding_option
    from compressor.errors import DataError
    from compressor.testing import check_plugin

    encoding = encoding_option(encoding)
    if not data.exists():  # a file, or a datasets save_to_disk directory
        raise DataError(data, "data file not found")
    siblings = {k: {"plugin": v, "path": data} for k, v in _options(sibling, "--sibling").items()}
    report = check_plugin(name, data, format=format, options=_options(option, "--option"),
                          labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None,
                          siblings=siblings, max_length=max_length, encoding=encoding)
    if json_out:
        typer.echo(json.dumps({"plugin": report.plugin, "ok": True, "checked": report.checked,
                               "examples": report.examples, "features": report.features, "labels": report.labels,
                               "metrics": report.metrics, "notes": report.notes}, indent=2))
    else:
        typer.echo(report.summary())


def tasks_new(
    name: Annotated[str, typer.Argument(help="Task plugin name (registered under it), e.g. pos.")],
    kind: Annotated[str, typer.Option("--kind", help="token | sequence | span-pair | span")] = "token",
    out: Annotated[Optional[Path], typer.Option("--out", help="Directory to create (default ./compressor-NAME).")] = None,
) -> None:
    """Write a plugin package: pyproject with entry points, plugin class, head, decoder, fixture and a test."""
    from compressor.scaffold import scaffold

    target = scaffold(name, kind, out)
    typer.echo(f"wrote {target}: pip install -e {target} && pytest {target}")
