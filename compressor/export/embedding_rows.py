"""Embedding tables stored quantized and dequantized after the lookup, so only the looked-up rows are dequantized:

- INT8 per row: ``Gather(int8 table)`` + ``Gather(scales)`` -> ``Cast`` -> ``Mul`` (standard ONNX ops; per-tensor
  INT8 gives every row the range of the table's largest value);
- INT4 per block: ONNX Runtime's ``com.microsoft.GatherBlockQuantized`` on a table of packed 4-bit values with
  one scale per ``block_size`` elements of a row (about 9/16 of INT8's bytes at blocks of 32, the scales
  included; coarser, so measure what it costs). The scales are stored as fp16 when every one fits its normal
  range (the 4-bit grid is computed with the rounded scales, so nothing is lost) and cast to fp32 once, at load.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: an embedding table smaller than this stays fp32 (token-type tables: 2 x hidden)
EMBED_MIN_ELEMENTS = 4096
#: elements of a row that share one scale in INT4 tables (ORT wants a power of two, at least 16)
INT4_BLOCK_SIZE = 32
#: fp16's range without subnormals: INT4 block scales inside it are stored in 2 bytes
FP16_NORMAL_MIN, FP16_MAX = 2.0 ** -14, 65504.0
HEAD_SCOPE = "/heads/"  # TorchScript scope of the heads in node names (ExportWrapper.model.heads.<task>)


@dataclass
class RowQuantized:
    """One embedding lookup turned into a lookup of a quantized table (INT8 per row or INT4 per block)."""

    node: str  # the replaced Gather's name
    table: str  # the fp32 initializer it read
    shape: tuple[int, int]
    fp32_bytes: int
    quantized_bytes: int  # table + scales
    max_abs_error: float  # largest |w - dequantized w| over the table (<= half the row's or block's scale)
    bits: int = 8


def inits_dtype(graph: Any, name: str) -> int | None:
    """The data type of initializer ``name`` of ``graph`` (None when it is not one)."""
    return next((i.data_type for i in graph.initializer if i.name == name), None)


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


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric INT8 of a 2-D table, one scale per row (max |w| / 127): (int8 table, scales [rows, 1], dequantized)."""
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale, q.astype(np.float32) * scale


def check_int4_block_size(block_size: int) -> None:
    """Raise ``ValueError`` unless ``block_size`` is one ``GatherBlockQuantized`` reads: a power of two, >= 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"INT4 block size must be a power of two of at least 16 (got {block_size})")


def int4_blocks(w: np.ndarray, block_size: int = INT4_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric INT4 of a 2-D table, one scale per ``block_size`` elements of a row (max |w| / 7, values in
    [-7, 7]), packed as ``GatherBlockQuantized`` reads uint8 data: value + 8, two per byte, the first in the low
    nibble. Returns (packed uint8 [rows, ceil(cols / 2)], scales [rows, ceil(cols / block_size)], dequantized).
    The scales are fp16 (rounded first, the values quantized with the rounded ones) when all of them lie in fp16's
    normal range, else fp32; ``dequantized`` is exactly what ONNX Runtime computes from them."""
    check_int4_block_size(block_size)
    rows, cols = w.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = w
    scale = np.abs(padded.reshape(rows, blocks, block_size)).max(axis=2) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    if scale.size and FP16_NORMAL_MIN <= scale.min() and scale.max() <= FP16_MAX:
        scale = scale.astype(np.float16)
    q = np.clip(np.rint(padded.reshape(rows, blocks, block_size) / scale[..., None].astype(np.float32)), -7, 7)
    deq = (q * scale[..., None].astype(np.float32)).reshape(rows, -1)[:, :cols].astype(np.float32)
    u = (q.reshape(rows, -1)[:, :cols] + 8).astype(np.uint8)
    if cols % 2:
        u = np.pad(u, ((0, 0), (0, 1)))
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale, deq


