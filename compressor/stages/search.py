"""The ``search`` stage: the smallest / fastest student whose every task keeps its retention floor.

Input is the latest model (a distilled student or the teacher). Each trial cuts a candidate from it (layers,
heads, FFN neurons; optionally the vocabulary), recovers it briefly by distillation from the teacher and measures
it (dev metric and retention of every task on the exported, optionally INT8 graph; ONNX Runtime latency at batch
1 on one thread; size on disk). The best candidate that holds every floor is rebuilt, fully recovered and saved
as this stage's model for export -> quantize -> bundle. When none holds, the stage writes every trial and the
best near miss and fails with :class:`compressor.search.SearchFailed` (exit code 1).

Artefacts: ``model/`` (the chosen student), ``trials.md`` / ``trials.json`` (every trial), ``pareto.png``,
``chosen.onnx`` (the chosen student's graph as measured) and ``study.db`` (the optuna study). The study lives in
the stage's checkpoint directory while the search runs, so ``compressor run --resume`` after a kill continues it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NoReturn

from compressor.errors import RecipeError
from compressor.fsutil import atomic_write_text
from compressor.stage_kinds import gives
from compressor.stages import StageContext, StageResult


def preflight(recipe: Any, index: int) -> None:
    """Checks that need the source model, made before anything is written: when the search's source is a model
    directory a ``load`` stage names, its architecture must leave the space at least one candidate."""
    from compressor.model.architecture import LayerArch
    from compressor.model.io import read_manifest
    from compressor.search.space import Space

    stage = recipe.stages[index]
    for prev in reversed(recipe.stages[:index]):
        if not gives(prev.kind, "model"):
            continue
        if prev.kind == "load":
            manifest = read_manifest(Path(prev.path).expanduser().resolve())
            layers = (manifest.get("architecture") or {}).get("layers") or []
            config = (manifest.get("encoder") or {}).get("config") or {}
            Space(stage.space, [LayerArch(**{k: int(v) for k, v in a.items()}) for a in layers],
                  f"stages[{index}].space", config.get("hidden_size"), config.get("num_attention_heads"))
        return
    raise RecipeError(f"stages[{index}]: search stage '{stage.name}' needs a model: put a load, train or distill "
                      "stage before it")


def run(ctx: StageContext) -> StageResult:
    """Search the space for the best candidate that holds every task's floor, then recover and save it."""
    import torch

    from compressor.console import say
    from compressor.distill.cache import open_cache
    from compressor.export.quantize import QuantOptions
    from compressor.model.architecture import encoder_layers, read_architecture
    from compressor.model.io import load_model
    from compressor.search.candidate import CandidateBuilder
    from compressor.search.space import Space
    from compressor.search.study import SearchLoop, open_study

    cfg = ctx.stage
    recipe = ctx.recipe
    if ctx.model_dir is None or ctx.teacher_dir is None:
        raise RecipeError(f"stages[{ctx.index}]: search stage '{cfg.name}' needs a teacher (a train or load stage) "
                          "before it")
    seed = recipe.seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    source, tokenizer, manifest = load_model(ctx.model_dir)
    _check_source(ctx, cfg, source)
    n = len(encoder_layers(source.encoder))
    space = Space(cfg.space, read_architecture(source.encoder), f"stages[{ctx.index}].space",
                  source.encoder.config.hidden_size, source.encoder.config.num_attention_heads)
    teacher, teacher_tok, teacher_layers = _teacher_of(ctx, cfg, source, tokenizer, manifest, n)
    tasks = list(source.tasks)
    floors = cfg.floors(tasks)
    ckpt = ctx.checkpoint_dir or (ctx.run_dir / "checkpoints" / cfg.name)
    ckpt.mkdir(parents=True, exist_ok=True)

    cache = open_cache(cfg.recovery.teacher_cache, ctx.run_dir, teacher, f"stages[{ctx.index}].recovery.teacher_cache")
    builder = CandidateBuilder(cfg, source, tokenizer, teacher, teacher_layers, ctx.data, recipe.model.max_length,
                               {}, recipe.report.threads, seed, teacher_cache=cache)
    _set_teacher_dev(builder, teacher, teacher_tok, ckpt)

    fingerprint = {"source": str(ctx.model_dir), "teacher": str(ctx.teacher_dir), "space": cfg.space.model_dump(exclude={"hidden"} if cfg.space.hidden == [None] else None),
                   "recovery_steps": cfg.recovery_steps, "recovery": cfg.recovery.model_dump(),
                   "importance": cfg.importance, "seed": seed, "early_stop_margin": cfg.early_stop_margin,
                   "int8_per_channel": QuantOptions().per_channel,  # how INT8 trials are quantized
                   **({"cut": cfg.cut} if cfg.cut != "iterative" else {})}  # iterative studies keep their fingerprint
    study = open_study(ckpt / "study.db", fingerprint, cfg.sampler, seed)
    values, attrs, early = _trial_callbacks(cfg, floors, tasks)
    loop = SearchLoop(study, space, lambda number, knobs: builder.trial(knobs, seed + number, floors, ctx.out_dir),
                      values, attrs, early, cfg.budget, log=lambda line: say(f"{cfg.name}: {line}"))
    stats = loop.run()
    return _finish(ctx, cfg, builder, study, space, floors, stats, ckpt, seed)


