"""The toy head: mean over real tokens, then linear."""

from __future__ import annotations

import torch
from torch import nn


class MeanPoolHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> dict:
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return {"logits": self.classifier(pooled)}
