"""What a quantized graph holds: integer-op counts, the weight nodes still fp32 (and why), and how much error
each quantized node adds (sensitivity, for the accuracy fallback)."""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.export.quant_graph import (HEAD_MIN_ELEMENTS, INTEGER_OPS, QuantOptions, head_weight_elements,
                                          quantized_nodes)


def integer_op_counts(path: Path) -> dict[str, int]:
    """Counts of integer-compute ops, ``DynamicQuantizeLinear``, QDQ MatMuls (``qdq_matmul``) and lookups of INT8
    (``int8_gather``) and INT4 (``int4_gather``) embedding tables in a graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    counts = Counter(n.op_type for n in model.graph.node
                     if n.op_type in (*INTEGER_OPS, "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"))
    counts["qdq_matmul"] = sum(
        1 for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and all(producers.get(i) == "DequantizeLinear" for i in n.input[:2])
    )
    int8 = {i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    counts["int8_gather"] = sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input[0] in int8)
    counts["int4_gather"] = sum(1 for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    return {k: int(v) for k, v in counts.items() if v}


def integer_matmuls(counts: Mapping[str, int]) -> int:
    """MatMuls with quantized weights: integer arithmetic (directly, or QDQ-wrapped for ORT to fuse at load) and
    4-bit ``MatMulNBits``."""
    return sum(counts.get(k, 0) for k in ("MatMulInteger", "QAttention", "QLinearMatMul", "DynamicQuantizeMatMul",
                                          "MatMulIntegerToFloat", "qdq_matmul", "QGemm", "MatMulNBits"))


def fp32_nodes(src: Path, quantized: Path, options: QuantOptions, fallback: Sequence[str] = (),
               sensitivity: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Every node of ``src`` that holds a weight matrix or embedding table (MatMul / Gemm / Attention /
    EmbedLayerNormalization / Gather of a float table) and still computes in fp32 in ``quantized``, with why."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    moved = set(quantized_nodes(src, quantized, options))
    fallback, sensitivity = set(fallback), dict(sensitivity or {})
    ops = set(options.ops())
    out = []
    for node in model.graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.input and node.input[0] in inits else None
        weight = next((i for i in node.input[1:3] if i in inits), None)
        if node.name in moved or not (
                table and inits[table].data_type == onnx.TensorProto.FLOAT
                or node.op_type in ("Attention", "EmbedLayerNormalization")
                or node.op_type in ("MatMul", "Gemm") and weight is not None):
            continue
        elements = math.prod(inits[table].dims) if table else None
        if node.name in fallback:
            why = f"accuracy fallback (adds relative error {sensitivity.get(node.name, float('nan')):.4g})"
        elif node.op_type in options.exclude_op_types:
            why = "exclude_op_types"
        elif any(fnmatch.fnmatchcase(node.name, p) for p in options.exclude_nodes):
            why = "exclude_nodes pattern"
        elif options.head_fp32(node, inits):
            why = ("task head (quantize_heads: false)" if options.quantize_heads is False else
                   f"task head (quantize_heads: large; {head_weight_elements(node, inits):,} weight elements < "
                   f"{HEAD_MIN_ELEMENTS:,}, writes the logits)")
        elif table and options.lookup_embeddings() and elements < options.embedding_min_elements:
            why = f"small table ({elements} elements < {options.embedding_min_elements})"
        elif table and options.embedding == "fp32":
            why = "embedding: fp32"
        elif not table and node.op_type not in ops:
            why = f"op type {node.op_type} not in the quantized op types"
        else:
            why = "left fp32 by the quantizer"
        out.append({"node": node.name, "op_type": node.op_type, "reason": why,
                    **({"elements": int(elements)} if elements is not None else {})})
    return out


def node_sensitivity(fp32: Path, quantized: Path, nodes: Sequence[str],
                     batches: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Rank ``nodes`` by the error each adds: rel. error of its output minus the largest of its activation inputs'.

    Both graphs get the nodes' input and output tensors as extra outputs (names survive quantization: ORT
    keeps a quantized node's output name) and run on the same ``batches``.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    initializers = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    watch: dict[str, tuple[str, list[str]]] = {}
    for name in nodes:
        node = by_name.get(name)
        if node is None or not node.output:
            continue
        acts = [i for i in node.input if i and i not in initializers]
        if node.op_type in ("Gather", "EmbedLayerNormalization"):
            acts = []  # integer ids in: all error comes from the quantized table
        watch[name] = (node.output[0], acts)
    tensors = sorted({t for out, acts in watch.values() for t in (out, *acts)})

    def session(path: Path) -> Any:
        m = onnx.load(str(path))
        existing = {o.name for o in m.graph.output}
        produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
        for t in tensors:
            if t not in existing and t in produced:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep tensors as named
        opts.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    s_fp, s_q = session(fp32), session(quantized)
    names_fp = {o.name for o in s_fp.get_outputs()}
    names_q = {o.name for o in s_q.get_outputs()}
    common = [t for t in tensors if t in names_fp and t in names_q]
    sse = dict.fromkeys(common, 0.0)
    ss = dict.fromkeys(common, 0.0)
    for feeds in batches:
        a = dict(zip(common, s_fp.run(common, dict(feeds))))
        b = dict(zip(common, s_q.run(common, dict(feeds))))
        for t in common:
            fa = np.asarray(a[t], dtype=np.float64)
            fb = np.asarray(b[t], dtype=np.float64)
            if fa.shape != fb.shape:
                continue
            sse[t] += float(np.sum((fa - fb) ** 2))
            ss[t] += float(np.sum(fa**2))
    err = {t: math.sqrt(sse[t] / ss[t]) if ss[t] > 0 else 0.0 for t in common}
    scores = [(name, err.get(out, 0.0) - max((err.get(a, 0.0) for a in acts), default=0.0))
              for name, (out, acts) in watch.items()]
    return sorted(scores, key=lambda x: -x[1])


def weight_elements(path: Path, nodes: Sequence[str]) -> dict[str, int]:
    """Elements of the float initializers each of ``nodes`` reads in the graph at ``path`` (its weight matrix or
    embedding table, plus biases): what moving the node back to fp32 adds to the graph, in 3 bytes an element."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    want = set(nodes)
    return {n.name: sum(sizes.get(i, 0) for i in n.input) for n in model.graph.node if n.name in want}


def rank_per_byte(ranking: Sequence[tuple[str, float]], elements: Mapping[str, int]) -> list[tuple[str, float]]:
    """``ranking`` (node, added error; most sensitive first) reordered by added error per weight element, so the
    fallback first restores the nodes that buy the most accuracy per byte (a big embedding table whose error is
    small for its size goes last). Nodes that add no error go to the end; the scores stay the added errors."""
    def key(item: tuple[str, float]) -> tuple[bool, float]:
        name, err = item
        return err <= 0, -err / max(elements.get(name, 0), 1)
    return sorted(ranking, key=key)
