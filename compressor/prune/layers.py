"""Dropping whole transformer layers."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from compressor.model.architecture import encoder_layers


def drop_layers(encoder: nn.Module, positions: Iterable[int]) -> list[int]:
    """Remove the layers at ``positions`` (current indices); returns the positions kept, in order.

    Raises:
        ValueError: a position is out of range, or no layer would remain.
    """
    layers = encoder_layers(encoder)
    drop = set(positions)
    bad = sorted(p for p in drop if p < 0 or p >= len(layers))
    if bad:
        raise ValueError(f"the encoder has {len(layers)} layers; cannot drop layer(s) {bad}")
    if len(drop) >= len(layers):
        raise ValueError(f"dropping {len(drop)} of {len(layers)} layers would leave the encoder without layers")
    keep = [i for i in range(len(layers)) if i not in drop]
    encoder.encoder.layer = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(encoder.encoder.layer):
        # HF uses layer_idx only for KV caches; keep it consistent with the new positions anyway
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    encoder.config.num_hidden_layers = len(keep)
    return keep


class SkipLayer:
    """Context manager that takes one layer out of the forward pass (for measuring what it contributes)."""

    def __init__(self, encoder: nn.Module, position: int):
        self.encoder = encoder
        self.position = position
        self._saved: nn.ModuleList | None = None

    def __enter__(self) -> SkipLayer:
        layers = encoder_layers(self.encoder)
        self._saved = layers
        self.encoder.encoder.layer = nn.ModuleList([m for i, m in enumerate(layers) if i != self.position])
        return self

    def __exit__(self, *exc: object) -> None:
        self.encoder.encoder.layer = self._saved
