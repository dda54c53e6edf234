"""Cutting the hidden width (the residual stream) of a trained multi-task model.

The kept residual channels are the same everywhere: the columns of the word, position and token-type embeddings,
the embedding LayerNorm, and in every layer the input columns of Q, K, V and of the FFN's first projection, the
output rows of the attention output and FFN output projections and both LayerNorms. Heads keep their head size
and count (the attention width ``heads * head_size`` is independent of the hidden size in the per-layer
architecture), so the new width must only be divisible by the config's ``num_attention_heads``, which the
encoder's constructor checks when the model is rebuilt from its manifest.

Task heads read the hidden states through linear layers, maybe after pooling, gathering or concatenating tokens.
Which input columns of a head's linear layers carry which hidden channel is found by feeding the head two
signatures (every token's channel ``c`` set to a distinct constant) and reading the layers' inputs; those columns
are dropped with their channels. The cut head is checked to give exactly the output of the old head on hidden
states whose removed channels are zero, and against a head the plugin builds for the new width (an option that
defaulted to the hidden size, such as a relation MLP's width, is pinned to its old value so the shapes agree).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers
from compressor.model.multitask import MultiTaskModel

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_width(encoder: nn.Module, hidden: int, field: str) -> None:
    """``RecipeError`` naming ``field`` unless ``hidden`` is a width ``encoder`` can be cut to."""
    check_width_of(encoder.config.hidden_size, encoder.config.num_attention_heads, hidden, field)


def check_width_of(old: int, heads: int, hidden: int, field: str) -> None:
    """``RecipeError`` naming ``field`` unless a model of width ``old`` with ``heads`` attention heads (its
    config's ``num_attention_heads``) can be cut to ``hidden``."""
    if not 0 < hidden < old:
        raise RecipeError(f"{field}: {hidden} must be smaller than the model's hidden size {old} (and above 0)")
    if hidden % heads:
        raise RecipeError(f"{field}: {hidden} is not divisible by the model's {heads} attention heads "
                          f"(encoder.config.num_attention_heads); choose a multiple of {heads}")


@torch.no_grad()
def channel_scores(model: MultiTaskModel, batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None
                   ) -> torch.Tensor:
    """Importance of each residual channel: its mean absolute value over the real tokens of the embeddings' and
    every layer's output on ``batches`` (each task weighed alike); without batches, the summed absolute weights of
    every LayerNorm that writes the residual stream."""
    encoder = model.encoder
    if not batches:
        lns = [encoder.embeddings.LayerNorm] + [m for layer in encoder_layers(encoder)
                                                for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
        return sum(ln.weight.detach().abs().float().cpu() for ln in lns)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(encoder.config.hidden_size)
    try:
        for task_batches in batches.values():
            acc = torch.zeros_like(total)
            count = 0
            for b in task_batches:
                inputs = {k: b[k].to(device) for k in ENCODER_INPUTS if k in b}
                states = encoder(**inputs, output_hidden_states=True, return_dict=True).hidden_states
                keep = inputs["attention_mask"].bool()
                for h in states:
                    acc += h[keep].abs().float().sum(0).cpu()
                count += int(keep.sum()) * len(states)
            total += acc / max(count, 1)
    finally:
        model.train(was)
    return total


def choose_channels(scores: torch.Tensor, hidden: int) -> list[int]:
    """The ``hidden`` highest-scoring channels, ascending."""
    return sorted(int(i) for i in torch.topk(scores, hidden).indices)


def cut_width(model: MultiTaskModel, keep: Sequence[int], probe: Mapping[str, Mapping[str, torch.Tensor]],
              field: str = "hidden_size") -> None:
    """Keep only the residual channels ``keep`` of ``model`` (encoder and task heads), in place.

    Args:
        probe: task -> one collated batch of that task (its head's extra inputs, e.g. relation spans, are needed
            to trace which head inputs carry hidden channels).
        field: the recipe field named in errors.
    """
    encoder = model.encoder
    old = encoder.config.hidden_size
    keep = sorted(set(int(k) for k in keep))
    check_width(encoder, len(keep), field)
    if any(k < 0 or k >= old for k in keep):
        raise ValueError(f"channels to keep must be in 0..{old - 1}")
    missing = [t for t in model.tasks if t not in probe]
    if missing:
        raise ValueError(f"cut_width needs a probe batch of every task; none for '{missing[0]}'")
    idx = torch.tensor(keep, device=next(model.parameters()).device)
    new_heads = {t: _cut_head(model, t, probe[t], idx, old, field) for t in model.tasks}
    _cut_encoder(encoder, idx)
    for t, head in new_heads.items():
        model.heads[t] = head


# ---- the encoder ------------------------------------------------------------------------------------------------
def _linear_in(linear: nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, idx].clone())
    linear.in_features = len(idx)


def _linear_out(linear: nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[idx].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[idx].clone())
    linear.out_features = len(idx)


def _layer_norm(ln: nn.LayerNorm, idx: torch.Tensor) -> None:
    ln.weight = nn.Parameter(ln.weight.detach()[idx].clone())
    ln.bias = nn.Parameter(ln.bias.detach()[idx].clone())
    ln.normalized_shape = (len(idx),)


@torch.no_grad()
def _cut_encoder(encoder: nn.Module, idx: torch.Tensor) -> None:
    emb = encoder.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table = getattr(emb, name, None)
        if table is not None:
            table.weight = nn.Parameter(table.weight.detach()[:, idx].clone())
            table.embedding_dim = len(idx)
    _layer_norm(emb.LayerNorm, idx)
    for layer in encoder_layers(encoder):
        attn = layer.attention
        for proj in (attn.self.query, attn.self.key, attn.self.value, layer.intermediate.dense):
            _linear_in(proj, idx)
        _linear_out(attn.output.dense, idx)
        _layer_norm(attn.output.LayerNorm, idx)
        _linear_out(layer.output.dense, idx)
        _layer_norm(layer.output.LayerNorm, idx)
    encoder.config.hidden_size = len(idx)


# ---- task heads ----------------------------------------------------------------------------------------------------
def _head_inputs(model: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    names = [k for k in model.tasks[task].input_names() if k not in ("input_ids", "token_type_ids")]
    return {k: batch[k].to(device) for k in names if k in batch}


def _signature_columns(head: nn.Module, inputs: Mapping[str, torch.Tensor], shape: tuple[int, ...],
                       hidden: int) -> dict[nn.Linear, dict[int, int]]:
    """For every linear layer of ``head``: input column -> the hidden channel it carries (unmapped columns left
    out), read from two signature passes."""
    device = inputs["attention_mask"].device
    signatures = [1.0 + (torch.arange(hidden, device=device) + 1) / (hidden + 1),
                  3.0 + torch.randperm(hidden, generator=torch.Generator().manual_seed(0)).to(device) / (hidden + 1)]
    seen: list[dict[nn.Linear, torch.Tensor]] = []
    for sig in signatures:
        captured: dict[nn.Linear, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(lambda mod, args, c=captured: c.__setitem__(mod, args[0].detach()))
                   for m in head.modules() if isinstance(m, nn.Linear)]
        try:
            x = sig.expand(*shape[:-1], hidden).contiguous()
            head(x, inputs["attention_mask"], **{k: v for k, v in inputs.items() if k != "attention_mask"})
        finally:
            for h in handles:
                h.remove()
        seen.append(captured)
    out: dict[nn.Linear, dict[int, int]] = {}
    for linear, z1 in seen[0].items():
        z2 = seen[1].get(linear)
        if z2 is None:
            continue
        cols: dict[int, int] = {}
        a, b = z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1])
        for j in range(a.shape[1]):
            first = a[:, j][a[:, j] != 0]
            second = b[:, j][b[:, j] != 0]
            if not len(first) or len(first) != len(second):
                continue
            c = int(torch.round((first[0] - 1.0) * (hidden + 1)).item()) - 1
            if not 0 <= c < hidden:
                continue
            if torch.allclose(first, signatures[0][c].expand_as(first), atol=1e-5) and \
                    torch.allclose(second, signatures[1][c].expand_as(second), atol=1e-5):
                cols[j] = c
        if cols:
            out[linear] = cols
    return out