def _check_source(ctx: StageContext, cfg: Any, source: Any) -> None:
    """The source model must have a head for every task of the recipe, and every task a dev split."""
    missing = [t for t in ctx.data.tasks if t not in source.tasks]
    if missing:
        raise RecipeError(f"stage '{cfg.name}': the model in {ctx.model_dir} has no head for task(s) {missing}")
    no_dev = [t for t in source.tasks if not ctx.data.has(t, "dev")]
    if no_dev:
        raise RecipeError(f"stage '{cfg.name}': task '{no_dev[0]}' has no dev split; the search scores every task "
                          "on dev")


def _teacher_of(ctx: StageContext, cfg: Any, source: Any, tokenizer: Any, manifest: dict[str, Any],
                n: int) -> tuple[Any, Any, list[int] | None]:
    """The recovery teacher, its tokenizer and the teacher layers the source kept (when known)."""
    from compressor.model.io import load_model
    from compressor.model.student import recorded_teacher_layers

    same = Path(ctx.teacher_dir).resolve() == Path(ctx.model_dir).resolve()
    if same or cfg.recovery.teacher == "input":
        return source, tokenizer, list(range(n))
    teacher, teacher_tok, _ = load_model(ctx.teacher_dir)
    teacher_layers = recorded_teacher_layers(manifest, n)
    if teacher.encoder.get_input_embeddings().num_embeddings != source.encoder.get_input_embeddings().num_embeddings:
        raise RecipeError(f"stage '{cfg.name}': the model in {ctx.model_dir} has another vocabulary than the "
                          "teacher; search before prune_vocab (the space has vocab_min_count)")
    return teacher, teacher_tok, teacher_layers


def _set_teacher_dev(builder: Any, teacher: Any, teacher_tok: Any, ckpt: Path) -> None:
    """The teacher's dev metric, the denominator of every retention (PyTorch, as the teacher's report rows)."""
    teacher_dev_file = ckpt / "teacher_dev.json"
    if teacher_dev_file.is_file():
        teacher_dev = json.loads(teacher_dev_file.read_text())
    else:
        teacher_dev = builder.torch_dev(teacher, teacher_tok)
        atomic_write_text(teacher_dev_file, json.dumps(teacher_dev))
    builder.teacher_dev = dict(teacher_dev)


def _trial_callbacks(cfg: Any, floors: dict[str, float], tasks: list[str]) -> tuple[Any, Any, Any]:
    """The search loop's ``values`` (objective, worst margin), ``attrs`` and ``early`` (early-stop record) hooks."""
    def values(m: Any) -> tuple[float, float]:
        objective = m.latency_ms if cfg.objective == "latency" else float(m.size_bytes)
        return objective, min(m.retention[t] - floors[t] for t in tasks)

    def attrs(m: Any) -> dict[str, Any]:
        return {"scores": m.scores, "retention": m.retention, "latency_ms": m.latency_ms,
                "latency_p95_ms": m.latency_p95_ms, "size_bytes": m.size_bytes, "params": m.params,
                "vocab_size": m.vocab_size, "architecture": m.architecture, "recovery": m.recovery}

    def early(stopped: Any) -> dict[str, Any]:
        return {"scores": stopped.scores, "retention": stopped.retention,
                "early_stop": f"dev retention after {cfg.recovery_steps // 2} of {cfg.recovery_steps} recovery steps "
                              f"more than {cfg.early_stop_margin} below the floor"}

    return values, attrs, early


