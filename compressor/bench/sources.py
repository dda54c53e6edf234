"""Where the benchmarked models come from: a finished run directory (its typed artefacts) and single-task
models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import CompressorError, ModelDirError
from compressor.rundir import (Int8Graph, OnnxGraph, RunDir, SingleTaskStudents, StageRecord, TeacherReference,
                               teacher)


@dataclass
class RunSources:
    """The models a finished run produced that the benchmark compares."""

    run_dir: Path
    recipe_path: Path
    teacher_dir: Path  # model dir of the first train/load stage
    teacher_stage: str
    export: OnnxGraph  # the last export stage's graph
    export_stage: str
    quantize: Int8Graph | None  # the last quantize stage's graph
    quantize_stage: str | None
    singles: dict[str, Path] = field(default_factory=dict)  # task -> single-task student of a distill stage
    singles_stage: str | None = None
    reference: TeacherReference | None = None  # a reference stage's (b) and (c) of the teacher
    reference_stage: str | None = None


def _last(records: list[StageRecord], cls: type) -> tuple[str | None, object | None]:
    return next(((r.name, r.get(cls)) for r in reversed(records) if r.get(cls) is not None), (None, None))


def read_run(run_dir: Path) -> RunSources:
    """Teacher, export and quantize artefacts of a finished run.

    Raises ``CompressorError`` when the run has no teacher (train/load stage) or no export stage.
    """
    run = RunDir.finished(run_dir)
    run_dir = Path(run_dir)
    records = run.records()
    first = teacher(records)
    if first is None:
        raise CompressorError(f"{run_dir}: no completed train/load stage: the benchmark needs the run's teacher")
    export_stage, export = _last(records, OnnxGraph)
    quantize_stage, quantize = _last(records, Int8Graph)
    if export is None:
        raise CompressorError(f"{run_dir}: no completed export stage: the benchmark compares the run's exported "
                              "student (add export and quantize stages to the recipe)")
    if not run.recipe_path.is_file():
        raise CompressorError(f"{run_dir / 'recipe.yaml'}: not found (the run directory lacks the recipe it ran)")
    reference_stage, reference = _last(records, TeacherReference)
    for what, path in (("teacher model", first.model_dir), ("export graph", export.onnx),
                       ("quantized graph", quantize.onnx if quantize else None),
                       ("reference graph", reference.onnx if reference else None),
                       ("reference INT8 graph", reference.int8 if reference else None)):
        if path is not None and not Path(path).exists():
            raise CompressorError(f"{path}: {what} listed in {run_dir / 'state.json'} does not exist")
    singles_stage, students = _last(records, SingleTaskStudents)
    singles = students.models if students else {}
    for t, path in singles.items():
        if not (path / "manifest.json").is_file():
            raise CompressorError(f"{path}: single-task student of '{t}' listed in {run_dir / 'state.json'} "
                                  "does not exist")
    return RunSources(run_dir, run_dir / "recipe.yaml", first.model_dir, first.name, export, export_stage,
                      quantize, quantize_stage, singles, singles_stage, reference, reference_stage)


@dataclass
class SingleSource:
    """A single-task student: an ONNX graph of a run (INT8 preferred), or a model directory to export."""

    path: Path  # what the user passed
    graph: Path | None  # ONNX graph to measure, or None: export ``model_dir`` first
    graph_spec: Path | None  # its graph.json
    model_dir: Path
    stage: str | None
    format: str = "onnx"  # "onnx-int8" for a quantize stage's graph


def read_single(path: Path) -> SingleSource:
    """Resolve ``--single PATH``: a run directory (its last quantize, else export graph, else last model) or a
    model directory (``manifest.json``)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return SingleSource(path, None, None, path, None)
    if (path / "state.json").is_file():
        records = RunDir.finished(path).records()
        for cls, fmt in ((Int8Graph, "onnx-int8"), (OnnxGraph, "onnx")):
            name, graph = _last(records, cls)
            if graph is not None:
                return SingleSource(path, graph.onnx, graph.spec, graph.model_dir, name, fmt)
        model_stage = next((r for r in reversed(records) if r.model_dir is not None), None)
        if model_stage is None:
            raise ModelDirError(f"{path}: the run has no completed stage with a model")
        return SingleSource(path, None, None, model_stage.model_dir, model_stage.name)
    raise ModelDirError(f"{path}: neither a model directory (manifest.json) nor a run directory (state.json)")


def physical_cores() -> int:
    """Physical cores (what ONNX Runtime uses by default), else logical CPUs."""
    import os

    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    return os.cpu_count() or 1
