"""Every recipe stage kind, registered once: its config model, its runner and what it takes and hands on.

A stage kind is one :class:`StageKind` registered in :data:`STAGE_KINDS`. Everything else that knows about
stage kinds derives from that entry:

- the recipe's ``Stage`` union (``compressor.recipe.schema``) is built from the ``config`` classes;
- ``compressor validate`` checks the stage chain from ``needs``, ``gives`` and ``sources``
  (``compressor.checks``);
- the run directory reads each completed stage's artefacts by what its kind ``gives``
  (``compressor.rundir``), and ``ctx.latest(ModelDir)`` finds the latest stage that gives ``"model"``;
- the pipeline loads ``runner`` (and ``preflight``) only when a stage of the kind runs.

This module imports nothing heavy (no torch, no pydantic models) so the run directory, the recipe schema and
the CLI can all read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from compressor.registry import Registry

#: what a stage can take from earlier stages and hand on (``StageKind.needs`` / ``gives`` / ``sources``)
TOKENS = {
    "teacher": "a teacher model",  # the run's teacher: the first stage that gives it
    "model": "a model",  # a model directory (manifest, safetensors, tokenizer)
    "export": "an ONNX export",  # the export stage's fp32 graph (rundir.OnnxGraph)
    "graph": "an ONNX graph",  # an exported or quantized graph (rundir.Graph)
    "int8": "an INT8 graph",  # a quantized graph (rundir.Int8Graph)
    "bundle": "an edge bundle",  # rundir.Bundle
    "reference": "the teacher's reference graphs",  # rundir.TeacherReference (benchmark rows b and c)
    "students": "single-task students",  # rundir.SingleTaskStudents (benchmark row d)
    "task_models": "per-task fine-tuned models",  # rundir.TaskModels (a finetune stage's)
    "search": "the INT8 mode a search stage chose",  # quantize's ``mode: search``
}


@dataclass(frozen=True)
class StageKind:
    """What the recipe, the pipeline, ``compressor validate`` and the run directory know of a stage kind.

    Attributes:
        config: ``"module:Class"`` of the stage's pydantic config model (its ``kind`` field is
            ``Literal["<kind>"]``); joins the recipe's ``Stage`` union.
        runner: ``"module:function"``, ``run(ctx: StageContext) -> StageResult``; imported only when a stage runs.
        needs: the token (:data:`TOKENS`) an earlier stage must give, checked before any work; None: nothing.
            A config model may refine it per stage with a method ``needs(self, default) -> list[(token,
            field | None)]`` (``add_task`` with a ``path`` needs nothing; ``quantize`` with ``mode: search``
            also needs ``"search"``).
        gives: the tokens it hands to later stages; the run directory reads the artefact of each
            (``compressor.rundir``) from the stage's recorded outputs.
        sources: the tokens a stage its ``source`` field names must give (empty: any earlier stage).
        preflight: ``"module:function(recipe, index)"`` run before anything is written (checks that need a
            model on disk).
    """

    config: str
    runner: str
    needs: str | None = "model"
    gives: frozenset[str] = frozenset({"model"})
    sources: frozenset[str] = frozenset()
    preflight: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted((({self.needs} - {None}) | self.gives | self.sources) - set(TOKENS))
        if unknown:
            raise ValueError(f"unknown stage token(s) {unknown} (known: {', '.join(TOKENS)})")

    def config_class(self) -> Any:
        """The config model, imported."""
        module, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(module), attr)


def _check(name: str, kind: StageKind) -> None:
    if not isinstance(kind, StageKind):
        raise TypeError(f"stage kind '{name}' must be registered as a StageKind, not {type(kind).__name__}")


#: every stage kind. A new kind: its config class (``compressor/recipe/``), its runner (``compressor/stages/``)
#: and one ``STAGE_KINDS.register`` call below.
STAGE_KINDS: Registry[StageKind] = Registry("stage kind", validate=_check)


def register(name: str, kind: StageKind, source: str = "compressor") -> None:
    """Register a stage kind (a duplicate name raises)."""
    STAGE_KINDS.register(name, kind, source=source)


def kinds_giving(token: str) -> tuple[str, ...]:
    """The stage kinds that give ``token``, sorted (e.g. ``kinds_giving("teacher") == ("load", "train")``)."""
    if token not in TOKENS:
        raise ValueError(f"unknown stage token '{token}' (known: {', '.join(TOKENS)})")
    return tuple(k for k in STAGE_KINDS.names() if token in STAGE_KINDS.get(k).gives)


def gives(kind: str | None, token: str) -> bool:
    """Whether a stage of ``kind`` gives ``token`` (False for a kind no longer registered)."""
    return kind is not None and kind in STAGE_KINDS and token in STAGE_KINDS.get(kind).gives


def stage_needs(stage: Any) -> list[tuple[str, str | None]]:
    """What a configured stage needs from earlier stages: ``(token, the config field that asks for it)``."""
    default = STAGE_KINDS.get(stage.kind).needs
    refine = getattr(stage, "needs", None)
    if callable(refine):
        return list(refine(default))
    return [] if default is None else [(default, None)]


_R = "compressor.recipe"
_S = "compressor.stages"
_MODEL = frozenset({"model"})
for _name, _kind in {
    "train": StageKind(f"{_R}.train_stages:TrainStage", f"{_S}.train:run", needs=None,
                       gives=frozenset({"teacher", "model"})),
    "load": StageKind(f"{_R}.train_stages:LoadStage", f"{_S}.load:run", needs=None,
                      gives=frozenset({"teacher", "model"})),
    "finetune": StageKind(f"{_R}.train_stages:FinetuneStage", f"{_S}.finetune:run",
                          gives=frozenset({"task_models"}), sources=frozenset({"model"})),
    "distill": StageKind(f"{_R}.train_stages:DistillStage", f"{_S}.distill:run", needs="teacher",
                         gives=frozenset({"model", "students"}), preflight="compressor.distill.teachers:preflight"),
    "prune": StageKind(f"{_R}.prune_stages:PruneStage", f"{_S}.prune:run", preflight=f"{_S}.prune:preflight"),
    "prune_vocab": StageKind(f"{_R}.prune_stages:PruneVocabStage", f"{_S}.prune_vocab:run"),
    "search": StageKind(f"{_R}.prune_stages:SearchStage", f"{_S}.search:run", needs="teacher",
                        gives=frozenset({"model", "search"}), preflight=f"{_S}.search:preflight"),
    "add_task": StageKind(f"{_R}.train_stages:AddTaskStage", f"{_S}.add_task:run",
                          sources=frozenset({"model", "graph", "bundle"})),
    "export": StageKind(f"{_R}.export_stages:ExportStage", f"{_S}.export:run", gives=frozenset({"export", "graph"})),
    "quantize": StageKind(f"{_R}.export_stages:QuantizeStage", f"{_S}.quantize:run", needs="export",
                          gives=frozenset({"graph", "int8"}), sources=frozenset({"export"})),
    "bundle": StageKind(f"{_R}.export_stages:BundleStage", f"{_S}.bundle:run", needs="graph",
                        gives=frozenset({"bundle"}), sources=frozenset({"graph"})),
    "reference": StageKind(f"{_R}.export_stages:ReferenceStage", f"{_S}.reference:run", needs="teacher",
                           gives=frozenset({"reference"})),
}.items():
    register(_name, _kind)
