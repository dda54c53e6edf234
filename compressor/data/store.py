"""Examples and features of every task and split, read once from the data root."""

from __future__ import annotations

import inspect
import os
import random
from pathlib import Path
from typing import Any

from compressor.data.options import DataOptions
from compressor.data.readers import decode_error, text_encoding
from compressor.data.tables import RECORD_FORMATS, ColumnMap, column_map
from compressor.errors import DataError, RecipeError
from compressor.tasks import Encoded, TaskPlugin, build_task

SPLITS = ("train", "dev", "test")


def read_split(task: TaskPlugin, path: Path, fmt: str | None, encoding: str | None = None,
               columns: ColumnMap | None = None) -> list[Any]:
    """``task.read(path, fmt)`` with the split's text encoding and column map.

    The encoding reaches the plugin two ways, so a plugin written before ``encoding:`` existed keeps working:
    every reader of :mod:`compressor.data.readers` (which the built-in plugins use) decodes in it while the call
    runs, and a plugin whose ``read`` takes an ``encoding`` keyword (or ``**kwargs``) is also given it. Text a
    plugin decodes itself and that is not valid in its codec becomes a ``DataError`` naming the file, the line
    and the byte offset. The column map (``columns``, ``label_names``) reaches every plugin that reads through
    :func:`compressor.data.tables.read_records`; one given to a plugin that reads otherwise is an error, not
    silently ignored.
    """
    kwargs = {"encoding": encoding} if encoding is not None and _takes_encoding(task.read) else {}
    with text_encoding(encoding), column_map(columns) as reading:
        try:
            examples = task.read(path, fmt, **kwargs)
        except UnicodeDecodeError as exc:
            try:
                raw = Path(path).read_bytes()
            except OSError:
                raw = b""
            raise decode_error(Path(path), raw, exc, exc.encoding or encoding or "utf-8") from None
    if columns and not reading.used:
        raise DataError(path, f"task '{task.name}' has columns/label_names, but its plugin reads this file "
                              f"(format {fmt or 'by extension'}) without them; use a format it reads as a table "
                              f"({', '.join(RECORD_FORMATS)}) or drop them")
    return examples


def _takes_encoding(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "encoding" and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in params)


# what to do when no data root was found (the recipe layer's resolve_data_root says the same)
NO_DATA_ROOT = ("set data_root in the recipe, pass --data-root, or set $COMPRESSOR_DATA_ROOT "
                "(the default ../shared/data was not found)")


