"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): project conflicting task gradients.

With ``loss_weighting: {strategy: pcgrad}`` the engine takes one optimizer step per group of consecutive draws of
different tasks: each task's loss is back-propagated on its own, the shared encoder's gradients are projected
(a task's gradient that conflicts with another's, negative dot product, loses its component along the other's),
summed, and applied in one step; each head keeps its own gradient (heads are never shared, so never conflict).
The schedule still advances once per draw, so the learning-rate curve over the data is the same as without it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def project_conflicts(grads: Sequence[torch.Tensor], rng: random.Random) -> torch.Tensor:
    """The sum of the task gradients ``grads`` (flat, one per task) after PCGrad's projection: each g_i, for every
    other task j in random order with g_i . g_j < 0, becomes g_i - (g_i . g_j / |g_j|^2) g_j (against the
    original g_j). With one gradient, or none conflicting, this is the plain sum."""
    projected = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = torch.dot(g, grads[j])
            norm = torch.dot(grads[j], grads[j])
            if dot < 0 and norm > 0:
                g -= (dot / norm) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(0)


def group_draws(first: str, draws, limit: int) -> tuple[list[str], str | None]:
    """Consecutive task draws forming one PCGrad step: tasks are taken from ``draws`` (an iterator of task names,
    starting after ``first``) until a task repeats or ``limit`` draws are taken; returns the group and the draw
    that ended it (the next group's first task), or None when ``limit`` ended it."""
    group = [first]
    while len(group) < limit:
        task = next(draws)
        if task in group:
            return group, task
        group.append(task)
    return group, None
