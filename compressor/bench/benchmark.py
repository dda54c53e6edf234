"""Run the side-by-side benchmark of a finished run and write ``<out>.md``, ``<out>.json`` and two plots."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compressor.bench.candidates import Candidate
from compressor.bench.state import Bench
from compressor.bench.timing import Settings
from compressor.bench.writer import INTERNAL  # noqa: F401  (re-exported: defined here before the split)
from compressor.bench.writer import write_report as _write
from compressor.errors import CompressorError


def run_benchmark(run_dir: Path, out: Path, singles: Sequence[Path] = (), threads: Sequence[int] | None = None,
                  batch: int = 32, runs: int = 20, seq_len: int = 128, samples: int = 100,
                  data_root: Path | None = None, log: Callable[[str], None] | None = None,
                  min_seconds: float = 3.0) -> dict[str, Path]:
    """Benchmark the run's teacher (a, b, c), single-task students (d) and multi-head student (e) on the run's
    test data; returns ``{"markdown", "json", "latency_plot", "size_plot"}`` paths.

    Args:
        run_dir: a finished run with a train/load stage and an export (and normally a quantize) stage.
        out: report path without extension.
        singles: run or model directories of single-task students (row d), one task each, tasks disjoint.
        threads: intra-op thread counts (default: 1 and every physical core).
        batch: batch size of the throughput measurements.
        runs: timed runs of each batch-1 dummy-input latency (batch runs: ``max(2, runs // 4)``).
        seq_len: tokens of the dummy inputs.
        samples: real test inputs per task for real-length latency and throughput.
        data_root: overrides the recipe's data root.
        min_seconds: each batch-1 dummy-input latency runs until its timed runs span at least this long.
    """
    import torch

    from compressor.bench.sources import physical_cores, read_run, read_single
    from compressor.console import say
    from compressor.data.store import DataStore
    from compressor.export.reference import cpu_target
    from compressor.recipe import load_recipe, resolve_data_root

    for name, value in (("batch", batch), ("runs", runs), ("seq_len", seq_len), ("samples", samples)):
        if value < 1:
            raise CompressorError(f"benchmark: {name} must be at least 1 (got {value})")
    if min_seconds < 0:
        raise CompressorError(f"benchmark: min_seconds must be at least 0 (got {min_seconds})")
    cores = physical_cores()
    thread_list = tuple(sorted(set(threads or (1, cores))))
    if thread_list[0] < 1:
        raise CompressorError(f"benchmark: thread counts must be at least 1 (got {list(thread_list)})")
    src = read_run(Path(run_dir))
    if not singles and src.singles:
        # row (d) from the run itself: the distill stage's single-task students (single_task_students: true)
        singles = list(src.singles.values())
    single_srcs = [read_single(Path(p)) for p in singles]
    recipe = load_recipe(src.recipe_path)
    bench = Bench(Settings(thread_list, batch, runs, seq_len, samples, min_seconds), max(thread_list),
                   src.reference.target if src.reference and src.reference.target else cpu_target(),
                   DataStore(recipe.data_options(), resolve_data_root(recipe.data_root, data_root, required=False)),
                   log or say)
    if src.singles and [Path(p) for p in singles] == list(src.singles.values()):
        bench.notes.append(f"(d) the single-task students of distill stage '{src.singles_stage}' (same architecture "
                           "as its multi-head student, same teacher, the steps the multi-head student spent on each "
                           "task); they are not pruned, vocabulary-pruned or quantized, so compare them with e-fp32 "
                           "of the same chain")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(bench.eval_threads)
    try:
        with tempfile.TemporaryDirectory(dir=src.run_dir, prefix=".benchmark-") as tmp_str:
            bench.work = Path(tmp_str)
            cands = _teacher_candidates(bench, src) + _student_candidates(bench, src)
            single_cands, covered = _single_candidates(bench, single_srcs, list(bench.inputs["teacher"]))
            models = _measure_all(bench, cands, single_cands, covered)
            _retention_intervals(bench, cands[0], models)
            bench.footprint = _footprint(bench, src, cands)
    finally:
        torch.set_num_threads(torch_threads)
    return _write(bench, src, recipe, cands + single_cands, bool(single_cands), models, Path(out), cores)


def _teacher_candidates(bench: Bench, src: Any) -> list[Candidate]:
    """(a) the teacher in PyTorch, (b) its checked ONNX export, (c) optimum dynamic INT8 of (b): the run's
    reference stage's graphs, or built here (temporary) through the same module for a run without one."""
    from compressor.bench.candidates import parity_batches, task_inputs
    from compressor.export.onnx_export import graph_spec, onnx_param_count
    from compressor.export.reference import build_reference_graphs
    from compressor.measure import count_parameters
    from compressor.model.io import WEIGHTS, load_model

    st, log = bench.settings, bench.log
    log(f"benchmark: teacher {src.teacher_dir}")
    teacher, t_tok, manifest = load_model(src.teacher_dir, device="cpu")
    max_length = int(manifest["max_length"])
    positions = getattr(teacher.encoder.config, "max_position_embeddings", None)
    if positions is not None and st.seq_len > positions:
        raise CompressorError(f"benchmark: --seq-len {st.seq_len} exceeds the teacher's "
                              f"{positions} position embeddings")
    spec_t = graph_spec(teacher, max_length)
    bench.inputs["teacher"] = task_inputs(teacher.tasks, bench.data, t_tok, max_length, st.samples, st.batch)
    cands = [Candidate("a", "teacher fp32, PyTorch", "pytorch", src.teacher_dir / WEIGHTS, spec_t,
                       dict(teacher.tasks), t_tok, count_parameters(teacher), "teacher", model=teacher)]
    ref = src.reference
    if ref is not None:
        b_path, c_path, c_int = ref.onnx, ref.int8, ref.int8_matmuls
        b_notes, c_notes = list(ref.onnx_notes), list(ref.int8_notes)
        b_src, c_src = (f"{b_path} (reference stage '{src.reference_stage}')",
                        f"{c_path} (reference stage '{src.reference_stage}')")
    else:
        log(f"benchmark: (b) exporting the teacher to ONNX (parity checked), (c) optimum dynamic INT8 of it "
            f"({bench.target}); the run has no reference stage")
        built = build_reference_graphs(teacher, spec_t, parity_batches(teacher.tasks, bench.inputs["teacher"]),
                                       bench.work / "reference", bench.eval_threads, bench.target)
        b_path, c_path, c_int, b_notes, c_notes = (built.onnx, built.int8, built.int8_matmuls, built.onnx_notes,
                                                   built.int8_notes)
        b_src = f"export of {src.teacher_dir} (the run has no reference stage: temporary, removed after measuring)"
        c_src = "quantization of (b) (temporary, removed after measuring)"
    cands.append(Candidate("b", "teacher fp32, ONNX Runtime", "onnx", b_path, spec_t, dict(teacher.tasks),
                           t_tok, onnx_param_count(b_path), "teacher", notes=b_notes, source=b_src))
    cands.append(Candidate("c", "teacher, optimum dynamic INT8", "onnx-int8", c_path, spec_t,
                           dict(teacher.tasks), t_tok, onnx_param_count(c_path), "teacher",
                           integer_matmuls=c_int, notes=c_notes, source=c_src))
    return cands


def _student_candidates(bench: Bench, src: Any) -> list[Candidate]:
    """(e) the run's multi-head student: the export stage's graph and the quantize stage's graph."""
    from transformers import AutoTokenizer

    from compressor.bench.candidates import task_inputs
    from compressor.export.onnx_export import onnx_param_count
    from compressor.export.quantize import integer_matmuls, integer_op_counts
    from compressor.runtime.spec import GraphSpec
    from compressor.stages.quantize import plugins_from_manifest

    s_dir = src.export.model_dir
    s_plugins = plugins_from_manifest(s_dir)
    s_tok = AutoTokenizer.from_pretrained(str(s_dir), use_fast=True)
    spec_e = GraphSpec.read(src.export.spec)
    bench.inputs["student"] = task_inputs(s_plugins, bench.data, s_tok, spec_e.max_length, bench.settings.samples,
                                          bench.settings.batch)
    e_fp32 = src.export.onnx
    cands = [Candidate("e-fp32", f"multi-head student fp32 ({src.export_stage})", "onnx", e_fp32, spec_e,
                       s_plugins, s_tok, onnx_param_count(e_fp32), "student")]
    if src.quantize is None:
        bench.notes.append("the run has no quantize stage: row e-int8 is absent and the targets are not measured")
        return cands
    e_int8 = src.quantize.onnx
    spec_q = GraphSpec.read(src.quantize.spec)
    quant = spec_q.metadata.get("quantization", {})
    cands.append(Candidate(
        "e-int8", f"multi-head student INT8 ({src.quantize_stage})", "onnx-int8", e_int8, spec_q,
        s_plugins, s_tok, onnx_param_count(e_int8), "student",
        integer_matmuls=integer_matmuls(integer_op_counts(e_int8)),
        notes=[f"{quant.get('mode', '?')} INT8 ({quant.get('target', '?')}), accuracy-aware: "
               f"{'within' if src.quantize.passed else 'NOT within'} the recipe's tolerance; "
               f"{len(src.quantize.fallback_nodes)} node(s) kept fp32"]))
    return cands


def _single_candidates(bench: Bench, single_srcs: Sequence[Any], tasks: list[str]) -> tuple[list[Candidate],
                                                                                              dict[str, str]]:
    """(d) single-task students: their run's graph, or their model directory exported here."""
    from transformers import AutoTokenizer

    from compressor.bench.candidates import export_checked, parity_batches, task_inputs
    from compressor.export.onnx_export import graph_spec, onnx_param_count
    from compressor.export.quantize import integer_matmuls, integer_op_counts
    from compressor.model.io import load_model
    from compressor.runtime.spec import GraphSpec
    from compressor.stages.quantize import plugins_from_manifest

    single_cands: list[Candidate] = []
    covered: dict[str, str] = {}
    for i, ss in enumerate(single_srcs):
        group = f"single{i}"
        if ss.graph is None:
            model, tok, man = load_model(ss.model_dir, device="cpu")
            spec = graph_spec(model, int(man["max_length"]))
            plugins = dict(model.tasks)
        else:
            model, spec = None, GraphSpec.read(ss.graph_spec)
            plugins = plugins_from_manifest(ss.model_dir)
            tok = AutoTokenizer.from_pretrained(str(ss.model_dir), use_fast=True)
        own = own_task(plugins)
        if own not in tasks:
            raise CompressorError(f"{ss.path}: task '{own}' is not a task of the run ({', '.join(tasks)})")
        if own in covered:
            raise CompressorError(f"{ss.path}: task '{own}' is already served by {covered[own]}")
        covered[own] = str(ss.path)
        bench.inputs[group] = task_inputs(plugins, bench.data, tok, spec.max_length, bench.settings.samples,
                                          bench.settings.batch, [own])
        d_notes = ([f"carries {', '.join(list(plugins)[1:])} (required by {own}); scored on {own} only"]
                   if len(plugins) > 1 else [])
        path = ss.graph
        if model is not None:
            bench.log(f"benchmark: (d) exporting single-task model {ss.model_dir} to ONNX (parity checked)")
            path, exported = export_checked(model, spec, parity_batches(plugins, bench.inputs[group]),
                                            bench.work / f"d{i}", bench.eval_threads)
            d_notes += exported
        n_int = integer_matmuls(integer_op_counts(path)) if ss.format == "onnx-int8" else None
        single_cands.append(Candidate(f"d:{own}", f"single-task student ({own})", ss.format, path, spec,
                                      plugins, tok, onnx_param_count(path), group, scored=[own],
                                      integer_matmuls=n_int, notes=d_notes,
                                      source=str(ss.path) + (f" (stage {ss.stage}: {path.name})" if ss.graph
                                                             else " (exported to ONNX, temporary)")))
    if single_cands and set(covered) != set(tasks):
        bench.notes.append(f"single-task students cover {', '.join(sorted(covered))} only: row (d) sums "
                           f"those models; serving {', '.join(t for t in tasks if t not in covered)} would need more")
    return single_cands, covered


def _measure_all(bench: Bench, cands: list[Candidate], single_cands: list[Candidate],
                 covered: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Measure every candidate; the single-task students together as row (d)."""
    from compressor.bench.timing import combine_singles, measure_candidate
    from compressor.console import progress

    models: dict[str, dict[str, Any]] = {}
    with progress("benchmark: models", total=len(cands) + len(single_cands)) as advance:
        for cand in cands:
            bench.log(f"benchmark: measuring ({cand.key}) {cand.label}")
            advance(0, f"({cand.key}) {cand.label}")
            models[cand.key] = measure_candidate(cand, bench.inputs[cand.group], bench.settings, bench.eval_threads)
            advance(1)
        if single_cands:
            parts = []
            for cand in single_cands:
                bench.log(f"benchmark: measuring ({cand.key}) {cand.label}")
                advance(0, f"({cand.key}) {cand.label}")
                # every single model runs on every covered task's inputs: serving a request needs them all
                task_src = {t: bench.inputs[next(c.group for c in single_cands if c.scored == [t])][t]
                            for t in covered}
                parts.append(measure_candidate(cand, task_src, bench.settings, bench.eval_threads))
                advance(1)
            models["d"] = combine_singles(single_cands, parts)
    return models


def _retention_intervals(bench: Bench, teacher: Candidate, models: dict[str, dict[str, Any]],
                         samples: int = 1000, confidence: float = 0.95) -> None:
    """Each model's paired-bootstrap interval of its retention against (a), per task, into
    ``models[m]["tasks"][t]["retention_interval"]``: the test examples are resampled with replacement, the same
    resample scoring both models, so a retention that only differs from 100% by noise shows an interval that
    holds 100%."""
    from compressor.significance import paired_bootstrap_drop

    ref = models["a"].get("predictions", {})
    bench.log(f"benchmark: paired-bootstrap intervals of retention against (a) ({samples} resamples)")
    for mid, m in models.items():
        if mid == "a":
            continue
        for t, entry in m["tasks"].items():
            preds, gold = m.get("predictions", {}).get(t), bench.inputs["teacher"].get(t)
            if t not in ref or preds is None or gold is None or len(preds) != len(gold.examples):
                continue
            plugin = teacher.plugins[t]
            metric = plugin.metric
            drop = paired_bootstrap_drop(lambda p, ex, plugin=plugin, name=metric.name: plugin.score(p, ex)[name],
                                         gold.examples, ref[t], preds, metric.higher_is_better, samples=samples,
                                         confidence=confidence, seed=0)
            entry["retention_interval"] = {"low": 1.0 - drop.high, "high": 1.0 - drop.low,
                                           "confidence": confidence, "samples": samples}


def _footprint(bench: Bench, src: Any, cands: list[Candidate]) -> dict[str, dict[str, Any]]:
    """Resident memory of a torch-free process serving (b) and e-int8 as bundles: load + 100 predictions."""
    from compressor.bench.footprint import measure_footprints, requests_from

    dirs = {"b": src.teacher_dir, "e-int8": src.quantize.model_dir if src.quantize is not None else None}
    graphs = {c.key: (c.path, c.spec, dirs[c.key] / "tokenizer.json", c.tokenizer.pad_token_id or 0)
              for c in cands if dirs.get(c.key) is not None}
    requests = requests_from(bench.data, list(bench.inputs["teacher"]))
    if not requests:
        bench.notes.append("edge footprint not measured: no test (or dev) example has a text to send")
        return {}
    bench.log(f"benchmark: edge footprint of {', '.join(graphs)} (torch-free child process per bundle)")
    return measure_footprints(graphs, requests, bench.work / "footprint", threads=1)


def own_task(plugins: dict[str, Any]) -> str:
    """The task a single-task model is for: a twin also carries the tasks its task requires (relation
    extraction's entity task); its own task is the first that no other task of the model requires."""
    required = {r for p in plugins.values() for r in p.requires()}
    return next((t for t in plugins if t not in required), next(iter(plugins)))
