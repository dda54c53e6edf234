"""The whole recipe: its stages (a union discriminated on ``kind``), report targets, cross-field checks."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, field_validator, model_validator

from compressor.data.options import DataOptions, SplitSource, TaskData
from compressor.errors import RecipeError
from compressor.recipe._base import NAME, Seed, Strict
from compressor.recipe.tasks import ModelSpec, TaskSpec
from compressor.stage_kinds import STAGE_KINDS


def stage_union() -> Any:
    """Every registered stage kind's config model, as one union discriminated on ``kind``."""
    configs = tuple(STAGE_KINDS.get(kind).config_class() for kind in STAGE_KINDS.names())
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007  (a runtime tuple of classes)


Stage = stage_union()


class Targets(Strict):
    """The product's targets, written once: the benchmark and ``publish`` check them and say by how much they
    are missed. Ratios are teacher / student (larger is better) unless named otherwise."""

    retention: float = Field(0.97, gt=0, le=1, description="least student metric / teacher metric, every task")
    size_x: float = Field(10.0, gt=0, description="INT8 student at least this many times smaller on disk")
    latency_x: float = Field(6.0, gt=0, description="INT8 student's ORT p50 this many times lower (1 thread)")
    points_vs_c: float = Field(1.0, ge=0, description="most metric points below optimum's INT8 teacher, any task")
    size_vs_c: float = Field(2.5, gt=0, description="INT8 student at least this many times smaller than (c)")
    latency_vs_c: float = Field(2.5, gt=0, description="INT8 student's ORT p50 this many times lower than (c)'s")
    size_vs_d: float = Field(0.3, gt=0, description="most size of the multi-head student / the single-task ones")
    points_vs_d: float = Field(0.5, ge=0, description="most points below each single-task student on its task")
    student_params_ratio: float = Field(0.25, gt=0, description="most student / teacher parameters (PyTorch)")
    student_speedup: float = Field(3.0, gt=0, description="least PyTorch speed-up of the student, every task")


class ReportSpec(Strict):
    targets: Targets = Targets()
    latency: bool = True
    latency_seq_len: int = Field(128, gt=0)
    latency_runs: int = Field(30, gt=0)
    latency_warmup: int = Field(5, ge=0)
    threads: int | None = Field(None, gt=0, description="torch threads for latency; default: all cores")


