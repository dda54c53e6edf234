"""How per-task losses combine into one: uniform, fixed weights, or learned uncertainty (Kendall et al. 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class LossWeighter(nn.Module):
    """``weighted(task, loss)`` -> the loss to back-propagate for a batch of ``task``.

    ``uncertainty`` learns one log-variance ``s_t`` per task and uses ``exp(-s_t) * L_t + s_t / 2``
    (Kendall, Gal & Cipolla 2018, with s = log sigma^2): a task whose loss stays high gets a larger variance and
    so a smaller weight, and the ``s_t / 2`` term keeps the variances from growing without bound.
    """

    def __init__(self, tasks: Sequence[str], strategy: str = "uniform", weights: Mapping[str, float] | None = None):
        super().__init__()
        self.strategy = strategy
        self.tasks = list(tasks)
        self.fixed = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}
        if strategy == "fixed":
            unknown = sorted(set(weights or {}) - set(self.tasks))
            if unknown:
                from compressor.errors import RecipeError

                raise RecipeError(f"loss_weighting.weights names unknown task(s) {unknown}; tasks: {self.tasks}")
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(())) for t in self.tasks} if strategy == "uncertainty" else {}
        )

    def weighted(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        if self.strategy == "uncertainty":
            s = self.log_vars[task]
            return torch.exp(-s) * loss + 0.5 * s
        if self.strategy == "fixed":
            return self.fixed[task] * loss
        return loss

    def current(self) -> dict[str, float]:
        """Effective weight of each task now (exp(-s) for uncertainty)."""
        if self.strategy == "uncertainty":
            return {t: float(torch.exp(-p.detach())) for t, p in self.log_vars.items()}
        return dict(self.fixed) if self.strategy == "fixed" else {t: 1.0 for t in self.tasks}
