"""The pipeline's checks: ``--out`` before anything is written, fitted label schemas against dev and test, every
dev and test split before training, the models a stage wrote before it is recorded complete, a stage's
checkpoints before it resumes, and the one-line error of a stage the environment failed (disk full, permissions).

Split out of :mod:`compressor.pipeline`, which re-exports :func:`check_stage_models` and :func:`check_checkpoints`.
"""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import CompressorError, RecipeError
from compressor.stages import StageResult


def check_out(run_dir: Path) -> None:
    """``--out`` must be a directory or a path that can become one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{run_dir}: --out is an existing file, not a directory")
    for parent in run_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RecipeError(f"{run_dir}: --out lies below {parent}, which is a file")
            break


def check_stage_models(result: StageResult, out_dir: Path, final_dir: Path) -> None:
    """Load every model a stage wrote (and the one it names) and check it: weights against the manifest, finite
    values, tokenizer. Paths under ``final_dir`` are read from ``out_dir``, where they still are."""
    from compressor.model.io import MANIFEST, check_model_dir

    dirs = {p.parent for p in out_dir.rglob(MANIFEST)}
    if result.model_dir is not None:
        named = Path(result.model_dir)
        try:
            named = out_dir / named.relative_to(final_dir)
        except ValueError:
            pass
        dirs.add(named)
    for d in sorted(dirs):
        check_model_dir(d)


def check_checkpoints(checkpoint_dir: Path | None, stage: str) -> None:
    """Before a stage resumes: every file of its checkpoint folder is readable (safetensors, JSON, torch
    tensors-only pickles), so a corrupt or crafted file is a one-line error naming it, not a traceback."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return
    for f in sorted(checkpoint_dir.rglob("*")):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(checkpoint_dir).parts):
            continue
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                load_file(str(f))
            elif f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix in (".pt", ".bin"):
                import warnings

                import torch

                with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a file
                    warnings.simplefilter("ignore")
                    torch.load(f, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - every reader has its own error types
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            if "Weights only load failed" in first:
                first = "it holds objects other than tensors; refused, unpickling it could run code"
            raise CompressorError(f"{f}: unreadable checkpoint of stage '{stage}' ({first[:200]}); remove "
                                  f"{checkpoint_dir} to restart the stage from scratch") from None


def stage_os_error(exc: BaseException, stage: str, where: Path) -> CompressorError | None:
    """The one-line error of a stage that the environment failed (disk full, permissions, I/O), naming the file
    (or, when the error names none, the directory the stage was writing to); ``None`` for any other failure."""
    import errno as _errno

    from compressor.errors import os_failure

    reason = os_failure(exc)
    if reason is None:
        return None
    path = getattr(exc, "filename", None)
    place = f"{path}" if path is not None else f"writing under {where}"
    if getattr(exc, "filename2", None) is not None:
        place += f" -> {exc.filename2}"
    hint = ""
    if getattr(exc, "errno", None) in (_errno.ENOSPC, _errno.EDQUOT) or "space" in reason.lower():
        hint = "; free some space and continue with --resume (the stage was not recorded complete)"
    return CompressorError(f"stage '{stage}': {place}: {reason}{hint}")


def check_fitted_labels(data, fitted: list[str]) -> None:
    """A label schema fitted from the training split must cover the dev and test labels; otherwise the
    training file is the one to blame (too small or incomplete), not the first evaluation file that shows it."""
    from compressor.errors import DataError

    for name, task in data.tasks.items():  # an extra test set's labels must be in the schema, fitted or given
        for split in [s for s in data.eval_splits(name) if s.startswith("test:")]:
            extra = sorted(set(task.fit_labels(data.examples(name, split))) - set(task.labels or []))
            if extra and task.labels:
                raise DataError(data.path(name, split), f"task '{name}': the extra test set '{split[5:]}' has "
                                f"label(s) {extra} outside the task's label schema {list(task.labels)}; a test set "
                                "is scored on the labels the model was trained on")
    for name in fitted:
        task = data.tasks[name]
        for split in ("dev", "test"):
            if not data.has(name, split):
                continue
            extra = sorted(set(task.fit_labels(data.examples(name, split))) - set(task.labels))
            if extra:
                n = len(data.examples(name, "train"))
                raise DataError(data.path(name, "train"), f"task '{name}': the training split ({n} example(s)) "
                                f"has only the labels {task.labels}, but the {split} split ({data.path(name, split)}) "
                                f"also has {extra}; use a complete training file or give tasks[].labels")


def check_eval_splits(data) -> None:
    """Read every split an evaluation scores (dev, test, extra test sets) before any training, so a malformed
    line or an example the split cannot use (``TaskPlugin.check_split``: a QA question without an answer) fails
    now, not after training."""
    for name in data.tasks:
        for split in data.eval_splits(name):
            data.examples(name, split)
