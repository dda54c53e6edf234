"""Per-task teachers of a distillation: which model teaches each task.

A distill stage's ``teachers: {task: <name> | auto}`` lets each task learn from its own teacher:

* the name of an earlier ``train`` or ``load`` stage: that multi-task model (the run's teacher by default);
* ``single:<task>``: the single-task twin a ``train`` stage with ``baselines: true`` trained for that task;
* the name of an earlier ``finetune`` stage: its model of that task;
* ``auto``: of all those the run has for the task, the one with the best dev metric (report rows; a fine-tuned
  model's recorded dev metric when it has no row).

:func:`preflight` checks a recipe before anything is written (names, tasks, and the tokenizers and widths of
model directories ``load`` stages name); :func:`resolve` picks each task's teacher from what earlier stages
left, loads each model once and checks that it can teach: the same tokenizer and the task's labels, and, when a
loss reads hidden states or attentions, the width of the run's teacher and the layers of the layer map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import RecipeError

AUTO = "auto"
TWIN = "single:"
TEACHER_STAGE_KINDS = ("train", "load")  # stages whose model is a multi-task teacher


@dataclass(frozen=True)
class Candidate:
    """A model that could teach ``task``: its name in a recipe, its directory, its dev metric on the task."""

    name: str
    task: str
    model_dir: Path
    dev: float | None = None


@dataclass
class TaskTeachers:
    """Each task's teacher: ``models`` (task -> loaded model; tasks with the same teacher share one object),
    ``chosen`` (task -> what the outputs record: teacher name, model directory, dev metric, why)."""

    models: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)

    def distinct(self) -> list[Any]:
        """Every teacher once, in task order."""
        seen: dict[int, Any] = {}
        for model in self.models.values():
            seen.setdefault(id(model), model)
        return list(seen.values())


def needs_match(kd: Any) -> bool:
    """Whether the loss reads the teacher's hidden states or attentions (then widths and layers must match)."""
    return kd.alpha < 1 and (kd.hidden > 0 or kd.attention > 0)


# ---- before anything is written ------------------------------------------------------------------------------
def preflight(recipe: Any, index: int) -> None:
    """The distill stage's ``teachers`` against the recipe: every name is an earlier stage that can teach the
    task, ``auto`` has a candidate, and ``load`` stages' models (read from their directories) have the task, the
    run teacher's tokenizer and, when the loss needs it, its width and layers. A ``RecipeError`` naming
    ``stages[index].teachers.<task>``."""
    stage = recipe.stages[index]
    teachers = getattr(stage, "teachers", None) or {}
    if not teachers:
        return
    earlier = list(recipe.stages[:index])
    task_names = [t.name for t in recipe.tasks]
    run_teacher = next((s for s in earlier if s.kind in TEACHER_STAGE_KINDS), None)
    for task, name in teachers.items():
        where = f"stages[{index}].teachers.{task}"
        if task not in task_names:
            raise RecipeError(f"{where}: the recipe has no task '{task}' (tasks: {task_names})")
        if name == AUTO:
            if not any(_may_have(s, task, recipe) for s in earlier if s.kind in (*TEACHER_STAGE_KINDS, "finetune")) \
                    and not _twin_stages(earlier, recipe):
                raise RecipeError(f"{where}: auto: no earlier stage has a model of task '{task}' (candidates: the "
                                  "train / load stages' models, single-task twins, finetune stages' models)")
            continue
        if name.startswith(TWIN):
            _check_twin(where, name, task, earlier, recipe)
            continue
        match = next((s for s in earlier if s.name == name), None)
        if match is None:
            later = any(s.name == name for s in recipe.stages[index:])
            raise RecipeError(f"{where}: '{name}' is {'a later stage' if later else 'no stage of the recipe'}; "
                              f"expected an earlier train, load or finetune stage, single:<task> or auto (earlier: "
                              f"{[s.name for s in earlier] or 'none'})")
        if match.kind not in (*TEACHER_STAGE_KINDS, "finetune"):
            raise RecipeError(f"{where}: '{name}' is a stage of kind {match.kind}; a teacher is a train, load or finetune "
                              "stage's model, single:<task> or auto")
        if not _may_have(match, task, recipe):
            raise RecipeError(f"{where}: the model of stage '{name}' has no task '{task}'")
        if match.kind == "load" and run_teacher is not None and run_teacher.kind == "load" and match is not run_teacher:
            _check_dirs(where, Path(run_teacher.path), Path(match.path), stage)


