"""``compressor benchmark RUN --out reports/benchmark``: the run's teacher and student side by side.

Only typer here; the benchmark (torch, onnxruntime, optimum) is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_OUT = Path("reports/benchmark")


def benchmark(
    run: Annotated[Path, typer.Argument(help="A finished run directory: a teacher (train/load stage) and a "
                                             "student chain ending in export/quantize.")],
    out: Annotated[Path, typer.Option("--out", help="Report path without extension: writes <out>.md, <out>.json, "
                                      "<out>-metric-vs-latency.png and <out>-metric-vs-size.png.")] = DEFAULT_OUT,
    singles: Annotated[Optional[list[Path]], typer.Option("--single", help="Run or model directory of a "
                                                          "single-task student (repeatable; row d).")] = None,
    threads: Annotated[Optional[list[int]], typer.Option("--threads", min=1, help="Intra-op thread count "
                                                         "(repeatable; default: 1 and all physical cores).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the throughput measurements.")] = 32,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per batch-1 latency (at least).")] = 20,
    min_seconds: Annotated[float, typer.Option("--min-seconds", min=0, help="Each batch-1 latency is the median "
                                               "of runs spanning at least this long (0: exactly --runs).")] = 3.0,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Tokens of the dummy latency inputs.")] = 128,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Real test inputs per task for real-length "
                                         "latency and throughput.")] = 100,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Data root (default: the run's "
                                                      "recipe, $COMPRESSOR_DATA_ROOT, then ../shared/data).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the benchmark (rows, targets, paths) as JSON on "
                                           "stdout; progress goes to stderr.")] = False,
) -> None:
    """Measure (a) the fp32 teacher in PyTorch, (b) in ONNX Runtime, (c) with optimum dynamic INT8, (d) single-task
    students and (e) the run's multi-head student (fp32 and INT8) on the same data and machine."""
    import json

    from compressor.bench.benchmark import run_benchmark
    from compressor.cli.output import emit_json, stdout_to_stderr

    with stdout_to_stderr(json_out):
        paths = run_benchmark(run, out, singles=singles or [], threads=threads or None, batch=batch, runs=runs,
                              seq_len=seq_len, samples=samples, data_root=data_root, min_seconds=min_seconds)
    result = json.loads(paths["json"].read_text())
    if json_out:
        emit_json({"paths": {k: str(v) for k, v in paths.items()}, "benchmark": result})
        return
    for t in result["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        typer.echo(f"{state}: {t['target']}: {t['detail']}")
    typer.echo(f"wrote {paths['markdown']}, {paths['json']}, {paths['latency_plot']} and {paths['size_plot']}")
