"""Recipe -> ordered stages -> run directory -> report, with resume.

The run directory's layout and ``state.json`` belong to :class:`compressor.rundir.RunDir`; ``<run>/.lock`` holds
the pid of the run holding the directory (flock; stale after a crash, taken over). Before a stage is recorded
complete, every model it wrote is loaded and checked (weights against the manifest, finite values, tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressor.console import say
from compressor.errors import CompressorError, RecipeError
from compressor.fsutil import LOCK_NAME, DirLock, atomic_write_bytes, relative_paths
from compressor.pipeline_checks import check_checkpoints, check_stage_models  # noqa: F401  (public here too)
from compressor.pipeline_checks import check_fitted_labels as _check_fitted_labels
from compressor.pipeline_checks import check_eval_splits, check_out as _check_out
from compressor.pipeline_checks import stage_os_error
from compressor.recipe import Recipe, load_recipe, resolve_data_root
from compressor.registry import load_target
from compressor.rundir import RunDir, StageRecord, teacher
from compressor.stage_kinds import gives
from compressor.stages import STAGE_KINDS, StageContext, StageResult


def run_recipe(recipe_path: Path, out: Path | None = None, resume: bool = False, data_root: Path | None = None,
               log=None, rerun_changed: bool = False) -> Path:
    """Run every stage of a recipe; returns the run directory (absolute).

    The run directory is locked for the whole run (a second run or resume into it fails at once, naming the
    holder's pid); SIGTERM cleans up like Ctrl-C. A resume compares the recipe with what each completed stage
    computed (:mod:`compressor.resume`): a change is refused, or with ``rerun_changed`` the stages from the
    first changed one run again.
    """
    from compressor.checks import check_models, check_stage_chain, check_tasks

    log = log or say
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    check_tasks(recipe, recipe_path)  # plugin typos and options name the recipe file and field
    check_stage_chain(recipe, recipe_path)  # a stage without its input fails now, not after training
    for note in check_models(recipe, recipe_path):  # max_length, remote code, manifests: before any training
        log(note)
    for i, stage in enumerate(recipe.stages):  # e.g. a search space against the loaded model's architecture
        preflight = STAGE_KINDS.get(stage.kind).preflight
        if preflight:
            load_target(preflight, f"stage '{stage.kind}' preflight")(recipe, i)
    from compressor.distill.cache import check_recipe_caches

    check_recipe_caches(recipe)  # teacher-cache folders the recipe names: writable, of this teacher
    run_dir = Path(os.path.abspath(out if out else Path("runs") / recipe.name))
    _check_out(run_dir)

    from compressor.data.store import DataStore

    # read and check every training split before anything is written
    data = DataStore(recipe.data_options(), resolve_data_root(recipe.data_root, data_root, required=False))
    fitted = [t.name for t in recipe.tasks if not data.tasks[t.name].labels]
    data.fit_labels()
    _check_fitted_labels(data, fitted)
    check_eval_splits(data)

    existed = run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"{run_dir}: cannot create the run directory (--out): {exc.strerror or exc}") from None
    lock = DirLock(run_dir)
    if _is_main_rank():
        try:
            lock.acquire()
        except CompressorError:
            raise
        except OSError as exc:
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise RecipeError(f"{run_dir}: cannot write the run directory (--out): {exc.strerror or exc}") from None
        if lock.previous_pid:
            log(f"took over the lock of process {lock.previous_pid}, which is no longer running")
    try:
        with _sigterm_as_exit():
            return _run_locked(recipe, recipe_path, run_dir, existed, resume, data, log, rerun_changed)
    finally:
        lock.release()


def _run_locked(recipe: Recipe, recipe_path: Path, run_dir: Path, existed: bool, resume: bool, data, log,
                rerun_changed: bool = False) -> Path:
    from compressor.report.rows import Reporter
    from compressor.resume import fingerprint, input_fields

    run = RunDir(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if entries and not resume:
        raise RecipeError(f"{run_dir}: run directory is not empty; pass --resume to continue it or --out for a new one")
    fresh = not entries  # nothing of ours was there: a failure before the first stage completes removes it all
    train_stages = [s for s in recipe.stages if gives(s.kind, "teacher")]
    reporter = Reporter(recipe.name, teacher_label=train_stages[0].name if train_stages else "teacher")
    state: dict[str, Any] = {"recipe": recipe.name, "completed": []}
    inputs = input_fields(recipe, data)
    prints = [fingerprint(inputs, s) for s in recipe.stages]
    previous = run.recipe_path.read_bytes() if run.recipe_path.is_file() else None
    copied = False
    try:
        if resume and run.state_path.is_file():
            state = run.read_state()
            if run.report_json.is_file():
                reporter.load(run.report_json)
                # the split sizes earlier processes read (a resume that skips stages reads fewer splits itself)
                reporter.meta["data"] = json.loads(run.report_json.read_text()).get("data") or {}
        _plan(recipe, run, state, prints, reporter, rerun_changed, log)
        # the recipe as run: every completed stage's fingerprint now matches it (what differs changes no result)
        atomic_write_bytes(run.recipe_path, recipe_path.read_bytes())
        copied = True
        _run_stages(recipe, run, state, data, reporter, resume, log, prints, rerun_changed)
    except BaseException as exc:
        if not state["completed"]:
            _take_back(run, fresh, existed, copied, previous)
        if isinstance(exc, KeyboardInterrupt | Terminated) and _kept_checkpoints(run):
            log(f"interrupted; the last checkpoint is kept under {run.path / 'checkpoints'}: continue with --resume")
        raise
    _write_report(reporter, run_dir, recipe, data, state)
    return run_dir


def _kept_checkpoints(run: RunDir) -> bool:
    """Whether a stage left an epoch checkpoint (any file but the hidden fingerprint) that --resume continues."""
    root = run.path / "checkpoints"
    return root.is_dir() and any(p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                                 for p in root.rglob("*"))


def _take_back(run: RunDir, fresh: bool, existed: bool, copied: bool, previous: bytes | None = None) -> None:
    """A run that completed no stage leaves nothing behind: a fresh run removes all it wrote, a resume what this
    attempt added. An epoch checkpoint is kept (with the recipe), as ``kill -9`` keeps it, so --resume continues."""
    if fresh and _kept_checkpoints(run):
        for p in run.path.iterdir():
            if p.name not in (LOCK_NAME, "checkpoints", run.recipe_path.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    if fresh:
        if not existed:
            shutil.rmtree(run.path, ignore_errors=True)
            return
        for p in run.path.iterdir():
            if p.name != LOCK_NAME:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    if copied:
        if previous is not None:
            atomic_write_bytes(run.recipe_path, previous)
        else:
            run.recipe_path.unlink(missing_ok=True)
    for sub in (run.path / "stages", run.path / "checkpoints"):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()


def _done(recipe: Recipe, run: RunDir, state: dict[str, Any]) -> list[bool]:
    """Which stages are complete: recorded and in place, and every stage before them too (a stage computes from
    the ones before it)."""
    done = {s["name"] for s in state["completed"]}
    flags, ok = [], True
    for index, stage in enumerate(recipe.stages):
        ok = ok and stage.name in done and run.stage_dir(index, stage.name).is_dir()
        flags.append(ok)
    return flags


def _plan(recipe: Recipe, run: RunDir, state: dict[str, Any], prints, reporter, rerun: bool, log) -> None:
    """Compare the completed stages' fingerprints with the recipe's; forget the stages that run again."""
    from compressor.resume import plan_resume

    completed = {s["name"]: s for s in state["completed"]}
    plan = plan_resume(run.state_path, completed, recipe.stages, prints, _done(recipe, run, state), rerun)
    if plan.rerun_from is not None:
        again = {s.name for s in recipe.stages[plan.rerun_from:]}
        log(f"the recipe changed since the run: {plan.changes}; re-running from stage "
            f"'{recipe.stages[plan.rerun_from].name}'")
        state["completed"] = [s for s in state["completed"] if s["name"] not in again]
        for name in again:
            reporter.drop_stage(name)
            shutil.rmtree(run.checkpoint_dir(name), ignore_errors=True)
        if plan.rerun_from == 0:
            reporter.meta["data"] = {}  # the split sizes are read again


def _run_stages(recipe: Recipe, run: RunDir, state: dict[str, Any], data, reporter, resume: bool, log,
                prints=None, rerun: bool = False) -> None:
    done = {s["name"]: s for s in state["completed"]}
    flags = _done(recipe, run, state)
    records: list[StageRecord] = []  # this recipe's stages so far, done earlier or now
    for index, stage in enumerate(recipe.stages):
        if flags[index]:
            entry = done[stage.name]
            log(f"stage {stage.name}: done earlier, skipped")
        else:
            log(f"stage {stage.name} ({stage.kind})")
            model = next((r.model_dir for r in reversed(records) if r.model_dir is not None), None)
            first = teacher(records)
            ctx = StageContext(
                recipe=recipe, stage=stage, index=index, run_dir=run.path, out_dir=run.partial_dir(index, stage.name),
                final_dir=run.stage_dir(index, stage.name), data=data, reporter=reporter, model_dir=model,
                teacher_dir=first.model_dir if first else None, outputs={r.name: r.outputs for r in records},
                resume=resume, checkpoint_dir=run.checkpoint_dir(stage.name),
            )
            entry = _run_stage(ctx, prints[index] if prints else None, rerun)
            later = {s.name for s in recipe.stages[index:]}  # what ran from earlier stages' outputs is stale now
            state["completed"] = [s for s in state["completed"] if s["name"] not in later] + [entry]
            run.write_state(state)
            _write_report(reporter, run.path, recipe, data, state)
        records.append(replace(StageRecord.from_json(entry), kind=stage.kind))


def _run_stage(ctx: StageContext, print_: dict[str, Any] | None = None, rerun: bool = False) -> dict[str, Any]:
    """Run one stage into its partial directory, check its models, move it into place; its ``state.json``
    record (with its fingerprint). An OS error (disk full, permissions) fails the stage naming the path."""
    from compressor.resume import check_checkpoint_fingerprint, stage_defaults, write_checkpoint_fingerprint

    stage, out_dir, final_dir = ctx.stage, ctx.out_dir, ctx.final_dir
    started = time.perf_counter()
    try:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        if print_ is not None and ctx.resume and check_checkpoint_fingerprint(ctx.checkpoint_dir, stage.name,
                                                                              print_, rerun, stage_defaults(stage)):
            shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # written under other settings: start afresh
    except OSError as exc:
        raise stage_os_error(exc, stage.name, out_dir) from None
    kill_hook = _test_kill_hook(stage.name, out_dir, ctx.checkpoint_dir)
    try:
        if ctx.resume:
            check_checkpoints(ctx.checkpoint_dir, stage.name)
        if print_ is not None:  # what the checkpoints this attempt writes are computed with
            write_checkpoint_fingerprint(ctx.checkpoint_dir, print_)
        result: StageResult = load_target(STAGE_KINDS.get(stage.kind).runner, f"stage '{stage.kind}'")(ctx)
        check_stage_models(result, out_dir, final_dir)  # whatever the stage evaluated: load and check
        if kill_hook is not None:  # TEST ONLY: the stage wrote nothing the watcher saw; die before it is recorded
            kill_hook()
    except BaseException as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        ctx.reporter.drop_stage(stage.name)
        _drop_empty_checkpoints(ctx.checkpoint_dir)
        failure = stage_os_error(exc, stage.name, ctx.run_dir)  # the file when the error names one
        if failure is not None:
            raise failure from None
        raise
    try:
        shutil.rmtree(final_dir, ignore_errors=True)
        out_dir.rename(final_dir)
    except OSError as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise stage_os_error(exc, stage.name, final_dir) from None
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    _drop_empty_checkpoints(ctx.checkpoint_dir)  # and checkpoints/ itself once no stage has one
    entry = {"name": stage.name, "kind": stage.kind, "outputs": result.outputs,
             "model_dir": str(result.model_dir) if result.model_dir else None,
             "wall_s": round(time.perf_counter() - started, 1), "notes": result.notes}
    if print_ is not None:
        entry["fingerprint"] = print_
    return entry


def _drop_empty_checkpoints(checkpoint_dir: Path | None) -> None:
    """A stage without a saved checkpoint leaves no checkpoint folder (its fingerprint alone is not one), and
    ``checkpoints/`` goes once it is empty."""
    if checkpoint_dir is None:
        return
    if checkpoint_dir.is_dir() and not any(
            p.is_file() and not any(part.startswith(".") for part in p.relative_to(checkpoint_dir).parts)
            for p in checkpoint_dir.rglob("*")):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    try:
        checkpoint_dir.parent.rmdir()
    except OSError:
        pass


# ---- TEST ONLY: kill -9 inside a stage -----------------------------------------------------------------------
KILL_ENV = "COMPRESSOR_TEST_KILL_IN_STAGE"


def _test_kill_hook(stage: str, out_dir: Path, checkpoint_dir: Path | None):
    """TEST ONLY (``tests/test_resume_kill.py``): with ``$COMPRESSOR_TEST_KILL_IN_STAGE`` naming this stage, the
    process SIGKILLs itself (what ``kill -9`` does: no cleanup, no handlers) right after the stage's first write
    has been moved into place: a file under its output or checkpoint directory whose path has no hidden
    (temporary) part, e.g. the first epoch checkpoint of a train stage, or the first model a stage saved. If the
    stage finishes without such a write being seen, it dies before the stage is recorded complete. Returns that
    last-resort kill, or None when the variable does not name this stage (always, outside tests)."""
    if os.environ.get(KILL_ENV) != stage:
        return None

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def written() -> bool:
        for root in (out_dir, checkpoint_dir):
            if root is not None and root.is_dir():
                for p in root.rglob("*"):
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
                        return True
        return False

    def watch() -> None:
        while not written():
            time.sleep(0.005)
        die()

    def before_change(event: str, _args: tuple) -> None:
        # a loaded machine can starve the watcher thread for a whole epoch: the stage's next change to the disk
        # after a first file is in place (the next checkpoint, clearing one, saving a model) dies first, so the
        # kill never lands later than "right after the first write", whatever the scheduling
        if event in _DISK_CHANGES and written():
            die()

    sys.addaudithook(before_change)
    threading.Thread(target=watch, daemon=True, name="test-kill-watcher").start()
    return die


_DISK_CHANGES = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move", "tempfile.mkdtemp",
                 "tempfile.mkstemp"}


def _is_main_rank() -> bool:
    """Under ``accelerate launch`` every rank runs the pipeline; only rank 0 holds the run directory's lock."""
    return os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")


class Terminated(SystemExit):
    """SIGTERM, raised where the run is so that it cleans up exactly as Ctrl-C does (exit code 143)."""


@contextmanager
def _sigterm_as_exit():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_report(reporter, run_dir: Path, recipe: Recipe, data, state) -> None:
    from compressor.measure import describe_threads
    from compressor.report.machine import describe_machine

    reporter.meta = {
        "machine": describe_machine(),
        "threads": recipe.report.threads or describe_threads()["torch_threads"],
        "latency_seq_len": recipe.report.latency_seq_len,
        "model": recipe.model.model_dump(),
        "data": _merge_sizes((reporter.meta or {}).get("data") or {}, data.sizes()),
        "limits": {t.name: t.limit.model_dump(exclude_none=True) for t in recipe.tasks if t.limit.model_dump(exclude_none=True)},
        "stages": [{k: s[k] for k in ("name", "kind", "wall_s", "notes")} for s in state["completed"]],
        "outputs": relative_paths({s["name"]: s["outputs"] for s in state["completed"]}, run_dir),
    }
    notes = [f"task '{t}' subsampled: {lim}" for t, lim in reporter.meta["limits"].items()]
    reporter.notes = sorted(set(n for n in reporter.notes if not n.startswith("task '")) | set(notes))
    reporter.write(run_dir)


def _merge_sizes(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """task -> split -> sizes: what this process read over what an earlier process of the same run recorded, so a
    resumed run reports every split the uninterrupted run does (with its truncation counts)."""
    out = {task: {split: dict(v) for split, v in splits.items() if isinstance(v, dict)}
           for task, splits in (earlier.items() if isinstance(earlier, dict) else ()) if isinstance(splits, dict)}
    for task, splits in now.items():
        for split, sizes in splits.items():
            out.setdefault(task, {}).setdefault(split, {}).update(sizes)
    return out
