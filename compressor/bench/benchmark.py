"""Run the side-by-side benchmark of a finished run and write ``<out>.md``, ``<out>.json`` and two plots."""

from __future__ import annotations

import datetime as _dt
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compressor.bench.candidates import Candidate, TaskInputs
from compressor.bench.timing import Settings
from compressor.errors import CompressorError

INTERNAL = ("tasks", "timings", "real_timings", "real_inputs")  # per-model keys the rows already carry


def run_benchmark(run_dir: Path, out: Path, singles: Sequence[Path] = (), threads: Sequence[int] | None = None,
                  batch: int = 32, runs: int = 20, seq_len: int = 128, samples: int = 100,
                  data_root: Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Path]:
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
    """
    import onnxruntime
    import optimum.version
    import torch
    from transformers import AutoTokenizer

    from compressor.bench.candidates import export_checked, parity_batches, quantize_user, task_inputs
    from compressor.bench.results import build_rows, check_targets
    from compressor.bench.render import plot, render_markdown
    from compressor.bench.sources import cpu_target, physical_cores, read_run, read_single
    from compressor.console import say
    from compressor.data.store import DataStore
    from compressor.export.onnx_export import graph_spec, onnx_param_count
    from compressor.export.quantize import integer_matmuls, integer_op_counts
    from compressor.fsutil import atomic_write_text
    from compressor.model.io import WEIGHTS, load_model
    from compressor.recipe import load_recipe, resolve_data_root
    from compressor.report.machine import describe_machine
    from compressor.measure import count_parameters
    from compressor.runtime.spec import GraphSpec
    from compressor.stages.quantize import plugins_from_manifest

    log = log or say
    for name, value in (("batch", batch), ("runs", runs), ("seq_len", seq_len), ("samples", samples)):
        if value < 1:
            raise CompressorError(f"benchmark: {name} must be at least 1 (got {value})")
    cores = physical_cores()
    thread_list = tuple(sorted(set(threads or (1, cores))))
    if thread_list[0] < 1:
        raise CompressorError(f"benchmark: thread counts must be at least 1 (got {list(thread_list)})")
    settings = Settings(thread_list, batch, runs, seq_len, samples)
    eval_threads = max(thread_list)

    src = read_run(Path(run_dir))
    if not singles and src.singles:
        # row (d) from the run itself: the distill stage's single-task students (single_task_students: true)
        singles = list(src.singles.values())
    single_srcs = [read_single(Path(p)) for p in singles]
    recipe = load_recipe(src.recipe_path)
    data = DataStore(recipe, resolve_data_root(recipe.data_root, data_root))
    notes: list[str] = []
    if src.singles and [Path(p) for p in singles] == list(src.singles.values()):
        notes.append(f"(d) the single-task students of distill stage '{src.singles_stage}' (same architecture as "
                     "its multi-head student, same teacher, the steps the multi-head student spent on each task); "
                     "they are not pruned, vocabulary-pruned or quantized, so compare them with e-fp32 of the "
                     "same chain")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(eval_threads)
    try:
        with tempfile.TemporaryDirectory(dir=src.run_dir, prefix=".benchmark-") as tmp_str:
            work = Path(tmp_str)
            # ---- (a) teacher in PyTorch, (b) its checked ONNX export, (c) optimum dynamic INT8 of (b)
            log(f"benchmark: teacher {src.teacher_dir}")
            teacher, t_tok, manifest = load_model(src.teacher_dir, device="cpu")
            max_length = int(manifest["max_length"])
            positions = getattr(teacher.encoder.config, "max_position_embeddings", None)
            if positions is not None and seq_len > positions:
                raise CompressorError(f"benchmark: --seq-len {seq_len} exceeds the teacher's "
                                      f"{positions} position embeddings")
            spec_t = graph_spec(teacher, max_length)
            tasks = list(teacher.tasks)
            inputs: dict[str, dict[str, TaskInputs]] = {
                "teacher": task_inputs(teacher.tasks, data, t_tok, max_length, samples, batch)}
            cands = [Candidate("a", "teacher fp32, PyTorch", "pytorch", src.teacher_dir / WEIGHTS, spec_t,
                               dict(teacher.tasks), t_tok, count_parameters(teacher), "teacher", model=teacher)]
            log("benchmark: (b) exporting the teacher to ONNX (parity checked)")
            b_path, b_notes = export_checked(teacher, spec_t, parity_batches(teacher.tasks, inputs["teacher"]),
                                             work / "b", eval_threads)
            cands.append(Candidate("b", "teacher fp32, ONNX Runtime", "onnx", b_path, spec_t, dict(teacher.tasks),
                                   t_tok, onnx_param_count(b_path), "teacher", notes=b_notes,
                                   source=f"export of {src.teacher_dir} (temporary, removed after measuring)"))
            target = cpu_target()
            log(f"benchmark: (c) optimum dynamic INT8 of the teacher ({target})")
            c_path, c_int, c_notes = quantize_user(b_path, work / "c", target)
            cands.append(Candidate("c", "teacher, optimum dynamic INT8", "onnx-int8", c_path, spec_t,
                                   dict(teacher.tasks), t_tok, onnx_param_count(c_path), "teacher",
                                   integer_matmuls=c_int, notes=c_notes,
                                   source="quantization of (b) (temporary, removed after measuring)"))

            # ---- (e) the run's multi-head student: the export stage's graph and the quantize stage's graph
            s_dir = Path(src.export["model_dir"])
            s_plugins = plugins_from_manifest(s_dir)
            s_tok = AutoTokenizer.from_pretrained(str(s_dir), use_fast=True)
            spec_e = GraphSpec.read(Path(src.export["graph"]))
            inputs["student"] = task_inputs(s_plugins, data, s_tok, spec_e.max_length, samples, batch)
            e_fp32 = Path(src.export["onnx"])
            cands.append(Candidate("e-fp32", f"multi-head student fp32 ({src.export_stage})", "onnx", e_fp32, spec_e,
                                   s_plugins, s_tok, onnx_param_count(e_fp32), "student"))
            if src.quantize is not None:
                e_int8 = Path(src.quantize["onnx"])
                spec_q = GraphSpec.read(Path(src.quantize["graph"]))
                quant = spec_q.metadata.get("quantization", {})
                cands.append(Candidate(
                    "e-int8", f"multi-head student INT8 ({src.quantize_stage})", "onnx-int8", e_int8, spec_q,
                    s_plugins, s_tok, onnx_param_count(e_int8), "student",
                    integer_matmuls=integer_matmuls(integer_op_counts(e_int8)),
                    notes=[f"{quant.get('mode', '?')} INT8 ({quant.get('target', '?')}), accuracy-aware: "
                           f"{'within' if src.quantize.get('passed') else 'NOT within'} the recipe's tolerance; "
                           f"{len(src.quantize.get('fallback_nodes') or [])} node(s) kept fp32"]))
            else:
                notes.append("the run has no quantize stage: row e-int8 is absent and the targets are not measured")

            # ---- (d) single-task students
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
                inputs[group] = task_inputs(plugins, data, tok, spec.max_length, samples, batch, [own])
                d_extra = ([f"carries {', '.join(list(plugins)[1:])} (required by {own}); scored on {own} only"]
                           if len(plugins) > 1 else [])
                if model is not None:
                    log(f"benchmark: (d) exporting single-task model {ss.model_dir} to ONNX (parity checked)")
                    path, d_notes = export_checked(model, spec, parity_batches(plugins, inputs[group]),
                                                   work / f"d{i}", eval_threads)
                else:
                    path, d_notes = ss.graph, []
                d_notes = d_extra + d_notes
                n_int = integer_matmuls(integer_op_counts(path)) if ss.format == "onnx-int8" else None
                single_cands.append(Candidate(f"d:{own}", f"single-task student ({own})", ss.format, path, spec,
                                              plugins, tok, onnx_param_count(path), group, scored=[own],
                                              integer_matmuls=n_int, notes=d_notes,
                                              source=str(ss.path) + (f" (stage {ss.stage}: {path.name})" if ss.graph
                                                                     else " (exported to ONNX, temporary)")))
            if single_cands and set(covered) != set(tasks):
                notes.append(f"single-task students cover {', '.join(sorted(covered))} only: row (d) sums "
                             f"those models; serving {', '.join(t for t in tasks if t not in covered)} would "
                             "need more")

            # ---- measure
            models: dict[str, dict[str, Any]] = {}
            for cand in cands:
                log(f"benchmark: measuring ({cand.key}) {cand.label}")
                models[cand.key] = _measure(cand, inputs[cand.group], settings, eval_threads)
            if single_cands:
                parts = []
                for cand in single_cands:
                    log(f"benchmark: measuring ({cand.key}) {cand.label}")
                    # every single model runs on every covered task's inputs: serving a request needs them all
                    task_src = {t: inputs[next(c.group for c in single_cands if c.scored == [t])][t]
                                for t in covered}
                    parts.append(_measure(cand, task_src, settings, eval_threads))
                models["d"] = _combine_singles(single_cands, parts)
    finally:
        torch.set_num_threads(torch_threads)

    rows = build_rows(models, thread_list)
    targets = check_targets(rows, thread_list, seq_len, recipe.report.targets)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"latency_plot": Path(f"{out}-metric-vs-latency.png"), "size_plot": Path(f"{out}-metric-vs-size.png"),
             "json": Path(f"{out}.json"), "markdown": Path(f"{out}.md")}
    lat_threads = 1 if 1 in thread_list else thread_list[0]
    plot(rows, f"latency_seq_p50_ms_t{lat_threads}",
         f"p50 latency (ms), batch 1, {seq_len} tokens, {lat_threads} thread(s)", paths["latency_plot"])
    plot(rows, "size_bytes", "size on disk (MB)", paths["size_plot"], scale=1e-6)

    for cand in cands:
        notes += [f"({cand.key}) {n}" for n in cand.notes]
    for cand in single_cands:
        notes += [f"({cand.key}) {n}" for n in cand.notes]
    if single_cands:
        notes.append("(d) size, parameters and latency are sums over the single-task models (serving every task "
                     "needs each of them); throughput combines as 1 / sum(1 / x). On another task's real inputs a "
                     "single-task model gets the same tokens (ids clipped into its vocabulary).")
    for group, per_task in inputs.items():
        for t, ti in per_task.items():
            if ti.split != "test":
                notes.append(f"task '{t}' has no test split: {group} models were measured on its {ti.split} split")
    notes = list(dict.fromkeys(notes))

    data_out = {
        "title": f"Benchmark: {recipe.name}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(src.run_dir), "recipe": recipe.name,
        "machine": describe_machine(),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "optimum": optimum.version.__version__},
        "settings": {**asdict(settings), "threads": list(thread_list), "all_cores": cores,
                     "warmup": settings.warmup, "batch_runs": settings.batch_runs,
                     "quantization_target": target},
        "models": {m: {k: v for k, v in models[m].items() if k not in INTERNAL}
                   for m in ("a", "b", "c", "d", "e-fp32", "e-int8") if m in models},
        "targets": targets,
        "rows": rows,
        "notes": notes,
        "plots": {"metric vs latency": str(paths["latency_plot"]), "metric vs size": str(paths["size_plot"])},
    }
    atomic_write_text(paths["json"], json.dumps(data_out, indent=2))
    atomic_write_text(paths["markdown"], render_markdown(data_out) + "\n")
    return paths


def own_task(plugins: dict[str, Any]) -> str:
    """The task a single-task model is for: a twin also carries the tasks its task requires (relation
    extraction's entity task); its own task is the first that no other task of the model requires."""
    required = {r for p in plugins.values() for r in p.requires()}
    return next((t for t in plugins if t not in required), next(iter(plugins)))


def _measure(cand: Candidate, inputs: dict[str, TaskInputs], settings: Settings, eval_threads: int) -> dict[str, Any]:
    """Metrics on the candidate's scored tasks (default: every task of ``inputs`` it has) and timings at every
    thread count: dummy-input ones, and real-input ones on every task of ``inputs``."""
    from compressor.bench.timing import model_timings, real_timings

    scored = [t for t in (cand.scored or inputs) if t in cand.plugins and t in inputs]
    tasks: dict[str, dict[str, Any]] = {}
    for t in scored:
        metrics = cand.evaluate(t, inputs[t], eval_threads)
        metric = cand.plugins[t].metric
        tasks[t] = {"split": inputs[t].split, "metric": metric.name, "higher_is_better": metric.higher_is_better,
                    "value": metrics[metric.name], "metrics": metrics}
    timings: dict[str, Any] = {}
    real: dict[str, dict[str, Any]] = {t: {} for t in inputs}
    for threads in settings.threads:
        with cand.runner(threads) as runner:
            timings.update(model_timings(runner, cand.spec, cand.vocab_size, threads, settings))
            for t, ti in inputs.items():
                real[t].update(real_timings(runner, cand.spec, cand.vocab_size, t, ti.ones, ti.batches, threads,
                                            settings))
    for t, ti in inputs.items():
        if t in tasks:
            tasks[t].update({"real_n": len(ti.ones), "real_mean_length": ti.mean_length, "timings": real[t]})
    return {"label": cand.label, "format": cand.format, "size_bytes": cand.size_bytes, "params": cand.params,
            "integer_matmuls": cand.integer_matmuls, "source": cand.source or str(cand.path), "notes": cand.notes,
            "timings": timings, "tasks": tasks, "real_timings": real,
            "real_inputs": {t: {"n": len(ti.ones), "mean_length": ti.mean_length} for t, ti in inputs.items()}}


def _combine_singles(cands: Sequence[Candidate], parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Row (d): the single-task models together (sizes, parameters and latencies summed)."""
    from compressor.bench.timing import combine

    tasks: dict[str, dict[str, Any]] = {}
    for part in parts:
        for t, entry in part["tasks"].items():
            tasks[t] = {**entry, "timings": combine([p["real_timings"][t] for p in parts])}
    ints = [c.integer_matmuls for c in cands]
    return {
        "label": f"{len(cands)} single-task student(s)", "format": "+".join(dict.fromkeys(c.format for c in cands)),
        "size_bytes": sum(p["size_bytes"] for p in parts), "params": sum(p["params"] for p in parts),
        "integer_matmuls": None if any(i is None for i in ints) else sum(ints),  # type: ignore[arg-type]
        "source": ", ".join(p["source"] for p in parts), "notes": [],
        "timings": combine([p["timings"] for p in parts]), "tasks": tasks,
        "parts": [{k: p[k] for k in ("label", "format", "size_bytes", "params", "source", "timings")} for p in parts],
    }
