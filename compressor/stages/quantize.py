"""The ``quantize`` stage: INT8 of the export stage's graph, accuracy-aware, evaluated with ONNX Runtime.

Artefacts (``ctx.out_dir``): ``model.int8.onnx``, ``graph.json`` (the contract, with the quantization recorded)
and ``quantization.json`` (every attempt: fallback nodes, metrics, drops, integer-op counts; sensitivity top).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from compressor.errors import ModelDirError, RecipeError
from compressor.fsutil import atomic_write_text
from compressor.recipe import QuantizeStage
from compressor.rundir import OnnxGraph
from compressor.stages import StageContext, StageResult


def plugins_from_manifest(model_dir: Path) -> dict[str, Any]:
    """The task plugins of a model directory (labels and options from its manifest), bound to each other."""
    from compressor.errors import CompressorError
    from compressor.model.io import read_manifest
    from compressor.tasks import build_task

    manifest = read_manifest(model_dir)
    tasks = {}
    for t in manifest["tasks"]:
        try:
            tasks[t["name"]] = build_task(t["plugin"], t["name"], t["labels"], t["options"])
        except CompressorError as exc:
            raise ModelDirError(f"{model_dir}: task '{t.get('name')}': {exc}") from exc
    for task in tasks.values():
        task.bind(tasks)
    return tasks


def searched_mode(ctx: StageContext) -> str:
    """The INT8 mode (dynamic / static) the latest earlier search stage chose; a ``RecipeError`` when there is
    none or it chose the fp32 graph."""
    cfg: QuantizeStage = ctx.stage
    search = next((s for s in reversed(ctx.recipe.stages[: ctx.index]) if s.kind == "search"), None)
    if search is None:
        raise RecipeError(f"stage '{cfg.name}': mode 'search' needs a search stage before it")
    chosen = (ctx.outputs.get(search.name) or {}).get("int8")
    if chosen not in ("dynamic", "static"):
        raise RecipeError(f"stage '{cfg.name}': search stage '{search.name}' chose INT8 mode {chosen!r} (the fp32 "
                          "graph): drop this quantize stage, or give mode dynamic or static")
    return chosen


def run(ctx: StageContext) -> StageResult:
    import torch
    from transformers import AutoTokenizer

    from compressor.export.evaluate import calibration_feeds, evaluate_split, onnx_rows
    from compressor.export.quantize import (
        QuantizationError, QuantOptions, calibrate, integer_matmuls, prepare_source, quantize_accuracy_aware,
    )
    from compressor.runtime.session import OrtForward, make_session
    from compressor.runtime.spec import GraphSpec

    cfg: QuantizeStage = ctx.stage
    source_name, export = ctx.latest(OnnxGraph, cfg.source)
    spec = GraphSpec.read(export.spec)
    unknown = sorted(set(cfg.tolerances) - set(spec.tasks))
    if unknown:
        raise RecipeError(f"stage '{cfg.name}': tolerances name unknown task(s) {unknown}; tasks: {list(spec.tasks)}")
    model_dir = export.model_dir
    plugins = plugins_from_manifest(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    threads = ctx.recipe.report.threads or torch.get_num_threads()
    def options_for(mode: str) -> Any:
        return QuantOptions(
            mode=mode, target=cfg.target, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
            op_types=cfg.op_types, exclude_op_types=list(cfg.exclude_op_types),
            exclude_nodes=list(cfg.exclude_nodes), quantize_heads=cfg.quantize_heads,
            calibration=cfg.calibration.method, percentile=cfg.calibration.percentile,
            num_bins=cfg.calibration.num_bins, embedding=cfg.embedding,
        )

    eval_split = {}
    for name in spec.tasks:
        other = "test" if cfg.eval_split == "dev" else "dev"
        split = next((s for s in (cfg.eval_split, other) if ctx.data.has(name, s)), None)
        if split is not None:
            eval_split[name] = split

    def evaluate(path: Path) -> dict[str, float]:
        forward = OrtForward(make_session(path, threads), spec)
        out = {}
        for name, split in eval_split.items():
            metrics = evaluate_split(forward, plugins, ctx.data, tokenizer, spec.max_length, split, [name],
                                     cfg.eval_batch_size)
            out[name] = metrics[name][plugins[name].metric.name]
        return out

    feeds = calibration_feeds(spec, plugins, ctx.data, tokenizer, cfg.calibration.split, cfg.calibration.samples,
                              cfg.calibration.batch_size)
    per_task = max(1, cfg.sensitivity_batches)
    sensitivity = feeds[:: max(1, len(feeds) // (per_task * max(1, len(spec.tasks))))]

    def quantize(mode: str, out: Path, tmp: Path) -> dict[str, Any]:
        """One mode, accuracy-aware, into ``out``."""
        options = options_for(mode)
        # static QDQ wants every MatMul visible (fused Attention hides the projections); dynamic works best fused
        source = export_source = export.onnx if mode == "dynamic" else export.raw
        notes: list[str] = []
        if options.per_row_embeddings() and _has_op(source, "EmbedLayerNormalization"):
            # the fused embedding op hides the word-embedding lookup: fuse again without it (checked)
            source, line = _unfused_embedding_source(export.raw, source, tmp / "rows" / "model.onnx",
                                                     spec, sensitivity, threads)
            notes.append(line)
        reference = evaluate(source)
        tolerances = {t: cfg.tolerances.get(t, cfg.tolerance) for t in reference}
        prepared = prepare_source(source, tmp / "src" / "model.onnx")
        ranges = calibrate(prepared, feeds, options, tmp) if mode == "static" else None
        outcome = quantize_accuracy_aware(
            prepared, out, options, evaluate, reference, tolerances,
            {t: plugins[t].metric.higher_is_better for t in reference}, sensitivity,
            max_iterations=cfg.max_iterations, step=cfg.fallback_step, ranges=ranges,
        )
        return {"mode": mode, "outcome": outcome, "options": options, "source": export_source, "notes": notes,
                "tolerances": tolerances}

    compared: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".quantize-") as tmp_str:
        tmp = Path(tmp_str)
        requested = searched_mode(ctx) if cfg.mode == "search" else cfg.mode
        modes = ["dynamic", "static"] if requested == "auto" else [requested]
        results = {}
        for mode in modes:
            (tmp / mode).mkdir()
            results[mode] = quantize(mode, tmp / mode / "model.int8.onnx", tmp / mode)
        if len(results) > 1:
            chosen, compared = _choose_mode(results, spec, threads, ctx.recipe.report)
        else:
            chosen = modes[0]
        picked = results[chosen]
        shutil.move(str(picked["outcome"].path), str(ctx.out_dir / "model.int8.onnx"))
        picked["outcome"].path = ctx.out_dir / "model.int8.onnx"
    outcome, options, source_notes = picked["outcome"], picked["options"], picked["notes"]
    export_source, tolerances, mode = picked["source"], picked["tolerances"], chosen
    if cfg.mode == "search":
        source_notes = [f"mode {mode}: the INT8 mode the search's trials were measured with", *source_notes]

    final = outcome.final
    n_int = integer_matmuls(final.integer_ops)
    summary = {
        "mode": mode, "requested_mode": cfg.mode, "compared": compared, "target": cfg.target, "per_channel": cfg.per_channel, "source": str(export_source),
        "embedding": cfg.embedding, "source_notes": source_notes,
        "source_stage": source_name, "op_types": options.ops(), "eval_split": eval_split,
        "calibration": cfg.calibration.model_dump() if mode == "static" else None,
        "integer_matmuls": n_int, **outcome.to_json(),
    }
    atomic_write_text(ctx.out_dir / "quantization.json", json.dumps(summary, indent=2))
    spec.metadata["quantization"] = {k: summary[k] for k in ("mode", "target", "per_channel", "integer_matmuls",
                                                             "passed", "fallback_nodes", "op_types", "embedding")}
    spec.metadata["graph_file"] = "model.int8.onnx"
    spec.write(ctx.out_dir / "graph.json")

    int8_tables = final.integer_ops.get("int8_gather", 0)
    notes = [f"{mode} INT8 ({cfg.target}{', per-channel' if cfg.per_channel else ''}): {n_int} integer "
             f"MatMul(s), {int8_tables} INT8 embedding table lookup(s) ({cfg.embedding}); {len(final.excluded)} "
             f"node(s) moved back to fp32 after {len(outcome.attempts) - 1} fallback round(s)", *source_notes]
    if compared:
        notes.append("static vs dynamic: " + "; ".join(
            f"{m}: p50 {c['latency_ms_p50']:.2f} ms, {'within' if c['passed'] else 'OVER'} tolerance, "
            f"{c['size_bytes'] / 1e6:.2f} MB" for m, c in compared.items() if isinstance(c, dict))
            + f"; kept {mode} ({compared['rule']})")
    if outcome.fp32:
        reasons: dict[str, list[str]] = {}
        for entry in outcome.fp32:
            reasons.setdefault(entry["reason"], []).append(entry["node"])
        notes.append("left fp32: " + "; ".join(
            f"{len(nodes)} node(s): {why} ({', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})"
            for why, nodes in reasons.items()))
    if n_int == 0:
        notes.append("WARNING: the kept graph has no integer MatMul: every quantizable node fell back to fp32")
    drops = ", ".join(f"{t} {final.metrics[t]:.4f} vs fp32 {outcome.reference[t]:.4f} "
                      f"(drop {100 * final.drops[t]:.2f}% / tol {100 * tolerances[t]:.2f}%)" for t in final.metrics)
    if outcome.passed:
        notes.append(f"every task within tolerance on its {cfg.eval_split} split: {drops}")
    else:
        msg = (f"quantization missed the tolerance of task(s) {', '.join(final.failing)} after "
               f"{len(outcome.attempts) - 1} fallback round(s) (max_iterations {cfg.max_iterations}): {drops}")
        if cfg.on_failure == "error":
            raise QuantizationError(f"stage '{cfg.name}': {msg}")
        notes.append(f"WARNING: {msg}; kept attempt {final.iteration}")
        ctx.reporter.notes.append(f"stage '{cfg.name}': {msg}")

    ctx.reporter.extend(onnx_rows(
        ctx.out_dir / "model.int8.onnx", spec, plugins, ctx.data, tokenizer, label=cfg.name, stage=cfg.name,
        fmt="onnx-int8", report=ctx.recipe.report, threads=threads, batch_size=cfg.eval_batch_size,
        extra={"quantization": mode, "integer_matmuls": n_int, "within_tolerance": outcome.passed},
    ))
    outputs = {
        "fp32_nodes": outcome.fp32,
        "onnx": str(ctx.final_dir / "model.int8.onnx"),
        "graph": str(ctx.final_dir / "graph.json"),
        "model_dir": str(model_dir),
        "mode": mode,
        "compared": compared,
        "passed": outcome.passed,
        "integer_ops": final.integer_ops,
        "integer_matmuls": n_int,
        "fallback_nodes": final.excluded,
        "attempts": len(outcome.attempts),
        "failing": final.failing,
    }
    return StageResult(outputs=outputs, notes=notes)


def _has_op(path: Path, op_type: str) -> bool:
    import onnx

    return any(n.op_type == op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _unfused_embedding_source(raw: Path, fused: Path, dst: Path, spec: Any, feeds: list[dict[str, Any]],
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
    except Exception as exc:  # noqa: BLE001 - a failing fusion only costs speed: the raw graph is exact
        return raw, (f"fusion without EmbedLayerNormalization raised {type(exc).__name__}: {exc}; quantizing the "
                     "unfused export so the embedding lookup can be INT8 per row")
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
                     "the unfused export so the embedding lookup can be INT8 per row")
    return dst, ("quantized the export fused without EmbedLayerNormalization (attention and layer-norm fusions "
                 "kept; outputs checked against the fused graph), so the embedding lookups are INT8 per row")


def _choose_mode(results: dict[str, dict[str, Any]], spec: Any, threads: int, report: Any) -> tuple[str, dict[str, Any]]:
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
