"""Per-row INT8 embedding tables: ``Gather(int8 table)`` + ``Gather(scales)`` -> ``Cast`` -> ``Mul``, so only the
looked-up rows are dequantized (per-tensor INT8 gives every row the range of the table's largest value)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: an embedding table smaller than this stays fp32 (token-type tables: 2 x hidden)
EMBED_MIN_ELEMENTS = 4096
HEAD_SCOPE = "/heads/"  # TorchScript scope of the heads in node names (ExportWrapper.model.heads.<task>)


@dataclass
class RowQuantized:
    """One embedding lookup turned into Gather(int8 table) + Gather(scales) -> Cast -> Mul."""

    node: str  # the replaced Gather's name
    table: str  # the fp32 initializer it read
    shape: tuple[int, int]
    fp32_bytes: int
    int8_bytes: int  # table + scales
    max_abs_error: float  # largest |w - dequantized w| over the table (<= half the row's scale)


def embedding_tables(model: Any, min_elements: int = EMBED_MIN_ELEMENTS) -> dict[str, str]:
    """Gather node name -> float32 2-D initializer it looks up rows of (axis 0), for tables of ``min_elements``+."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or not node.input or node.input[0] not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        init = inits[node.input[0]]
        if (axis == 0 and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2
                and math.prod(init.dims) >= min_elements):
            out[node.name] = node.input[0]
    return out


def quantize_embedding_rows(src: Path, dst: Path, exclude: Iterable[str] = (), min_elements: int = EMBED_MIN_ELEMENTS,
                            skip_heads: bool = True) -> list[RowQuantized]:
    """Store every embedding table of ``src`` as INT8 with one fp32 scale per row (symmetric, max |w| / 127).

    Each lookup ``Gather(table, ids)`` becomes ``Mul(Cast(Gather(table_int8, ids)), Gather(scales, ids))`` with
    the same output name, so the table stays INT8 in memory and only the looked-up rows are dequantized. A table
    that another node also reads (tied weights) keeps its fp32 copy for that node. Nodes named in ``exclude``
    (and the heads, with ``skip_heads``) are left alone. Writes ``dst`` (may be ``src``); returns what changed.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    exclude = set(exclude)
    tables = {n: t for n, t in embedding_tables(model, min_elements).items()
              if n not in exclude and not (skip_heads and HEAD_SCOPE in n)}
    if not tables:
        if Path(src) != Path(dst):
            onnx.save(model, str(dst))
        return []
    inits = {i.name: i for i in graph.initializer}
    done: dict[str, tuple[str, str]] = {}  # table -> (int8 name, scales name)
    records: list[RowQuantized] = []
    new_nodes = []
    for node in graph.node:
        if node.name not in tables:
            new_nodes.append(node)
            continue
        table = tables[node.name]
        if table not in done:
            w = numpy_helper.to_array(inits[table]).astype(np.float32)
            scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            names = (f"{table}_int8_rows", f"{table}_row_scales")
            graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1])])
            done[table] = names
            error = float(np.abs(q.astype(np.float32) * scale - w).max()) if w.size else 0.0
            records.append(RowQuantized(node.name, table, (int(w.shape[0]), int(w.shape[1])), int(w.nbytes),
                                        int(q.nbytes + scale.nbytes), error))
        q_name, s_name = done[table]
        ids, out = node.input[1], node.output[0]
        base = f"{node.name}/int8_rows"
        new_nodes += [
            helper.make_node("Gather", [q_name, ids], [f"{base}/q"], name=f"{base}/Gather", axis=0),
            helper.make_node("Gather", [s_name, ids], [f"{base}/scale"], name=f"{base}/GatherScale", axis=0),
            helper.make_node("Cast", [f"{base}/q"], [f"{base}/float"], name=f"{base}/Cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{base}/float", f"{base}/scale"], [out], name=f"{base}/Mul"),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for table in done:
        if table not in still_read:
            graph.initializer.remove(inits[table])
            for inp in [i for i in graph.input if i.name == table]:
                graph.input.remove(inp)
    onnx.save(model, str(dst))
    return records
