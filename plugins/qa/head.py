"""The span head of extractive QA (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import torch
from torch import nn

#: logit of padding positions: far below any real logit, yet finite so KL and softmax stay NaN-free in bf16
MASKED = -1e4


class SpanHead(nn.Module):
    """Dropout + ``Linear(hidden, 2)``: ``{"start_logits": [batch, seq], "end_logits": [batch, seq]}``.

    Padding positions get :data:`MASKED`, so decoding and distillation ignore them.
    """

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.qa_outputs = nn.Linear(hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, std=0.02)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.qa_outputs(self.dropout(hidden_states))
        logits = logits.masked_fill((attention_mask == 0).unsqueeze(-1), MASKED)
        start, end = logits.unbind(dim=-1)
        return {"start_logits": start, "end_logits": end}
