"""``compressor benchmark``: a finished run's teacher and student side by side, measured in one process.

Rows: (a) the fp32 teacher in PyTorch, (b) the same teacher exported to ONNX Runtime, (c) that graph after the
usual optimum dynamic INT8 quantization, (d) single-task students (when given), (e) the run's multi-head student
as fp32 and INT8 graphs. Each row gets its test metric per task, size on disk, parameters, batch-1 latency
(dummy full-length inputs and real test inputs) and batch throughput, at each thread count, plus ratios
against (a) and (c) and the product's targets (P1-P3) checked on the measured numbers.

Entry point: :func:`compressor.bench.benchmark.run_benchmark`.
"""
