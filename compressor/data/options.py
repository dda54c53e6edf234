"""What the data layer needs to know of each task, as its own typed options (no recipe schema).

``compressor.recipe.Recipe.data_options()`` translates a recipe into them, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from compressor.errors import RecipeError


@dataclass(frozen=True)
class SplitSource:
    """A split's file: its path (relative to the data root, or absolute), reader format, text encoding and its
    own column map (field -> file column; default: the task's)."""

    path: str
    format: str | None = None
    encoding: str | None = None
    columns: Mapping[str, str] | None = None


@dataclass(frozen=True)
class TaskData:
    """One task's data: its plugin, its split files, per-split limits, the dev hold-out share, and how tabular
    files map onto the plugin's fields (``columns``: field -> file column; ``label_names``: field -> the names of
    its integer ids)."""

    name: str
    plugin: str
    splits: dict[str, SplitSource] = field(default_factory=dict)
    format: str | None = None
    encoding: str | None = None
    labels: list[str] | None = None
    limits: dict[str, int | None] = field(default_factory=dict)
    dev_from_train: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    columns: Mapping[str, str] = field(default_factory=dict)
    label_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def source(self, split: str) -> SplitSource | None:
        return self.splits.get(split)

    def eval_splits(self) -> list[str]:
        """The splits every evaluation scores: dev, test, then each extra test set ('test:<name>')."""
        return ["dev", "test"] + [s for s in self.splits if s.startswith("test:")]


@dataclass(frozen=True)
class DataOptions:
    """Every task's data, the seed of subsampling and hold-outs, and the encoders' ``max_length``."""

    tasks: tuple[TaskData, ...]
    seed: int = 42
    max_length: int = 128
    recipe: str = ""  # the recipe's name, for messages

    def task(self, name: str) -> TaskData:
        for t in self.tasks:
            if t.name == name:
                return t
        raise RecipeError(f"recipe '{self.recipe}': no task '{name}'")