@torch.no_grad()
def _cut_head(model: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor], idx: torch.Tensor, old: int,
              field: str) -> nn.Module:
    """The head of ``task`` cut to the channels ``idx``, checked against the old head and a fresh build."""
    plugin = model.tasks[task]
    old_head = model.heads[task]
    was = old_head.training
    old_head.eval()
    inputs = _head_inputs(model, task, batch)
    shape = (*inputs["attention_mask"].shape, old)
    kept = set(idx.tolist())
    head = copy.deepcopy(old_head)
    mapping = _signature_columns(head, inputs, shape, old)
    for linear, cols in mapping.items():
        drop = {j for j, c in cols.items() if c not in kept}
        _linear_in(linear, torch.tensor([j for j in range(linear.in_features) if j not in drop], device=idx.device))
    # exact: the cut head on the kept channels == the old head on hidden states without the removed channels
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(idx.device)
    zeroed = torch.zeros_like(x)
    zeroed[..., idx] = x[..., idx]
    extra = {k: v for k, v in inputs.items() if k != "attention_mask"}
    want = old_head(zeroed, inputs["attention_mask"], **extra)
    got = head(x[..., idx], inputs["attention_mask"], **extra)
    for name, value in want.items():
        if got[name].shape != value.shape or not torch.allclose(got[name], value, atol=1e-4, rtol=1e-4):
            raise RecipeError(f"{field}: the head of task '{task}' mixes hidden channels before its linear layers "
                              "(e.g. a LayerNorm on the hidden states), so its width cannot be cut")
    _match_fresh_build(plugin, head, len(idx), old, task, field)
    old_head.train(was)
    head.train(was)
    return head


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _match_fresh_build(plugin: Any, head: nn.Module, hidden: int, old: int, task: str, field: str) -> None:
    """Make the plugin build ``head``'s shapes at the new width (pinning options that defaulted to the hidden size
    to ``old``); ``RecipeError`` when it cannot, since the model would not reload from its manifest."""
    want = _shapes(head)
    if _shapes(plugin.build_head(hidden)) == want:
        return
    options = plugin.options
    unset = [k for k, v in options.model_dump().items() if v is None]
    for keys in [[k] for k in unset] + ([unset] if len(unset) > 1 else []):
        try:
            trial = options.model_copy(update=dict.fromkeys(keys, old))
            plugin.options = trial
            if _shapes(plugin.build_head(hidden)) == want:
                plugin.options = type(options)(**trial.model_dump())
                return
        except Exception:  # noqa: BLE001 - an option that does not take an int is not the one
            pass
        plugin.options = options
    raise RecipeError(f"{field}: the head of task '{task}' has shapes that depend on the hidden size beyond its "
                      "input, and no option of its plugin fixes them; its width cannot be cut")
