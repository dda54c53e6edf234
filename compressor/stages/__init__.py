"""Recipe stages. Each stage kind is a module with ``run(ctx: StageContext) -> StageResult``.

The kinds themselves (config model, runner, what each takes and hands on) are registered once in
:mod:`compressor.stage_kinds`; ``STAGE_KINDS`` is re-exported here.

The pipeline gives a stage a :class:`StageContext` (recipe, its own config, the data, the model earlier stages
produced) and a fresh ``ctx.out_dir``. The stage writes its artefacts there and returns a :class:`StageResult`;
the pipeline moves ``out_dir`` into place only when the stage succeeds, so a failed stage leaves earlier
stages' outputs untouched and the run resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from compressor.stage_kinds import STAGE_KINDS, StageKind  # noqa: F401  (the registry of stage kinds)

if TYPE_CHECKING:
    from compressor.data.store import DataStore
    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter

A = TypeVar("A")


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
