"""Quantizing one graph: the options (over optimum's presets), graph preparation, which nodes stay fp32,
calibration of activation ranges and ``ORTQuantizer`` itself. See :mod:`compressor.export.quantize`."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compressor.errors import CompressorError
from compressor.export.embedding_rows import (EMBED_MIN_ELEMENTS, HEAD_SCOPE, INT4_BLOCK_SIZE,
                                              quantize_embedding_rows)
from compressor.export.matmul4 import NBitsGroup, nbits_assignment, quantize_matmuls_nbits
from compressor.export.optimize import quiet_loggers

Mode = Literal["dynamic", "static"]
Embedding = Literal["per_row", "int4_block", "per_tensor", "fp32"]
Method = Literal["minmax", "percentile", "entropy"]
Target = Literal["avx512_vnni", "avx2", "arm64"]

#: op types quantized by default. Embedding lookups (Gather / EmbedLayerNormalization) hold most of a small
#: encoder's weights, so quantizing them is most of the size win on disk.
DEFAULT_OP_TYPES: dict[str, list[str]] = {
    "dynamic": ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
    "static": ["MatMul", "Gather"],
}
#: ``quantize_heads: large``: a head's weight matrix of at least this many elements is quantized (a 256 x 256
#: matrix); smaller ones (those that write a handful of logits) stay fp32
HEAD_MIN_ELEMENTS = 65_536


def head_weight_elements(node: Any, initializers: Mapping[str, Any]) -> int:
    """Elements of the largest constant weight among a node's inputs (0 when it has none)."""
    import math

    return max((math.prod(initializers[i].dims) for i in node.input if i in initializers), default=0)


#: ops that compute with integers in a quantized graph (QDQ MatMuls are counted separately)
INTEGER_OPS = ("MatMulInteger", "QAttention", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
               "QEmbedLayerNormalization", "QGemm", "MatMulNBits")


class QuantizationError(CompressorError):
    """Quantization failed, or produced a graph without integer MatMuls."""


@dataclass
class QuantOptions:
    """How to quantize (the recipe's ``quantize`` stage maps onto this)."""

    mode: Mode = "dynamic"
    target: Target = "avx512_vnni"
    per_channel: bool = True  # one weight scale per output channel (the reference row (c) asks for False)
    reduce_range: bool = False
    op_types: list[str] | None = None  # None: DEFAULT_OP_TYPES[mode]
    exclude_op_types: list[str] = field(default_factory=list)  # kept fp32 (e.g. Gather, LayerNormalization)
    exclude_nodes: list[str] = field(default_factory=list)  # fnmatch patterns on node names, e.g. "*/layer.5/*"
    #: task heads (nodes under ``/heads/``): True quantizes them like the encoder, False keeps them fp32, "large"
    #: quantizes a head's weight matrices of at least ``HEAD_MIN_ELEMENTS`` elements (a relation head's hidden
    #: layer over pair features) and keeps the small ones that write the logits fp32; head tables (Gather) are
    #: quantized only with True
    quantize_heads: bool | Literal["large"] = "large"
    calibration: Method = "minmax"
    percentile: float = 99.999
    num_bins: int | None = None  # None: 2048 (percentile), 128 (entropy)
    #: embedding tables (Gather of a float initializer): "per_row" INT8 with one fp32 scale per row, dequantized
    #: after the lookup (:func:`quantize_embedding_rows`); "int4_block": the largest (word) table INT4 with one fp32
    #: scale per ``embedding_block_size`` elements of a row (ORT's GatherBlockQuantized), the others per row;
    #: "per_tensor": ORT's quantizer (one scale per table); "fp32": left alone. A fused ``EmbedLayerNormalization``
    #: (word embedding inside) is quantized per tensor by ORT unless "fp32": fuse with ``embed_layer_norm=False``
    #: to get per-row lookups.
    embedding: Embedding = "per_row"
    embedding_min_elements: int = EMBED_MIN_ELEMENTS
    embedding_block_size: int = INT4_BLOCK_SIZE
    #: MatMuls whose constant weights are stored block-wise in 4 or 8 bits (ORT's MatMulNBits, one scale and
    #: zero point per block of a column) instead of per-column INT8; the first group choosing a node wins; empty:
    #: none. The accuracy fallback sends such a node to per-column INT8 (not fp32).
    matmul_nbits: list[NBitsGroup] = field(default_factory=list)

    def head_fp32(self, node: Any, initializers: Mapping[str, Any]) -> bool:
        """Whether ``node`` is a task-head node kept fp32 by ``quantize_heads`` (``initializers``: name -> the
        graph's ``TensorProto``)."""
        if HEAD_SCOPE not in node.name or self.quantize_heads is True:
            return False
        if self.quantize_heads is False:
            return True
        return head_weight_elements(node, initializers) < HEAD_MIN_ELEMENTS

    def ops(self) -> list[str]:
        """Op types ORT's quantizer handles (per-row and per-block embeddings are done here, not by ORT)."""
        ops = [t for t in (self.op_types or DEFAULT_OP_TYPES[self.mode]) if t not in self.exclude_op_types]
        if self.embedding != "per_tensor":
            ops = [t for t in ops if t != "Gather" and (self.embedding != "fp32" or t != "EmbedLayerNormalization")]
        return ops

    def lookup_embeddings(self) -> bool:
        """Whether the embedding tables are quantized here (INT8 per row or INT4 per block), not by ORT."""
        requested = self.op_types is None or "Gather" in self.op_types
        return self.embedding in ("per_row", "int4_block") and requested and "Gather" not in self.exclude_op_types

    def embedding_bits(self) -> int:
        """Bits of the embedding tables quantized here."""
        return 4 if self.embedding == "int4_block" else 8