class Recipe(Strict):
    name: str = Field(pattern=NAME)
    seed: Seed = 42
    data_root: str | None = Field(
        None, description="folder the tasks' relative data paths are read from (relative to the cwd); null: "
                          "--data-root, $COMPRESSOR_DATA_ROOT, then ../shared/data; not needed when every path is "
                          "absolute")
    model: ModelSpec = ModelSpec()
    tasks: list[TaskSpec] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
    report: ReportSpec = ReportSpec()

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        _unique([t.name for t in tasks], "task")
        return tasks

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, stages: list[Any]) -> list[Any]:
        _unique([s.name for s in stages], "stage")
        return stages

    @model_validator(mode="after")
    def _budgets_name_tasks(self) -> Recipe:
        names = [t.name for t in self.tasks]
        for stage in self.stages:
            sampling = getattr(stage, "sampling", None)
            for task in getattr(sampling, "passes", {}) or {}:
                if task not in names:
                    raise ValueError(f"stage '{stage.name}': sampling.passes names task '{task}', which the recipe "
                                     f"does not have (tasks: {', '.join(names)})")
            for options in (stage, getattr(stage, "recovery", None)):
                _check_transfer(stage.name, options, names)
        return self

    @model_validator(mode="after")
    def _search_stages_fit_tasks(self) -> Recipe:
        names = [t.name for t in self.tasks]
        for i, stage in enumerate(self.stages):
            if stage.kind != "search":
                continue
            if isinstance(stage.retention, dict):
                unknown = sorted(set(stage.retention) - set(names))
                missing = [n for n in names if n not in stage.retention]
                if unknown or missing:
                    raise ValueError(f"stages[{i}].retention: " + (f"unknown task(s) {unknown}" if unknown else
                                     f"no floor for task(s) {missing}") + f" (tasks: {', '.join(names)})")
            no_dev = [(j, t.name) for j, t in enumerate(self.tasks) if not t.has_dev()]
            if no_dev:
                j, name = no_dev[0]
                raise ValueError(f"tasks[{j}].data.dev: task '{name}' has no dev split; search stage "
                                 f"'{stage.name}' scores every task on dev")
        return self

    @model_validator(mode="after")
    def _recovery_stop_needs_dev(self) -> Recipe:
        for i, stage in enumerate(self.stages):
            if getattr(stage, "recovery_until", None) is None:
                continue
            no_dev = [(j, t.name) for j, t in enumerate(self.tasks) if not t.has_dev()]
            if no_dev:
                j, name = no_dev[0]
                raise ValueError(f"tasks[{j}].data.dev: task '{name}' has no dev split; stage '{stage.name}' "
                                 "recovers until every task's dev metric is back (recovery_until)")
        return self

    @model_validator(mode="after")
    def _added_tasks_exist(self) -> Recipe:
        names = [t.name for t in self.tasks]
        for i, stage in enumerate(self.stages):
            if stage.kind == "add_task" and stage.task not in names:
                raise ValueError(f"stages[{i}].task: stage '{stage.name}' adds task '{stage.task}', which the recipe "
                                 f"does not have (tasks: {', '.join(names)})")
            unknown = [t for t in getattr(stage, "tasks", None) or [] if t not in names] if stage.kind == "finetune" else []
            if unknown:
                raise ValueError(f"stages[{i}].tasks: stage '{stage.name}' fine-tunes task(s) {unknown}, which the "
                                 f"recipe does not have (tasks: {', '.join(names)})")
        return self

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise RecipeError(f"recipe '{self.name}': no task '{name}'")

    def data_options(self) -> DataOptions:
        """What the data layer (``DataStore``, ``validate_data``) needs of this recipe: the one translation."""
        return DataOptions(tasks=tuple(_task_data(t) for t in self.tasks), seed=self.seed,
                           max_length=self.model.max_length, recipe=self.name)


def _task_data(spec: TaskSpec) -> TaskData:
    splits = {split: SplitSource(path=entry.path, format=entry.format, encoding=entry.encoding, columns=entry.columns)
              for split, entry in spec.split_files().items()}
    return TaskData(name=spec.name, plugin=spec.plugin, splits=splits, format=spec.format, encoding=spec.encoding,
                    labels=spec.labels, limits=spec.limit.model_dump(), dev_from_train=spec.dev_from_train,
                    options=spec.options, columns=dict(spec.columns),
                    label_names={k: tuple(v) for k, v in spec.label_names.items()})


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what} name '{n}' is used twice")
        seen.add(n)


def _check_transfer(stage: str, options: Any, names: list[str]) -> None:
    """A distillation's ``transfer`` names tasks of the recipe or its own ``unlabeled`` sets, never the head itself;
    every unlabeled set is named by some transfer and is no task's name."""
    transfer = getattr(options, "transfer", None) or {}
    unlabeled = getattr(options, "unlabeled", None) or {}
    for name in unlabeled:
        if name in names:
            raise ValueError(f"stage '{stage}': unlabeled.{name} has the name of a task; give the text set a name "
                             "of its own")
    for head, sources in transfer.items():
        field = f"stage '{stage}': transfer.{head}"
        if head not in names:
            raise ValueError(f"{field} names task '{head}', which the recipe does not have (tasks: {', '.join(names)})")
        for source in [] if sources == "all" else sources:
            if source == head:
                raise ValueError(f"{field} lists '{head}' itself: its own inputs teach it anyway; list the other "
                                 "tasks whose inputs should")
            if source not in names and source not in unlabeled:
                raise ValueError(f"{field} names task '{source}', which the recipe does not have (tasks: "
                                 f"{', '.join(names)}; unlabeled sets: {', '.join(unlabeled) or 'none'})")
    used = {s for sources in transfer.values() if sources != "all" for s in sources}
    for name in unlabeled:
        if name not in used:
            raise ValueError(f"stage '{stage}': unlabeled.{name} is named by no transfer source; add it to the heads "
                             f"it should teach, e.g. transfer: {{<head>: [{name}]}}")
