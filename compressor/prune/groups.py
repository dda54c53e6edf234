"""Coupled weights of one encoder layer, found and removed through torch-pruning's dependency graph.

A head is ``head_size`` output rows of query, key and value plus the same input columns of the attention output
dense; an FFN neuron is one output row of ``intermediate.dense`` plus one input column of ``output.dense``. The
graph finds these couplings by tracing; we check that each group holds exactly those layers (so the hidden size,
embeddings, LayerNorms and task heads can never be touched), remove it, then bring the self-attention module's
head bookkeeping in line with its new weights (``set_attention_heads``), so no caller patches HF attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from compressor.model.architecture import encoder_layers, read_architecture, set_attention_heads


class CouplingError(RuntimeError):
    """The dependency graph coupled weights other than the ones a head or FFN neuron owns."""


def build_graph(encoder: nn.Module) -> Any:
    """Trace ``encoder`` (a BERT-family model) into a torch-pruning ``DependencyGraph``."""
    import torch_pruning as tp

    device = next(encoder.parameters()).device
    seq = 8
    example = {
        "input_ids": torch.ones(1, seq, dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, seq, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(1, seq, dtype=torch.long, device=device),
    }
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                encoder, example_inputs=example, forward_fn=lambda m, x: m(**x).last_hidden_state, verbose=False,
            )
    finally:
        encoder.train(was_training)
    return graph


def head_channels(heads: Iterable[int], head_size: int) -> list[int]:
    """Output channels of query/key/value that belong to ``heads``."""
    return [h * head_size + i for h in sorted(set(heads)) for i in range(head_size)]


def head_group(graph: Any, layer: nn.Module, channels: Sequence[int]) -> Any:
    """The group that removes ``channels`` of one layer's attention (Q/K/V rows + output-dense columns)."""
    import torch_pruning as tp

    attn = layer.attention
    group = graph.get_pruning_group(attn.self.query, tp.prune_linear_out_channels, list(channels))
    _check(graph, group, {
        (attn.self.query, "out"), (attn.self.key, "out"), (attn.self.value, "out"), (attn.output.dense, "in"),
    }, channels, "attention heads")
    return group


def ffn_group(graph: Any, layer: nn.Module, neurons: Sequence[int]) -> Any:
    """The group that removes FFN ``neurons`` of one layer (intermediate rows + output-dense columns)."""
    import torch_pruning as tp

    group = graph.get_pruning_group(layer.intermediate.dense, tp.prune_linear_out_channels, list(neurons))
    _check(graph, group, {(layer.intermediate.dense, "out"), (layer.output.dense, "in")}, neurons, "FFN neurons")
    return group


def _check(graph: Any, group: Any, expected: set[tuple[nn.Module, str]], idxs: Sequence[int], what: str) -> None:
    """Only the expected layers, each pruned on the expected side at exactly ``idxs``."""
    names = {m: n for n, m in graph.model.named_modules()}
    found: set[tuple[nn.Module, str]] = set()
    for item in group:
        dep, got = item.dep, item.idxs
        module = dep.target.module
        if not isinstance(module, nn.Module) or not list(module.parameters(recurse=False)):
            continue  # reshapes, transposes and other parameter-free ops in between
        side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        if (module, side) not in expected or sorted(got) != sorted(idxs):
            raise CouplingError(
                f"pruning {what}: the dependency graph also couples {names.get(module, module)} "
                f"({side} channels); only Q/K/V/O or FFN in/out may change"
            )
        found.add((module, side))
    if found != expected:
        missing = [names.get(m, m) for m, _ in expected - found]
        raise CouplingError(f"pruning {what}: the dependency graph did not couple {missing}")


def remove_heads(encoder: nn.Module, heads: dict[int, Sequence[int]], graph: Any | None = None) -> None:
    """Remove attention heads: ``{layer position: [head index in that layer]}``.

    Raises:
        ValueError: a head index is out of range, or a layer would lose every head.
    """
    layers = encoder_layers(encoder)
    todo = {i: sorted(set(h)) for i, h in heads.items() if h}
    for i, hs in todo.items():
        attn = layers[i].attention.self
        n = attn.num_attention_heads
        if any(h < 0 or h >= n for h in hs):
            raise ValueError(f"layer {i} has {n} heads; cannot remove head(s) {hs}")
        if len(hs) >= n:
            raise ValueError(f"removing heads {hs} would leave layer {i} without attention heads")
    if not todo:
        return
    graph = graph or build_graph(encoder)
    for i, hs in todo.items():
        attn = layers[i].attention.self
        n, size = attn.num_attention_heads, attn.attention_head_size
        head_group(graph, layers[i], head_channels(hs, size)).prune()
        set_attention_heads(attn, n - len(hs), size)
    check_architecture(encoder)


def remove_ffn_neurons(encoder: nn.Module, neurons: dict[int, Sequence[int]], graph: Any | None = None) -> None:
    """Remove FFN neurons: ``{layer position: [neuron index]}``; a layer keeps at least one neuron."""
    layers = encoder_layers(encoder)
    todo = {i: sorted(set(n)) for i, n in neurons.items() if n}
    for i, ns in todo.items():
        width = layers[i].intermediate.dense.out_features
        if any(n < 0 or n >= width for n in ns):
            raise ValueError(f"layer {i} has {width} FFN neurons; cannot remove index {max(ns)}")
        if len(ns) >= width:
            raise ValueError(f"removing {len(ns)} FFN neurons would leave layer {i} without any")
    if not todo:
        return
    graph = graph or build_graph(encoder)
    for i, ns in todo.items():
        ffn_group(graph, layers[i], ns).prune()
    check_architecture(encoder)


def check_architecture(encoder: nn.Module) -> None:
    """Raise ``CouplingError`` if any layer's head bookkeeping or FFN widths disagree with its weights."""
    hidden = encoder.config.hidden_size
    for i, (layer, arch) in enumerate(zip(encoder_layers(encoder), read_architecture(encoder))):
        attn = layer.attention
        width = arch.heads * arch.head_size
        shapes = {
            "query": attn.self.query.weight.shape, "key": attn.self.key.weight.shape,
            "value": attn.self.value.weight.shape, "attention.output.dense": attn.output.dense.weight.shape[::-1],
        }
        for name, shape in shapes.items():
            if tuple(shape) != (width, hidden):
                raise CouplingError(
                    f"layer {i}: {arch.heads} heads x {arch.head_size} = {width} but {name} has shape {tuple(shape)}"
                )
        if attn.self.all_head_size != width:
            raise CouplingError(f"layer {i}: all_head_size {attn.self.all_head_size} != heads x head_size {width}")
        if tuple(layer.output.dense.weight.shape) != (hidden, arch.ffn):
            raise CouplingError(f"layer {i}: FFN width {arch.ffn} but output.dense has {tuple(layer.output.dense.weight.shape)}")
