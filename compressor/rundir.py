"""The run directory and the typed artefacts its stages leave.

Layout (owned here; the pipeline writes it, ``compressor benchmark`` and ``compressor publish`` read it)::

    <run>/recipe.yaml            the recipe as run
    <run>/state.json             completed stages, their outputs and models (what --resume reads)
    <run>/stages/NN-<name>/      each completed stage's artefacts (written under ``.NN-<name>.partial`` first)
    <run>/checkpoints/<name>/    in-stage checkpoints (epochs), removed when the stage completes
    <run>/report.json, report.md

Paths inside the run directory are stored in ``state.json`` relative to it, so a run resumes from any working
directory and the directory can be moved. A stage records its outputs as JSON; :func:`artefacts` reads them back
as typed artefacts (:class:`ModelDir`, :class:`OnnxGraph`, :class:`Int8Graph`, :class:`Bundle`,
:class:`SingleTaskStudents`, :class:`TaskModels`, :class:`TeacherReference`), and :func:`latest` finds the one a
later stage (or the benchmark) asks for by type. Which stage kinds leave which artefact is not listed here: each
artefact class names the token (``GIVEN``) that the kinds leaving it declare in their ``gives``
(``compressor.stage_kinds``).
``state.json`` itself keeps the format earlier runs wrote, so they still load, resume and benchmark.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from compressor.errors import CompressorError, RecipeError
from compressor.fsutil import absolute_paths, atomic_write_text, dumps_strict, relative_paths
from compressor.stage_kinds import gives, kinds_giving

STATE = "state.json"


# ---- typed artefacts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDir:
    """A model directory (manifest, safetensors, tokenizer) a stage wrote or loaded."""

    path: Path
    GIVEN: ClassVar[str] = "model"
    WHAT: ClassVar[str] = "a model stage"


@dataclass(frozen=True)
class Graph:
    """An ONNX graph with its contract (``graph.json``) and the model directory it was exported from."""

    onnx: Path
    spec: Path
    model_dir: Path
    GIVEN: ClassVar[str] = "graph"
    WHAT: ClassVar[str] = "an export (or quantize) stage"


@dataclass(frozen=True)
class OnnxGraph(Graph):
    """The export stage's fp32 graph (``onnx`` optimised when that passed parity; ``raw`` the plain export)."""

    raw: Path | None = None
    GIVEN: ClassVar[str] = "export"
    WHAT: ClassVar[str] = "an export stage"

    @classmethod
    def from_outputs(cls, out: dict[str, Any]) -> OnnxGraph | None:
        if not out.get("onnx"):
            return None
        return cls(Path(out["onnx"]), Path(out["graph"]), Path(out["model_dir"]),
                   Path(out["raw"]) if out.get("raw") else None)


@dataclass(frozen=True)
class Int8Graph(Graph):
    """The quantize stage's INT8 graph and the outcome of its accuracy-aware loop."""

    passed: bool | None = None
    fallback_nodes: tuple[str, ...] = ()
    GIVEN: ClassVar[str] = "int8"
    WHAT: ClassVar[str] = "a quantize stage"

    @classmethod
    def from_outputs(cls, out: dict[str, Any]) -> Int8Graph | None:
        if not out.get("onnx"):
            return None
        return cls(Path(out["onnx"]), Path(out["graph"]), Path(out["model_dir"]), out.get("passed"),
                   tuple(out.get("fallback_nodes") or ()))


@dataclass(frozen=True)
class Bundle:
    """An edge bundle directory (``model.onnx``, ``tokenizer.json``, ``tasks.json``)."""

    path: Path
    source_stage: str | None = None
    GIVEN: ClassVar[str] = "bundle"
    WHAT: ClassVar[str] = "a bundle stage"

    @classmethod
    def from_outputs(cls, out: dict[str, Any]) -> Bundle | None:
        return cls(Path(out["bundle"]), out.get("source_stage")) if out.get("bundle") else None


@dataclass(frozen=True)
class SingleTaskStudents:
    """A distill stage's single-task students: task -> model directory."""

    models: dict[str, Path] = field(default_factory=dict, hash=False)
    GIVEN: ClassVar[str] = "students"
    WHAT: ClassVar[str] = "a distill stage with single_task_students"

    @classmethod
    def from_outputs(cls, out: dict[str, Any]) -> SingleTaskStudents | None:
        students = out.get("single_task_students")
        return cls({t: Path(p) for t, p in students.items()}) if students else None


@dataclass(frozen=True)
class TaskModels:
    """A finetune stage's per-task models: task -> model directory, and each one's dev metric on its task."""

    models: dict[str, Path] = field(default_factory=dict, hash=False)
    dev: dict[str, float | None] = field(default_factory=dict, hash=False)
    GIVEN: ClassVar[str] = "task_models"
    WHAT: ClassVar[str] = "a finetune stage"

    @classmethod
    def from_outputs(cls, out: dict[str, Any]) -> TaskModels | None:
        models = out.get("models")
        return cls({t: Path(p) for t, p in models.items()}, dict(out.get("dev") or {})) if models else None


@dataclass(frozen=True)
class TeacherReference:
    """A reference stage's graphs of the teacher: (b) its checked ONNX export and (c) optimum's dynamic INT8."""

    onnx: Path
    spec: Path
    int8: Path
    model_dir: Path
    int8_matmuls: int | None = None
    target: str | None = None
    onnx_notes: tuple[str, ...] = ()
    int8_notes: tuple[str, ...] = ()
    GIVEN: ClassVar[str] = "reference"
    WHAT: ClassVar[str] = "a reference stage"

    @classmethod
    def from_outputs(cls, out: dict[str, Any]) -> TeacherReference | None:
        if not out.get("onnx"):
            return None
        return cls(Path(out["onnx"]), Path(out["graph"]), Path(out["int8"]), Path(out["model_dir"]),
                   out.get("int8_matmuls"), out.get("target"), tuple(out.get("onnx_notes") or ()),
                   tuple(out.get("int8_notes") or ()))


