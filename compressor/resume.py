"""What ``--resume`` compares: a fingerprint of the recipe fields (and data) that determine what a stage computes.

Every completed stage's record in ``state.json`` keeps its fingerprint: a flat ``{field: value}`` map of the
recipe's inputs (seed, model, every task's plugin, labels, options, limits, formats, encodings and the sha256 of
each data file it reads) and of the stage's own configuration (``stages.<name>.<field>``). A stage computes from
the stages before it, so a change to one stage's fields affects it and every later stage; a change to the inputs
affects every stage. Fields that change no stage's computation (``report.*``, the recipe's name, the data root's
spelling) are not in the fingerprint. The running stage's fingerprint lies beside its epoch checkpoints
(``checkpoints/<stage>/.fingerprint.json``), so a checkpoint is never continued under other settings either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import RecipeError
from compressor.fsutil import atomic_write_text

FINGERPRINT_FILE = ".fingerprint.json"  # hidden: checkpoint readers and the kill test skip hidden files
RERUN_OPTION = "--rerun-from-changed"
_HASH_CHUNK = 1 << 20


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def input_fields(recipe: Any, data: Any) -> dict[str, Any]:
    """The fields every stage depends on: seed, model, tasks (without data paths) and each data file's content."""
    out: dict[str, Any] = {"seed": recipe.seed}
    _flat("model", recipe.model.model_dump(mode="json"), out)
    for task in recipe.tasks:
        spec = task.model_dump(mode="json", exclude={"name", "data", "tests"})
        _flat(f"tasks.{task.name}", spec, out)
        for split, entry in task.split_files().items():  # train, dev, test and each extra 'test:<name>'
            key = f"tasks.{task.name}.data.{split}"
            out[f"{key}.format"], out[f"{key}.encoding"] = entry.format, entry.encoding
            path = data.path(task.name, split) if data is not None else None
            # the content, not the path: the same files under another --data-root resume
            out[f"{key}.sha256"] = file_sha256(path) if path is not None and Path(path).is_file() else None
    return out


def stage_fields(stage: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _flat(f"stages.{stage.name}", stage.model_dump(mode="json", exclude={"name"}), out)
    return out


def fingerprint(inputs: Mapping[str, Any], stage: Any) -> dict[str, Any]:
    """The fingerprint of one stage: the run's inputs and the stage's own fields. An absolute path (an encoder or
    model directory given by path) is kept as its portable form plus a digest of the whole path, so state.json
    holds no build-machine path and a changed path is still seen."""
    return {k: _no_abs_path(v) for k, v in {**inputs, **stage_fields(stage)}.items()}


def _no_abs_path(value: Any) -> Any:
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    from compressor.fsutil import portable

    return f"{portable(value)} (path sha256 {hashlib.sha256(value.encode()).hexdigest()[:12]})"


def stage_defaults(stage: Any) -> dict[str, Any]:
    """Every field of ``stage`` that has a default, flattened as :func:`stage_fields` flattens the stage."""
    out: dict[str, Any] = {}
    _defaults(type(stage), f"stages.{stage.name}", out)
    return out


def _defaults(cls: Any, prefix: str, out: dict[str, Any]) -> None:
    from pydantic import BaseModel

    for name, info in cls.model_fields.items():
        if name == "name" or info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        _flat(f"{prefix}.{name}", default.model_dump(mode="json") if isinstance(default, BaseModel) else default, out)


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any],
                   defaults: Mapping[str, Any] | None = None) -> list[str]:
    """The fields whose values differ (or that one side lacks), sorted. A field one side lacks and the other holds
    at its default (``defaults``: an option a newer version added, left as it was) is no change."""
    defaults = defaults or {}

    def differs(k: str) -> bool:
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if a is _MISSING or b is _MISSING:
            return (b if a is _MISSING else a) != defaults.get(k, _MISSING)
        return a != b

    return sorted(k for k in set(old) | set(new) if differs(k))


_MISSING = object()


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], fields: Sequence[str], limit: int = 6) -> str:
    """``field (old -> new), ...`` cut to a readable length."""
    def short(v: Any) -> str:
        text = json.dumps(v, default=str) if v is not _MISSING else "absent"
        return text if len(text) <= 24 else text[:12] + "..."

    parts = [f"{f} ({short(old.get(f, _MISSING))} -> {short(new.get(f, _MISSING))})" for f in fields[:limit]]
    if len(fields) > limit:
        parts.append(f"and {len(fields) - limit} more")
    return ", ".join(parts)


@dataclass(frozen=True)
class ResumePlan:
    """What a resume runs again: stages from ``rerun_from`` (an index; None: nothing completed is redone)."""

    rerun_from: int | None
    changes: str = ""


def plan_resume(state_path: Path, completed: Mapping[str, Mapping[str, Any]], stages: Sequence[Any],
                prints: Sequence[Mapping[str, Any]], done: Sequence[bool], rerun: bool) -> ResumePlan:
    """Compare each completed stage's stored fingerprint with the recipe's; the first stage that differs is
    refused (a ``RecipeError`` naming the fields) unless ``rerun``, when it and every later stage run again.
    Records of runs written before fingerprints existed are not compared."""
    for i, stage in enumerate(stages):
        if not done[i]:
            continue
        old = completed[stage.name].get("fingerprint")
        if not isinstance(old, Mapping):
            continue
        fields = changed_fields(old, prints[i], stage_defaults(stage))
        if not fields:
            continue
        changes = describe_changes(old, prints[i], fields)
        if not rerun:
            raise RecipeError(f"{state_path}: the recipe changed what completed stage '{stage.name}' computed: "
                              f"{changes}; pass {RERUN_OPTION} to re-run from stage '{stage.name}', or use "
                              "another --out")
        return ResumePlan(i, changes)
    return ResumePlan(None)


def check_checkpoint_fingerprint(checkpoint_dir: Path | None, stage: str, print_: Mapping[str, Any],
                                 rerun: bool, defaults: Mapping[str, Any] | None = None) -> bool:
    """Before a stage continues from its checkpoints: were they written under the same fingerprint? A change is
    refused unless ``rerun`` (then returns True: the caller discards the checkpoints)."""
    if checkpoint_dir is None:
        return False
    path = checkpoint_dir / FINGERPRINT_FILE
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    if not isinstance(old, Mapping):
        old = {}
    fields = changed_fields(old, print_, defaults)
    if not fields:
        return False
    if not rerun:
        raise RecipeError(f"{path}: the recipe changed what the checkpoints of stage '{stage}' were computed "
                          f"with: {describe_changes(old, print_, fields)}; pass {RERUN_OPTION} to restart the "
                          "stage, or use another --out")
    return True


def write_checkpoint_fingerprint(checkpoint_dir: Path | None, print_: Mapping[str, Any]) -> None:
    if checkpoint_dir is not None:
        atomic_write_text(checkpoint_dir / FINGERPRINT_FILE, json.dumps(dict(print_), sort_keys=True, default=str))