def _finish(ctx: StageContext, cfg: Any, builder: Any, study: Any, space: Any, floors: dict[str, float],
            stats: dict[str, Any], ckpt: Path, seed: int) -> StageResult:
    """Write the evidence; fail when no trial held every floor, else rebuild, fully recover and save the choice."""
    from compressor.model.io import save_model
    from compressor.report.evaluate import evaluate_rows
    from compressor.search.evidence import choose, markdown_table, pareto_plot, trial_rows
    from compressor.search.space import Knobs

    tasks = list(floors)
    rows = trial_rows(study, floors, cfg.objective)
    chosen, near = choose(rows, cfg.objective)
    floor_text = ", ".join(f"{t} {f:g}" for t, f in floors.items())
    summary = (f"{cfg.name}: {len(rows)} trial(s) trained ({sum(r['status'] == 'early-stopped' for r in rows)} "
               f"early-stopped, {sum(r['passed'] for r in rows)} held every floor: {floor_text}); objective "
               f"{cfg.objective}; stopped by {stats['stopped_by']}; {space.size} setting(s) in the space")
    if chosen is None:
        _fail(ctx, cfg, rows, near, tasks, floors, stats, space, ckpt)

    knobs = Knobs(**{k: tuple(v) if isinstance(v, list) else v for k, v in chosen["knobs"].items()})
    model, tokenizer = _recovered_choice(ctx, cfg, builder, knobs, seed + chosen["trial"], ckpt)
    full = builder.measure(model, tokenizer, knobs.int8, ctx.out_dir, keep=ctx.out_dir / "chosen.onnx")

    saved = ctx.out_dir / "model"
    save_model(model, tokenizer, saved, ctx.recipe.model.max_length, extra={"searched_by": {
        "stage": cfg.name, "trial": chosen["trial"], "knobs": knobs.to_json(), "floors": floors,
        "objective": cfg.objective, "full_recovery_steps": cfg.full_recovery_steps}})
    ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                                      report=ctx.recipe.report, batch_size=cfg.eval_batch_size))

    prediction = {t: {"short": chosen["retention"][t], "full": full.retention[t]} for t in tasks}
    held = all(full.retention[t] >= floors[t] for t in tasks)
    notes = _chosen_notes(ctx, cfg, summary, chosen, prediction, held, knobs, space)
    table_md = _write_evidence(ctx.out_dir, rows, tasks, floors, chosen["trial"], cfg, stats, space, markdown_table,
                               pareto_plot, final_dir=ctx.final_dir, target=ctx.recipe.report.targets.retention)
    shutil.copyfile(ckpt / "study.db", ctx.out_dir / "study.db")
    outputs: dict[str, Any] = {
        "model_dir": str(ctx.final_dir / "model"), "objective": cfg.objective, "floors": floors,
        "chosen": chosen, "int8": knobs.int8, "full_recovery": {
            "scores": full.scores, "retention": full.retention, "latency_ms": full.latency_ms,
            "size_bytes": full.size_bytes, "params": full.params, "held_floors": held},
        "prediction": prediction, "search": stats, "space_size": space.size, "trials": rows,
        "table": str(ctx.final_dir / "trials.md"), "plot": str(ctx.final_dir / "pareto.png"),
        "report_section": table_md,
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _fail(ctx: StageContext, cfg: Any, rows: list[dict[str, Any]], near: dict[str, Any] | None, tasks: list[str],
          floors: dict[str, float], stats: dict[str, Any], space: Any, ckpt: Path) -> NoReturn:
    """No trial held every floor: write every trial and the best near miss, then raise SearchFailed."""
    from compressor.search import SearchFailed
    from compressor.search.evidence import markdown_table, pareto_plot

    evidence = ckpt / "evidence"
    table = _write_evidence(evidence, rows, tasks, floors, None, cfg, stats, space, markdown_table, pareto_plot,
                            target=ctx.recipe.report.targets.retention)
    if near is None:
        miss = "no trial was scored"
    else:
        short = ", ".join(f"{t} {near['retention'][t]:.3f} < {floors[t]:g}" for t in near["failing"])
        miss = f"best near miss: trial {near['trial']} ({near['describe']}; {short})"
    message = (f"search stage '{cfg.name}': no candidate held every task's retention floor in {len(rows)} "
               f"trial(s); {miss}; every trial: {table}")
    ctx.reporter.notes.append(message)
    ctx.reporter.write(ctx.run_dir)
    raise SearchFailed(message)


def _recovered_choice(ctx: StageContext, cfg: Any, builder: Any, knobs: Any, trial_seed: int,
                      ckpt: Path) -> tuple[Any, Any]:
    """The choice rebuilt from the source with the trial's seed and fully recovered (kept in the checkpoint
    directory so a resume after a kill does not recover it again)."""
    from compressor.model.io import load_model, save_model

    final = ckpt / "final" / "model"
    marker = ckpt / "final" / "knobs.json"
    if final.is_dir() and marker.is_file() and json.loads(marker.read_text()) == {**knobs.to_json(),
                                                                                   "steps": cfg.full_recovery_steps}:
        model, tokenizer, _ = load_model(final)
    else:
        model, kept = builder.build(knobs, trial_seed)
        builder.recover(model, kept, cfg.full_recovery_steps, trial_seed)
        tokenizer = builder.prune_vocab(model, knobs.vocab_min_count)
        shutil.rmtree(final.parent, ignore_errors=True)
        save_model(model, tokenizer, final, ctx.recipe.model.max_length)
        atomic_write_text(marker, json.dumps({**knobs.to_json(), "steps": cfg.full_recovery_steps}))
    return model, tokenizer


def _chosen_notes(ctx: StageContext, cfg: Any, summary: str, chosen: dict[str, Any], prediction: dict[str, Any],
                  held: bool, knobs: Any, space: Any) -> list[str]:
    """The stage's notes when a candidate was chosen: the summary, the choice, its full recovery, warnings."""
    uncut = not knobs.cuts_encoder  # an uncut candidate is not recovered (CandidateBuilder.recover)
    short = "uncut, not recovered" if uncut else f"after {cfg.recovery_steps} recovery steps"
    full = ("the source as it is (nothing cut, so not recovered): dev retention "
            if uncut else f"after {cfg.full_recovery_steps} recovery steps the chosen student's dev retention is ")
    notes = [
        summary,
        f"{cfg.name}: chosen trial {chosen['trial']}: {chosen['describe']}; latency p50 {chosen['latency_ms']:.2f} ms "
        f"(batch 1, 1 thread, seq {cfg.latency_seq_len}), {chosen['size_bytes'] / 1e6:.2f} MB, worst dev retention "
        f"{chosen['worst_retention']:.3f} ({short})",
        f"{cfg.name}: {full}"
        + ", ".join(f"{t} {v['full']:.3f} (short recovery predicted {v['short']:.3f})" for t, v in prediction.items())
        + ("" if held else "; WARNING: below a floor after full recovery"),
        f"{cfg.name}: trial table {ctx.final_dir / 'trials.md'}, Pareto plot {ctx.final_dir / 'pareto.png'}",
    ]
    notes += [f"{cfg.name}: {n}" for n in space.notes]
    later = [s for s in ctx.recipe.stages[ctx.index + 1:] if s.kind == "quantize"]
    if later and knobs.int8 != "none" and later[0].mode not in (knobs.int8, "search"):
        notes.append(f"{cfg.name}: WARNING: trials measured INT8 {knobs.int8}; stage '{later[0].name}' quantizes "
                     f"with mode {later[0].mode}")
    return notes


def _write_evidence(directory: Path, rows: list[dict[str, Any]], tasks: list[str], floors: dict[str, float],
                    chosen: int | None, cfg: Any, stats: dict[str, Any], space: Any, markdown_table: Any,
                    pareto_plot: Any, final_dir: Path | None = None, target: float | None = None) -> str:
    """trials.md / trials.json / pareto.png in ``directory``; returns the Markdown (or the table's path)."""
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, tasks, floors, chosen)
    head = (f"Search '{cfg.name}': objective {cfg.objective}, floors "
            + ", ".join(f"{t} {f:g}" for t, f in floors.items())
            + f"; {len(rows)} trial(s), stopped by {stats['stopped_by']}; dev metric (retention vs teacher dev; "
            f"'<' below the floor); latency: ONNX Runtime, batch 1, seq {cfg.latency_seq_len}, "
            f"{cfg.latency_threads} thread(s); size: the measured graph on disk. Plot: pareto.png.")
    md = head + "\n\n" + table
    atomic_write_text(directory / "trials.md", md + "\n")
    atomic_write_text(directory / "trials.json", json.dumps({"floors": floors, "objective": cfg.objective,
                                                             "chosen": chosen, "search": stats, "trials": rows},
                                                            indent=2, default=str))
    pareto_plot(rows, floors, chosen, directory / "pareto.png", f"search '{cfg.name}' ({cfg.objective})", target)
    if final_dir is None:
        return str(directory / "trials.md")
    return md
