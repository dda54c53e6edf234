"""INT8 quantization of a multi-task ONNX graph with optimum's ``ORTQuantizer``, and an accuracy-aware fallback.

* **dynamic** (default): weights int8 ahead of time, activations quantized per batch at run time
  (``DynamicQuantizeLinear`` + ``MatMulInteger`` / ``QAttention``). Works on the fused graph.
* **static**: QDQ format, activation ranges calibrated on task batches (min-max, percentile or entropy). Works on
  the raw export, so every MatMul (also inside attention) gets QDQ pairs; ONNX Runtime fuses them at load.
* **embedding tables** (word and position embeddings, the largest tensors of a small encoder) are stored INT8
  with one fp32 scale per row (:func:`quantize_embedding_rows`): ``Gather(int8 table)`` + ``Gather(scales)`` ->
  ``Cast`` -> ``Mul``, so only the looked-up rows are dequantized. Per-tensor INT8 (ORT's Gather quantizer) gives
  every row the range of the table's largest value and loses the small rows; per row costs almost nothing.

``ORTQuantizer`` handles any ONNX file (``ORTQuantizer(path)``; it only wants a config for ``ORTModel``
loading, which a multi-head graph does not use). Two things it cannot do are done here with ONNX Runtime
directly: type information for the contrib ops of fused graphs (symbolic shape inference first), and
calibration over batches of different shapes (ORT's histogram calibrators stack every collected tensor, so
each batch is collected on its own and the histograms are merged).

The accuracy-aware loop (:func:`quantize_accuracy_aware`) quantizes, evaluates every task, and while a task
drops more than its tolerance below the fp32 graph, moves the most sensitive nodes back to fp32 and quantizes
again. Sensitivity of a node = relative error of its output in the quantized graph minus that of its input
(what the node itself adds), measured against the fp32 graph on calibration batches.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compressor.errors import CompressorError
from compressor.export.optimize import quiet_loggers

Mode = Literal["dynamic", "static"]
Embedding = Literal["per_row", "per_tensor", "fp32"]
#: an embedding table smaller than this stays fp32 (token-type tables: 2 x hidden)
EMBED_MIN_ELEMENTS = 4096
Method = Literal["minmax", "percentile", "entropy"]
Target = Literal["avx512_vnni", "avx2", "arm64"]

#: op types quantized by default. Embedding lookups (Gather / EmbedLayerNormalization) hold most of a small
#: encoder's weights, so quantizing them is most of the size win on disk.
DEFAULT_OP_TYPES: dict[str, list[str]] = {
    "dynamic": ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
    "static": ["MatMul", "Gather"],
}
#: ops that compute with integers in a quantized graph (QDQ MatMuls are counted separately)
INTEGER_OPS = ("MatMulInteger", "QAttention", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
               "QEmbedLayerNormalization", "QGemm")
HEAD_SCOPE = "/heads/"  # TorchScript scope of the heads in node names (ExportWrapper.model.heads.<task>)


class QuantizationError(CompressorError):
    """Quantization failed, or produced a graph without integer MatMuls."""


@dataclass
class QuantOptions:
    """How to quantize (the recipe's ``quantize`` stage maps onto this)."""

    mode: Mode = "dynamic"
    target: Target = "avx512_vnni"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: list[str] | None = None  # None: DEFAULT_OP_TYPES[mode]
    exclude_op_types: list[str] = field(default_factory=list)  # kept fp32 (e.g. Gather, LayerNormalization)
    exclude_nodes: list[str] = field(default_factory=list)  # fnmatch patterns on node names, e.g. "*/layer.5/*"
    quantize_heads: bool = False  # heads are tiny and write straight into the logits: fp32 by default
    calibration: Method = "minmax"
    percentile: float = 99.999
    num_bins: int | None = None  # None: 2048 (percentile), 128 (entropy)
    #: embedding tables (Gather of a float initializer): "per_row" INT8 with one fp32 scale per row, dequantized
    #: after the lookup (:func:`quantize_embedding_rows`); "per_tensor": ORT's quantizer (one scale per table);
    #: "fp32": left alone. A fused ``EmbedLayerNormalization`` (word embedding inside) is quantized per tensor
    #: by ORT unless "fp32": fuse with ``embed_layer_norm=False`` to get per-row lookups.
    embedding: Embedding = "per_row"
    embedding_min_elements: int = EMBED_MIN_ELEMENTS

    def ops(self) -> list[str]:
        """Op types ORT's quantizer handles (per-row embeddings are done here, not by ORT)."""
        ops = [t for t in (self.op_types or DEFAULT_OP_TYPES[self.mode]) if t not in self.exclude_op_types]
        if self.embedding != "per_tensor":
            ops = [t for t in ops if t != "Gather" and (self.embedding != "fp32" or t != "EmbedLayerNormalization")]
        return ops

    def per_row_embeddings(self) -> bool:
        requested = self.op_types is None or "Gather" in self.op_types
        return self.embedding == "per_row" and requested and "Gather" not in self.exclude_op_types


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
    out: list[str] = []
    for node in model.graph.node:
        if (node.op_type in options.exclude_op_types
                or any(fnmatch.fnmatchcase(node.name, p) for p in options.exclude_nodes)
                or (not options.quantize_heads and HEAD_SCOPE in node.name)):
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
    ops = set(options.ops()) | ({"Gather"} if options.per_row_embeddings() else set())
    out = []
    for node in src_model.graph.node:
        if node.op_type not in ops:
            continue
        q = q_nodes.get(node.name)
        if node.op_type == "Gather" and q is not None and q.op_type == "Gather":
            continue  # per-row embeddings replace the node; a Gather still there is fp32
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
    plus ``exclude``. ``ranges``: calibration ranges, required for static mode.
    """
    from optimum.onnxruntime import ORTQuantizer

    if options.mode == "static" and ranges is None:
        raise QuantizationError("static quantization needs calibration ranges (see calibrate)")
    exclude = nodes_to_exclude(src, options, exclude)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp:
        with quiet_loggers("optimum.onnxruntime.quantization", "optimum", ""), contextlib.redirect_stdout(io.StringIO()):
            quantizer = ORTQuantizer(Path(src))
            quantizer.quantize(quantization_config(options, exclude), save_dir=tmp, file_suffix=None,
                               calibration_tensors_range=ranges)
        out = Path(tmp) / f"{Path(src).stem}.onnx"
        if not out.is_file():
            raise QuantizationError(f"ORTQuantizer wrote no {out.name} for {src}")
        if options.per_row_embeddings():
            quantize_embedding_rows(out, out, exclude=set(exclude), min_elements=options.embedding_min_elements,
                                    skip_heads=not options.quantize_heads)
        shutil.move(str(out), str(dst))
    return dst


# ---- per-row INT8 embedding tables -------------------------------------------------------------------------
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


def integer_op_counts(path: Path) -> dict[str, int]:
    """Counts of integer-compute ops, ``DynamicQuantizeLinear`` and QDQ MatMuls (``qdq_matmul``) in a graph."""
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
    return {k: int(v) for k, v in counts.items() if v}


def integer_matmuls(counts: Mapping[str, int]) -> int:
    """MatMuls that run in integer arithmetic (directly, or QDQ-wrapped for ORT to fuse at load)."""
    return sum(counts.get(k, 0) for k in ("MatMulInteger", "QAttention", "QLinearMatMul", "DynamicQuantizeMatMul",
                                          "MatMulIntegerToFloat", "qdq_matmul", "QGemm"))


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
        elif HEAD_SCOPE in node.name and not options.quantize_heads:
            why = "task head (quantize_heads: false; tiny, writes the logits)"
        elif table and options.embedding == "per_row" and elements < options.embedding_min_elements:
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


# ---- sensitivity -------------------------------------------------------------------------------------------
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


# ---- accuracy-aware loop -----------------------------------------------------------------------------------
def relative_drop(reference: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse ``value`` is than ``reference``, relative to |reference| (absolute when it is 0)."""
    worse = (reference - value) if higher_is_better else (value - reference)
    return worse / abs(reference) if reference else worse


@dataclass
class Attempt:
    iteration: int  # 0: everything quantizable quantized; i > 0: i-th fallback
    excluded: list[str]  # nodes moved back to fp32 by the fallback (user exclusions not listed)
    metrics: dict[str, float]
    drops: dict[str, float]
    failing: list[str]
    integer_ops: dict[str, int]


@dataclass
class QuantizeOutcome:
    path: Path  # the kept quantized graph
    passed: bool
    attempts: list[Attempt]
    kept: int  # index into attempts
    reference: dict[str, float]
    tolerances: dict[str, float]
    ranking: list[tuple[str, float]] = field(default_factory=list)
    fp32: list[dict[str, Any]] = field(default_factory=list)  # nodes left fp32 in the kept graph, and why

    @property
    def final(self) -> Attempt:
        return self.attempts[self.kept]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "kept_iteration": self.final.iteration, "reference": self.reference,
            "tolerances": self.tolerances, "attempts": [asdict(a) for a in self.attempts],
            "fallback_nodes": self.final.excluded, "integer_ops": self.final.integer_ops,
            "sensitivity_top": [[n, round(s, 6)] for n, s in self.ranking[:20]],
            "fp32_nodes": self.fp32,
        }


