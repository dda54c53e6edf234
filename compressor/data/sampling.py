"""Multi-task batch scheduling: task-homogeneous batches (grouped by length), tasks drawn by size, size^(1/tau),
in turn, or by fixed per-task step quotas (``passes``)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence


def task_probabilities(sizes: Mapping[str, int], strategy: str, tau: float = 1.0) -> dict[str, float]:
    """P(task) for ``proportional`` (n_t / sum n), ``temperature`` (n_t^(1/tau), normalised), ``round_robin`` or
    ``passes`` (proportional to the sizes given, which are then the per-task step quotas)."""
    if strategy == "round_robin":
        return {t: 1.0 / len(sizes) for t in sizes}
    power = 1.0 if strategy in ("proportional", "passes") else 1.0 / tau
    if strategy not in ("proportional", "temperature", "passes"):
        raise ValueError(f"unknown sampling strategy '{strategy}'")
    weights = {t: float(n) ** power for t, n in sizes.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


class TaskSampler:
    """Yields the task of each step; ``round_robin`` cycles, the others draw with a seeded RNG."""

    def __init__(self, sizes: Mapping[str, int], strategy: str, tau: float = 1.0, seed: int = 0):
        self.tasks = list(sizes)
        self.strategy = strategy
        self.probs = task_probabilities(sizes, strategy, tau)
        self._rng = random.Random(seed)
        self._turn = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.strategy == "round_robin":
            task = self.tasks[self._turn % len(self.tasks)]
            self._turn += 1
            return task
        return self._rng.choices(self.tasks, weights=[self.probs[t] for t in self.tasks])[0]

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "turn": self._turn}

    def load_state_dict(self, state: dict) -> None:
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self._turn = state["turn"]


class QuotaSampler:
    """Yields the task of each step so that each task gets exactly ``quotas[task]`` steps per epoch, interleaved
    in a seeded random order (a task's steps are spread over the whole epoch, not bunched at its end).

    ``stop(task)`` removes a task from later epochs (per-task early stopping); ``epoch_steps()`` is the number
    of steps of the epoch about to start.
    """

    def __init__(self, quotas: Mapping[str, int], seed: int = 0):
        self.tasks = list(quotas)
        self.quotas = {t: int(q) for t, q in quotas.items()}
        self.stopped: list[str] = []
        self._rng = random.Random(seed)
        self._plan: list[str] = []
        self._pos = 0

    def epoch_steps(self) -> int:
        return sum(q for t, q in self.quotas.items() if t not in self.stopped)

    def stop(self, task: str) -> None:
        if task not in self.stopped:
            self.stopped.append(task)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._pos >= len(self._plan):
            self._plan = [t for t in self.tasks if t not in self.stopped for _ in range(self.quotas[t])]
            if not self._plan:
                raise StopIteration
            self._rng.shuffle(self._plan)
            self._pos = 0
        self._pos += 1
        return self._plan[self._pos - 1]

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "plan": list(self._plan), "pos": self._pos, "stopped": list(self.stopped)}

    def load_state_dict(self, state: dict) -> None:
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self._plan, self._pos, self.stopped = list(state["plan"]), state["pos"], list(state["stopped"])


GROUP_BATCHES = 50  # length grouping sorts windows of this many batches, so batches stay random across passes


class BatchStream:
    """Endless shuffled batches of feature indices for one task; reshuffles after each pass.

    With ``lengths`` (one per feature), each pass is grouped by length: the shuffled indices are cut into
    windows of ``GROUP_BATCHES`` batches, each window is sorted by length and cut into batches, and the full
    batches are shuffled (the one short batch of a pass comes last). Padding to the longest feature of a batch
    then wastes little, and the batches still mix examples from the whole split.
    """

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} features")
        self.n = n
        self.batch_size = batch_size
        self.lengths = list(lengths) if lengths is not None else None
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._pos = 0

    def batches_per_pass(self) -> int:
        return -(-self.n // self.batch_size)

    def next(self) -> list[int]:
        if self._pos >= len(self._order):
            self._order = list(range(self.n))
            self._rng.shuffle(self._order)
            if self.lengths is not None:
                self._order = self._grouped(self._order)
            self._pos = 0
        out = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out

    def _grouped(self, order: list[int]) -> list[int]:
        bs, window = self.batch_size, self.batch_size * GROUP_BATCHES
        batches: list[list[int]] = []
        for lo in range(0, len(order), window):
            part = sorted(order[lo : lo + window], key=self.lengths.__getitem__)
            batches += [part[j : j + bs] for j in range(0, len(part), bs)]
        short = [b for b in batches if len(b) < bs]
        full = [b for b in batches if len(b) == bs]
        self._rng.shuffle(full)
        return [i for b in full + short for i in b]
