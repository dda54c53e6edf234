"""The task-plugin contract and the task registry.

A task plugin is one class deriving from :class:`TaskPlugin`. It is registered under a name through the
entry-point group ``compressor.tasks`` (the built-in plugins use the same group), and it is checked when it
registers: a missing part, or a part whose signature does not fit the contract, is rejected with an error that
names the plugin and the part.

Data flows through a plugin in this order::

    read(path) -> examples
    encode(examples, tokenizer, max_length, train) -> Encoded(features=[feature dicts], truncated=n)
    collate(features) -> batch (dict of tensors; model inputs + labels)
    head(hidden_states, attention_mask, **extra_inputs) -> outputs (dict of tensors, keys = onnx output names)
    loss(outputs, batch) -> scalar tensor
    distill_targets(outputs, batch) -> {name: DistillTarget}
    decode(outputs as numpy, batch as numpy, features) -> one result per feature
    aggregate(results, encoded) -> one prediction per example
    score(predictions, examples) -> {metric name: value, ...}

Everything a plugin needs at run time lives on the instance: ``name`` (the task's name in a recipe, e.g. ``sst2``),
``labels`` (its label schema) and ``options`` (a validated pydantic model of its recipe options).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from compressor.errors import RecipeError, RegistryError
from compressor.registry import Registry

if TYPE_CHECKING:  # torch stays out of `compressor --help`
    import numpy as np
    import torch
    from torch import nn

#: Inputs every model takes; a plugin adds its own through ``onnx_inputs``.
BASE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class MetricSpec:
    """The primary metric of a task (the key in ``score``'s result that reports and early stopping use)."""

    name: str
    higher_is_better: bool = True

    def retention(self, value: float, reference: float) -> float:
        """:func:`retention` of ``value`` against ``reference`` under this metric's direction."""
        return retention(value, reference, self.higher_is_better)


def retention(value: float, reference: float, higher_is_better: bool = True) -> float:
    """How much of ``reference``'s metric ``value`` keeps: value / reference, or reference / value for a
    lower-is-better metric. Where that divides by zero: 1.0 when ``value`` is at least as good as ``reference``,
    else 0.0 (a zero reference is matched or missed, never an infinite gain)."""
    num, den = (value, reference) if higher_is_better else (reference, value)
    if den:
        return num / den
    at_least_as_good = value >= reference if higher_is_better else value <= reference
    return 1.0 if at_least_as_good else 0.0


@dataclass(frozen=True)
class OnnxOutput:
    """One graph output of a task head; the graph name is ``f"{task}.{name}"``.

    ``dynamic_axes`` maps axis index -> symbolic name (e.g. ``{0: "batch", 1: "sequence"}``); ``atol`` is the
    largest absolute difference to PyTorch that an exported graph may show on this output.
    """

    name: str
    dynamic_axes: Mapping[int, str]
    atol: float = 1e-4


@dataclass(frozen=True)
class OnnxInput:
    """An extra graph input a head needs beyond ``BASE_INPUTS`` (e.g. entity spans for relation extraction)."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "bool"
    dynamic_axes: Mapping[int, str]
    example_shape: tuple[int, ...]  # trailing dims after the dynamic ones, used to make export dummies


@dataclass
class Encoded:
    """Features of one split: one dict per model row (a sentence, or one window of a long context).

    A feature dict holds plain Python values: the model inputs (lists of ints), the labels, ``example_index``
    (which example it came from) and whatever the decoder needs (word ids, character offsets...).
    """

    features: list[dict[str, Any]]
    num_examples: int
    truncated: int = 0  # examples that did not fit max_length and were truncated (never dropped)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, for records a plugin skips


@dataclass
class DistillTarget:
    """What distillation compares: KL over the last dimension of ``logits`` where ``mask`` is true.

    ``mask`` has the shape of ``logits`` without its last dimension; ``None`` means every position counts.
    """

    logits: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class HfHead:
    """How a task's head maps onto a head class of transformers (``compressor export-hf``).

    ``kind``: ``"token-classification"`` (a Linear over every token's last hidden state: ``*ForTokenClassification``),
    ``"sequence-classification"`` (a Linear over the first token's last hidden state: ``*ForSequenceClassification``)
    or ``"question-answering"`` (``Linear(hidden, 2)`` giving start and end logits: ``*ForQuestionAnswering``).
    ``labels``: the class names in logit order (``id2label``; empty for question answering). ``linear``: the dotted
    name of that Linear inside the head module (e.g. ``"classifier"``).
    """

    kind: Literal["token-classification", "sequence-classification", "question-answering"]
    labels: tuple[str, ...]
    linear: str


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: forward(task_name, batch as numpy) -> outputs as numpy; the same callable works for PyTorch and ONNX Runtime.
Forward = Callable[[str, Mapping[str, "np.ndarray"]], Mapping[str, "np.ndarray"]]


class TaskPlugin(ABC):
    """Base class of a task plugin. See the module docstring for the data flow."""

    #: Primary metric.
    metric: ClassVar[MetricSpec]
    #: Pydantic model of the options a recipe may set for this task (``extra="forbid"``).
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: Label schema when it does not come from data (e.g. fixed relation types); empty means "from data".
    default_labels: ClassVar[tuple[str, ...]] = ()
    #: Short description shown by ``compressor tasks list``.
    description: ClassVar[str] = ""

    def __init__(self, name: str, labels: Sequence[str] | None = None, options: Mapping[str, Any] | None = None):
        self.name = name
        self.plugin_name: str | None = None  # set by build_task: the registry name this instance came from
        self.labels: list[str] = list(labels) if labels else list(self.default_labels)
        from compressor.inputs import misplaced_bool

        misplaced = misplaced_bool(self.Options, options) if isinstance(options, Mapping) else None
        if misplaced is not None:  # pydantic's lax mode would read it as 0 or 1
            raise RecipeError(f"task '{name}': invalid options: {misplaced}: expected a number, got a boolean")
        try:
            self.options = self.Options(**dict(options or {}))
        except ValidationError as exc:
            raise RecipeError(f"task '{name}': invalid options: {_first_error(exc)}") from exc

    def bind(self, tasks: Mapping[str, TaskPlugin]) -> None:
        """Called once all tasks of a model or run exist, with every task by name (including this one).

        A task that builds on another (relation extraction decodes entities with the NER task) keeps what it
        needs here. Default: nothing.
        """

    def requires(self) -> list[str]:
        """Names of other tasks this one cannot run without (relation extraction needs its entity task).

        A single-task twin of this task is trained together with them; the report scores only this task.
        """
        return []

    # ---- data ---------------------------------------------------------------------------------------------
    @abstractmethod
    def read(self, path: Path, format: str | None = None) -> list[Any]:
        """Read one split. Raises ``DataError`` naming the file and line/record for anything malformed."""

    def check_split(self, examples: Sequence[Any], split: str) -> None:
        """Raise ``DataError`` naming the file and line or record for an example the ``split`` ("train", "dev" or
        "test") cannot use, before any training (a QA question without a reference answer cannot be scored on
        dev or test). Default: nothing."""

    @abstractmethod
    def fit_labels(self, examples: Sequence[Any]) -> list[str]:
        """Derive the label schema from training examples (called when the recipe gives no labels)."""

    @abstractmethod
    def encode(self, examples: Sequence[Any], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        """Tokenise examples into features; raises ``DataError`` for labels outside ``self.labels``."""

    @abstractmethod
    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad features into a batch: ``BASE_INPUTS`` present in the features, extra inputs, and labels."""

    # ---- model --------------------------------------------------------------------------------------------
    @abstractmethod
    def build_head(self, hidden_size: int) -> nn.Module:
        """The head: ``forward(hidden_states, attention_mask, **extra_inputs) -> {output name: tensor}``."""

    @abstractmethod
    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one batch."""

    @abstractmethod
    def distill_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget]:
        """The logits distillation compares between teacher and student, with their masks."""

    def transfer_targets(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, DistillTarget] | None:
        """The logits to distil this head on a batch of *another* task (``transfer`` in a distillation): the
        head's ``outputs`` on that batch, which holds only the shared inputs (``input_ids``, ``attention_mask``,
        ``token_type_ids``) and none of this task's labels or extra inputs. A sentence classifier can be taught
        on any sentence and a token tagger on any tokens; ``None`` (the default) says this head needs inputs of
        its own (e.g. a question with its context, or candidate pairs) and cannot be."""
        return None

    # ---- predictions --------------------------------------------------------------------------------------
    @abstractmethod
    def decode(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], features: Sequence[dict[str, Any]]
    ) -> list[Any]:
        """One raw result per feature of the batch (numpy in, plain Python out)."""

    def aggregate(self, results: Sequence[Any], encoded: Encoded) -> list[Any]:
        """Combine per-feature results into one prediction per example (default: one feature per example)."""
        predictions: list[Any] = [None] * encoded.num_examples
        for feature, result in zip(encoded.features, results):
            predictions[feature["example_index"]] = result
        return predictions

    @abstractmethod
    def score(self, predictions: Sequence[Any], examples: Sequence[Any]) -> dict[str, float]:
        """Metrics of predictions against gold examples; holds at least ``metric.name``."""

    @abstractmethod
    def onnx_outputs(self) -> list[OnnxOutput]:
        """Graph outputs of the head, in the order the head returns them."""

    def onnx_inputs(self) -> list[OnnxInput]:
        """Extra graph inputs of the head (beyond ``BASE_INPUTS``)."""
        return []

    def export_spec(self) -> dict[str, Any]:
        """What a torch-free runtime needs to decode this task's graph outputs (written to ``tasks.json``).

        Built-in decoders (``compressor.runtime``): ``{"decoder": "bio", "tags": [...]}``,
        ``{"decoder": "classification", "labels": [...], "text_pair": bool}``,
        ``{"decoder": "relation", "entity_task": str, "labels": [...], "no_relation": str, ...}``,
        ``{"decoder": "qa_span", "max_answer_length": int, "n_best": int, "doc_stride": int}``.
        ``{"decoder": None}`` means the runtime returns raw outputs.
        """
        return {"decoder": None}

    def hf_head(self) -> HfHead | None:
        """The transformers head class this task's head is exactly, or ``None`` (default) when none is: then
        ``compressor export-hf`` saves the head's weights beside the encoder in its own documented form."""
        return None

    def input_names(self) -> list[str]:
        return [*BASE_INPUTS, *(i.name for i in self.onnx_inputs())]

    def evaluate(
        self, forward: Forward, encoded: Encoded, examples: Sequence[Any], batch_size: int = 32
    ) -> tuple[dict[str, float], list[Any]]:
        """Predict every example with ``forward`` and score it. Plugins that chain tasks override this."""
        results: list[Any] = []
        for start in range(0, len(encoded.features), batch_size):
            feats = encoded.features[start : start + batch_size]
            batch = {k: v.numpy() for k, v in self.collate(feats).items()}
            results.extend(self.decode(forward(self.name, batch), batch, feats))
        predictions = self.aggregate(results, encoded)
        return self.score(predictions, examples), predictions

    def describe(self) -> dict[str, Any]:
        """What the manifest stores to rebuild this task: plugin, labels, options."""
        return {"name": self.name, "labels": list(self.labels), "options": self.options.model_dump(mode="json")}


# ---- registration checks ----------------------------------------------------------------------------------

#: part -> the parameters (after self) the contract passes it
_METHODS: dict[str, tuple[str, ...]] = {
    "read": ("path", "format"),
    "check_split": ("examples", "split"),
    "fit_labels": ("examples",),
    "encode": ("examples", "tokenizer", "max_length", "train"),
    "collate": ("features",),
    "build_head": ("hidden_size",),
    "loss": ("outputs", "batch"),
    "distill_targets": ("outputs", "batch"),
    "decode": ("outputs", "batch", "features"),
    "aggregate": ("results", "encoded"),
    "score": ("predictions", "examples"),
    "onnx_outputs": (),
    "onnx_inputs": (),
    "evaluate": ("forward", "encoded", "examples"),
    "hf_head": (),
}


def with_required(tasks: Mapping[str, TaskPlugin], task: str) -> list[str]:
    """``task`` first, then every task it needs (``requires()``, transitively), in the order of ``tasks``."""
    need, todo = {task}, [task]
    while todo:
        for req in tasks[todo.pop()].requires():
            if req not in need:
                need.add(req)
                todo.append(req)
    return [task] + [t for t in tasks if t in need and t != task]


def required_by(tasks: Mapping[str, TaskPlugin], task: str) -> list[str]:
    """``task`` and every task of ``tasks`` that requires it, transitively (their outputs depend on its head)."""
    found = [task]
    changed = True
    while changed:
        changed = False
        for name, plugin in tasks.items():
            if name not in found and any(r in found for r in plugin.requires()):
                found.append(name)
                changed = True
    return found


def validate_plugin(name: str, cls: object) -> None:
    """Reject a plugin class that misses a part of the contract or has a part with the wrong signature."""
    if not (isinstance(cls, type) and issubclass(cls, TaskPlugin)):
        raise RegistryError(f"task plugin '{name}': {cls!r} is not a subclass of compressor.tasks.TaskPlugin")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise RegistryError(f"task plugin '{name}': missing part(s) {', '.join(missing)}")
    metric = getattr(cls, "metric", None)
    if not isinstance(metric, MetricSpec):
        raise RegistryError(f"task plugin '{name}': part 'metric' must be a MetricSpec, got {metric!r}")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise RegistryError(f"task plugin '{name}': part 'Options' must be a pydantic BaseModel subclass")
    for part, params in _METHODS.items():
        fn = getattr(cls, part, None)
        if not callable(fn):
            raise RegistryError(f"task plugin '{name}': part '{part}' is not callable")
        try:
            inspect.signature(fn).bind(None, *params)
        except TypeError as exc:
            raise RegistryError(
                f"task plugin '{name}': part '{part}' has signature {inspect.signature(fn)}, "
                f"expected (self, {', '.join(params)}): {exc}"
            ) from exc


TASKS: Registry[type[TaskPlugin]] = Registry("task", validate=validate_plugin, group="compressor.tasks")


def register_task(name: str) -> Callable[[type[TaskPlugin]], type[TaskPlugin]]:
    """Decorator for registering a plugin at runtime (tests, notebooks); packages use entry points."""

    def deco(cls: type[TaskPlugin]) -> type[TaskPlugin]:
        TASKS.register(name, cls)
        return cls

    return deco


def build_task(plugin: str, name: str, labels: Sequence[str] | None = None, options: Mapping | None = None) -> TaskPlugin:
    """Instantiate the plugin registered as ``plugin`` for the task ``name``."""
    task = TASKS.get(plugin)(name, labels=labels, options=options)
    task.plugin_name = plugin
    return task


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]