# ---- graph preparation -----------------------------------------------------------------------------------
def prepare_source(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` with every node named and tensor types inferred (contrib ops included)."""
    import onnx

    model = onnx.load(str(src))
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with quiet_loggers("onnxruntime.tools.symbolic_shape_infer"):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        if inferred is not None:
            model = inferred
    except Exception:  # noqa: BLE001 - symbolic inference is best effort; ONNX inference covers standard ops
        model = onnx.shape_inference.infer_shapes(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def nodes_to_exclude(path: Path, options: QuantOptions, extra: Iterable[str] = ()) -> list[str]:
    """Node names kept in fp32: excluded op types, name patterns, the heads (unless quantized) and ``extra``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out: list[str] = []
    for node in model.graph.node:
        if (node.op_type in options.exclude_op_types
                or any(fnmatch.fnmatchcase(node.name, p) for p in options.exclude_nodes)
                or options.head_fp32(node, inits)):
            out.append(node.name)
            if node.op_type == "Gemm":  # ORT's dynamic quantizer splits Gemm into "<name>_MatMul" + "<name>_Add"
                out.append(f"{node.name}_MatMul")
    return sorted(set(out) | set(extra))


def quantized_nodes(src: Path, quantized: Path, options: QuantOptions) -> list[str]:
    """Nodes of ``src`` (quantizable op types) that run in INT8 in ``quantized``: the dynamic quantizer
    replaces them (their name is gone); the QDQ quantizer feeds them from ``DequantizeLinear``."""
    import onnx

    src_model = onnx.load(str(src), load_external_data=False)
    q_model = onnx.load(str(quantized), load_external_data=False)
    q_nodes = {n.name: n for n in q_model.graph.node}
    producers = {o: n.op_type for n in q_model.graph.node for o in n.output}
    ops = (set(options.ops()) | ({"Gather"} if options.lookup_embeddings() else set())
           | ({"MatMul"} if options.matmul_nbits else set()))
    out = []
    for node in src_model.graph.node:
        if node.op_type not in ops:
            continue
        q = q_nodes.get(node.name)
        if node.op_type == "Gather" and q is not None and q.op_type == "Gather":
            continue  # quantized lookups replace the node; a Gather still there is fp32
        if q is None or any(producers.get(i) == "DequantizeLinear" for i in q.input):
            out.append(node.name)
    return out


# ---- quantization ------------------------------------------------------------------------------------------
def quantization_config(options: QuantOptions, exclude: Sequence[str]) -> Any:
    """optimum's ``QuantizationConfig`` for the target CPU (``AutoQuantizationConfig`` presets)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    preset = getattr(AutoQuantizationConfig, options.target)
    kwargs: dict[str, Any] = {"is_static": options.mode == "static", "per_channel": options.per_channel,
                              "nodes_to_exclude": list(exclude), "operators_to_quantize": options.ops()}
    if options.target in ("avx2", "avx512"):
        kwargs["reduce_range"] = options.reduce_range
    return preset(**kwargs)


def calibrate(path: Path, batches: Sequence[Mapping[str, np.ndarray]], options: QuantOptions, workdir: Path) -> Any:
    """Activation ranges of ``path`` over ``batches`` (each batch collected alone, so shapes may differ)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from optimum.onnxruntime.configuration import CalibrationConfig

    if not batches:
        raise QuantizationError("static quantization needs calibration batches; the tasks gave none")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.calibration]
    kwargs: dict[str, Any] = {}
    if options.calibration == "percentile":
        kwargs = {"num_bins": options.num_bins or 2048, "percentile": options.percentile}
    elif options.calibration == "entropy":
        kwargs = {"num_bins": options.num_bins or 128, "num_quantized_bins": 128}
    else:
        kwargs = {"moving_average": False, "averaging_constant": 0.01}
    config = CalibrationConfig(dataset_name="compressor-tasks", dataset_config_name="multi-task",
                               dataset_split="calibration", dataset_num_samples=len(batches), method=method, **kwargs)
    calibrator = config.create_calibrator(onnx_model_path=str(path), operators_to_quantize=options.ops(),
                                          augmented_model_name=str(workdir / "augmented.onnx"))

    class _One(CalibrationDataReader):
        def __init__(self, feeds: Mapping[str, np.ndarray]):
            self.feeds: dict[str, np.ndarray] | None = dict(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feeds, self.feeds = self.feeds, None
            return feeds

    # ORT's calibrators print progress lines; the stage reports what matters
    with quiet_loggers("onnxruntime.quantization", ""), contextlib.redirect_stdout(io.StringIO()):
        for feeds in batches:
            calibrator.collect_data(_One(feeds))
        return calibrator.compute_data()


def quantize_graph(src: Path, dst: Path, options: QuantOptions, exclude: Sequence[str] = (),
                   ranges: Any = None) -> Path:
    """Quantize the prepared graph ``src`` into ``dst`` with ``ORTQuantizer``.

    Nodes kept fp32: ``options``' exclusions (op types, name patterns, heads; see :func:`nodes_to_exclude`)
    plus ``exclude``, except that a block-wise MatMul (``options.matmul_nbits``) or the lookup of the 4-bit word table
    (``embedding: int4_block``) in ``exclude`` goes to INT8 instead. ``ranges``: calibration ranges, required for
    static mode.
    """
    from optimum.onnxruntime import ORTQuantizer

    if options.mode == "static" and ranges is None:
        raise QuantizationError("static quantization needs calibration ranges (see calibrate)")
    fixed = nodes_to_exclude(src, options)
    fallback = set(exclude) - set(fixed)  # what the caller (the accuracy fallback) asks to keep fp32
    nbits = nbits_assignment(src, options.matmul_nbits, fixed)
    demoted = fallback & set(nbits)  # the fallback sends a block-wise node to per-column INT8 first
    blockwise = [n for n in nbits if n not in demoted]
    exclude = nodes_to_exclude(src, options, [*(n for n in exclude if n not in demoted), *blockwise])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp:
        with quiet_loggers("optimum.onnxruntime.quantization", "optimum", ""), contextlib.redirect_stdout(io.StringIO()):
            quantizer = ORTQuantizer(Path(src))
            quantizer.quantize(quantization_config(options, exclude), save_dir=tmp, file_suffix=None,
                               calibration_tensors_range=ranges)
        out = Path(tmp) / f"{Path(src).stem}.onnx"
        if not out.is_file():
            raise QuantizationError(f"ORTQuantizer wrote no {out.name} for {src}")
        for group in options.matmul_nbits:
            chosen = [n for n in blockwise if nbits[n] is group]
            if chosen:
                quantize_matmuls_nbits(out, out, chosen, group.block_size, group.accuracy_level, group.bits)
        if options.lookup_embeddings():
            quantize_embedding_rows(out, out, exclude=set(exclude), min_elements=options.embedding_min_elements,
                                    skip_heads=options.quantize_heads is not True, bits=options.embedding_bits(),
                                    block_size=options.embedding_block_size, int8_instead=fallback)
        shutil.move(str(out), str(dst))
    return dst
