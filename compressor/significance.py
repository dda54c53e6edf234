"""How much of a metric drop is noise: the relative drop of a compressed model's metric against its reference,
and a paired bootstrap interval of that drop over the evaluation examples.

A dev set of a few hundred examples moves a task's F1 by a point or two between two models that differ only by
rounding noise, so "within 1%" judged on one number accepts or rejects at random. The paired bootstrap resamples
the examples (the same resample for both models, so what the two share cancels) and rescores both with the task's
own ``score``; the interval says which drops the data can tell from zero and which it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def relative_drop(reference: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse ``value`` is than ``reference``, relative to |reference| (absolute when it is 0)."""
    worse = (reference - value) if higher_is_better else (value - reference)
    return worse / abs(reference) if reference else worse


@dataclass(frozen=True)
class DropInterval:
    """A relative drop on the whole set and its paired-bootstrap percentile interval."""

    drop: float
    low: float
    high: float
    confidence: float
    samples: int

    def exceeds(self, tolerance: float) -> bool:
        """Whether the drop is above ``tolerance`` at this confidence: even the interval's low end is."""
        return self.low > tolerance + 1e-12

    def to_json(self) -> dict[str, float]:
        return {"drop": self.drop, "low": self.low, "high": self.high, "confidence": self.confidence,
                "samples": self.samples}


def paired_bootstrap_drop(score: Callable[[Sequence[Any], Sequence[Any]], float], examples: Sequence[Any],
                          reference: Sequence[Any], candidate: Sequence[Any], higher_is_better: bool = True,
                          samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> DropInterval:
    """The relative drop of ``candidate``'s metric below ``reference``'s, with a paired bootstrap interval.

    Args:
        score: (predictions, examples) -> the metric (a task plugin's ``score`` and its primary metric).
        examples: the gold examples; ``reference`` and ``candidate`` hold one prediction per example, aligned.
        samples: bootstrap resamples (each scores both models once).
        confidence: two-sided coverage of the percentile interval.

    Every resample draws ``len(examples)`` indices with replacement and scores both models on them; the drop of a
    resample is relative to the reference's metric on the whole set, as the point drop is.
    """
    n = len(examples)
    if n == 0 or len(reference) != n or len(candidate) != n:
        raise ValueError(f"paired bootstrap needs one prediction per example from both models (examples {n}, "
                         f"reference {len(reference)}, candidate {len(candidate)})")
    if samples < 1 or not 0 < confidence < 1:
        raise ValueError(f"bootstrap samples must be >= 1 and confidence in (0, 1) (got {samples}, {confidence})")
    ref_full = float(score(reference, examples))
    point = relative_drop(ref_full, float(score(candidate, examples)), higher_is_better)
    scale = abs(ref_full) if ref_full else 1.0
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(seed)
    drops = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, n)
        ex = [examples[i] for i in idx]
        ref_b = float(score([reference[i] for i in idx], ex))
        cand_b = float(score([candidate[i] for i in idx], ex))
        drops[b] = sign * (ref_b - cand_b) / scale
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(drops, [tail, 100 - tail])
    return DropInterval(point, float(low), float(high), confidence, samples)


def task_intervals(plugins: Mapping[str, Any], examples: Mapping[str, Sequence[Any]],
                   reference: Mapping[str, Sequence[Any]], candidate: Mapping[str, Sequence[Any]],
                   samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, DropInterval]:
    """Task -> :func:`paired_bootstrap_drop` of ``candidate``'s primary metric below ``reference``'s, scored by
    each task plugin's own ``score`` (``examples``, ``reference``, ``candidate``: per task, aligned lists)."""
    out = {}
    for i, name in enumerate(reference):
        plugin = plugins[name]
        metric = plugin.metric.name
        out[name] = paired_bootstrap_drop(
            lambda preds, exs, plugin=plugin, metric=metric: plugin.score(preds, exs)[metric],
            examples[name], reference[name], candidate[name], plugin.metric.higher_is_better,
            samples=samples, confidence=confidence, seed=seed + i)
    return out
