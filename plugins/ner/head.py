"""The token-tagging head (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import torch
from torch import nn


class TokenTaggingHead(nn.Module):
    """Dropout + a linear layer over every token: ``{"logits": [batch, seq, num_tags]}``."""

    def __init__(self, hidden_size: int, num_tags: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_tags)
        nn.init.normal_(self.classifier.weight, std=0.02)  # BERT's initializer_range: small logits at start
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.dropout(hidden_states))}
