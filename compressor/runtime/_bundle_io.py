"""Reading and checking the files of an edge bundle: ``tasks.json``, ``tokenizer.json`` and ``model.onnx``.

Split out of :mod:`compressor.runtime.bundle` (which re-exports the file names); torch-free like the rest of
:mod:`compressor.runtime`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compressor.runtime.decoders import BundleError
from compressor.runtime.spec import GraphSpec

MODEL = "model.onnx"
TOKENIZER = "tokenizer.json"
TASKS = "tasks.json"
FILES = (MODEL, TOKENIZER, TASKS)


def read_spec(path: Path) -> GraphSpec:
    """``tasks.json`` as a :class:`GraphSpec`; unreadable or malformed is a :class:`BundleError` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    try:
        spec = GraphSpec.from_json(data, str(path))
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    return spec


def read_tokenizer(path: Path) -> Any:
    """``tokenizer.json`` as a ``tokenizers.Tokenizer`` without padding or truncation."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise BundleError(f"{path}: not a Hugging Face tokenizers file: {exc}") from exc
    tok.no_padding()
    tok.no_truncation()
    return tok


def open_session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime session of ``model.onnx``; unloadable is a :class:`BundleError` naming it."""
    from compressor.runtime.session import make_session

    try:
        return make_session(path, threads)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: not a loadable ONNX model: {first}") from exc


def check_graph(directory: Path, spec: GraphSpec, session: Any) -> None:
    """The outputs ``tasks.json`` names are outputs of the graph, and its inputs are the graph's inputs."""
    outputs = {o.name for o in session.get_outputs()}
    inputs = {i.name for i in session.get_inputs()}
    missing = [n for n in spec.output_names if n not in outputs]
    if missing:
        raise BundleError(f"{directory / TASKS}: output(s) {', '.join(missing)} are not outputs of {MODEL} "
                          f"(it has {', '.join(sorted(outputs))})")
    want = set(spec.input_names)
    if want != inputs:
        raise BundleError(f"{directory / TASKS}: inputs {sorted(want)} do not match the inputs of {MODEL} "
                          f"{sorted(inputs)}")


def check_max_length(directory: Path, spec: GraphSpec, session: Any) -> None:
    """One row of ``max_length`` tokens through the graph: a ``max_length`` beyond the model's positions is an
    error naming tasks.json now, not an ONNX Runtime INVALID_ARGUMENT at the first long text."""
    from compressor.runtime.session import build_feeds

    lengths = [spec.max_length, *(getattr(t, "max_length", 0) or 0 for t in spec.tasks.values())]
    length = max(int(n) for n in lengths)
    if length < 2:
        raise BundleError(f"{directory / TASKS}: field 'max_length' must be at least 2, got {length}")
    try:
        feeds = build_feeds(spec, {"input_ids": np.zeros((1, length), dtype=np.int64)}, [])
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{directory / TASKS}: field 'max_length' {length} does not fit {MODEL} "
                          f"(more tokens than the model has positions?): {first[:200]}") from None


def vocabulary_digest(tokenizer: Any) -> tuple[int, str]:
    """``(size, sha256)`` of a ``tokenizers.Tokenizer``'s vocabulary (token -> id, added tokens included): what
    ``tasks.json`` records at export and a load compares, so a tokenizer of another vocabulary is refused."""
    import hashlib

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    text = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    return len(vocab), hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_vocabulary(directory: Path, spec: GraphSpec, tokenizer: Any, session: Any) -> None:
    """``tokenizer.json`` against ``tasks.json`` (the vocabulary the model was exported with) and the graph: one
    row holding the tokenizer's largest id and ``pad_id`` through the graph, so a tokenizer with more tokens than
    the embedding table has rows is refused now, not at the first text that uses a new token."""
    from compressor.runtime.session import build_feeds

    size, digest = vocabulary_digest(tokenizer)
    meta = spec.metadata
    want = meta.get("vocab_sha256")
    if isinstance(want, str) and want != digest:
        raise BundleError(f"{directory / TOKENIZER}: not the vocabulary the model was exported with ({size} tokens, "
                          f"sha256 {digest[:12]}; tasks.json field 'metadata.vocab_sha256' says "
                          f"{meta.get('vocab_size', '?')} tokens, {want[:12]}); ship the model's own tokenizer.json")
    pad_id = int(meta.get("pad_id", 0))
    ids = np.array([[0, size - 1, pad_id]], dtype=np.int64)
    try:
        session.run(None, build_feeds(spec, {"input_ids": ids}, []))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if pad_id >= size:
            raise BundleError(f"{directory / TASKS}: field 'metadata.pad_id' {pad_id} is not an id {MODEL} can "
                              f"embed: {first[:160]}") from None
        raise BundleError(f"{directory / TOKENIZER}: {size} tokens, but {MODEL} cannot embed id {size - 1} (its "
                          f"embedding table is smaller; ship the model's own tokenizer.json): {first[:160]}") from None


def check_classes(directory: Path, spec: GraphSpec, decoders: Mapping[str, Any], session: Any) -> None:
    """Each decoder's label (tag, class) count against the last axis of the graph output it decodes."""
    shapes = {o.name: o.shape for o in session.get_outputs()}
    for name, decoder in decoders.items():
        found = decoder.output_classes()
        if found is None:
            continue
        output, classes = found
        graph_name = spec.tasks[name].outputs.get(output)
        shape = shapes.get(graph_name) if graph_name else None
        if not shape or not isinstance(shape[-1], int):
            continue
        if shape[-1] != classes:
            raise BundleError(f"{directory / TASKS}: task '{name}' names {classes} label(s) (field 'tasks.{name}"
                              f".labels' / its decoder's), but output '{graph_name}' of {MODEL} has {shape[-1]} "
                              "classes")
