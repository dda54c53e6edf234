"""The search space: knobs, their feasibility against the source model, and the optuna distributions.

A candidate (:class:`Knobs`) is: how many layers the source keeps (the least important are dropped), the share of
attention heads and FFN neurons every layer loses (one ratio for all layers, or one per layer), an optional hidden
width (the residual stream cut to its most active channels), an optional vocabulary cut (keep the tokens the training data uses at least ``k`` times) and the INT8 mode it is measured in.

Ratios are of each layer's count and rounded like the pruner rounds them (``compressor.prune.select.scheduled``);
a value that would remove every head (or neuron) of some layer is no candidate. Values that fit no layer are
dropped with a note; a knob left without a value is an error naming the recipe field.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from compressor.errors import RecipeError
from compressor.model.architecture import LayerArch
from compressor.prune.select import scheduled


@dataclass(frozen=True)
class Knobs:
    layers: int  # layers kept
    head_ratios: tuple[float, ...]  # per source layer: share of heads removed
    ffn_ratios: tuple[float, ...]  # per source layer: share of FFN neurons removed
    vocab_min_count: int | None  # None: keep the vocabulary
    int8: str  # dynamic | static | none
    hidden: int | None = None  # None: keep the hidden width

    @property
    def cuts_encoder(self) -> bool:
        """Whether the candidate removes a layer, a head, an FFN neuron or hidden channels of the source
        (``head_ratios`` has one entry per source layer); a vocabulary cut alone leaves the encoder as it is."""
        return (self.layers < len(self.head_ratios) or any(self.head_ratios) or any(self.ffn_ratios)
                or self.hidden is not None)

    def describe(self) -> str:
        def ratios(values: tuple[float, ...]) -> str:
            return f"{values[0]:g}" if len(set(values)) == 1 else "/".join(f"{v:g}" for v in values)

        vocab = "full" if self.vocab_min_count is None else f"min_count {self.vocab_min_count}"
        width = f", hidden {self.hidden}" if self.hidden is not None else ""
        return (f"layers {self.layers}{width}, heads -{ratios(self.head_ratios)}, ffn -{ratios(self.ffn_ratios)}, "
                f"vocab {vocab}, int8 {self.int8}")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Space:
    """The knobs of a ``search`` stage's ``space`` over a source model with architecture ``arch``.

    Args:
        cfg: the stage's ``SearchSpace``.
        arch: the source model's layers (heads, head size, FFN width).
        where: the recipe path of the space, e.g. ``stages[1].space`` (named in errors).
        hidden_size, num_heads: the source's hidden size and ``num_attention_heads`` (to check ``hidden``).

    Raises:
        RecipeError: a knob with no feasible value, or a hidden width the source cannot take.
    """

    def __init__(self, cfg: Any, arch: Sequence[LayerArch], where: str, hidden_size: int | None = None,
                 num_heads: int | None = None):
        self.cfg = cfg
        self.arch = list(arch)
        self.where = where
        self.notes: list[str] = []
        n = len(self.arch)
        if n == 0:
            raise RecipeError(f"{where}: the source model has no encoder layer")
        layers = sorted(set(cfg.layers)) if cfg.layers else list(range(math.ceil(n / 2), n + 1))
        too_many = [v for v in layers if v > n]
        if too_many:
            raise RecipeError(f"{where}.layers: the source model has {n} layers; cannot keep {too_many[0]}")
        self.layers = layers
        self.per_layer = bool(cfg.per_layer)
        self.head_choices = self._ratios("head_ratio", [a.heads for a in self.arch], "attention heads")
        self.ffn_choices = self._ratios("ffn_ratio", [a.ffn for a in self.arch], "FFN neurons")
        self.vocab = list(dict.fromkeys(cfg.vocab_min_count))
        self.int8 = list(dict.fromkeys(cfg.int8))
        self.hidden = list(dict.fromkeys(getattr(cfg, "hidden", None) or [None]))
        for h in self.hidden:
            if h is None or hidden_size is None:
                continue
            if h >= hidden_size:
                raise RecipeError(f"{where}.hidden: the source model's hidden size is {hidden_size}; cannot cut it "
                                  f"to {h}")
            if num_heads and h % num_heads:
                raise RecipeError(f"{where}.hidden: {h} is not divisible by the source model's {num_heads} "
                                  f"attention heads (num_attention_heads); choose a multiple of {num_heads}")

    def _ratios(self, key: str, counts: list[int], what: str) -> list[list[float]]:
        """Per source layer, the feasible values of a ratio knob (the same list for every layer when global)."""
        values = sorted(set(getattr(self.cfg, key)))

        def fits(ratio: float, total: int) -> bool:
            return scheduled(total, ratio, 1, 1) < total

        if self.per_layer:
            out = []
            for i, total in enumerate(counts):
                ok = [v for v in values if fits(v, total)]
                if not ok:
                    raise RecipeError(f"{self.where}.{key}: every value {values} removes all {total} {what} of "
                                      f"layer {i}; no candidate")
                out.append(ok)
            dropped = sorted({v for v in values for per in out if v not in per})
        else:
            ok = [v for v in values if all(fits(v, total) for total in counts)]
            if not ok:
                raise RecipeError(f"{self.where}.{key}: every value {values} removes all {what} of some layer "
                                  f"(layers have {counts}); no candidate")
            dropped = [v for v in values if v not in ok]
            out = [ok] * len(counts)
        if dropped:
            self.notes.append(f"{key} value(s) {dropped} would empty a layer of {what} and are skipped where they do")
        return out

    # ---- optuna ---------------------------------------------------------------------------------------------
    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution

        dist: dict[str, Any] = {"layers": CategoricalDistribution(self.layers)}
        if self.per_layer:
            for i, (h, f) in enumerate(zip(self.head_choices, self.ffn_choices)):
                dist[f"head_ratio_{i}"] = CategoricalDistribution(h)
                dist[f"ffn_ratio_{i}"] = CategoricalDistribution(f)
        else:
            dist["head_ratio"] = CategoricalDistribution(self.head_choices[0])
            dist["ffn_ratio"] = CategoricalDistribution(self.ffn_choices[0])
        dist["vocab_min_count"] = CategoricalDistribution(self.vocab)
        dist["int8"] = CategoricalDistribution(self.int8)
        if self.hidden != [None]:  # only then: studies of spaces without the knob keep their parameters
            dist["hidden"] = CategoricalDistribution(self.hidden)
        return dist

    def knobs(self, params: Mapping[str, Any]) -> Knobs:
        n = len(self.arch)
        if self.per_layer:
            heads = tuple(float(params[f"head_ratio_{i}"]) for i in range(n))
            ffn = tuple(float(params[f"ffn_ratio_{i}"]) for i in range(n))
        else:
            heads = (float(params["head_ratio"]),) * n
            ffn = (float(params["ffn_ratio"]),) * n
        vocab = params["vocab_min_count"]
        hidden = params.get("hidden")
        return Knobs(int(params["layers"]), heads, ffn, None if vocab is None else int(vocab), str(params["int8"]),
                     None if hidden is None else int(hidden))

    @property
    def size(self) -> int:
        """Number of distinct parameter settings."""
        return math.prod(len(d.choices) for d in self.distributions().values())

    def uncut_params(self) -> dict[str, Any] | None:
        """The setting that keeps the source as it is (every layer, no head, FFN or vocabulary cut; the first INT8
        mode), or None when the space does not hold it. The search measures it first: the reference point."""
        dist = self.distributions()
        params: dict[str, Any] = {}
        for name, d in dist.items():
            want = (len(self.arch) if name == "layers" else 0.0 if "ratio" in name
                    else None if name in ("vocab_min_count", "hidden") else d.choices[0])
            if want not in d.choices:
                return None
            params[name] = want
        return params

    def random_params(self, seen: set[tuple], seed: int) -> dict[str, Any] | None:
        """A seeded parameter setting not in ``seen`` (keys from :func:`params_key`), or None when none is left."""
        dist = self.distributions()
        names = list(dist)
        if self.size <= 50_000:
            unseen = [c for c in itertools.product(*(dist[k].choices for k in names))
                      if params_key(dict(zip(names, c))) not in seen]
            return dict(zip(names, random.Random(seed).choice(unseen))) if unseen else None
        rng = random.Random(seed)
        for _ in range(1000):
            params = {k: rng.choice(dist[k].choices) for k in names}
            if params_key(params) not in seen:
                return params
        return None


def params_key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, params[k]) for k in params))


def prune_config(knobs: Knobs, stage: Any, num_layers: int) -> Any | None:
    """The ``PruneStage`` that turns the source into this candidate (None: the candidate is the source)."""
    from compressor.recipe import PruneLayerRatios, PruneStage

    if not knobs.cuts_encoder:
        return None
    kwargs: dict[str, Any] = dict(kind="prune", name=f"{stage.name}-candidate", importance=stage.importance,
                                  scope="per_layer", steps=1, recovery_steps=0,
                                  importance_batches=stage.importance_batches, batch_size=stage.batch_size)
    if knobs.layers < num_layers:
        kwargs["drop_num_layers"] = num_layers - knobs.layers
    if knobs.hidden is not None:
        kwargs["hidden_size"] = knobs.hidden  # cut by the candidate builder before the pruner runs
    if len(set(knobs.head_ratios)) == 1 and len(set(knobs.ffn_ratios)) == 1:
        kwargs["head_ratio"] = knobs.head_ratios[0] or None
        kwargs["ffn_ratio"] = knobs.ffn_ratios[0] or None
    else:
        kwargs["layer_ratios"] = {i: PruneLayerRatios(head_ratio=h, ffn_ratio=f)
                                  for i, (h, f) in enumerate(zip(knobs.head_ratios, knobs.ffn_ratios)) if h or f}
    return PruneStage(**kwargs)