def under_root(path: str | Path, root: Path | None) -> Path | None:
    """A recipe's data path: as given when absolute, else under ``root``; ``None`` when it is relative and there
    is no root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return None if root is None else Path(root) / p


class DataStore:
    """Reads each split lazily, applies the task's ``limit`` (seeded subsample) and caches encodings.

    A split is read in its ``encoding`` (the split's, else the task's, else UTF-8). A task with
    ``dev_from_train`` and no dev file gets a seeded hold-out of its training file as the dev split, and the
    rest as the training split. Labels are fitted on the whole training file, never on a ``limit`` subsample.
    """

    def __init__(self, options: DataOptions, data_root: Path | None):
        if not isinstance(options, DataOptions):
            raise TypeError(f"DataStore takes DataOptions (a recipe gives them: recipe.data_options()), "
                            f"got {type(options).__name__}")
        self.options = options
        self.max_length = options.max_length
        self.root = Path(data_root) if data_root is not None else None
        self.tasks: dict[str, TaskPlugin] = {
            t.name: build_task(t.plugin, t.name, t.labels, t.options) for t in options.tasks
        }
        for task in self.tasks.values():
            task.bind(self.tasks)
        self._examples: dict[tuple[str, str], list[Any]] = {}
        self._files: dict[tuple[str, str], list[Any]] = {}  # whole files, kept until their splits are subsampled
        self._full_sizes: dict[tuple[str, str], int] = {}
        self._encoded: dict[tuple[str, str, str, bool, int], Encoded] = {}
        self._tokenizers: dict[int, tuple[Any, str]] = {}

    def path(self, task: str, split: str) -> Path | None:
        """The file a split is read from (a dev split held out of train: the training file); None: no split."""
        spec = self.options.task(task)
        entry = spec.source(split)
        if entry is None and split == "dev" and spec.dev_from_train is not None:
            entry = spec.source("train")
        if entry is None:
            return None
        return self.resolve(entry.path, f"task '{task}', split '{split}'")

    def resolve(self, path: str | Path, what: str) -> Path:
        """``path`` as given when absolute, else under the data root; with no data root a relative path is an
        error naming ``what`` reads it."""
        resolved = under_root(path, self.root)
        if resolved is None:
            raise RecipeError(f"{what}: {Path(path).expanduser()} is relative to the data root, and there is none: "
                              f"{NO_DATA_ROOT}, or give an absolute path")
        return resolved

    def eval_splits(self, task: str) -> list[str]:
        """The splits of ``task`` an evaluation scores (dev, test, extra test sets), those it has."""
        return [s for s in self.options.task(task).eval_splits() if self.has(task, s)]

    def has(self, task: str, split: str) -> bool:
        return self.path(task, split) is not None

    def format(self, task: str, split: str) -> str | None:
        """The reader format of a split: its own, else the task's."""
        spec = self.options.task(task)
        entry = spec.source(self._file_split(task, split))
        return (entry.format if entry is not None else None) or spec.format

    def encoding(self, task: str, split: str) -> str | None:
        """The text encoding of a split: its own, else the task's; None means UTF-8."""
        spec = self.options.task(task)
        entry = spec.source(self._file_split(task, split))
        return (entry.encoding if entry is not None else None) or spec.encoding

    def columns(self, task: str, split: str) -> ColumnMap:
        """The column map of a split: its own ``columns`` (else the task's) and the task's ``label_names``."""
        spec = self.options.task(task)
        entry = spec.source(self._file_split(task, split))
        own = entry.columns if entry is not None and entry.columns is not None else spec.columns
        return ColumnMap(dict(own or {}), dict(spec.label_names or {}))

    def held_out(self, task: str) -> bool:
        """Whether the task's dev split is a hold-out of its training file (``dev_from_train``)."""
        spec = self.options.task(task)
        return spec.source("dev") is None and spec.dev_from_train is not None

    def _file_split(self, task: str, split: str) -> str:
        return "train" if split == "dev" and self.held_out(task) else split

    def read_file(self, task: str, split: str) -> list[Any]:
        """Every example of the file behind a split, in its format and encoding (no limit, no hold-out)."""
        path = self.path(task, split)
        if path is None:
            raise DataError(f"recipe task '{task}'", f"no '{split}' file given (tasks[].data.{split})")
        if not path.exists():
            raise DataError(path, f"data file for task '{task}' split '{self._file_split(task, split)}' not found")
        key = (task, f"file:{self._file_split(task, split)}")
        if key in self._files:
            return self._files[key]
        examples = read_split(self.tasks[task], path, self.format(task, split), self.encoding(task, split),
                              self.columns(task, split))
        if not examples:
            raise DataError(path, f"split '{self._file_split(task, split)}' of task '{task}' is empty")
        file_split = self._file_split(task, split)
        users = ("train", "dev") if self.held_out(task) and file_split == "train" else (file_split,)
        if not all((task, s) in self._examples for s in users):  # kept only until its splits are subsampled
            self._files[key] = examples
        return examples

    def full(self, task: str, split: str) -> list[Any]:
        """Every example of a split before ``limit`` (the training split without its dev hold-out), checked by
        its plugin for that split (``TaskPlugin.check_split``)."""
        examples = self.read_file(task, split)
        if self.held_out(task) and split in ("train", "dev"):
            train_idx, dev_idx = self._holdout(task, len(examples))
            examples = [examples[i] for i in (dev_idx if split == "dev" else train_idx)]
        self.tasks[task].check_split(examples, split)
        return examples

    def _holdout(self, task: str, n: int) -> tuple[list[int], list[int]]:
        share = self.options.task(task).dev_from_train
        n_dev = max(1, round(share * n))
        if n_dev >= n:
            raise DataError(self.path(task, "train"), f"task '{task}': dev_from_train={share} of {n} example(s) "
                            "leaves no training example; give a dev file or a larger training file")
        dev = sorted(self._draw(self._file_key(task, "train"), "dev_from_train", n)[:n_dev])
        chosen = set(dev)
        return [i for i in range(n) if i not in chosen], dev

    def examples(self, task: str, split: str) -> list[Any]:
        key = (task, split)
        if key not in self._examples:
            spec = self.options.task(task)
            examples = self.full(task, split)
            self._full_sizes[key] = len(examples)
            limit = spec.limits.get(split)
            if limit is not None and limit < len(examples):
                keep = sorted(self._draw(self._file_key(task, split), split, len(examples))[:limit])
                examples = [examples[i] for i in keep]
            self._examples[key] = examples
            self._drop_file(task, split)
        return self._examples[key]

    def _file_key(self, task: str, split: str) -> str:
        """What identifies the file behind a split across tasks: its path relative to the data root (as a recipe
        spells it, so a moved data root draws the same samples)."""
        path = self.path(task, self._file_split(task, split))
        resolved = Path(os.path.abspath(path))
        if self.root is None:
            return resolved.as_posix()
        root = Path(os.path.abspath(self.root))
        try:
            return resolved.relative_to(root).as_posix()
        except ValueError:
            return resolved.as_posix()

    def _draw(self, file_key: str, what: str, n: int) -> list[int]:
        """A seeded order of ``range(n)`` shared by every task reading the same file: its first ``k`` entries are
        the ``k`` examples a ``limit`` (or a dev hold-out) keeps, so two tasks with a limit on one file draw the
        same examples (the one with the smaller limit, a subset of the other's)."""
        order = list(range(n))
        random.Random(f"{self.options.seed}:{file_key}:{what}").shuffle(order)
        return order

    def _drop_file(self, task: str, split: str) -> None:
        """Forget a whole file once every split read from it has its examples (a limit keeps a subsample)."""
        users = ("train", "dev") if self.held_out(task) and split in ("train", "dev") else (split,)
        if all((task, s) in self._examples for s in users):
            self._files.pop((task, f"file:{self._file_split(task, split)}"), None)

    def fit_labels(self) -> None:
        """Give every task without a label schema the one its training data implies: fitted on the whole
        training file (a dev split held out of it included), not on the ``limit`` subsample."""
        for name, task in self.tasks.items():
            if not task.labels:
                task.labels = list(task.fit_labels(self.read_file(name, "train")))
                self._drop_file(name, "train")

    def encoded(self, task: str, split: str, tokenizer: Any, max_length: int, train: bool = False) -> Encoded:
        """The task's encoding of a split, cached by the tokenizer's content: two loads of the same tokenizer
        (the teacher's and each twin's) share one encoding; a pruned vocabulary gets its own."""
        key = (task, split, self._fingerprint(tokenizer), train, max_length)
        if key not in self._encoded:
            encoded = self.tasks[task].encode(self.examples(task, split), tokenizer, max_length, train)
            self._encoded[key] = encoded
        return self._encoded[key]

    def _fingerprint(self, tokenizer: Any) -> str:
        entry = self._tokenizers.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            import hashlib

            backend = getattr(tokenizer, "backend_tokenizer", None)
            text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
            extra = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'padding_side', '')}:{len(tokenizer)}"
            entry = (tokenizer, hashlib.sha256((extra + text).encode()).hexdigest())
            self._tokenizers[id(tokenizer)] = entry  # holds the tokenizer, so its id is not reused
        return entry[1]

    def sizes(self) -> dict[str, dict[str, dict[str, int]]]:
        """task -> split -> {"used": n, "available": m, "labels": the task's label count, "truncated": t} for
        every split read so far."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (task, split), examples in self._examples.items():
            out.setdefault(task, {})[split] = {"used": len(examples), "available": self._full_sizes[(task, split)],
                                               "labels": len(self.tasks[task].labels)}
        for (task, split, _tok, _train, _len), enc in self._encoded.items():
            entry = out.setdefault(task, {}).setdefault(split, {})
            entry["truncated"] = max(entry.get("truncated", 0), enc.truncated)
            for reason, n in enc.skipped.items():
                entry[f"skipped:{reason}"] = n
        return out
