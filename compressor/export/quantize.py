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

The pieces live in ``quant_graph`` (options, preparation, calibration, ``ORTQuantizer``), ``embedding_rows``
(per-row INT8 tables), ``quant_nodes`` (integer-op counts, fp32 nodes, sensitivity) and ``quant_fallback`` (the
accuracy-aware loop); this module is the one place to import them from.
"""

from compressor.export.embedding_rows import (EMBED_MIN_ELEMENTS, HEAD_SCOPE, RowQuantized, embedding_tables,
                                              quantize_embedding_rows)
from compressor.export.quant_fallback import Attempt, QuantizeOutcome, quantize_accuracy_aware, relative_drop
from compressor.export.quant_graph import (DEFAULT_OP_TYPES, INTEGER_OPS, Embedding, Method, Mode,
                                           QuantizationError, QuantOptions, Target, calibrate, nodes_to_exclude,
                                           prepare_source, quantization_config, quantize_graph, quantized_nodes)
from compressor.export.quant_nodes import fp32_nodes, integer_matmuls, integer_op_counts, node_sensitivity

__all__ = [
    "DEFAULT_OP_TYPES", "EMBED_MIN_ELEMENTS", "HEAD_SCOPE", "INTEGER_OPS", "Attempt", "Embedding", "Method", "Mode",
    "QuantOptions", "QuantizationError", "QuantizeOutcome", "RowQuantized", "Target", "calibrate",
    "embedding_tables", "fp32_nodes", "integer_matmuls", "integer_op_counts", "node_sensitivity",
    "nodes_to_exclude", "prepare_source", "quantization_config", "quantize_accuracy_aware", "quantize_embedding_rows",
    "quantize_graph", "quantized_nodes", "relative_drop",
]
