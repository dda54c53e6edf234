"""Where the benchmarked models come from: a finished run directory (``state.json``) and single-task models."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError, ModelDirError

TEACHER_KINDS = ("train", "load")  # as in compressor.pipeline: the first of these provides the teacher


@dataclass
class RunSources:
    """The models a finished run produced that the benchmark compares."""

    run_dir: Path
    recipe_path: Path
    teacher_dir: Path  # model dir of the first train/load stage
    teacher_stage: str
    export: dict[str, Any] | None  # outputs of the last export stage
    export_stage: str | None
    quantize: dict[str, Any] | None  # outputs of the last quantize stage
    quantize_stage: str | None
    singles: dict[str, Path] = field(default_factory=dict)  # task -> single-task student of a distill stage
    singles_stage: str | None = None


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's ``state.json`` (completed stages); a clear error when the directory is not a run."""
    path = Path(run_dir) / "state.json"
    if not Path(run_dir).is_dir():
        raise CompressorError(f"{run_dir}: run directory does not exist")
    if not path.is_file():
        raise CompressorError(f"{path}: not found (is {run_dir} a run directory written by `compressor run`?)")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CompressorError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(state.get("completed"), list):
        raise CompressorError(f"{path}: field 'completed' is missing or not a list")
    from compressor.fsutil import absolute_paths

    return absolute_paths(state, Path(run_dir).absolute())  # state.json stores paths relative to the run


def _last(completed: list[dict[str, Any]], kind: str, key: str) -> tuple[str | None, dict[str, Any] | None]:
    for stage in reversed(completed):
        if stage.get("kind") == kind and (stage.get("outputs") or {}).get(key):
            return stage["name"], stage["outputs"]
    return None, None


def read_run(run_dir: Path) -> RunSources:
    """Teacher, export and quantize outputs of a finished run.

    Raises ``CompressorError`` when the run has no teacher (train/load stage) or no export stage.
    """
    run_dir = Path(run_dir)
    completed = read_state(run_dir)["completed"]
    teacher = next((s for s in completed if s.get("kind") in TEACHER_KINDS and s.get("model_dir")), None)
    if teacher is None:
        raise CompressorError(f"{run_dir}: no completed train/load stage: the benchmark needs the run's teacher")
    export_stage, export = _last(completed, "export", "onnx")
    quantize_stage, quantize = _last(completed, "quantize", "onnx")
    if export is None:
        raise CompressorError(f"{run_dir}: no completed export stage: the benchmark compares the run's exported "
                              "student (add export and quantize stages to the recipe)")
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise CompressorError(f"{recipe_path}: not found (the run directory lacks the recipe it ran)")
    for what, path in (("teacher model", teacher["model_dir"]), ("export graph", export["onnx"]),
                       ("quantized graph", quantize["onnx"] if quantize else None)):
        if path is not None and not Path(path).exists():
            raise CompressorError(f"{path}: {what} listed in {run_dir / 'state.json'} does not exist")
    singles_stage, distill = _last(completed, "distill", "single_task_students")
    singles = {t: Path(p) for t, p in (distill or {}).get("single_task_students", {}).items()}
    for t, path in singles.items():
        if not (path / "manifest.json").is_file():
            raise CompressorError(f"{path}: single-task student of '{t}' listed in {run_dir / 'state.json'} "
                                  "does not exist")
    return RunSources(run_dir, recipe_path, Path(teacher["model_dir"]), teacher["name"], export, export_stage,
                      quantize, quantize_stage, singles, singles_stage)


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
        completed = read_state(path)["completed"]
        for kind in ("quantize", "export"):
            name, out = _last(completed, kind, "onnx")
            if out is not None:
                return SingleSource(path, Path(out["onnx"]), Path(out["graph"]), Path(out["model_dir"]), name,
                                    "onnx-int8" if kind == "quantize" else "onnx")
        model_stage = next((s for s in reversed(completed) if s.get("model_dir")), None)
        if model_stage is None:
            raise ModelDirError(f"{path}: the run has no completed stage with a model")
        return SingleSource(path, None, None, Path(model_stage["model_dir"]), model_stage["name"])
    raise ModelDirError(f"{path}: neither a model directory (manifest.json) nor a run directory (state.json)")


def cpu_target() -> str:
    """optimum's ``AutoQuantizationConfig`` preset for this CPU: avx512_vnni, avx2 or arm64."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx512_vnni" if "avx512_vnni" in line.split() else "avx2"
    except OSError:
        pass
    return "avx2"


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
