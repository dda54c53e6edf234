"""Block-wise MatMul weights: chosen MatMul nodes of a graph become ONNX Runtime's ``com.microsoft.MatMulNBits``.

Each chosen node's constant weight ``[K, N]`` is stored as 4- or 8-bit values, block-wise along K: every
``block_size`` consecutive elements of a column share one fp32 scale and a zero point (about 4.6 bits a weight at
4 bits and blocks of 32, 9.2 at 8 bits, against the 8 of per-column INT8). ``accuracy_level`` 4 lets ONNX Runtime
quantize the activations to 8 bits on the fly, one scale per block of K (finer than the dynamic INT8 MatMuls'
one scale per tensor), and run the product in integers; 0 dequantizes the weights and multiplies in fp32.
Groups (:class:`NBitsGroup`) choose nodes by name pattern, the first group that matches a node wins, so e.g.
the FFN can take 4 bits and every other MatMul 8.
The blocks are computed here with numpy (ORT's own ``MatMulNBitsQuantizer`` needs the ``onnx_ir`` package).

The quantize stage applies this after ORT's INT8 pass to the MatMuls it kept out of INT8 for that reason, so a
graph mixes INT8 and block-wise MatMuls, node by node, and the accuracy-aware fallback judges the block-wise nodes
like every other one (a sensitive one goes to per-column INT8 first).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: elements of a weight column that share one scale (ORT's default is 128; 32 keeps BERT-sized MatMuls accurate)
MATMUL4_BLOCK_SIZE = 32
#: ORT's MatMulNBits accuracy levels: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: weight widths MatMulNBits serves here
BITS = (4, 8)


@dataclass(frozen=True)
class NBitsGroup:
    """MatMul nodes (fnmatch patterns on node names) whose weights go to ``bits`` bits in blocks of
    ``block_size``, run at ``accuracy_level``."""

    nodes: tuple[str, ...]
    bits: int = 4
    block_size: int = MATMUL4_BLOCK_SIZE
    accuracy_level: int = 4


def nbits_assignment(path: Path, groups: Sequence[NBitsGroup], exclude: Iterable[str] = ()
                     ) -> dict[str, NBitsGroup]:
    """Node name -> the first of ``groups`` whose patterns choose it (see :func:`matmul4_candidates`)."""
    out: dict[str, NBitsGroup] = {}
    for group in groups:
        for name in matmul4_candidates(path, group.nodes, exclude):
            out.setdefault(name, group)
    return out


def check_matmul4_block_size(block_size: int) -> None:
    """Raise ``ValueError`` unless ``block_size`` is one ``MatMulNBits`` reads: a power of two, >= 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"4-bit MatMul block size must be a power of two of at least 16 (got {block_size})")


def matmul4_candidates(path: Path, patterns: Sequence[str], exclude: Iterable[str] = ()) -> list[str]:
    """Names of the MatMul nodes of ``path`` that 4-bit weights can serve and ``patterns`` (fnmatch) choose:
    a constant float weight of rank 2 as second input, not in ``exclude``."""
    import onnx

    if not patterns:
        return []
    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    skip = set(exclude)
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights and n.name not in skip
            and any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]


def matmul4_blocks(w: np.ndarray, block_size: int = MATMUL4_BLOCK_SIZE, bits: int = 4
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric ``bits``-bit (4 or 8) of a weight ``[K, N]`` in MatMulNBits' layout, one scale and zero point
    per ``block_size`` elements of a column (each block's range widened to hold 0, so zeros stay exact).

    Returns (packed uint8 ``[N, blocks, block_size * bits / 8]``, at 4 bits two values a byte, the lower one
    first; scales fp32 ``[N * blocks]``; zero points uint8 ``[N * ceil(blocks * bits / 8)]``, packed the same
    way; the dequantized weight ``[K, N]``).
    """
    check_matmul4_block_size(block_size)
    if bits not in BITS:
        raise ValueError(f"MatMul weight bits must be one of {BITS} (got {bits})")
    top = float(2 ** bits - 1)
    k, n = w.shape
    blocks = -(-k // block_size)
    cols = np.zeros((n, blocks * block_size), np.float32)
    cols[:, :k] = w.T
    cols = cols.reshape(n, blocks, block_size)
    lo = np.minimum(cols.min(axis=2), 0.0)
    hi = np.maximum(cols.max(axis=2), 0.0)
    scale = (hi - lo) / top
    scale[scale == 0] = 1.0
    zp = np.clip(np.rint(-lo / scale), 0, top).astype(np.uint8)
    q = np.clip(np.rint(cols / scale[..., None]) + zp[..., None], 0, top).astype(np.uint8)
    deq = ((q.astype(np.float32) - zp[..., None]) * scale[..., None]).reshape(n, -1)[:, :k].T
    if bits == 8:
        return q, scale.astype(np.float32).reshape(-1), zp.reshape(-1), np.ascontiguousarray(deq)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zp_pad = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
    zp_pad[:, :blocks] = zp
    zp_packed = (zp_pad[:, 0::2] | (zp_pad[:, 1::2] << 4)).reshape(-1)
    return packed, scale.astype(np.float32).reshape(-1), zp_packed, np.ascontiguousarray(deq)


def quantize_matmuls_nbits(src: Path, dst: Path, nodes: Sequence[str], block_size: int = MATMUL4_BLOCK_SIZE,
                          accuracy_level: int = 4, bits: int = 4) -> list[str]:
    """Write ``src`` to ``dst`` with each of ``nodes`` (MatMuls with a constant 2-D float weight) as
    ``MatMulNBits`` of ``bits`` bits named ``<node>_Q<bits>`` (same output tensor). Returns the nodes replaced; every other node is
    left as it is (INT8 ones included), and a weight no other node reads is dropped."""
    import onnx
    from onnx import helper, numpy_helper

    check_matmul4_block_size(block_size)
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"4-bit MatMul accuracy_level must be one of {ACCURACY_LEVELS} (got {accuracy_level})")
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    want = set(nodes)
    replaced: list[str] = []
    new_nodes = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if node.name not in want or weight is None or weight.data_type != onnx.TensorProto.FLOAT \
                or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        packed, scales, zps, _ = matmul4_blocks(w, block_size, bits)
        base = f"{weight.name}_{len(replaced)}" if f"{weight.name}_Q{bits}" in inits else weight.name
        names = (f"{base}_Q{bits}", f"{base}_scales", f"{base}_zero_points")
        for name, array in zip(names, (packed, scales, zps)):
            graph.initializer.append(numpy_helper.from_array(array, name))
            inits[name] = graph.initializer[-1]
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *names], list(node.output), name=f"{node.name}_Q{bits}",
            domain="com.microsoft", K=int(w.shape[0]), N=int(w.shape[1]), bits=bits, block_size=block_size,
            **({"accuracy_level": accuracy_level} if accuracy_level else {})))
        replaced.append(node.name)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return replaced
