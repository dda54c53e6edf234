"""Examples and features of every task and split of a recipe, read once from the data root."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from compressor.errors import DataError
from compressor.recipe import Recipe
from compressor.tasks import Encoded, TaskPlugin, build_task

SPLITS = ("train", "dev", "test")


class DataStore:
    """Reads each split lazily, applies the recipe's ``limit`` (seeded subsample) and caches encodings."""

    def __init__(self, recipe: Recipe, data_root: Path):
        self.recipe = recipe
        self.root = Path(data_root)
        self.tasks: dict[str, TaskPlugin] = {
            t.name: build_task(t.plugin, t.name, t.labels, t.options) for t in recipe.tasks
        }
        for task in self.tasks.values():
            task.bind(self.tasks)
        self._examples: dict[tuple[str, str], list[Any]] = {}
        self._full_sizes: dict[tuple[str, str], int] = {}
        self._encoded: dict[tuple[str, str, str, bool, int], Encoded] = {}
        self._tokenizers: dict[int, tuple[Any, str]] = {}

    def path(self, task: str, split: str) -> Path | None:
        entry = self.recipe.task(task).data.get(split)
        if entry is None:
            return None
        p = Path(entry.path).expanduser()
        return p if p.is_absolute() else self.root / p

    def has(self, task: str, split: str) -> bool:
        return self.path(task, split) is not None

    def examples(self, task: str, split: str) -> list[Any]:
        key = (task, split)
        if key not in self._examples:
            path = self.path(task, split)
            if path is None:
                raise DataError(f"recipe task '{task}'", f"no '{split}' file given (tasks[].data.{split})")
            if not path.is_file():
                raise DataError(path, f"data file for task '{task}' split '{split}' not found")
            spec = self.recipe.task(task)
            fmt = spec.data.get(split).format or spec.format
            examples = self.tasks[task].read(path, fmt)
            if not examples:
                raise DataError(path, f"split '{split}' of task '{task}' is empty")
            self._full_sizes[key] = len(examples)
            limit = getattr(spec.limit, split)
            if limit is not None and limit < len(examples):
                rng = random.Random(f"{self.recipe.seed}:{task}:{split}")
                keep = sorted(rng.sample(range(len(examples)), limit))
                examples = [examples[i] for i in keep]
            self._examples[key] = examples
        return self._examples[key]

    def fit_labels(self) -> None:
        """Give every task without a label schema the one its training data implies."""
        for name, task in self.tasks.items():
            if not task.labels:
                task.labels = list(task.fit_labels(self.examples(name, "train")))

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
        """task -> split -> {"used": n, "available": m, "truncated": t} for every split read so far."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (task, split), examples in self._examples.items():
            out.setdefault(task, {})[split] = {"used": len(examples), "available": self._full_sizes[(task, split)]}
        for (task, split, _tok, _train, _len), enc in self._encoded.items():
            entry = out.setdefault(task, {}).setdefault(split, {})
            entry["truncated"] = max(entry.get("truncated", 0), enc.truncated)
            for reason, n in enc.skipped.items():
                entry[f"skipped:{reason}"] = n
        return out
