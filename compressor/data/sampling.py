"""Multi-task batch scheduling: task-homogeneous batches, tasks drawn by size, size^(1/tau) or in turn."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping


def task_probabilities(sizes: Mapping[str, int], strategy: str, tau: float = 1.0) -> dict[str, float]:
    """P(task) for ``proportional`` (n_t / sum n), ``temperature`` (n_t^(1/tau), normalised) or ``round_robin``."""
    if strategy == "round_robin":
        return {t: 1.0 / len(sizes) for t in sizes}
    power = 1.0 if strategy == "proportional" else 1.0 / tau
    if strategy not in ("proportional", "temperature"):
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


class BatchStream:
    """Endless shuffled batches of feature indices for one task; reshuffles after each pass."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n = n
        self.batch_size = batch_size
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._pos = 0

    def batches_per_pass(self) -> int:
        return -(-self.n // self.batch_size)

    def next(self) -> list[int]:
        if self._pos >= len(self._order):
            self._order = list(range(self.n))
            self._rng.shuffle(self._order)
            self._pos = 0
        out = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out
