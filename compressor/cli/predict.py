"""``compressor predict BUNDLE "text" --task T``: torch-free inference over an edge bundle.

Imports only typer and, inside the command, ``compressor.runtime`` (onnxruntime, tokenizers, numpy): no torch,
directly or indirectly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (model.onnx, tokenizer.json, tasks.json).")],
    text: Annotated[Optional[list[str]], typer.Argument(help="Text(s) to predict; for QA, the context(s).")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="Task to run (repeatable; default: "
                                                      "every task of the bundle).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read texts from a UTF-8 file, one per "
                                                 "line (lines end at \\n or \\r\\n only; blank lines are skipped).")] = None,
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="Question for QA tasks.")] = None,
    pair: Annotated[Optional[str], typer.Option("--pair", help="Second text for text-pair classification.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads.")] = None,
) -> None:
    """Predict with an exported bundle (torch-free): entities, relations, labels, answers."""
    from compressor.data.readers import split_lines
    from compressor.errors import DataError
    from compressor.runtime import Bundle, BundleError

    texts = list(text or [])
    if file is not None:
        if not file.is_file():
            raise DataError(file, "input file not found")
        try:
            content = file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(file, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        # one text per line, cut at \n / \r\n only: U+2028, form feed... stay inside their text
        texts += [line for line in split_lines(content) if line.strip()]
        if not texts:
            raise DataError(file, "no text in the file (every line is blank)")
    if not texts:
        raise BundleError("no text given: pass TEXT arguments or --file")
    model = Bundle.load(bundle, threads=threads)
    results = model.predict(texts, tasks=task or None, questions=question, text_pairs=pair)
    if json_out:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for r in results:
        typer.echo(r["text"] + ("  [truncated]" if r["truncated"] else ""))
        for name, pred in r["predictions"].items():
            typer.echo(f"  {name}: {model.decoder(name).describe(pred)}")  # each plugin's decoder words its output
