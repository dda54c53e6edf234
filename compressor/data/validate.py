"""``compressor validate --data``: read every split of every task whole, before any training.

What it checks, each problem as one line naming the file and the line or record (or the recipe field):

* every split parses in its reader format and text encoding (``encoding:`` on the split or the task);
* the label schema: the recipe's ``labels``, else the one fitted on the whole training file (never on a ``limit``
  subsample, as the pipeline does); every dev and test label (and every training label when the recipe gives the
  labels) must be in it;
* every task has a dev split: a dev file, or ``dev_from_train`` (a seeded hold-out of train); a task without one
  would train without early stopping or dev scores for it.

Unlike the quick check of ``compressor validate`` (a file's first lines), nothing stops at the first problem:
every split of every task is read and every problem is listed (at most ``MAX_PER_FILE`` label errors per file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import DataError
from compressor.data.options import DataOptions
from compressor.data.readers import example_location

SPLITS = ("train", "dev", "test")
#: label errors listed per file before the rest are counted on one line
MAX_PER_FILE = 20


@dataclass
class DataCheck:
    """What ``validate_data`` found: one message per problem, and per task and split the examples read."""

    errors: list[str] = field(default_factory=list)
    examples: dict[str, dict[str, int]] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_data(options: DataOptions, recipe_path: Path, data_root: Path) -> DataCheck:
    """Read every split of every task whole and check formats, encodings, labels and dev splits.

    ``options``: the recipe's ``data_options()``; ``recipe_path`` names the file in every message.
    """
    from compressor.checks import locate
    from compressor.data.store import DataStore

    store = DataStore(options, data_root)
    check = DataCheck()
    for i, spec in enumerate(store.options.tasks):
        name = spec.name
        task = store.tasks[name]
        read: dict[str, list[Any]] = {}
        splits = (*SPLITS, *spec.eval_splits()[2:])  # and the extra test sets ('test:<name>')
        for split in splits:
            if not store.has(name, split):
                if split == "dev":
                    check.errors.append(
                        f"{locate(recipe_path, ['tasks', i, 'data'])}.dev: task '{name}' has no dev split (its dev "
                        f"metric, early stopping and dev retention would be missing); give a dev file or set "
                        f"tasks[{i}].dev_from_train: 0.1 to hold out a seeded share of the training file")
                continue
            try:
                read[split] = store.full(name, split)
            except DataError as exc:
                message = str(exc)
                if message not in check.errors:  # a held-out dev split fails with its training file
                    check.errors.append(message)
                continue
            check.examples.setdefault(name, {})[split] = len(read[split])

        schema, fitted = _schema(store, name, task, check)
        if schema is None:
            continue
        check.labels[name] = list(schema)
        if not schema and not fitted:
            continue
        known = set(schema)
        for split in splits:
            if split not in read or (split == "train" and fitted):
                continue
            where = (f"the label schema of the training split {list(schema)}" if fitted else
                     f"tasks[{i}].labels {list(schema)}")
            check.errors += _label_errors(task, read[split], known, store.path(name, split), name, split, where)
    return check


def _schema(store: Any, name: str, task: Any, check: DataCheck) -> tuple[list[str] | None, bool]:
    """(label schema, whether it was fitted on the training file); (None, _) when the training file is unreadable."""
    if task.labels:
        return list(task.labels), False
    if not store.has(name, "train"):
        return None, True
    try:
        examples = store.read_file(name, "train")
    except DataError:
        return None, True  # already listed
    return list(task.fit_labels(examples)), True


def _label_errors(task: Any, examples: list[Any], known: set[str], path: Path | None, name: str, split: str,
                  schema: str) -> list[str]:
    errors: list[str] = []
    more = 0
    for k, ex in enumerate(examples):
        outside = [label for label in task.fit_labels([ex]) if label not in known]
        for label in outside:
            if len(errors) < MAX_PER_FILE:
                errors.append(f"{_example_where(ex, path, k)}: label '{label}' ({split} split of task '{name}') "
                              f"is not in {schema}")
            else:
                more += 1
    if more:
        errors.append(f"{path}: {more} more label(s) of the {split} split of task '{name}' outside the schema")
    return errors


def _example_where(ex: Any, path: Path | None, index: int) -> str:
    """``file:line`` / ``file [record r]`` of an example, from what its reader kept (see
    :func:`~compressor.data.readers.example_location`), else its position in the split."""
    return example_location(ex) or f"{path} [record {index}]"
