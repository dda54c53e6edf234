"""``compressor evaluate PATH --task T --data FILE``: score a model directory (PyTorch) or an edge bundle (ONNX
Runtime, the graph that ships) on one task's data file, with the task plugin's own metric.

A bundle is scored the way the run report scores the graph it came from (the same plugin encoding, decoding and
score, the same ONNX Runtime session settings), so the numbers equal the report's row of that graph on the same
file. Only typer is imported at module level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def evaluate(
    path: Annotated[Path, typer.Argument(help="A model directory written by a stage, or an edge bundle "
                                              "(model.onnx, tokenizer.json, tasks.json).")],
    task: Annotated[str, typer.Option("--task", help="Task name in the model.")],
    data: Annotated[Path, typer.Option("--data", help="Data file of that task.")],
    format: Annotated[Optional[str], typer.Option("--format", help="Reader format (default: from the extension).")] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Text encoding of the file (default utf-8).")] = None,
    column: Annotated[Optional[list[str]], typer.Option("--column", help="A table's column map FIELD=COLUMN, as "
                                                        "'columns:' in a recipe (repeatable; model directories).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Evaluation batch size (the stages' "
                                            "eval_batch_size, 64 by default: dynamic INT8 scales per batch).")] = 64,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads "
                                                   "(bundles only).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a line.")] = False,
) -> None:
    """Score a saved model or an edge bundle on one task's data file."""
    from compressor.cli.options import column_options, encoding_option

    encoding = encoding_option(encoding)
    if (path / "tasks.json").is_file() or (path / "model.onnx").is_file():
        from compressor.export.evaluate import evaluate_bundle

        result = {"path": str(path), "kind": "bundle",
                  **evaluate_bundle(path, task, data, format, encoding, batch_size, threads)}
    else:
        result = {"path": str(path), "kind": "model",
                  **_evaluate_model(path, task, data, format, encoding, batch_size, column_options(column))}
    result["data"] = str(data)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    runtime = f"ONNX Runtime, {result['format']}" if result["kind"] == "bundle" else "PyTorch"
    typer.echo(f"{task} on {data} ({runtime}): " + ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
               + f" ({result['examples']} examples, {result['truncated']} truncated)")


def _evaluate_model(model_dir: Path, task: str, data: Path, fmt: str | None, encoding: str | None,
                    batch_size: int, columns=None) -> dict:
    import difflib

    from compressor.data.store import read_split
    from compressor.errors import DataError, RecipeError
    from compressor.model.forward import torch_forward
    from compressor.model.io import load_model

    model, tokenizer, manifest = load_model(model_dir)
    if task not in model.tasks:
        close = difflib.get_close_matches(task, list(model.tasks), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; it has: {', '.join(model.tasks)}"
        raise RecipeError(f"{model_dir}: no task '{task}'{hint}")
    if not data.exists():  # a file, or a datasets save_to_disk directory
        raise DataError(data, "data file not found")
    plugin = model.tasks[task]
    examples = read_split(plugin, data, fmt, encoding, columns)
    if not examples:
        raise DataError(data, "no examples")
    encoded = plugin.encode(examples, tokenizer, manifest["max_length"], False)
    metrics, _ = plugin.evaluate(torch_forward(model), encoded, examples, batch_size)
    return {"task": task, "examples": len(examples), "truncated": encoded.truncated, "metric": plugin.metric.name,
            "value": float(metrics[plugin.metric.name]), "metrics": {k: float(v) for k, v in metrics.items()},
            "runtime": "pytorch", "format": "pytorch", "batch_size": batch_size}
