"""Recipe stages. Each stage kind is a module with ``run(ctx: StageContext) -> StageResult``.

The pipeline gives a stage a :class:`StageContext` (recipe, its own config, the data, the model earlier stages
produced) and a fresh ``ctx.out_dir``. The stage writes its artefacts there and returns a :class:`StageResult`;
the pipeline moves ``out_dir`` into place only when the stage succeeds, so a failed stage leaves earlier
stages' outputs untouched and the run resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compressor.data.store import DataStore
    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter

#: stage kind -> "module:function"; loaded only when a stage of that kind runs.
STAGE_RUNNERS: dict[str, str] = {
    "train": "compressor.stages.train:run",
    "load": "compressor.stages.load:run",
    "distill": "compressor.stages.distill:run",
    "prune": "compressor.stages.prune:run",
    "prune_vocab": "compressor.stages.prune_vocab:run",
    "export": "compressor.stages.export:run",
    "quantize": "compressor.stages.quantize:run",
    "bundle": "compressor.stages.bundle:run",
    "search": "compressor.stages.search:run",
    "add_task": "compressor.stages.add_task:run",
}

#: stage kind -> what it needs from an earlier stage (None: nothing). ``compressor validate`` and the pipeline
#: check the chain before any work: "teacher" (a train/load model), "model" (any model), "export" (an ONNX
#: export), "graph" (an exported or quantized graph)
STAGE_NEEDS: dict[str, str | None] = {
    "train": None, "load": None, "distill": "teacher", "prune": "model", "prune_vocab": "model", "export": "model",
    "quantize": "export", "bundle": "graph", "search": "teacher",
    "add_task": "model",  # none with `path` (a model directory from another run)
}
#: stage kind -> what it gives later stages
STAGE_GIVES: dict[str, set[str]] = {
    "train": {"teacher", "model"}, "load": {"teacher", "model"}, "distill": {"model"}, "prune": {"model"},
    "prune_vocab": {"model"}, "export": {"export", "graph"}, "quantize": {"graph"}, "bundle": set(),
    "search": {"model"}, "add_task": {"model"},
}
#: stage kind -> "module:function(recipe, index)" run before anything is written (checks that need a model on disk)
STAGE_PREFLIGHT: dict[str, str] = {"search": "compressor.stages.search:preflight"}
#: stage kind -> the kinds its ``source`` field may name
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "quantize": ("export",), "bundle": ("export", "quantize"),
    "add_task": ("train", "load", "distill", "prune", "prune_vocab", "search", "add_task", "export", "quantize",
                 "bundle"),
}


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


@dataclass
class StageResult:
    model_dir: Path | None = None  # a model this stage produced (under ctx.final_dir); None keeps the previous
    outputs: dict[str, Any] = field(default_factory=dict)  # paths/values later stages may read (JSON-serialisable)
    notes: list[str] = field(default_factory=list)  # lines for the report
