"""How much each head, FFN neuron and layer matters.

* ``magnitude``: group L2 magnitude of the coupled weights (torch-pruning ``GroupMagnitudeImportance``); needs no
  data.
* ``taylor``: first-order Taylor ``|w * dL/dw|`` summed over the coupled weights (``GroupTaylorImportance``). The
  gradient comes from each task's own batches; every task's scores are normalised to sum to 1 and the tasks are
  combined by taking the maximum, so a unit that *any* task relies on ranks high even when another task's
  gradients are larger or point the other way (a plain sum of gradients could cancel them).
* layers: the relative increase of each task's loss when the layer is skipped, averaged over tasks (an ablation on
  the same batches); smallest first.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from compressor.model.architecture import encoder_layers
from compressor.model.multitask import MultiTaskModel
from compressor.prune.groups import build_graph, ffn_group, head_group, head_channels
from compressor.prune.layers import SkipLayer

Batches = Mapping[str, Sequence[Mapping[str, torch.Tensor]]]


@dataclass
class Scores:
    """Per current layer: one score per head and one per FFN neuron (higher = more important)."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]


def task_batches(data: Any, tokenizer: Any, tasks: Mapping[str, Any], max_length: int, batches: int,
                 batch_size: int, seed: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Up to ``batches`` collated training batches per task (a seeded sample of its features)."""
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name, plugin in tasks.items():
        feats = data.encoded(name, "train", tokenizer, max_length, train=True).features
        if not feats:
            from compressor.errors import DataError

            raise DataError(data.path(name, "train"), f"task '{name}': no training features to score importance on")
        rng = random.Random(f"{seed}:prune:{name}")
        idx = rng.sample(range(len(feats)), min(len(feats), batches * batch_size))
        out[name] = [plugin.collate([feats[i] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]
    return out


def batch_loss(model: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return model.tasks[task].loss(model.forward_batch(task, batch).outputs, batch)


def unit_scores(model: MultiTaskModel, importance: Any, graph: Any | None = None) -> Scores:
    """Score every head and FFN neuron of the encoder with a torch-pruning importance object."""
    encoder = model.encoder
    graph = graph or build_graph(encoder)
    heads, ffn = [], []
    for layer in encoder_layers(encoder):
        attn = layer.attention.self
        n, size = attn.num_attention_heads, attn.attention_head_size
        channels = importance(head_group(graph, layer, head_channels(range(n), size)))
        heads.append(channels.detach().float().cpu().view(n, size).sum(1))
        width = layer.intermediate.dense.out_features
        ffn.append(importance(ffn_group(graph, layer, list(range(width)))).detach().float().cpu())
    return Scores(heads, ffn)


def magnitude_scores(model: MultiTaskModel, graph: Any | None = None) -> Scores:
    import torch_pruning as tp

    return unit_scores(model, tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None), graph)


def taylor_scores(model: MultiTaskModel, batches: Batches, graph: Any | None = None) -> Scores:
    """Per-task Taylor scores from each task's batches, normalised per task and combined by maximum."""
    import torch_pruning as tp

    graph = graph or build_graph(model.encoder)
    imp = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    was_training = model.training
    model.eval()  # no dropout: the scores should depend on the weights and data only
    per_task: dict[str, Scores] = {}
    try:
        for task, task_batches_ in batches.items():
            model.zero_grad(set_to_none=False)
            for batch in task_batches_:
                (batch_loss(model, task, batch) / len(task_batches_)).backward()
            per_task[task] = unit_scores(model, imp, graph)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return combine_task_scores(per_task)


def combine_task_scores(per_task: Mapping[str, Scores]) -> Scores:
    """Normalise each task's head and FFN scores to sum to 1 over the model, then take the maximum over tasks."""
    tasks = list(per_task.values())
    if not tasks:
        raise ValueError("no task scores to combine")

    def norm(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        total = float(sum(p.sum() for p in parts))
        return [p / total if total > 0 else p.clone() for p in parts]

    heads = [norm(s.heads) for s in tasks]
    ffn = [norm(s.ffn) for s in tasks]
    return Scores(
        heads=[torch.stack([h[i] for h in heads]).max(0).values for i in range(len(heads[0]))],
        ffn=[torch.stack([f[i] for f in ffn]).max(0).values for i in range(len(ffn[0]))],
    )


@torch.no_grad()
def layer_scores(model: MultiTaskModel, batches: Batches) -> list[float]:
    """Mean relative loss increase over tasks when each layer is skipped (lower = safer to drop)."""
    was_training = model.training
    model.eval()
    try:
        def losses() -> dict[str, float]:
            return {t: sum(float(batch_loss(model, t, b)) for b in bs) / len(bs) for t, bs in batches.items()}

        base = losses()
        out = []
        for i in range(len(encoder_layers(model.encoder))):
            with SkipLayer(model.encoder, i):
                skipped = losses()
            out.append(sum((skipped[t] - base[t]) / max(abs(base[t]), 1e-6) for t in base) / len(base))
        return out
    finally:
        model.train(was_training)
