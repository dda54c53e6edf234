"""Iterative structured pruning of a multi-task model: explicit removals, layer dropping, heads and FFN neurons.

Each step: (step 1 only) the explicitly listed heads and layers go; then the least important layers
(``drop_num_layers``, spread over the steps); then heads and FFN neurons are scored on the current model and
removed down to the step's scheduled count. A recovery callback (distillation) runs after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import RecipeError
from compressor.model.architecture import LayerArch, read_architecture
from compressor.model.multitask import MultiTaskModel
from compressor.prune import select
from compressor.prune.groups import build_graph, remove_ffn_neurons, remove_heads
from compressor.prune.importance import Batches, Scores, layer_scores, magnitude_scores, taylor_scores
from compressor.prune.layers import drop_layers


@dataclass
class StepReport:
    step: int
    dropped_layers: list[int] = field(default_factory=list)  # original layer indices
    heads_removed: dict[int, int] = field(default_factory=dict)  # original layer index -> heads removed
    ffn_removed: dict[int, int] = field(default_factory=dict)
    not_removed: dict[str, int] = field(default_factory=dict)  # global scope: units the 1-per-layer floor kept
    layers: list[int] = field(default_factory=list)  # original indices of the layers left, in order
    architecture: list[dict[str, int]] = field(default_factory=list)
    recovery: dict[str, Any] | None = None  # the recovery callback's result (loss parts, dev checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "dropped_layers": self.dropped_layers,
            "heads_removed": {str(k): v for k, v in self.heads_removed.items()},
            "ffn_removed": {str(k): v for k, v in self.ffn_removed.items()},
            "not_removed": self.not_removed, "layers": self.layers, "architecture": self.architecture,
            "recovery": self.recovery,
        }


class StructuredPruner:
    """Prunes ``model`` in place following a ``PruneStage`` config.

    Args:
        model: the multi-task model; only its encoder changes (the hidden size and every task head stay).
        cfg: the stage config (``compressor.recipe.PruneStage``).
        batches: task -> training batches for Taylor importance and layer scores (not needed for magnitude
            importance without ``drop_num_layers``).
    """

    def __init__(self, model: MultiTaskModel, cfg: Any, batches: Batches | None = None):
        self.model = model
        self.cfg = cfg
        self.batches = batches
        self.original: list[LayerArch] = read_architecture(model.encoder)
        self.layer_ids = list(range(len(self.original)))  # current position -> original layer index
        self._validate()

    # ---- public ---------------------------------------------------------------------------------------------
    def run(self, recover: Callable[[int], dict[str, Any] | None] | None = None) -> list[StepReport]:
        """All ``cfg.steps`` steps, calling ``recover(step)`` after each (when given)."""
        reports = []
        for step in range(1, self.cfg.steps + 1):
            report = self.step(step)
            if recover is not None:
                report.recovery = recover(step)
            reports.append(report)
        return reports

    def step(self, step: int) -> StepReport:
        cfg, report = self.cfg, StepReport(step)
        if step == 1:
            self._explicit(report)
        if cfg.drop_num_layers:
            by_importance = len(self.original) - len(self.layer_ids) - len(set(cfg.drop_layers))
            n = select.scheduled(cfg.drop_num_layers, 1.0, step, cfg.steps) - by_importance
            if n > 0:
                scores = layer_scores(self.model, self._need_batches("drop_num_layers"))
                worst = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n]
                self._drop(sorted(worst), report)
        if self._prunes_units():
            self._units(step, report)
        report.layers = list(self.layer_ids)
        report.architecture = [a.to_dict() for a in read_architecture(self.model.encoder)]
        return report

    # ---- steps ----------------------------------------------------------------------------------------------
    def _explicit(self, report: StepReport) -> None:
        if self.cfg.heads:
            remove_heads(self.model.encoder, {int(layer): hs for layer, hs in self.cfg.heads.items()})
            report.heads_removed = {int(layer): len(set(hs)) for layer, hs in self.cfg.heads.items() if hs}
        if self.cfg.drop_layers:
            self._drop(sorted(set(self.cfg.drop_layers)), report)

    def _drop(self, positions: list[int], report: StepReport) -> None:
        report.dropped_layers += [self.layer_ids[p] for p in positions]
        kept = drop_layers(self.model.encoder, positions)
        self.layer_ids = [self.layer_ids[p] for p in kept]

    def _units(self, step: int, report: StepReport) -> None:
        cfg = self.cfg
        scores = self._scores()
        arch = read_architecture(self.model.encoder)
        orig = [self.original[i] for i in self.layer_ids]
        heads_now, heads_orig = [a.heads for a in arch], [a.heads for a in orig]
        ffn_now, ffn_orig = [a.ffn for a in arch], [a.ffn for a in orig]
        if cfg.scope == "global":
            heads, ffn = {}, {}
            if cfg.head_ratio:
                heads, left = select.global_ranking(scores.heads, heads_now, heads_orig, cfg.head_ratio, step, cfg.steps)
                if left:
                    report.not_removed["heads"] = left
            if cfg.ffn_ratio:
                ffn, left = select.global_ranking(scores.ffn, ffn_now, ffn_orig, cfg.ffn_ratio, step, cfg.steps)
                if left:
                    report.not_removed["ffn"] = left
        else:
            head_ratios = [self._ratio(i, "head_ratio") for i in self.layer_ids]
            ffn_ratios = [self._ratio(i, "ffn_ratio") for i in self.layer_ids]
            try:
                heads = select.per_layer(scores.heads, heads_now, heads_orig, head_ratios, step, cfg.steps, "heads",
                                         self.layer_ids)
                ffn = select.per_layer(scores.ffn, ffn_now, ffn_orig, ffn_ratios, step, cfg.steps, "FFN neurons",
                                       self.layer_ids)
            except RecipeError as exc:
                raise RecipeError(f"prune stage '{cfg.name}': {exc}") from exc
        remove_heads(self.model.encoder, heads)
        remove_ffn_neurons(self.model.encoder, ffn)
        for pos, hs in heads.items():
            layer = self.layer_ids[pos]
            report.heads_removed[layer] = report.heads_removed.get(layer, 0) + len(hs)
        for pos, ns in ffn.items():
            report.ffn_removed[self.layer_ids[pos]] = len(ns)

    def _scores(self) -> Scores:
        graph = build_graph(self.model.encoder)
        if self.cfg.importance == "taylor":
            return taylor_scores(self.model, self._need_batches("taylor importance"), graph)
        return magnitude_scores(self.model, graph)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _ratio(self, layer: int, key: str) -> float | None:
        override = self.cfg.layer_ratios.get(layer)
        value = getattr(override, key, None) if override is not None else None
        return value if value is not None else getattr(self.cfg, key)

    def _prunes_units(self) -> bool:
        cfg = self.cfg
        return bool(cfg.head_ratio or cfg.ffn_ratio or any(
            (r.head_ratio or r.ffn_ratio) for r in cfg.layer_ratios.values()))

    def _need_batches(self, what: str) -> Batches:
        if not self.batches:
            raise ValueError(f"{what} needs task batches; pass batches= to StructuredPruner")
        return self.batches

    def _validate(self) -> None:
        cfg, n = self.cfg, len(self.original)
        where = f"prune stage '{cfg.name}'"
        bad = sorted({i for i in [*cfg.drop_layers, *cfg.heads, *cfg.layer_ratios] if int(i) >= n})
        if bad:
            raise RecipeError(f"{where}: the encoder has {n} layers (0-{n - 1}); no layer {bad[0]}")
        dropping = len(set(cfg.drop_layers)) + cfg.drop_num_layers
        if dropping >= n:
            raise RecipeError(f"{where}: dropping {dropping} of {n} layers would leave no layer")
        for layer, hs in cfg.heads.items():
            layer, total = int(layer), self.original[int(layer)].heads
            if layer in set(cfg.drop_layers):
                raise RecipeError(f"{where}: heads of layer {layer} are listed but the layer is in drop_layers")
            out = sorted(h for h in hs if h >= total)
            if out:
                raise RecipeError(f"{where}: layer {layer} has {total} heads (0-{total - 1}); no head {out[0]}")
            if len(set(hs)) >= total:
                raise RecipeError(f"{where}: heads {sorted(set(hs))} would remove every head of layer {layer}; "
                                  "drop the layer with drop_layers instead")
        if cfg.scope == "per_layer":
            # fail before any work if a ratio would empty a layer
            for i, a in enumerate(self.original):
                for key, total, what in (("head_ratio", a.heads, "heads"), ("ffn_ratio", a.ffn, "FFN neurons")):
                    ratio = self._ratio(i, key)
                    if ratio and select.scheduled(total, ratio, 1, 1) >= total:
                        raise RecipeError(
                            f"{where}: {key} {ratio} would remove all {total} {what} of layer {i}; "
                            "use a smaller ratio or drop the layer with drop_layers"
                        )
