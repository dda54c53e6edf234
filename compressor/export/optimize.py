"""ONNX Runtime graph optimisation of an exported graph, each candidate checked before it is kept.

First choice: the transformer fusions of ``onnxruntime.transformers.optimizer`` (model type ``bert``; head count
and hidden size detected per attention node, which is what pruned encoders with different head counts per
layer need). If the fused graph fails the parity check (or fusion raises), the fallback is ONNX Runtime's
basic, hardware-independent graph optimisation (constant folding, redundant-node elimination); if that fails
too, no optimised graph is written and the raw export is used (the notes say why). An optimiser that fails because
the environment refused a write (disk full, permissions: :func:`compressor.errors.os_failure`) fails the stage
instead: its graph would be missing for a reason that has nothing to do with the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from compressor.errors import os_failure
from compressor.export.parity import ParityReport

#: fused operators worth reporting (the optimizer lists many that never occur in encoders)
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


@dataclass
class OptimizeResult:
    path: Path | None  # the optimised graph that passed parity, or None
    level: str | None  # "transformer-fusions" | "basic" | None
    fused: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parity: ParityReport | None = None


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Silence (below ERROR) the named loggers for the duration; onnxruntime/optimum log per node."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def fuse_transformer(src: Path, dst: Path, embed_layer_norm: bool = True) -> dict[str, int]:
    """ORT transformer fusions of a BERT-family graph; returns fused-operator counts (only non-zero ones).

    ``embed_layer_norm=False`` leaves the embedding lookups as plain ``Gather`` nodes (no
    ``EmbedLayerNormalization``), so the word-embedding table can be quantized per row (see
    :func:`compressor.export.quantize.quantize_embedding_rows`); attention and the other fusions still apply.

    The residual ``Add`` + ``LayerNormalization`` pairs are never fused into ``SkipLayerNormalization``: ONNX
    Runtime's fp32 CPU kernel of that operator took 3-7x the time of the two plain operators it replaces
    (onnxruntime 1.32, 384 wide, sequence 128, batch 1 and 8, 1 and 2 threads), a quarter of an INT8 student's
    latency. :func:`compressor.runtime.session.make_session` keeps ONNX Runtime from fusing them at load time.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = embed_layer_norm
    options.enable_skip_layer_norm = False
    # the fusion code logs per-node warnings (e.g. "hidden size differs" for pruned layers) that parity covers
    with quiet_loggers("onnxruntime.transformers", "fusion_base", "onnx_model", ""):
        optimized = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, use_gpu=False,
                                   optimization_options=options)
        stats = optimized.get_fused_operator_statistics()
        optimized.save_model_to_file(str(dst))
    return {k: int(v) for k, v in stats.items() if v and k in FUSED_OPS}


def basic_optimize(src: Path, dst: Path) -> None:
    """ONNX Runtime's basic (hardware-independent) graph optimisations, saved to ``dst``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])


def optimize_checked(src: Path, dst: Path, check: Callable[[Path], ParityReport]) -> OptimizeResult:
    """Write an optimised ``dst`` that passes ``check``, trying fusions, then basic optimisation."""
    def basic() -> dict[str, int]:
        basic_optimize(src, dst)
        return {}

    notes: list[str] = []
    attempts: list[tuple[str, Callable[[], dict[str, int]]]] = [
        ("transformer-fusions", lambda: fuse_transformer(src, dst)),
        ("basic", basic),
    ]
    for level, attempt in attempts:
        try:
            fused = attempt()
        except Exception as exc:  # noqa: BLE001 - a failing optimiser only costs the optimisation ...
            dst.unlink(missing_ok=True)
            if os_failure(exc) is not None:  # ... but a full disk or a refused write fails the stage
                if isinstance(exc, OSError) and exc.filename is None:
                    exc.filename = str(dst)
                raise
            notes.append(f"{level} optimisation raised {type(exc).__name__}: {exc}; not used")
            continue
        report = check(dst)
        bad = report.failures()
        if not bad:
            return OptimizeResult(dst, level, fused, notes, report)
        worst = max(bad, key=lambda o: o.max_excess)
        notes.append(f"{level} optimisation failed parity on '{worst.output}' (max |diff| {worst.max_abs:.3g}, "
                     f"atol {worst.atol:g}); not used")
        dst.unlink(missing_ok=True)
    return OptimizeResult(None, None, {}, notes)


def describe(result: OptimizeResult) -> dict[str, Any]:
    return {"level": result.level, "fused": result.fused, "notes": result.notes}
