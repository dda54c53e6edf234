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

from compressor.console import progress
from compressor.errors import ModelDirError, RecipeError
from compressor.fsutil import atomic_write_text, portable
from compressor.recipe import QuantizeStage
from compressor.rundir import OnnxGraph
from compressor.stages import StageContext, StageResult
from compressor.stages._quantize_modes import choose_mode, has_op, unfused_embedding_source


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


class _Job:
    """One quantize stage run's shared state: the export's graph and contract, task plugins, data and feeds."""

    def __init__(self, ctx: StageContext) -> None:
        """Read the export (checking the tolerances' task names), plugins, tokenizer and calibration feeds."""
        import torch
        from transformers import AutoTokenizer

        from compressor.export.evaluate import calibration_feeds
        from compressor.runtime.spec import GraphSpec

        self.ctx = ctx
        self.cfg: QuantizeStage = ctx.stage
        cfg = self.cfg
        self.source_name, self.export = ctx.latest(OnnxGraph, cfg.source)
        self.spec = spec = GraphSpec.read(self.export.spec)
        unknown = sorted(set(cfg.tolerances) - set(spec.tasks))
        if unknown:
            raise RecipeError(f"stage '{cfg.name}': tolerances name unknown task(s) {unknown}; tasks: {list(spec.tasks)}")
        self.model_dir = self.export.model_dir
        self.plugins = plugins_from_manifest(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), use_fast=True)
        self.threads = ctx.recipe.report.threads or torch.get_num_threads()
        self.eval_split = _eval_splits(ctx, cfg, spec)
        self.feeds = calibration_feeds(spec, self.plugins, ctx.data, self.tokenizer, cfg.calibration.split,
                                       cfg.calibration.samples, cfg.calibration.batch_size)
        per_task = max(1, cfg.sensitivity_batches)
        self.sensitivity = self.feeds[:: max(1, len(self.feeds) // (per_task * max(1, len(spec.tasks))))]
        self.predictions: dict[str, dict[str, list[Any]]] = {}  # graph path -> task -> one prediction per example
        self.tick: Any = lambda n=1, note=None: None  # the progress bar of the mode being quantized

    def evaluate(self, path: Path) -> dict[str, float]:
        """Every evaluated task's metric of the graph at ``path`` under ONNX Runtime (its predictions are kept for
        the bootstrap tolerance test)."""
        from compressor.export.evaluate import evaluate_split
        from compressor.runtime.session import OrtForward, make_session

        forward = OrtForward(make_session(path, self.threads), self.spec)
        out, kept = {}, {}
        for name, split in self.eval_split.items():
            metrics = evaluate_split(forward, self.plugins, self.ctx.data, self.tokenizer, self.spec.max_length,
                                     split, [name], self.cfg.eval_batch_size, kept)
            out[name] = metrics[name][self.plugins[name].metric.name]
        if self.cfg.tolerance_test == "bootstrap":
            self.predictions[str(path)] = kept
        self.tick(1, "graph evaluated")
        return out

    def intervals(self, reference: Path, path: Path) -> dict[str, Any]:
        """Task -> paired-bootstrap interval of the drop of ``path``'s metric below ``reference``'s (both
        evaluated by :meth:`evaluate` before)."""
        from compressor.significance import task_intervals

        cfg = self.cfg
        examples = {name: self.ctx.data.examples(name, split) for name, split in self.eval_split.items()}
        return task_intervals(self.plugins, examples, self.predictions[str(reference)], self.predictions[str(path)],
                              cfg.bootstrap_samples, cfg.confidence, self.ctx.recipe.seed)

    def quantize(self, mode: str, out: Path, tmp: Path) -> dict[str, Any]:
        """One mode, accuracy-aware, into ``out``."""
        from compressor.export.quantize import calibrate, prepare_source, quantize_accuracy_aware

        cfg, export = self.cfg, self.export
        options = _options(cfg, mode)
        # static QDQ wants every MatMul visible (fused Attention hides the projections); dynamic works best fused
        source = export_source = export.onnx if mode == "dynamic" else export.raw
        notes: list[str] = []
        if options.lookup_embeddings() and has_op(source, "EmbedLayerNormalization"):
            # the fused embedding op hides the word-embedding lookup: fuse again without it (checked)
            source, line = unfused_embedding_source(export.raw, source, tmp / "rows" / "model.onnx",
                                                    self.spec, self.sensitivity, self.threads)
            notes.append(line)
        reference = self.evaluate(source)
        tolerances = {t: cfg.tolerances.get(t, cfg.tolerance) for t in reference}
        prepared = prepare_source(source, tmp / "src" / "model.onnx")
        ranges = calibrate(prepared, self.feeds, options, tmp) if mode == "static" else None
        outcome = quantize_accuracy_aware(
            prepared, out, options, self.evaluate, reference, tolerances,
            {t: self.plugins[t].metric.higher_is_better for t in reference}, self.sensitivity,
            max_iterations=cfg.max_iterations, step=cfg.fallback_step, ranges=ranges, order=cfg.fallback_order,
            noise=(lambda path: self.intervals(source, path)) if cfg.tolerance_test == "bootstrap" else None,
        )
        return {"mode": mode, "outcome": outcome, "options": options, "source": export_source, "notes": notes,
                "tolerances": tolerances}

    def quantize_modes(self) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """Quantize in the requested mode(s), keep one as ``model.int8.onnx``; returns (its result, mode, compared)."""
        ctx, cfg = self.ctx, self.cfg
        compared: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".quantize-") as tmp_str:
            tmp = Path(tmp_str)
            requested = searched_mode(ctx) if cfg.mode == "search" else cfg.mode
            modes = ["dynamic", "static"] if requested == "auto" else [requested]
            results = {}
            for mode in modes:
                (tmp / mode).mkdir()
                # each accuracy-aware attempt is one graph evaluated (the fp32 reference first)
                with progress(f"{cfg.name}: INT8 {mode}, graphs evaluated") as self.tick:
                    results[mode] = self.quantize(mode, tmp / mode / "model.int8.onnx", tmp / mode)
                self.tick = lambda n=1, note=None: None
            if len(results) > 1:
                chosen, compared = choose_mode(results, self.spec, self.threads, ctx.recipe.report)
            else:
                chosen = modes[0]
            picked = results[chosen]
            shutil.move(str(picked["outcome"].path), str(ctx.out_dir / "model.int8.onnx"))
            picked["outcome"].path = ctx.out_dir / "model.int8.onnx"
        return picked, chosen, compared


def run(ctx: StageContext) -> StageResult:
    """Quantize the latest export to INT8 (accuracy-aware), write its artefacts, report rows and notes."""
    from compressor.export.evaluate import onnx_rows
    from compressor.export.quantize import integer_matmuls

    job = _Job(ctx)
    cfg, spec = job.cfg, job.spec
    picked, mode, compared = job.quantize_modes()
    outcome, source_notes = picked["outcome"], picked["notes"]
    if cfg.mode == "search":
        source_notes = [f"mode {mode}: the INT8 mode the search's trials were measured with", *source_notes]
    final = outcome.final
    n_int = integer_matmuls(final.integer_ops)
    _write_summary(job, picked, mode, compared, source_notes, n_int)
    notes = _notes(ctx, outcome, mode, compared, source_notes, n_int, picked["tolerances"])
    ctx.reporter.extend(onnx_rows(
        ctx.out_dir / "model.int8.onnx", spec, job.plugins, ctx.data, job.tokenizer, label=cfg.name, stage=cfg.name,
        fmt="onnx-int8", report=ctx.recipe.report, threads=job.threads, batch_size=cfg.eval_batch_size,
        extra={"quantization": mode, "integer_matmuls": n_int, "within_tolerance": outcome.passed},
    ))
    outputs = {
        "fp32_nodes": outcome.fp32,
        "onnx": str(ctx.final_dir / "model.int8.onnx"),
        "graph": str(ctx.final_dir / "graph.json"),
        "model_dir": str(job.model_dir),
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


def _options(cfg: QuantizeStage, mode: str) -> Any:
    """The quantizer options of the stage's configuration for one mode."""
    from compressor.export.matmul4 import NBitsGroup
    from compressor.export.quantize import QuantOptions

    return QuantOptions(
        mode=mode, target=cfg.target, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
        op_types=cfg.op_types, exclude_op_types=list(cfg.exclude_op_types),
        exclude_nodes=list(cfg.exclude_nodes), quantize_heads=cfg.quantize_heads,
        calibration=cfg.calibration.method, percentile=cfg.calibration.percentile,
        num_bins=cfg.calibration.num_bins, embedding=cfg.embedding,
        embedding_block_size=cfg.embedding_block_size,
        matmul_nbits=[NBitsGroup(tuple(g.nodes), g.bits, g.block_size, g.accuracy_level)
                      for g in cfg.matmul_nbits or []],
    )


def _eval_splits(ctx: StageContext, cfg: QuantizeStage, spec: Any) -> dict[str, str]:
    """The split each task is evaluated on: ``eval_split``, else the other of dev / test; tasks with neither left out."""
    eval_split = {}
    for name in spec.tasks:
        other = "test" if cfg.eval_split == "dev" else "dev"
        split = next((s for s in (cfg.eval_split, other) if ctx.data.has(name, s)), None)
        if split is not None:
            eval_split[name] = split
    return eval_split


def _write_summary(job: _Job, picked: dict[str, Any], mode: str, compared: dict[str, Any], source_notes: list[str],
                   n_int: int) -> None:
    """Write ``quantization.json`` and ``graph.json`` (the contract with the quantization recorded)."""
    cfg, spec, out_dir = job.cfg, job.spec, job.ctx.out_dir
    outcome, options = picked["outcome"], picked["options"]
    summary = {
        "mode": mode, "requested_mode": cfg.mode, "compared": compared, "target": cfg.target, "per_channel": cfg.per_channel, "source": str(picked["source"]),
        "embedding": cfg.embedding, "source_notes": source_notes,
        **({"embedding_block_size": cfg.embedding_block_size} if cfg.embedding == "int4_block" else {}),
        **({"matmul_nbits": [g.model_dump() for g in cfg.matmul_nbits]} if cfg.matmul_nbits else {}),
        "tolerance_test": cfg.tolerance_test,
        **({"confidence": cfg.confidence, "bootstrap_samples": cfg.bootstrap_samples}
           if cfg.tolerance_test == "bootstrap" else {}),
        "source_stage": job.source_name, "op_types": options.ops(), "eval_split": job.eval_split,
        "calibration": cfg.calibration.model_dump() if mode == "static" else None,
        "integer_matmuls": n_int, **outcome.to_json(),
    }
    atomic_write_text(out_dir / "quantization.json", json.dumps(portable(summary, out_dir), indent=2))
    spec.metadata["quantization"] = {k: summary[k] for k in ("mode", "target", "per_channel", "integer_matmuls",
                                                             "passed", "fallback_nodes", "op_types", "embedding")}
    spec.metadata["graph_file"] = "model.int8.onnx"
    spec.write(out_dir / "graph.json")


def _notes(ctx: StageContext, outcome: Any, mode: str, compared: dict[str, Any], source_notes: list[str], n_int: int,
           tolerances: dict[str, float]) -> list[str]:
    """The stage's notes; raises ``QuantizationError`` when a tolerance is missed and ``on_failure`` is error."""
    cfg: QuantizeStage = ctx.stage
    final = outcome.final
    tables = f"{final.integer_ops.get('int8_gather', 0)} INT8"
    if cfg.embedding == "int4_block":
        tables = f"{final.integer_ops.get('int4_gather', 0)} INT4 (blocks of {cfg.embedding_block_size}) and {tables}"
    four_bits = bool(cfg.matmul_nbits) or cfg.embedding == "int4_block"
    nbits = final.integer_ops.get("MatMulNBits", 0)
    groups = "; ".join(f"{', '.join(g.nodes)}: {g.bits}-bit, blocks of {g.block_size}" for g in cfg.matmul_nbits or [])
    four_note = (f" ({nbits} of them block-wise MatMulNBits ({groups}); one the fallback moves goes to per-column "
                 "INT8)" if cfg.matmul_nbits else "")
    notes = [f"{mode} INT8 ({cfg.target}{', per-channel' if cfg.per_channel else ''}): {n_int} integer "
             f"MatMul(s){four_note}, {tables} embedding table lookup(s) ({cfg.embedding}); {len(final.excluded)} "
             f"node(s) {'moved by the fallback (block-wise ones to INT8)' if four_bits else 'moved back to fp32'} after {len(outcome.attempts) - 1} fallback round(s)", *source_notes]
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
    notes.append(_tolerance_note(ctx, outcome, tolerances))
    return notes


def _tolerance_note(ctx: StageContext, outcome: Any, tolerances: dict[str, float]) -> str:
    """The note on the kept attempt's drops; a miss raises (``on_failure: error``) or is also a reporter note."""
    from compressor.export.quantize import QuantizationError

    cfg: QuantizeStage = ctx.stage
    final = outcome.final
    ivs = final.drop_intervals

    def interval(t: str) -> str:
        return f" [{100 * ivs[t]['low']:+.2f}%, {100 * ivs[t]['high']:+.2f}%]" if t in ivs else ""

    drops = ", ".join(f"{t} {final.metrics[t]:.4f} vs fp32 {outcome.reference[t]:.4f} "
                      f"(drop {100 * final.drops[t]:.2f}%{interval(t)} / tol {100 * tolerances[t]:.2f}%)"
                      for t in final.metrics)
    if ivs:
        drops += (f" (tolerance_test bootstrap: {cfg.confidence:.0%} paired-bootstrap intervals of the drop over "
                  f"{cfg.bootstrap_samples} resamples; a task fails only when its interval lies above its tolerance)")
    if outcome.passed:
        return f"every task within tolerance on its {cfg.eval_split} split: {drops}"
    msg = (f"quantization missed the tolerance of task(s) {', '.join(final.failing)} after "
           f"{len(outcome.attempts) - 1} fallback round(s) (max_iterations {cfg.max_iterations}): {drops}")
    if cfg.on_failure == "error":
        raise QuantizationError(f"stage '{cfg.name}': {msg}")
    ctx.reporter.notes.append(f"stage '{cfg.name}': {msg}")
    return f"WARNING: {msg}; kept attempt {final.iteration}"
