"""The model and the tasks of a recipe: encoder, splits (paths, formats, encodings), limits, dev hold-out."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from compressor.recipe._base import NAME, Strict, known_codec


class ModelSpec(Strict):
    encoder: str = Field("offline-default", description="HF name or local path; 'offline-default' = all-MiniLM-L6-v2")
    max_length: int = Field(128, ge=8, le=4096)
    trust_remote_code: bool = False


class SplitFile(Strict):
    """A split given with its own reader format (e.g. the same SQuAD file read as ``squad-train``/``squad-dev``)
    and/or its own text encoding (``latin-1``, ``cp1252``...; default: the task's ``encoding``, else UTF-8)
    and/or its own column map (default: the task's ``columns``)."""

    path: str
    format: str | None = None
    encoding: str | None = None
    columns: dict[str, str] | None = Field(None, description="field -> column of this split's file")

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_columns(v)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        return known_codec(v)



def check_columns(v: dict[str, str] | None) -> dict[str, str] | None:
    """A column map: non-empty field and column names."""
    for key, col in (v or {}).items():
        if not key or not col:
            raise ValueError(f"columns: field and column names must be non-empty, got {key!r}: {col!r}")
    return v


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
    encoding: str | None = Field(None, description="text encoding of every split without its own (default utf-8)")
    labels: list[str] | None = None
    limit: Limits = Limits()
    dev_from_train: float | None = Field(
        None, gt=0, lt=1, description="no dev file: hold out this share of the training file (seeded) as the dev "
        "split; the rest is the training split")
    options: dict[str, Any] = {}
    columns: dict[str, str] = Field({}, description="tabular files: the plugin's field -> the file's column, e.g. "
                                    "{tags: ner_tags}")
    label_names: dict[str, list[str]] = Field({}, description="field -> the names of its integer ids (index = id), "
                                              "when the file has no ClassLabel feature naming them")

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        return check_columns(v) or {}

    @field_validator("label_names")
    @classmethod
    def _label_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, names in v.items():
            if not names or any(not isinstance(n, str) or not n for n in names):
                raise ValueError(f"label_names.{key} must be a non-empty list of names")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"label_names.{key} names {', '.join(dup)} twice")
        return v
    tests: dict[str, str | SplitFile] = Field(
        {}, description="extra test sets beside data.test, by name (e.g. {amazon: reviews.jsonl}): scored by every "
        "evaluation and reported as their own split 'test:<name>' with retention, to show how a model holds up "
        "off-domain; a path relative to the data root, or {path, format, encoding}")

    @field_validator("tests")
    @classmethod
    def _test_names(cls, tests: dict[str, str | SplitFile]) -> dict[str, str | SplitFile]:
        import re

        for name in tests:
            if not re.match(NAME, name) or len(name) > 64:
                raise ValueError(f"test set name '{name[:80]}' must be a letter or _ followed by letters, digits, "
                                 "_ or - (at most 64 characters)")
        return tests

    def split_files(self) -> dict[str, SplitFile]:
        """Every split of the task by name (train, dev, test and 'test:<name>' for each extra test set)."""
        files = {s: self.data.get(s) for s in ("train", "dev", "test")}
        files.update({f"test:{n}": SplitFile(path=v) if isinstance(v, str) else v for n, v in self.tests.items()})
        return {s: f for s, f in files.items() if f is not None}

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        return known_codec(v)

    @model_validator(mode="after")
    def _one_dev_source(self) -> TaskSpec:
        if self.dev_from_train is not None and self.data.dev is not None:
            raise ValueError("give data.dev or dev_from_train, not both")
        if self.dev_from_train is not None and self.data.train is None:
            raise ValueError("dev_from_train needs data.train")
        return self

    def has_dev(self) -> bool:
        """A dev file, or a dev split held out of train (``dev_from_train``)."""
        return self.data.dev is not None or self.dev_from_train is not None

