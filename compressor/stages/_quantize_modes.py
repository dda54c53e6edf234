"""Graph-level helpers of the ``quantize`` stage: the source graph with unfused embeddings, choosing a mode.

:func:`unfused_embedding_source` re-fuses the raw export without ``EmbedLayerNormalization`` (checked against
the fused graph) so the word-embedding table can be quantized per row or per block; :func:`choose_mode` picks
between the dynamic and static results when both were tried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def has_op(path: Path, op_type: str) -> bool:
    """Whether the ONNX graph at ``path`` has a node of ``op_type`` (external data not loaded)."""
    import onnx

    return any(n.op_type == op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def unfused_embedding_source(raw: Path, fused: Path, dst: Path, spec: Any, feeds: list[dict[str, Any]],
                             threads: int) -> tuple[Path, str]:
    """The raw export fused again with every fusion but ``EmbedLayerNormalization``, kept when its outputs match
    the fused graph's on ``feeds`` (atol of each output + 1e-3 relative); else the raw export. Returns
    (the graph, a note)."""
    import numpy as np

    from compressor.export.optimize import fuse_transformer
    from compressor.runtime.session import make_session

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        fuse_transformer(raw, dst, embed_layer_norm=False)
    except Exception as exc:  # noqa: BLE001 - a failing fusion only costs speed: the raw graph is exact ...
        from compressor.errors import os_failure

        if os_failure(exc) is not None:  # ... but a full disk or a refused write fails the stage
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(dst)
            raise
        return raw, (f"fusion without EmbedLayerNormalization raised {type(exc).__name__}: {exc}; quantizing the "
                     "unfused export so the embedding table can be quantized per row or per block")
    a, b = make_session(fused, threads), make_session(dst, threads)
    atol = {g: task.atol[o] for task in spec.tasks.values() for o, g in task.outputs.items()}
    names = [o.name for o in a.get_outputs()]
    worst = 0.0
    for f in feeds:
        for n, x, y in zip(names, a.run(names, f), b.run(names, f)):
            excess = np.abs(x - y) - (atol.get(n, 1e-4) + 1e-3 * np.abs(x))
            worst = max(worst, float(excess.max()) if excess.size else 0.0)
    if worst > 0:
        return raw, ("the graph fused without EmbedLayerNormalization disagreed with the fused export; quantizing "
                     "the unfused export so the embedding table can be quantized per row or per block")
    return dst, ("quantized the export fused without EmbedLayerNormalization (attention and layer-norm fusions "
                 "kept; outputs checked against the fused graph), so the embedding tables are quantized per row or "
                 "per block")


def choose_mode(results: dict[str, dict[str, Any]], spec: Any, threads: int, report: Any) -> tuple[str, dict[str, Any]]:
    """The mode to keep when both were tried: among those within every tolerance the one with the lower ORT p50
    latency (batch 1, the report's sequence length); when neither is within tolerance, the one with fewer failing
    tasks, then the smaller worst excess. Returns (mode, what was measured per mode)."""
    from compressor.measure import ort_latency_ms
    from compressor.runtime.session import latency_inputs, make_session

    feeds = latency_inputs(spec, int(spec.metadata.get("vocab_size", 30522)), report.latency_seq_len)
    compared: dict[str, Any] = {}
    for mode, r in results.items():
        outcome = r["outcome"]
        lat = ort_latency_ms(make_session(outcome.path, threads), feeds, max(report.latency_runs, 10),
                             max(report.latency_warmup, 2))
        final = outcome.final
        excess = max((d - r["tolerances"].get(t, 0.0) for t, d in final.drops.items()), default=0.0)
        compared[mode] = {"passed": outcome.passed, "metrics": final.metrics, "drops": final.drops,
                          "failing": final.failing, "fallback_nodes": len(final.excluded),
                          "latency_ms_p50": lat["p50"], "size_bytes": outcome.path.stat().st_size,
                          "_key": (0, lat["p50"]) if outcome.passed else (1, len(final.failing), excess)}
    chosen = min(compared, key=lambda m: compared[m]["_key"])
    for entry in compared.values():
        del entry["_key"]
    compared["chosen"] = chosen
    compared["rule"] = ("faster of the modes within every tolerance" if compared[chosen]["passed"]
                        else "no mode within every tolerance: fewest failing tasks")
    return chosen, compared