def _check_twin(where: str, name: str, task: str, earlier: Sequence[Any], recipe: Any) -> None:
    twin_task = name[len(TWIN):]
    if not _twin_stages(earlier, recipe):
        raise RecipeError(f"{where}: '{name}': no earlier train stage trains single-task twins (baselines: true, "
                          "and more than one task)")
    if twin_task != task:
        raise RecipeError(f"{where}: '{name}' is the twin of task '{twin_task}'; it has no task '{task}' to teach "
                          f"(use single:{task})")


def _twin_stages(earlier: Sequence[Any], recipe: Any) -> list[Any]:
    return [s for s in earlier if s.kind == "train" and s.baselines and len(recipe.tasks) > 1]


def _may_have(stage: Any, task: str, recipe: Any) -> bool:
    """Whether the stage's model can have ``task`` (a load stage: its manifest; a finetune stage: its tasks)."""
    if stage.kind == "load":
        from compressor.model.io import read_manifest

        try:
            manifest = read_manifest(Path(stage.path).expanduser().resolve())
        except Exception:  # noqa: BLE001 - the load stage's own check reports an unreadable directory
            return True
        return task in {t.get("name") for t in manifest.get("tasks") or []}
    if stage.kind == "finetune":
        return stage.tasks is None or task in stage.tasks
    return stage.kind == "train"


def _check_dirs(where: str, reference: Path, other: Path, stage: Any) -> None:
    """Two model directories (the run's teacher's, a named teacher's): the same tokenizer, and the same width
    and enough layers when the loss reads hidden states or attentions."""
    from compressor.distill.objective import kd_config
    from compressor.model.io import load_tokenizer, read_manifest

    ref_dir, other_dir = reference.expanduser().resolve(), other.expanduser().resolve()
    try:
        ref, oth = read_manifest(ref_dir), read_manifest(other_dir)
        same_tokenizer = load_tokenizer(ref_dir).get_vocab() == load_tokenizer(other_dir).get_vocab()
    except Exception:  # noqa: BLE001 - the load stages report unreadable directories themselves
        return
    if not same_tokenizer or ref["architecture"].get("vocab_size") != oth["architecture"].get("vocab_size"):
        raise RecipeError(f"{where}: {other_dir} has another tokenizer / vocabulary than the run's teacher "
                          f"({ref_dir}); a teacher must read the student's token ids")
    if needs_match(kd_config(stage)):
        _check_shape(where, str(other_dir), int(oth["architecture"]["hidden_size"]),
                     len(oth["architecture"].get("layers") or []), int(ref["architecture"]["hidden_size"]),
                     stage.layer_map)


def _check_shape(where: str, what: str, width: int, layers: int, reference_width: int,
                 layer_map: Mapping[int, int] | None) -> None:
    if width != reference_width:
        raise RecipeError(f"{where}: {what} is {width} wide, the run's teacher {reference_width}: hidden-state and "
                          "attention losses need one width (set weights.hidden and weights.attention to 0 to learn "
                          "from its logits only)")
    if layer_map and max(layer_map.values()) >= layers:
        raise RecipeError(f"{where}: {what} has {layers} layers; the layer map reads teacher layer "
                          f"{max(layer_map.values())} (hidden-state and attention losses need it)")


# ---- when the stage runs ---------------------------------------------------------------------------------------
def candidates(ctx: Any, task: str) -> list[Candidate]:
    """Every model the run has for ``task`` so far, in stage order: train / load stages' models that have it,
    single-task twins, finetune stages' models; each with its dev metric on the task (or None)."""
    from compressor.model.io import read_manifest
    from compressor.rundir import ModelDir

    rows = [r for r in ctx.reporter.rows if r.get("task") == task and r.get("split") == "dev"]

    def dev_of(label: str, stage: str) -> float | None:
        row = next((r for r in rows if r["model"] == label and r["stage"] == stage), None)
        return None if row is None else float(row["value"])

    found: list[Candidate] = []
    for stage in ctx.recipe.stages[: ctx.index]:
        out = ctx.outputs.get(stage.name) or {}
        if stage.kind in TEACHER_STAGE_KINDS:
            _, model = ctx.latest(ModelDir, stage.name)
            if task in {t.get("name") for t in read_manifest(model.path).get("tasks") or []}:
                found.append(Candidate(stage.name, task, Path(model.path), dev_of(stage.name, stage.name)))
            twin = (out.get("baselines") or {}).get(task) if stage.kind == "train" else None
            if twin:
                found.append(Candidate(f"{TWIN}{task}", task, Path(twin), dev_of(f"{TWIN}{task}", stage.name)))
        elif stage.kind == "finetune" and task in (out.get("models") or {}):
            dev = dev_of(f"{stage.name}:{task}", stage.name)
            recorded = (out.get("dev") or {}).get(task)
            found.append(Candidate(stage.name, task, Path(out["models"][task]),
                                   dev if dev is not None else recorded))
    return found


