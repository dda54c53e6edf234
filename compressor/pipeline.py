"""Recipe -> ordered stages -> run directory -> report, with resume.

Run directory::

    <run>/recipe.yaml            the recipe as run
    <run>/state.json             completed stages, their outputs and models (what --resume reads)
    <run>/stages/NN-<name>/      each completed stage's artefacts (written under a temporary name first)
    <run>/checkpoints/<name>/    in-stage checkpoints (epochs), removed when the stage completes
    <run>/report.json, report.md
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from compressor.console import say
from compressor.errors import RecipeError
from compressor.fsutil import atomic_write_text
from compressor.recipe import Recipe, load_recipe, resolve_data_root
from compressor.registry import _load
from compressor.stages import STAGE_RUNNERS, StageContext, StageResult

STATE = "state.json"


TEACHER_KINDS = ("train", "load")  # the first stage of these kinds provides the teacher


def run_recipe(recipe_path: Path, out: Path | None = None, resume: bool = False, data_root: Path | None = None,
               log=None) -> Path:
    """Run every stage of a recipe; returns the run directory."""
    log = log or say
    recipe = load_recipe(recipe_path)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    state_path = run_dir / STATE
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise RecipeError(f"{run_dir}: run directory is not empty; pass --resume to continue it or --out for a new one")

    from compressor.data.store import DataStore
    from compressor.report.machine import describe_machine
    from compressor.report.measure import describe_threads
    from compressor.report.rows import Reporter

    # read and check every training split before anything is written
    data = DataStore(recipe, resolve_data_root(recipe.data_root, data_root))
    data.fit_labels()
    train_stages = [s for s in recipe.stages if s.kind in TEACHER_KINDS]
    reporter = Reporter(recipe.name, teacher_label=train_stages[0].name if train_stages else "teacher")
    state: dict[str, Any] = {"recipe": recipe.name, "completed": []}
    created = not run_dir.exists()
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if (run_dir / "report.json").is_file():
            reporter.load(run_dir / "report.json")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe_path, run_dir / "recipe.yaml") if not (run_dir / "recipe.yaml").exists() else None

    done = {s["name"]: s for s in state["completed"]}
    model_dir: Path | None = None
    teacher_dir: Path | None = None
    outputs: dict[str, dict[str, Any]] = {}
    try:
        for index, stage in enumerate(recipe.stages):
            final_dir = run_dir / "stages" / f"{index:02d}-{stage.name}"
            if stage.name in done and final_dir.is_dir():
                rec = done[stage.name]
                outputs[stage.name] = rec["outputs"]
                if rec.get("model_dir"):
                    model_dir = Path(rec["model_dir"])
                    if stage.kind in TEACHER_KINDS and teacher_dir is None:
                        teacher_dir = model_dir
                log(f"stage {stage.name}: done earlier, skipped")
                continue
            log(f"stage {stage.name} ({stage.kind})")
            out_dir = run_dir / "stages" / f".{index:02d}-{stage.name}.partial"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            ctx = StageContext(
                recipe=recipe, stage=stage, index=index, run_dir=run_dir, out_dir=out_dir, final_dir=final_dir,
                data=data, reporter=reporter, model_dir=model_dir, teacher_dir=teacher_dir, outputs=outputs,
                resume=resume, checkpoint_dir=run_dir / "checkpoints" / stage.name,
            )
            started = time.perf_counter()
            try:
                result: StageResult = _load(STAGE_RUNNERS[stage.kind], f"stage '{stage.kind}'")(ctx)
            except BaseException:
                shutil.rmtree(out_dir, ignore_errors=True)
                reporter.drop_stage(stage.name)
                raise
            shutil.rmtree(final_dir, ignore_errors=True)
            out_dir.rename(final_dir)
            shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
            if result.model_dir is not None:
                model_dir = result.model_dir
                if stage.kind in TEACHER_KINDS and teacher_dir is None:
                    teacher_dir = model_dir
            outputs[stage.name] = result.outputs
            state["completed"] = [s for s in state["completed"] if s["name"] != stage.name] + [{
                "name": stage.name, "kind": stage.kind, "outputs": result.outputs,
                "model_dir": str(result.model_dir) if result.model_dir else None,
                "wall_s": round(time.perf_counter() - started, 1), "notes": result.notes,
            }]
            atomic_write_text(state_path, json.dumps(state, indent=2, default=str))
            _write_report(reporter, run_dir, recipe, data, state, describe_machine, describe_threads)
    except BaseException:
        if created and not state["completed"]:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    _write_report(reporter, run_dir, recipe, data, state, describe_machine, describe_threads)
    return run_dir


def _write_report(reporter, run_dir: Path, recipe: Recipe, data, state, describe_machine, describe_threads) -> None:
    reporter.meta = {
        "machine": describe_machine(),
        "threads": recipe.report.threads or describe_threads()["torch_threads"],
        "latency_seq_len": recipe.report.latency_seq_len,
        "model": recipe.model.model_dump(),
        "data": data.sizes(),
        "limits": {t.name: t.limit.model_dump(exclude_none=True) for t in recipe.tasks if t.limit.model_dump(exclude_none=True)},
        "stages": [{k: s[k] for k in ("name", "kind", "wall_s", "notes")} for s in state["completed"]],
        "outputs": {s["name"]: s["outputs"] for s in state["completed"]},
    }
    notes = [f"task '{t}' subsampled: {lim}" for t, lim in reporter.meta["limits"].items()]
    reporter.notes = sorted(set(n for n in reporter.notes if not n.startswith("task '")) | set(notes))
    reporter.write(run_dir)
