"""Recording the attention query/key/value projections of chosen encoder layers during a forward pass (what the
attention-transfer loss compares, and what the teacher cache stores of the teacher)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from compressor.model.architecture import encoder_layers
from compressor.model.multitask import MultiTaskModel


@contextmanager
def capture_qkv(model: MultiTaskModel, layers: list[int]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Record the query/key/value projection outputs of ``layers`` during the forward passes inside the block."""
    blocks = encoder_layers(model.encoder)
    store: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    handles = []
    for i in layers:
        attn = blocks[i].attention.self
        for name in ("query", "key", "value"):
            def hook(_module, _inputs, output, i=i, name=name):
                store[i][name] = output
            handles.append(getattr(attn, name).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
