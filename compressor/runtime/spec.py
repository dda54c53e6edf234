"""The graph contract of an exported multi-task model, as written to ``graph.json`` and a bundle's ``tasks.json``.

One ONNX graph serves every task: it takes the encoder inputs (``input_ids``, ``attention_mask`` and, where the
encoder has them, ``token_type_ids``) plus each head's extra inputs, and returns one output per task output,
named ``f"{task}.{name}"``. An extra input keeps its plugin name (``re_spans``) unless two tasks declare the same
name, in which case both become ``f"{task}.{name}"``.

Torch-free: only the standard library is imported here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "compressor-bundle"
VERSION = 1


@dataclass(frozen=True)
class ExtraInput:
    """One extra graph input of a head (see ``compressor.tasks.OnnxInput``)."""

    name: str  # the keyword the head and the collated batch use
    graph_name: str  # the graph input's name
    dtype: str  # numpy dtype name
    dynamic_axes: dict[int, str]
    example_shape: tuple[int, ...]  # dims after the batch dim, for dummies

    def dummy_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.example_shape)


@dataclass
class TaskGraph:
    """What the graph holds for one task: its inputs, its outputs and how to decode them."""

    name: str
    plugin: str
    labels: list[str]
    outputs: dict[str, str]  # plugin output name -> graph output name
    atol: dict[str, float]  # plugin output name -> parity tolerance
    extra_inputs: list[ExtraInput] = field(default_factory=list)
    decoder: dict[str, Any] = field(default_factory=lambda: {"decoder": None})  # plugin.export_spec()
    options: dict[str, Any] = field(default_factory=dict)  # the plugin's recipe options (rebuilds its plugin)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_inputs"] = [{**asdict(e), "dynamic_axes": {str(k): v for k, v in e.dynamic_axes.items()},
                              "example_shape": list(e.example_shape)} for e in self.extra_inputs]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskGraph:
        extras = [ExtraInput(e["name"], e["graph_name"], e["dtype"], {int(k): v for k, v in e["dynamic_axes"].items()},
                             tuple(e["example_shape"])) for e in d.get("extra_inputs", [])]
        return cls(name=d["name"], plugin=d["plugin"], labels=list(d.get("labels", [])), outputs=dict(d["outputs"]),
                   atol={k: float(v) for k, v in d.get("atol", {}).items()}, extra_inputs=extras,
                   decoder=dict(d.get("decoder") or {"decoder": None}), options=dict(d.get("options") or {}))


@dataclass
class GraphSpec:
    """The inputs and outputs of one multi-task graph, task by task."""

    base_inputs: list[str]  # the encoder inputs the graph takes, in graph order
    tasks: dict[str, TaskGraph]
    max_length: int
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form: opset, optimisation, quantization ...

    @property
    def input_names(self) -> list[str]:
        return [*self.base_inputs, *(e.graph_name for t in self.tasks.values() for e in t.extra_inputs)]

    @property
    def output_names(self) -> list[str]:
        return [g for t in self.tasks.values() for g in t.outputs.values()]

    def extra_inputs(self) -> list[ExtraInput]:
        return [e for t in self.tasks.values() for e in t.extra_inputs]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "max_length": self.max_length, "inputs": self.base_inputs,
            "tasks": {name: {**t.to_json(), "inputs": [*self.base_inputs, *(e.graph_name for e in t.extra_inputs)],
                             "max_length": self.max_length} for name, t in self.tasks.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "<graph spec>") -> GraphSpec:
        """Parse ``to_json`` output; raises ``ValueError`` naming ``source`` and the field for bad input."""
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: field 'format' is {d.get('format')!r}, expected '{FORMAT}'")
        if not isinstance(d.get("version"), int) or d["version"] > VERSION:
            raise ValueError(f"{source}: field 'version' is {d.get('version')!r}; this runtime reads up to {VERSION}")
        for key in ("inputs", "tasks", "max_length"):
            if key not in d:
                raise ValueError(f"{source}: missing field '{key}'")
        if not isinstance(d["tasks"], dict) or not d["tasks"]:
            raise ValueError(f"{source}: field 'tasks' must be a non-empty mapping of task name -> task")
        if not isinstance(d["inputs"], list) or not all(isinstance(x, str) for x in d["inputs"]):
            raise ValueError(f"{source}: field 'inputs' must be a list of input names, got {_short(d['inputs'])}")
        if not _is_int(d["max_length"]) or d["max_length"] < 1:
            raise ValueError(f"{source}: field 'max_length' must be a positive integer, got {_short(d['max_length'])}")
        metadata = d.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"{source}: field 'metadata' must be a JSON object, got {_short(metadata)}")
        metadata = dict(metadata or {})
        if "pad_id" in metadata and (not _is_int(metadata["pad_id"]) or metadata["pad_id"] < 0):
            raise ValueError(f"{source}: field 'metadata.pad_id' must be a non-negative integer (the padding token "
                             f"id), got {_short(metadata['pad_id'])}")
        tasks = {}
        for name, t in d["tasks"].items():
            if not isinstance(t, dict):
                raise ValueError(f"{source}: field 'tasks.{name}' must be a JSON object, got {_short(t)}")
            problem = _task_problem(t)
            if problem:
                raise ValueError(f"{source}: field 'tasks.{name}.{problem}")
            try:
                tasks[name] = TaskGraph.from_json(t)
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise ValueError(f"{source}: tasks.{name}: malformed task entry ({exc!r})") from exc
        return cls(list(d["inputs"]), tasks, int(d["max_length"]), metadata)

    def write(self, path: Path) -> None:
        """Write ``to_json`` atomically; paths in ``metadata`` are stored relative to the run (or repository)."""
        from compressor.fsutil import atomic_write_text, portable

        atomic_write_text(Path(path), json.dumps(portable(self.to_json(), path), indent=2))

    @classmethod
    def read(cls, path: Path) -> GraphSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        return cls.from_json(data, str(path))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _task_problem(t: dict[str, Any]) -> str | None:
    """What is wrong with one task entry's field types (``<field>' must be ...``), or None."""
    for key in ("name", "plugin"):
        if not isinstance(t.get(key), str):
            return f"{key}' must be a string, got {_short(t.get(key))}"
    labels = t.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return f"labels' must be a list of strings, got {_short(labels)}"
    outputs = t.get("outputs")
    if not isinstance(outputs, dict) or not outputs or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in outputs.items()):
        return f"outputs' must be a non-empty mapping of output name -> graph output name, got {_short(outputs)}"
    decoder = t.get("decoder")
    if decoder is not None and not isinstance(decoder, dict):
        return f"decoder' must be a JSON object, got {_short(decoder)}"
    for key in ("atol",):
        if key in t and not isinstance(t[key], dict):
            return f"{key}' must be a JSON object, got {_short(t[key])}"
    if "extra_inputs" in t and not isinstance(t["extra_inputs"], list):
        return f"extra_inputs' must be a list, got {_short(t['extra_inputs'])}"
    return None
