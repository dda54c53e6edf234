"""Write an edge bundle: ``model.onnx`` + ``tokenizer.json`` + ``tasks.json``, atomically.

``tasks.json`` is the graph contract (:class:`compressor.runtime.spec.GraphSpec`): format and version, the
graph's inputs, and per task its plugin, labels, input and output names, ``max_length`` and the plugin's
``export_spec()`` decoder settings; ``metadata`` adds the padding id, the graph's provenance (fp32 or INT8,
which stage) and file sizes. ``compressor.runtime.Bundle`` reads it back without torch.
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
from compressor.runtime.bundle import MODEL, TASKS, TOKENIZER
from compressor.runtime.spec import GraphSpec


def write_bundle(directory: Path, graph: Path, spec: GraphSpec, tokenizer_file: Path, pad_id: int,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the bundle directory (a half-written bundle never appears at ``directory``)."""
    graph, tokenizer_file = Path(graph), Path(tokenizer_file)
    if not graph.is_file():
        raise ModelDirError(f"{graph}: graph file not found")
    if not tokenizer_file.is_file():
        raise ModelDirError(f"{tokenizer_file}: no tokenizer.json (a fast tokenizer is required for a bundle)")
    spec = GraphSpec(spec.base_inputs, spec.tasks, spec.max_length, dict(spec.metadata))
    spec.metadata.update({
        "pad_id": int(pad_id),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "graph_source": str(graph),
        **(dict(metadata) if metadata else {}),
    })
    spec.metadata.pop("graph_file", None)
    with atomic_dir(Path(directory)) as tmp:
        shutil.copyfile(graph, tmp / MODEL)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        spec.metadata["files"] = {MODEL: (tmp / MODEL).stat().st_size, TOKENIZER: (tmp / TOKENIZER).stat().st_size}
        (tmp / TASKS).write_text(json.dumps(portable(spec.to_json(), directory), indent=2), encoding="utf-8")
    return Path(directory)