def quantize_embedding_rows(src: Path, dst: Path, exclude: Iterable[str] = (), min_elements: int = EMBED_MIN_ELEMENTS,
                            skip_heads: bool = True, bits: int = 8, block_size: int = INT4_BLOCK_SIZE,
                            int8_instead: Iterable[str] = ()) -> list[RowQuantized]:
    """Store every embedding table of ``src`` quantized: INT8 with one fp32 scale per row (``bits=8``, symmetric,
    max |w| / 127); with ``bits=4`` the largest table (the word table) INT4 with one fp32 scale per ``block_size``
    elements of a row (:func:`int4_blocks`) and the smaller ones (positions) still INT8 per row: they are a few
    percent of the bytes, and on a BERT encoder 4 bits made the position lookup add 13% relative error.

    With 8 bits each lookup ``Gather(table, ids)`` becomes ``Mul(Cast(Gather(table_int8, ids)), Gather(scales,
    ids))``; with 4 bits, ``com.microsoft.GatherBlockQuantized(packed, ids, scales)``. Either keeps the output name,
    so the table stays quantized in memory and only the looked-up rows are dequantized. A table that another node
    also reads (tied weights) keeps its fp32 copy for that node. Nodes named in ``exclude`` (and the heads, with
    ``skip_heads``) are left alone, except that a node in both ``exclude`` and ``int8_instead`` that reads the
    4-bit table gets that table INT8 per row (the accuracy fallback's first step for the 4-bit table, as for a
    4-bit MatMul). Writes ``dst`` (may be ``src``); returns what changed.
    """
    import onnx
    from onnx import helper, numpy_helper

    if bits not in (4, 8):
        raise ValueError(f"embedding tables are quantized to 8 or 4 bits (got {bits})")
    if bits == 4:
        check_int4_block_size(block_size)  # before any work
    model = onnx.load(str(src))
    graph = model.graph
    exclude = set(exclude)
    candidates = {n: t for n, t in embedding_tables(model, min_elements).items()
                  if not (skip_heads and HEAD_SCOPE in n)}
    inits = {i.name: i for i in graph.initializer}
    # the largest table of the encoder (an excluded one too: excluding the word table leaves positions INT8)
    largest = max(set(candidates.values()), key=lambda t: (math.prod(inits[t].dims), t)) if candidates else None
    demoted = {n for n in set(int8_instead) & exclude if bits == 4 and candidates.get(n) == largest}
    tables = {n: t for n, t in candidates.items() if n not in exclude or n in demoted}
    if not tables:
        if Path(src) != Path(dst):
            onnx.save(model, str(dst))
        return []
    four = bits == 4 and not any(tables.get(n) == largest for n in demoted)
    table_bits = {t: 4 if four and t == largest else 8 for t in tables.values()}
    done: dict[str, tuple[str, str]] = {}  # table -> (quantized table name, scales name)
    records: list[RowQuantized] = []
    new_nodes = []
    for node in graph.node:
        if node.name not in tables:
            new_nodes.append(node)
            continue
        table = tables[node.name]
        if table not in done:
            w = numpy_helper.to_array(inits[table]).astype(np.float32)
            q, scale, deq = int8_rows(w) if table_bits[table] == 8 else int4_blocks(w, block_size)
            names = (f"{table}_int8_rows", f"{table}_row_scales") if table_bits[table] == 8 else \
                (f"{table}_int4_blocks", f"{table}_block_scales")
            graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1])])
            done[table] = names
            error = float(np.abs(deq - w).max()) if w.size else 0.0
            records.append(RowQuantized(node.name, table, (int(w.shape[0]), int(w.shape[1])), int(w.nbytes),
                                        int(q.nbytes + scale.nbytes), error, table_bits[table]))
        q_name, s_name = done[table]
        ids, out = node.input[1], node.output[0]
        if table_bits[table] == 4 and inits_dtype(graph, s_name) == onnx.TensorProto.FLOAT16:
            # fp16 scales on disk, cast once (ONNX Runtime folds the Cast of a constant at load)
            cast = f"{s_name}/fp32"
            new_nodes.append(helper.make_node("Cast", [s_name], [cast], name=f"{s_name}/Cast",
                                              to=onnx.TensorProto.FLOAT))
            done[table] = (q_name, cast)
            s_name = cast
        if table_bits[table] == 4:
            new_nodes.append(helper.make_node(
                "GatherBlockQuantized", [q_name, ids, s_name], [out], name=f"{node.name}/int4_blocks",
                domain="com.microsoft", bits=4, block_size=block_size, gather_axis=0, quantize_axis=1))
            continue
        base = f"{node.name}/int8_rows"
        new_nodes += [
            helper.make_node("Gather", [q_name, ids], [f"{base}/q"], name=f"{base}/Gather", axis=0),
            helper.make_node("Gather", [s_name, ids], [f"{base}/scale"], name=f"{base}/GatherScale", axis=0),
            helper.make_node("Cast", [f"{base}/q"], [f"{base}/float"], name=f"{base}/Cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{base}/float", f"{base}/scale"], [out], name=f"{base}/Mul"),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    if bits == 4 and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    still_read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for table in done:
        if table not in still_read:
            graph.initializer.remove(inits[table])
            for inp in [i for i in graph.input if i.name == table]:
                graph.input.remove(inp)
    onnx.save(model, str(dst))
    return records
