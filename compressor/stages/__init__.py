"""Recipe stages. Each stage kind is a module with ``run(ctx: StageContext) -> StageResult``.

The pipeline gives a stage a :class:`StageContext` (recipe, its own config, the data, the model earlier stages
produced) and a fresh ``ctx.out_dir``. The stage writes its artefacts there and returns a :class:`StageResult`;
the pipeline moves ``out_dir`` into place only when the stage succeeds, so a failed stage leaves earlier
stages' outputs untouched and the run resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from compressor.registry import Registry

if TYPE_CHECKING:
    from compressor.data.store import DataStore
    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter

A = TypeVar("A")


@dataclass(frozen=True)
class StageKind:
    """What the pipeline and ``compressor validate`` know of a stage kind.

    ``needs``: what it takes from an earlier stage, checked before any work (None: nothing; "teacher": a train or
    load model; "model": any model; "export": an ONNX export; "graph": an exported or quantized graph).
    ``gives``: what it hands to later stages. ``sources``: the kinds its ``source`` field may name.
    ``preflight``: ``"module:function(recipe, index)"`` run before anything is written (checks that need a model
    on disk). ``runner`` is loaded only when a stage of the kind runs.
    """

    runner: str
    needs: str | None = "model"
    gives: frozenset[str] = frozenset({"model"})
    sources: tuple[str, ...] = ()
    preflight: str | None = None


_MODEL_SOURCES = ("train", "load", "distill", "prune", "prune_vocab", "search", "add_task", "export", "quantize",
                  "bundle")

#: every stage kind, registered once (a new kind: its config class in ``compressor.recipe.Stage`` and an entry here)
STAGE_KINDS: Registry[StageKind] = Registry("stage kind")
for _kind, _spec in {
    "train": StageKind("compressor.stages.train:run", needs=None, gives=frozenset({"teacher", "model"})),
    "load": StageKind("compressor.stages.load:run", needs=None, gives=frozenset({"teacher", "model"})),
    # one model per task, fine-tuned from an earlier model; the run's current model stays that model
    "finetune": StageKind("compressor.stages.finetune:run", gives=frozenset(), sources=("train", "load", "distill", "prune", "prune_vocab", "search", "add_task")),
    "distill": StageKind("compressor.stages.distill:run", needs="teacher"),
    "prune": StageKind("compressor.stages.prune:run", preflight="compressor.stages.prune:preflight"),
    "prune_vocab": StageKind("compressor.stages.prune_vocab:run"),
    "export": StageKind("compressor.stages.export:run", gives=frozenset({"export", "graph"})),
    "quantize": StageKind("compressor.stages.quantize:run", needs="export", gives=frozenset({"graph"}),
                          sources=("export",)),
    "bundle": StageKind("compressor.stages.bundle:run", needs="graph", gives=frozenset(),
                        sources=("export", "quantize")),
    # the teacher's ONNX export and optimum's INT8 of it (benchmark rows b, c); hands no model on
    "reference": StageKind("compressor.stages.reference:run", needs="teacher", gives=frozenset()),
    "search": StageKind("compressor.stages.search:run", needs="teacher",
                        preflight="compressor.stages.search:preflight"),
    # needs no earlier model when given a `path` (a model directory from another run)
    "add_task": StageKind("compressor.stages.add_task:run", sources=_MODEL_SOURCES),
}.items():
    STAGE_KINDS.register(_kind, _spec, source="compressor.stages")


@dataclass
class StageContext:
    recipe: Recipe
    stage: Any  # the stage's config model (TrainStage, ...)
    index: int  # position in recipe.stages
    run_dir: Path
    out_dir: Path  # where this stage writes; moved to final_dir on success
    final_dir: Path  # where the outputs will live after success (record this path in artefacts)
    data: DataStore
    reporter: Reporter
    model_dir: Path | None = None  # the latest model an earlier stage produced
    teacher_dir: Path | None = None  # the model of the first train stage
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier stage name -> its StageResult.outputs
    resume: bool = False
    checkpoint_dir: Path | None = None  # survives failures; for in-stage resume (epoch checkpoints)

    def latest(self, cls: type[A], source: str | None = None) -> tuple[str, A]:
        """``(stage name, artefact)``: the artefact of type ``cls`` (:mod:`compressor.rundir`, e.g. ``OnnxGraph``)
        of the earlier stage ``source``, or of the latest earlier stage that left one; a ``RecipeError`` naming
        this stage when there is none."""
        from compressor.rundir import RunDir, StageRecord, latest

        earlier = self.recipe.stages[: self.index]
        run = RunDir(self.run_dir)  # no state.json yet: no stage has completed on disk
        model_dirs = {r.name: r.model_dir for r in run.records()} if run.state_path.is_file() else {}
        records = [StageRecord(s.name, s.kind, self.outputs.get(s.name) or {}, model_dirs.get(s.name)) for s in earlier]
        return latest(records, cls, source, consumer=self.stage.name)


@dataclass
class StageResult:
    model_dir: Path | None = None  # a model this stage produced (under ctx.final_dir); None keeps the previous
    outputs: dict[str, Any] = field(default_factory=dict)  # paths/values later stages may read (JSON-serialisable)
    notes: list[str] = field(default_factory=list)  # lines for the report
