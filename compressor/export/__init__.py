"""Export a multi-task model to ONE ONNX graph, check it against PyTorch, optimise, quantize and bundle it.

Modules: ``onnx_export`` (graph contract + TorchScript export), ``parity`` (numeric checks on real batches),
``optimize`` (ONNX Runtime transformer fusions with a checked fallback), ``evaluate`` (task metrics and latency
through ONNX Runtime), ``quantize`` (dynamic / static INT8, accuracy-aware fallback) and ``bundle`` (the edge
bundle the torch-free ``compressor.runtime`` loads). Importing this package imports nothing heavy.
"""
