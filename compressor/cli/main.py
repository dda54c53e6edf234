"""The ``compressor`` command line. A thin layer: every command calls the library.

Heavy imports (torch, transformers, onnx) happen inside the commands, so ``compressor --help`` stays fast.
User errors (``CompressorError``) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

app = typer.Typer(help="Make multi-task NLP transformers small and fast.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
tasks_app = typer.Typer(help="Task plugins.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Data root (default: recipe, "
                                                  "$COMPRESSOR_DATA_ROOT, then ../shared/data).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


_DEBUG = {"on": False}  # set by --debug for this invocation


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of every error "
                                                 "(or set COMPRESSOR_DEBUG=1).")] = False) -> None:
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
            typer.echo(f"error: {message}", err=True)
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
) -> None:
    """Check recipes without running them: YAML and fields, every task built through its plugin (options
    against the plugin's schema), the stage chain (each stage's input made by an earlier stage, every `source`
    an earlier stage), and every data file (exists, its first lines parse; skipped without a data root)."""
    from compressor.checks import check_recipe, default_data_root
    from compressor.recipe import load_recipe

    if data:
        from compressor.cli.validate_data import validate_recipes_data

        raise typer.Exit(validate_recipes_data(recipes, data_root))
    for path in recipes:
        recipe = load_recipe(path)
        root = default_data_root(recipe, data_root)
        summary = check_recipe(recipe, path, root)
        for note in summary["notes"]:
            typer.echo(f"{path}: {note}", err=True)
        data = f", {summary['data_files']} data file(s) read" if root is not None else ", no data root: data not checked"
        typer.echo(f"{path}: ok ({summary['tasks']} task(s), stages: {', '.join(summary['stages'])}{data})")


@app.command()
@guarded
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run: skip completed stages, "
                                                          "resume the running one from its last checkpoint.")] = False,
    data_root: DataRoot = None,
) -> None:
    """Run a recipe's stages in order and write report.json / report.md into the run directory."""
    from compressor.pipeline import run_recipe

    run_dir = run_recipe(recipe, out=out, resume=resume, data_root=data_root)
    typer.echo(f"report: {run_dir / 'report.md'} (and report.json)")


@app.command()
@guarded
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by a stage.")],
    task: Annotated[str, typer.Option("--task", help="Task name in the model.")],
    data: Annotated[Path, typer.Option("--data", help="Data file of that task.")],
    format: Annotated[Optional[str], typer.Option("--format", help="Reader format (default: from the extension).")] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of the file (default utf-8).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    json_out: JsonOut = False,
) -> None:
    """Score a saved model on one task's data file."""
    from compressor.errors import DataError, RecipeError
    from compressor.model.io import load_model
    from compressor.model.forward import torch_forward

    model, tokenizer, manifest = load_model(model_dir)
    if task not in model.tasks:
        import difflib

        close = difflib.get_close_matches(task, list(model.tasks), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; it has: {', '.join(model.tasks)}"
        raise RecipeError(f"{model_dir}: no task '{task}'{hint}")
    if not data.is_file():
        raise DataError(data, "data file not found")
    plugin = model.tasks[task]
    from compressor.data.readers import check_encoding
    from compressor.data.store import read_split

    if encoding is not None:
        try:
            check_encoding(encoding)
        except ValueError as exc:
            raise RecipeError(f"--encoding: {exc}") from None
    examples = read_split(plugin, data, format, encoding)
    if not examples:
        raise DataError(data, "no examples")
    encoded = plugin.encode(examples, tokenizer, manifest["max_length"], False)
    metrics, _ = plugin.evaluate(torch_forward(model), encoded, examples, batch_size)
    result = {"task": task, "data": str(data), "examples": len(examples), "truncated": encoded.truncated,
              "metric": plugin.metric.name, "metrics": metrics}
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"{task} on {data}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                   + f" ({len(examples)} examples, {encoded.truncated} truncated)")


@app.command()
@guarded
def publish(
    runs: Annotated[list[Path], typer.Argument(help="Finished run directories (one section each).")],
    to: Annotated[Path, typer.Option("--to", help="Report path without extension, e.g. reports/teacher.")],
    title: Annotated[str, typer.Option("--title")] = "",
    stage: Annotated[Optional[list[str]], typer.Option("--stage", help="Keep only these stages' rows.")] = None,
    note: Annotated[Optional[list[str]], typer.Option("--note", help="A line of context at the top.")] = None,
) -> None:
    """Write finished runs' reports as one benchmark report (Markdown + JSON) with per-task comparisons."""
    from compressor.report.publish import publish_runs

    md, js = publish_runs(runs, to, title, stage, note)
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


def main() -> None:  # pragma: no cover - console script entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
