"""YAML recipes, validated by pydantic. Torch-free, so ``compressor validate`` is fast.

Errors name the YAML path, the line and what was expected::

    recipes/x.yaml:14: stages[0].epochs: Input should be greater than 0 (got -1)

Each stage kind has a config model here with ``kind: Literal[...]``; ``Stage`` is the union discriminated on
``kind``. A new stage adds its config class to ``Stage`` and its runner to ``compressor.stages.STAGE_RUNNERS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.errors import RecipeError

NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
DATA_ROOT_ENV = "COMPRESSOR_DATA_ROOT"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- model and tasks --------------------------------------------------------------------------------------
class ModelSpec(Strict):
    encoder: str = Field("offline-default", description="HF name or local path; 'offline-default' = all-MiniLM-L6-v2")
    max_length: int = Field(128, ge=8, le=4096)
    trust_remote_code: bool = False


class SplitFile(Strict):
    """A split given with its own reader format (e.g. the same SQuAD file read as ``squad-train``/``squad-dev``)."""

    path: str
    format: str | None = None


class Splits(Strict):
    """Paths relative to the data root (or absolute); a plain string or ``{path, format}``."""

    train: str | SplitFile | None = None
    dev: str | SplitFile | None = None
    test: str | SplitFile | None = None

    def get(self, split: str) -> SplitFile | None:
        value = getattr(self, split)
        return SplitFile(path=value) if isinstance(value, str) else value


class Limits(Strict):
    """Subsample a split to its first N examples (after a seeded shuffle); reports say so."""

    train: int | None = Field(None, gt=0)
    dev: int | None = Field(None, gt=0)
    test: int | None = Field(None, gt=0)


class TaskSpec(Strict):
    name: str = Field(pattern=NAME)
    plugin: str
    data: Splits
    format: str | None = None
    labels: list[str] | None = None
    limit: Limits = Limits()
    options: dict[str, Any] = {}


# ---- stages -----------------------------------------------------------------------------------------------
class Sampling(Strict):
    strategy: Literal["proportional", "temperature", "round_robin"] = "temperature"
    tau: float = Field(2.0, gt=0)


class LossWeighting(Strict):
    strategy: Literal["uniform", "fixed", "uncertainty"] = "uniform"
    weights: dict[str, float] = {}

    @model_validator(mode="after")
    def _fixed_needs_weights(self) -> LossWeighting:
        if self.strategy == "fixed" and not self.weights:
            raise ValueError("strategy 'fixed' needs 'weights' (task name -> weight)")
        return self


class TrainStage(Strict):
    """Joint training of the multi-task teacher (and, with ``baselines``, one single-task model per task)."""

    kind: Literal["train"]
    name: str = Field("teacher", pattern=NAME)
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    freeze_embeddings: bool = False
    freeze_layers: int = Field(0, ge=0)
    sampling: Sampling = Sampling()
    loss_weighting: LossWeighting = LossWeighting()
    early_stopping_patience: int | None = Field(None, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0, description="default: one pass over all tasks' training batches")
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    baselines: bool = False


Stage = Annotated[Union[TrainStage], Field(discriminator="kind")]


class ReportSpec(Strict):
    latency: bool = True
    latency_seq_len: int = Field(128, gt=0)
    latency_runs: int = Field(30, gt=0)
    latency_warmup: int = Field(5, ge=0)
    threads: int | None = Field(None, gt=0, description="torch threads for latency; default: all cores")


class Recipe(Strict):
    name: str = Field(pattern=NAME)
    seed: int = 42
    data_root: str | None = None
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

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise RecipeError(f"recipe '{self.name}': no task '{name}'")


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what} name '{n}' is used twice")
        seen.add(n)


# ---- loading ----------------------------------------------------------------------------------------------
def load_recipe(path: Path | str) -> Recipe:
    """Parse and validate a YAML recipe; every error names the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: expected a mapping at the top of the recipe, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
        line = _line_of(node, loc)
        dotted = _dotted(loc) or "<recipe>"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; expected one of {err['ctx']['expected_tags']}"
            got = ""
        raise RecipeError(f"{path}:{line}: {dotted}: {msg}{got}") from exc


_UNION_TAGS = {"train"}  # discriminator values pydantic inserts into error locations


def _dotted(loc: list[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _line_of(node: Any, loc: list[Any]) -> int:
    """1-based line of the deepest YAML node along ``loc``."""
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def resolve_data_root(recipe_root: str | None, cli_root: str | Path | None = None) -> Path:
    """CLI option > recipe field > $COMPRESSOR_DATA_ROOT > ../shared/data (from the cwd or the checkout)."""
    for candidate in (cli_root, recipe_root, os.environ.get(DATA_ROOT_ENV)):
        if candidate:
            return Path(candidate).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        default = base.parent / "shared" / "data"
        if default.is_dir():
            return default
    raise RecipeError(
        f"no data root: set data_root in the recipe, pass --data-root, or set ${DATA_ROOT_ENV} "
        "(default ../shared/data was not found)"
    )
