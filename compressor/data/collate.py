"""Padding features into batches: what every plugin's ``collate`` starts with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def pad_inputs(features: Sequence[dict[str, Any]], extra: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with the feature's ``pad_id``), ``attention_mask``, ``token_type_ids`` and the
    per-token ``extra`` keys (key -> pad value, e.g. ``{"labels": -100}``) into long tensors."""
    import torch

    if not features:
        raise ValueError("cannot collate an empty list of features")
    width = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": features[0].get("pad_id", 0), "attention_mask": 0, "token_type_ids": 0, **(extra or {})}
    return {
        key: torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)
        for key, value in pads.items() if key in features[0]
    }
