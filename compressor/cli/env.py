"""``compressor env``: what a bug report or a benchmark needs to know about this machine: versions of compressor
and its main dependencies, CPU model, cores and instruction-set flags (avx2, avx512, vnni, bf16, amx), thread
settings, ONNX Runtime's execution providers and the GPUs, if any."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def env(json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of lines.")] = False) -> None:
    """Print versions, threads, CPU flags, ONNX Runtime providers and GPUs (paste it into bug reports)."""
    from compressor.report.machine import describe_environment

    info = describe_environment()
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"python: {info['python']} ({info['platform']})")
    for name, version in info["packages"].items():
        typer.echo(f"{name}: {version or 'not installed'}")
    cpu = info["cpu"]
    typer.echo(f"cpu: {cpu['model']}; {cpu['physical_cores']} physical / {cpu['logical_cores']} logical cores, "
               f"{cpu['usable_cores']} usable")
    typer.echo(f"cpu flags: {' '.join(cpu['flags']) or 'none of the tracked ones'}")
    typer.echo("threads: " + ", ".join(f"{k}={v}" for k, v in info["threads"].items() if v is not None))
    ort = info["onnxruntime"]
    typer.echo(f"onnxruntime providers: {', '.join(ort['providers']) if ort else 'onnxruntime not installed'}")
    gpus = info["gpus"]
    typer.echo("gpu: " + ("; ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) if gpus else "none"))
