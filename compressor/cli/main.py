"""The ``compressor`` command line. A thin layer: every command calls the library.

Heavy imports (torch, transformers, onnx) happen inside the commands, so ``compressor --help`` stays fast.
User errors (``CompressorError``) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperGroup


class OneLineErrors(TyperGroup):
    """The command group of the CLI: a usage error (unknown option, missing argument, bad value) is one line
    ``error: ...`` on stderr with exit code 2, like every other user error, not Typer's usage box."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            rv = 1
        except Exception as exc:  # Click's ClickException family (typer ships its own copy of click)
            if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
                raise
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `compressor`: the help
                typer.echo(ctx.get_help())
            else:
                typer.echo(f"error: {one_line(exc.format_message())}", err=True)
            rv = exc.exit_code
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def one_line(message: str) -> str:
    """A message as one printable line (text from argv may hold undecodable bytes as surrogates)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


app = typer.Typer(help="Make multi-task NLP transformers small and fast.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, cls=OneLineErrors)
tasks_app = typer.Typer(help="Task plugins.", no_args_is_help=True, cls=OneLineErrors)
app.add_typer(tasks_app, name="tasks")

DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Data root (default: recipe, "
                                                  "$COMPRESSOR_DATA_ROOT, then ../shared/data).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress and "
                                      "messages go to stderr).")]


_DEBUG = {"on": False}  # set by --debug for this invocation


def _version(value: bool) -> None:
    if value:
        typer.echo(f"compressor {compressor_version()}")
        raise typer.Exit()


def compressor_version() -> str:
    """The installed distribution's version ("unknown" for a checkout that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compressor")
    except PackageNotFoundError:  # pragma: no cover - a checkout on PYTHONPATH without an install
        return "unknown"


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of every error "
                                                 "(or set COMPRESSOR_DEBUG=1).")] = False,
             version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Make multi-task NLP transformers small and fast."""
    _DEBUG["on"] = debug


def _debugging() -> bool:
    from compressor.errors import DEBUG_ENV

    return _DEBUG["on"] or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's one error boundary: an anticipated failure (user input, paths, data, model directories,
    ONNX Runtime argument errors, refused remote code) prints ``error: <one line>`` on stderr and exits with
    code 2; anything else is a bug and shows its traceback. ``--debug`` / ``COMPRESSOR_DEBUG=1`` show the
    traceback of every error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from compressor.errors import anticipated

        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted into anticipated failures and bugs below
            message = anticipated(exc)
            if message is None:
                raise
            if _debugging():
                import traceback

                traceback.print_exc()
            typer.echo(f"error: {one_line(message)}", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None  # SearchFailed: 1

    return wrapper


@app.command()
@guarded
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.")],
    data_root: DataRoot = None,
    data: Annotated[bool, typer.Option("--data", help="Read every split of every task whole: formats, encodings, "
                                       "dev/test labels against the training split's label schema, a dev split "
                                       "for every task; every problem on its own line.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Check recipes without running them: YAML and fields, every task built through its plugin (options
    against the plugin's schema), the stage chain (each stage's input made by an earlier stage, every `source`
    an earlier stage), and every data file (exists, its first lines parse; skipped without a data root)."""
    from compressor.checks import check_recipe, default_data_root
    from compressor.recipe import load_recipe

    if data:
        from compressor.cli.validate_data import validate_recipes_data

        raise typer.Exit(validate_recipes_data(recipes, data_root, json_out))
    results = []
    for path in recipes:
        recipe = load_recipe(path)
        root = default_data_root(recipe, data_root)
        summary = check_recipe(recipe, path, root)
        for note in summary["notes"]:
            typer.echo(f"{path}: {note}", err=True)
        results.append({"recipe": str(path), "ok": True, "tasks": summary["tasks"], "stages": summary["stages"],
                        "data_files": summary["data_files"],
                        "notes": list(summary["notes"])})
        if not json_out:
            data = f", {summary['data_files']} data file(s) read" + (
                "" if root is not None else " (no data root: relative data paths not checked)")
            typer.echo(f"{path}: ok ({summary['tasks']} task(s), stages: {', '.join(summary['stages'])}{data})")
    if json_out:
        from compressor.cli.output import emit_json

        emit_json(results)


@app.command()
@guarded
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run: skip completed stages, "
                                                          "resume the running one from its last checkpoint.")] = False,
    data_root: DataRoot = None,
    rerun_changed: Annotated[bool, typer.Option("--rerun-from-changed", help="With --resume: when the recipe changed "
                                                "what a completed stage computed, re-run from that stage instead of "
                                                "refusing.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Run a recipe's stages in order and write report.json / report.md into the run directory."""
    from compressor.cli.output import emit_json, run_result, stdout_to_stderr
    from compressor.errors import RecipeError
    from compressor.pipeline import run_recipe

    if rerun_changed and not resume:
        raise RecipeError("--rerun-from-changed continues a run: give it with --resume")
    with stdout_to_stderr(json_out):
        run_dir = run_recipe(recipe, out=out, resume=resume, data_root=data_root, rerun_changed=rerun_changed)
    if json_out:
        emit_json(run_result(run_dir))
    else:
        typer.echo(f"report: {run_dir / 'report.md'} (and report.json)")



@app.command()
@guarded
def publish(
    runs: Annotated[list[Path], typer.Argument(help="Finished run directories (one section each).")],
    to: Annotated[Path, typer.Option("--to", help="Report path without extension, e.g. reports/teacher.")],
    title: Annotated[str, typer.Option("--title")] = "",
    stage: Annotated[Optional[list[str]], typer.Option("--stage", help="Keep only these stages' rows.")] = None,
    note: Annotated[Optional[list[str]], typer.Option("--note", help="A line of context at the top.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Write finished runs' reports as one benchmark report (Markdown + JSON) with per-task comparisons."""
    from compressor.report.publish import publish_runs

    md, js = publish_runs(runs, to, title, stage, note)
    if json_out:
        from compressor.cli.output import emit_json

        emit_json({"markdown": str(md), "json": str(js)})
    else:
        typer.echo(f"wrote {md} and {js}")


from compressor.cli.bench import benchmark  # noqa: E402  (typer only at import time)
from compressor.cli.predict import predict  # noqa: E402  (torch-free: the edge runtime)

app.command(name="predict")(guarded(predict))
app.command(name="benchmark")(guarded(benchmark))
from compressor.cli.tasks import tasks_check, tasks_list, tasks_new  # noqa: E402  (typer only at import time)

tasks_app.command("list")(guarded(tasks_list))
tasks_app.command("check")(guarded(tasks_check))
tasks_app.command("new")(guarded(tasks_new))
from compressor.cli.compress import compress  # noqa: E402  (typer only at import time)
app.command(name="compress")(guarded(compress))
from compressor.cli.evaluate import evaluate  # noqa: E402  (typer only at import time)
app.command(name="evaluate")(guarded(evaluate))
from compressor.cli.env import env  # noqa: E402  (typer only at import time)
app.command(name="env")(guarded(env))
from compressor.cli.serve import serve  # noqa: E402  (typer only at import time)
app.command(name="serve")(guarded(serve))
from compressor.cli.export_hf import export_hf  # noqa: E402  (typer only at import time)
app.command(name="export-hf")(guarded(export_hf))


def main() -> None:  # pragma: no cover - console script entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
