"""What to remove at a pruning step, from scores and ratios (pure bookkeeping, no torch graph work).

Ratios are of the *original* count of each layer, reached linearly over the steps: after step ``s`` of ``k`` a
layer with ``N`` original heads has lost ``round(N * ratio * s / k)`` of them.

* ``per_layer``: every layer loses its share; a ratio that would remove every head (or neuron) of a layer is an
  error, never a silent clamp.
* ``global``: units are ranked across layers after dividing each layer's scores by their L2 norm (Michel et al.,
  2019: raw scores are not comparable across layers); every layer keeps at least one head and one FFN neuron,
  so a global ratio never removes a whole layer (use ``drop_layers`` / ``drop_num_layers`` for that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from compressor.errors import RecipeError


def scheduled(total: int, ratio: float, step: int, steps: int) -> int:
    """Units removed after ``step`` of ``steps`` (round half up)."""
    return int(math.floor(total * ratio * step / steps + 0.5))


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties broken by index, so the choice is deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:n])


def per_layer(scores: Sequence[torch.Tensor], current: Sequence[int], original: Sequence[int],
              ratios: Sequence[float | None], step: int, steps: int, what: str,
              layer_names: Sequence[int]) -> dict[int, list[int]]:
    """``{layer position: [unit index]}`` to remove so each layer reaches its scheduled count.

    Raises:
        RecipeError: a ratio would leave a layer with no unit.
    """
    out: dict[int, list[int]] = {}
    for pos, (s, cur, orig, ratio) in enumerate(zip(scores, current, original, ratios)):
        if not ratio:
            continue
        final = scheduled(orig, ratio, steps, steps)
        if final >= orig:
            raise RecipeError(
                f"{what} ratio {ratio} would remove all {orig} {what} of layer {layer_names[pos]} "
                f"(round({orig} x {ratio}) = {final}); use a smaller ratio or drop the layer with drop_layers"
            )
        n = scheduled(orig, ratio, step, steps) - (orig - cur)
        if n > 0:
            out[pos] = lowest(s, n)
    return out


def global_ranking(scores: Sequence[torch.Tensor], current: Sequence[int], original: Sequence[int], ratio: float,
                   step: int, steps: int, min_keep: int = 1) -> tuple[dict[int, list[int]], int]:
    """Remove the globally lowest (layer-normalised) units; returns (removals, units it could not remove)."""
    n = scheduled(sum(original), ratio, step, steps) - (sum(original) - sum(current))
    candidates = []
    for pos, s in enumerate(scores):
        norm = float(s.norm())
        normed = s / norm if norm > 0 else s
        candidates += [(float(v), pos, i) for i, v in enumerate(normed)]
    candidates.sort()
    remaining = list(current)
    out: dict[int, list[int]] = {}
    for _, pos, i in candidates:
        if n <= 0:
            break
        if remaining[pos] - 1 < min_keep:
            continue
        out.setdefault(pos, []).append(i)
        remaining[pos] -= 1
        n -= 1
    return {p: sorted(v) for p, v in out.items()}, max(n, 0)