def quantize_accuracy_aware(
    source: Path,
    out: Path,
    options: QuantOptions,
    evaluate: Callable[[Path], Mapping[str, float]],
    reference: Mapping[str, float],
    tolerances: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    batches: Sequence[Mapping[str, np.ndarray]],
    max_iterations: int = 5,
    step: int = 2,
    ranges: Any = None,
) -> QuantizeOutcome:
    """Quantize ``source`` (prepared by :func:`prepare_source`) into ``out``, falling back node by node.

    Args:
        evaluate: quantized graph path -> {task: primary metric}.
        reference: {task: metric of the fp32 graph}; a task passes when ``relative_drop <= tolerance``.
        batches: graph feeds for sensitivity ranking (calibration batches).
        max_iterations: fallback rounds after the first attempt; round ``i`` keeps the ``step * 2**(i-1)`` most
            sensitive nodes in fp32 (doubling, so a deep encoder is covered in a few rounds).
        ranges: calibration ranges (static mode).

    Returns the outcome; ``out`` holds the first graph that passes, or, if none does, the attempt with the
    fewest failing tasks (then the smallest worst excess of a drop over its tolerance).
    """
    workdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=".quantize-"))
    try:
        attempts: list[Attempt] = []
        files: list[Path] = []
        ranking: list[tuple[str, float]] = []
        fallback: list[str] = []
        for iteration in range(max_iterations + 1):
            path = workdir / f"attempt{iteration}.onnx"
            quantize_graph(source, path, options, fallback, ranges)
            counts = integer_op_counts(path)
            if iteration == 0 and integer_matmuls(counts) == 0:
                raise QuantizationError(f"{source}: quantization produced no integer MatMul (op types "
                                        f"{options.ops()}, {len(nodes_to_exclude(source, options))} node(s) "
                                        "excluded)")
            metrics = {k: float(v) for k, v in evaluate(path).items()}
            drops = {t: relative_drop(reference[t], metrics[t], higher_is_better.get(t, True)) for t in metrics}
            failing = [t for t, d in drops.items() if d > tolerances.get(t, 0.0) + 1e-12]
            attempts.append(Attempt(iteration, list(fallback), metrics, drops, failing, counts))
            files.append(path)
            if not failing:
                break
            if iteration == 0:
                ranking = node_sensitivity(source, path, quantized_nodes(source, path, options), batches)
            if len(fallback) >= len(ranking):
                break  # everything quantizable is fp32 already: more rounds cannot help
            fallback = [n for n, _ in ranking[: min(len(ranking), step * 2**iteration)]]
        passed = not attempts[-1].failing
        def shortfall(a: Attempt) -> tuple[int, float]:
            return len(a.failing), max((d - tolerances.get(t, 0.0) for t, d in a.drops.items()), default=0.0)

        kept = len(attempts) - 1 if passed else min(range(len(attempts)), key=lambda i: shortfall(attempts[i]))
        fp32 = fp32_nodes(source, files[kept], options, attempts[kept].excluded, dict(ranking))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(files[kept]), str(out))
        return QuantizeOutcome(out, passed, attempts, kept, dict(reference), dict(tolerances), ranking, fp32)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