Artefact = ModelDir | Graph | Bundle | SingleTaskStudents | TaskModels | TeacherReference
#: the artefacts read from a stage's recorded outputs, each when the stage's kind gives its token
_FROM_OUTPUTS = (OnnxGraph, Int8Graph, Bundle, TeacherReference, TaskModels, SingleTaskStudents)
A = TypeVar("A")


@dataclass(frozen=True)
class StageRecord:
    """One completed stage as ``state.json`` records it."""

    name: str
    kind: str | None
    outputs: dict[str, Any] = field(default_factory=dict, hash=False)
    model_dir: Path | None = None

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> StageRecord:
        model_dir = rec.get("model_dir")
        return cls(rec["name"], rec.get("kind"), rec.get("outputs") or {}, Path(model_dir) if model_dir else None)

    def artefacts(self) -> list[Any]:
        """What the stage left, typed (from its recorded outputs; the keys earlier runs wrote)."""
        found: list[Any] = [ModelDir(self.model_dir)] if self.model_dir is not None else []
        for cls in _FROM_OUTPUTS:
            artefact = cls.from_outputs(self.outputs) if gives(self.kind, cls.GIVEN) else None
            if artefact is not None:
                found.append(artefact)
        return found

    def get(self, cls: type[A]) -> A | None:
        return next((a for a in self.artefacts() if isinstance(a, cls)), None)


def latest(records: Sequence[StageRecord], cls: type[A], source: str | None = None,
           consumer: str | None = None) -> tuple[str, A]:
    """The artefact of type ``cls`` of stage ``source`` (or the latest of ``records`` that has one).

    ``consumer`` names the stage asking, for its error (a ``RecipeError``) when there is none.
    """
    token = cls.GIVEN  # type: ignore[attr-defined]
    earlier = [r for r in records if gives(r.kind, token)]
    kinds = " or ".join(kinds_giving(token))
    if source is not None:
        match = [r for r in earlier if r.name == source]
        if not match:
            raise RecipeError(f"stage '{consumer}': source '{source}' is not an earlier stage of kind {kinds} "
                              f"(earlier: {[r.name for r in earlier] or 'none'})")
        earlier = match
    for rec in reversed(earlier):
        found = rec.get(cls)
        if found is not None:
            return rec.name, found
    what = cls.WHAT  # type: ignore[attr-defined]
    raise RecipeError(f"stage '{consumer}': needs {what} before it (a stage of kind {kinds})")


def teacher(records: Iterable[StageRecord]) -> StageRecord | None:
    """The first completed train/load stage with a model: the run's teacher."""
    return next((r for r in records if gives(r.kind, "teacher") and r.model_dir is not None), None)


# ---- the run directory ----------------------------------------------------------------------------------------
class RunDir:
    """A run directory: where each stage's files go and ``state.json``, read and written atomically."""

    def __init__(self, path: Path | str):
        self.path = Path(os.path.abspath(path))

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.path / "stages" / f"{index:02d}-{name}"

    def partial_dir(self, index: int, name: str) -> Path:
        return self.path / "stages" / f".{index:02d}-{name}.partial"

    def checkpoint_dir(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    def write_state(self, state: dict[str, Any]) -> None:
        """``state.json`` with every path inside the run directory stored relative to it, strict JSON (no NaN)."""
        atomic_write_text(self.state_path, dumps_strict(relative_paths(state, self.path)))

    def read_state(self) -> dict[str, Any]:
        """``state.json`` with its paths made absolute again (wherever the run directory now is)."""
        path = self.state_path
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: unreadable run state ({exc}); remove it to start the run afresh") from None
        if not isinstance(state, dict) or not isinstance(state.get("completed"), list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("outputs", {}), dict)
                for s in state["completed"]):
            raise RecipeError(f"{path}: field 'completed' must be a list of stage records")
        return absolute_paths(state, self.path)

    def records(self) -> list[StageRecord]:
        """The completed stages, in the order they completed."""
        return [StageRecord.from_json(s) for s in self.read_state()["completed"]]

    @classmethod
    def enclosing(cls, path: Path | str) -> RunDir | None:
        """The run directory that holds ``path`` (a stage's model directory, say): the nearest parent with a
        ``state.json``; None when there is none."""
        for parent in Path(os.path.abspath(path)).parents:
            if (parent / STATE).is_file():
                return cls(parent)
        return None

    @classmethod
    def finished(cls, path: Path | str) -> RunDir:
        """A run written by ``compressor run``, for the readers of finished runs (benchmark, publish): a
        ``CompressorError`` naming what is missing when ``path`` is not one."""
        run = cls(path)
        if not Path(path).is_dir():
            raise CompressorError(f"{path}: run directory does not exist")
        state = Path(path) / STATE
        if not state.is_file():
            raise CompressorError(f"{state}: not found (is {path} a run directory written by `compressor run`?)")
        try:
            data = json.loads(state.read_text())
        except json.JSONDecodeError as exc:
            raise CompressorError(f"{state}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(data.get("completed"), list):
            raise CompressorError(f"{state}: field 'completed' is missing or not a list")
        return run
