"""The sequence-classification head (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import torch
from torch import nn


class SequenceClassificationHead(nn.Module):
    """Pool the sequence (first token, or mean over real tokens), dropout, linear: ``{"logits": [batch, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)  # BERT's initializer_range
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if self.pooling == "cls":
            pooled = hidden_states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
            pooled = (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return {"logits": self.classifier(self.dropout(pooled))}
