"""The teacher's reference graphs: what a user gets without compressor.

* (b) the teacher's checked ONNX export (:func:`compressor.export.checked.export_checked`), fp32;
* (c) optimum's dynamic INT8 of (b), as one call of ``ORTQuantizer`` with
  ``AutoQuantizationConfig.<cpu>(is_static=False, per_channel=False)`` gives it: optimum's default dynamic
  operators on every node (heads included), no accuracy loop, no per-row embedding tables.

The ``reference`` stage writes both into a run; ``compressor benchmark`` measures them beside the student (and
builds them in a temporary directory through this same module for a run without the stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("avx512_vnni", "avx2", "arm64")


def cpu_target() -> str:
    """optimum's ``AutoQuantizationConfig`` preset for this CPU: avx512_vnni, avx2 or arm64."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx512_vnni" if "avx512_vnni" in line.split() else "avx2"
    except OSError:
        pass
    return "avx2"


def optimum_int8_options(target: str) -> Any:
    """What a user gets from ``AutoQuantizationConfig.<target>(is_static=False, per_channel=False)`` with
    ``ORTQuantizer``: optimum's default dynamic operators, every node (heads included)."""
    from optimum.onnxruntime.configuration import ORT_DEFAULT_OPS_DYNAMIC_QUANTIZATION

    from compressor.export.quantize import QuantOptions

    return QuantOptions(mode="dynamic", target=target, per_channel=False,  # type: ignore[arg-type]
                        op_types=list(ORT_DEFAULT_OPS_DYNAMIC_QUANTIZATION), quantize_heads=True)


def optimum_int8(src: Path, workdir: Path, target: str) -> tuple[Path, int, list[str]]:
    """optimum dynamic INT8 of ``src`` (no accuracy loop) as ``workdir/model.int8.onnx``; returns the graph, its
    integer MatMuls and notes. ``QuantizationError`` when no MatMul came out integer."""
    from compressor.export.quantize import (
        QuantizationError, integer_matmuls, integer_op_counts, prepare_source, quantize_graph,
    )

    options = optimum_int8_options(target)
    prepared = prepare_source(src, workdir / "src" / "model.onnx")
    out = quantize_graph(prepared, workdir / "model.int8.onnx", options)
    n = integer_matmuls(integer_op_counts(out))
    if n == 0:
        raise QuantizationError(f"{src}: optimum dynamic quantization produced no integer MatMul")
    return out, n, [f"optimum ORTQuantizer, AutoQuantizationConfig.{target}(is_static=False, per_channel=False), "
                    f"operators {options.ops()}; {n} integer MatMul(s)"]


def export_notes(checked: Any) -> list[str]:
    """One line per fact of a :class:`~compressor.export.checked.CheckedExport`: parity, fusions, which graph."""
    worst = max(checked.parity.outputs.values(), key=lambda o: o.max_abs)
    notes = [f"parity with PyTorch: max |diff| {worst.max_abs:.2g} ({worst.output})"]
    if checked.optimized is not None:
        notes += checked.optimized.notes
    if checked.optimized_path is None:
        notes.append("no optimised graph passed parity: the raw export is measured")
    else:
        notes.append(f"optimised: {checked.optimized.level} (fused: {checked.fused}), parity checked")
    return notes


@dataclass
class ReferenceGraphs:
    """(b) and (c) of one teacher, with what was done to make them."""

    onnx: Path  # (b): the optimised export when it passed parity, else the raw one
    int8: Path  # (c)
    int8_matmuls: int
    target: str
    onnx_notes: list[str] = field(default_factory=list)
    int8_notes: list[str] = field(default_factory=list)


def build_reference_graphs(model: Any, spec: Any, batches: Any, workdir: Path, threads: int,
                           target: str | None = None) -> ReferenceGraphs:
    """Export ``model`` (parity-checked on ``batches``) into ``workdir/b`` and quantize it the way optimum does
    by default into ``workdir/c``. ``target``: optimum's preset (default: this CPU's)."""
    from compressor.export.checked import export_checked

    target = target or cpu_target()
    checked = export_checked(model, spec, batches, workdir / "b", threads)
    int8, n, int8_notes = optimum_int8(checked.graph, workdir / "c", target)
    return ReferenceGraphs(checked.graph, int8, n, target, export_notes(checked), int8_notes)
