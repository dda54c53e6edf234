"""Per-layer architecture of a BERT-family encoder: attention heads, head size and FFN width of each layer.

Pruning changes these per layer; the manifest records them so a pruned model is rebuilt from its config plus
this list, then loaded from safetensors, with no pickle and no ``prune_heads``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from compressor.errors import ModelDirError


@dataclass(frozen=True)
class LayerArch:
    heads: int
    head_size: int
    ffn: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-family encoder (BERT, RoBERTa, ELECTRA, XLM-R, MiniLM...)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise ModelDirError(
            f"{type(encoder).__name__}: expected a BERT-family encoder with .encoder.layer "
            "(BertModel, RobertaModel, ElectraModel, ...); other layouts are not supported yet"
        )
    return layers


def read_architecture(encoder: nn.Module) -> list[LayerArch]:
    out = []
    for layer in encoder_layers(encoder):
        attn = layer.attention.self
        out.append(LayerArch(attn.num_attention_heads, attn.attention_head_size, layer.intermediate.dense.out_features))
    return out


def set_attention_heads(self_attention: nn.Module, heads: int, head_size: int) -> None:
    """Keep the bookkeeping of a (pruned) self-attention module in line with its weights."""
    self_attention.num_attention_heads = heads
    self_attention.attention_head_size = head_size
    self_attention.all_head_size = heads * head_size


def apply_architecture(encoder: nn.Module, arch: list[LayerArch]) -> None:
    """Reshape a freshly built encoder so its layers match ``arch`` (weights are loaded afterwards)."""
    layers = encoder_layers(encoder)
    if len(arch) != len(layers):
        del layers[len(arch) :]
        if len(arch) > len(layers):
            raise ModelDirError(f"architecture lists {len(arch)} layers but the config builds only {len(layers)}")
    hidden = encoder.config.hidden_size
    for layer, a in zip(layers, arch):
        width = a.heads * a.head_size
        attn = layer.attention
        for proj in ("query", "key", "value"):
            setattr(attn.self, proj, nn.Linear(hidden, width))
        attn.output.dense = nn.Linear(width, hidden)
        set_attention_heads(attn.self, a.heads, a.head_size)
        layer.intermediate.dense = nn.Linear(hidden, a.ffn)
        layer.output.dense = nn.Linear(a.ffn, hidden)
    encoder.config.num_hidden_layers = len(arch)
