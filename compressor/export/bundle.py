"""Write an edge bundle: ``model.onnx`` + ``tokenizer.json`` + ``tasks.json``, atomically.

``tokenizer.json`` truncates to the model's ``max_length`` (plain ``tokenizers`` / onnxruntime use cannot feed the
graph more positions than it has; compressor's runtime turns truncation off and flags truncated texts itself).
Given the model directory, the bundle also holds ``config.json`` (the encoder as transformers would build it) and
``tokenizer_config.json`` / ``special_tokens_map.json``, so ``optimum``'s ``ORTModelForCustomTasks`` and
transformers' ``AutoTokenizer`` load the directory as it is.

``tasks.json`` is the graph contract (:class:`compressor.runtime.spec.GraphSpec`): format and version, the
graph's inputs, and per task its plugin, labels, input and output names, ``max_length`` and the plugin's
``export_spec()`` decoder settings; ``metadata`` adds the padding id, the vocabulary's size and sha256, the
graph's provenance (fp32 or INT8, which stage) and file sizes. ``compressor.runtime.Bundle`` reads it back without torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.errors import ModelDirError
from compressor.fsutil import atomic_dir, portable
from compressor.runtime.bundle import MODEL, TASKS, TOKENIZER, vocabulary_digest
from compressor.runtime.spec import GraphSpec


def write_bundle(directory: Path, graph: Path, spec: GraphSpec, tokenizer_file: Path, pad_id: int,
                 metadata: Mapping[str, Any] | None = None, model_dir: Path | None = None,
                 word_splitter: str = "punct") -> Path:
    """Write the bundle directory (a half-written bundle never appears at ``directory``); with ``model_dir`` (the
    model the graph was exported from) also the files optimum and transformers read; ``word_splitter``: how
    predict splits raw text into words for token tasks (:mod:`compressor.runtime.words`)."""
    graph, tokenizer_file = Path(graph), Path(tokenizer_file)
    if not graph.is_file():
        raise ModelDirError(f"{graph}: graph file not found")
    if not tokenizer_file.is_file():
        raise ModelDirError(f"{tokenizer_file}: no tokenizer.json (a fast tokenizer is required for a bundle)")
    from tokenizers import Tokenizer

    spec = GraphSpec(spec.base_inputs, spec.tasks, spec.max_length, dict(spec.metadata))
    vocab_size, vocab_sha256 = vocabulary_digest(Tokenizer.from_file(str(tokenizer_file)))
    spec.metadata.update({
        "pad_id": int(pad_id),
        "vocab_size": vocab_size,  # a load refuses a tokenizer.json of another vocabulary
        "vocab_sha256": vocab_sha256,
        "word_splitter": word_splitter,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "graph_source": str(graph),
        **(dict(metadata) if metadata else {}),
    })
    spec.metadata.pop("graph_file", None)
    from compressor.export.hf import transformers_files, truncating_tokenizer  # transformers' view of the files

    tokenizer_json = truncating_tokenizer(tokenizer_file, spec.max_length)
    hf_files = transformers_files(Path(model_dir), spec.max_length) if model_dir is not None else {}
    with atomic_dir(Path(directory)) as tmp:
        shutil.copyfile(graph, tmp / MODEL)
        (tmp / TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
        for name, text in hf_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        spec.metadata["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / TASKS).write_text(json.dumps(portable(spec.to_json(), directory), indent=2), encoding="utf-8")
    return Path(directory)