def choose(where: str, name: str, task: str, found: Sequence[Candidate], higher_is_better: bool,
           ) -> tuple[Candidate, str]:
    """The candidate ``name`` asks for (``auto``: the best dev metric; ties go to the earlier one) and why."""
    if name != AUTO:
        match = [c for c in found if c.name == name]
        if not match:
            raise RecipeError(f"{where}: '{name}' left no model of task '{task}' (models of it: "
                              f"{[c.name for c in found] or 'none'})")
        return match[-1], "named in the recipe"
    if not found:
        raise RecipeError(f"{where}: auto: no earlier stage left a model of task '{task}'")
    scored = [c for c in found if c.dev is not None]
    if not scored:
        return found[0], f"auto: no candidate has a dev metric on {task}; the first, {found[0].name}"
    best = scored[0]
    for c in scored[1:]:
        if (c.dev > best.dev) if higher_is_better else (c.dev < best.dev):
            best = c
    listing = ", ".join(f"{c.name} {c.dev:.4f}" if c.dev is not None else f"{c.name} n/a" for c in found)
    return best, f"auto: best dev {'(higher is better)' if higher_is_better else '(lower is better)'} of {listing}"


def resolve(ctx: Any, student: Any, teacher: Any, tokenizer: Any, kd: Any, layer_map: Mapping[int, int]
            ) -> TaskTeachers:
    """Each of the student's tasks' teacher: the stage's ``teachers`` choice or the run's ``teacher`` (already
    loaded, from ``ctx.teacher_dir``). Each other model is loaded once and checked against the run's teacher
    (tokenizer, the task's labels, and width / layers when the loss needs them). Raises a ``RecipeError`` naming
    ``stages[i].teachers.<task>``."""
    from compressor.model.architecture import encoder_layers
    from compressor.model.io import load_model

    cfg = ctx.stage
    named: dict[str, str] = dict(cfg.teachers or {})
    unknown = [t for t in named if t not in student.tasks]
    if unknown:
        raise RecipeError(f"stages[{ctx.index}].teachers.{unknown[0]}: the student has no task '{unknown[0]}' "
                          f"(its tasks: {list(student.tasks)})")
    run_dir = Path(ctx.teacher_dir).resolve()
    loaded: dict[Path, Any] = {run_dir: teacher}
    out = TaskTeachers()
    vocab = tokenizer.get_vocab()
    for task in student.tasks:
        where = f"stages[{ctx.index}].teachers.{task}"
        if task not in named:
            if task not in teacher.tasks:
                raise RecipeError(f"stages[{ctx.index}].teachers: the run's teacher has no task '{task}'; name a "
                                  f"teacher for it ({where}: <stage> or auto)")
            out.models[task] = teacher
            out.chosen[task] = {"teacher": _name_of(ctx), "model_dir": str(run_dir), "dev": None,
                                "reason": "the run's teacher (default)"}
            continue
        metric = student.tasks[task].metric
        pick, reason = choose(where, named[task], task, candidates(ctx, task), metric.higher_is_better)
        path = pick.model_dir.resolve()
        if path not in loaded:
            model, model_tokenizer, _ = load_model(path)
            if model_tokenizer.get_vocab() != vocab or (model.encoder.get_input_embeddings().num_embeddings
                                                        != teacher.encoder.get_input_embeddings().num_embeddings):
                raise RecipeError(f"{where}: '{pick.name}' ({path}) has another tokenizer / vocabulary than the "
                                  "student; a teacher must read the student's token ids")
            loaded[path] = model
        model = loaded[path]
        if task not in model.tasks:
            raise RecipeError(f"{where}: '{pick.name}' ({path}) has no task '{task}'")
        if list(model.tasks[task].labels) != list(student.tasks[task].labels):
            raise RecipeError(f"{where}: '{pick.name}' labels task '{task}' {list(model.tasks[task].labels)}, the "
                              f"student {list(student.tasks[task].labels)}")
        if needs_match(kd) and model is not teacher:
            _check_shape(where, f"'{pick.name}' ({path})", model.config.hidden_size,
                         len(encoder_layers(model.encoder)), teacher.config.hidden_size, layer_map)
        out.models[task] = model
        out.chosen[task] = {"teacher": pick.name, "model_dir": str(path), "dev": pick.dev, "reason": reason}
    return out


def _name_of(ctx: Any) -> str:
    first = next((s for s in ctx.recipe.stages[: ctx.index] if s.kind in TEACHER_STAGE_KINDS), None)
    return first.name if first is not None else "teacher"
