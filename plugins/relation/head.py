"""The entity-pair head of relation extraction (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import torch
from torch import nn


def mean_pool(hidden: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden[b, start:end]`` for every ``[batch, pairs]`` span; zeros for an empty span.

    A ``[batch, pairs, seq]`` mask times ``hidden`` (one batched matmul), so memory grows with pairs x seq, not
    pairs x seq x hidden as a max-pool would; no Python loop over data-dependent sizes, so it exports to ONNX.
    """
    pos = torch.arange(hidden.shape[1], device=hidden.device)
    mask = ((pos >= start.unsqueeze(-1)) & (pos < end.unsqueeze(-1))).to(hidden.dtype)
    total = torch.bmm(mask, hidden)
    return total / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b, p]]`` -> ``[batch, pairs, hidden]``."""
    return torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


class PairHead(nn.Module):
    """Classifies entity pairs given as sub-token spans ``re_spans [batch, pairs, 4]``.

    Each pair is ``[CLS; head first token; head mean; tail first token; tail mean; mean of the tokens between
    the two (zeros when they touch)]`` -> Linear -> GELU -> Linear: ``{"logits": [batch, pairs, classes]}``.
    Ends are exclusive. Padding pairs (``[0, 0, 0, 0]``) give finite logits that loss and decoding ignore.
    """

    def __init__(self, hidden_size: int, num_classes: int, dropout: float, width: int | None = None):
        super().__init__()
        width = width or hidden_size
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(6 * hidden_size, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, num_classes),
        )
        for layer in (self.mlp[0], self.mlp[3]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, re_spans: torch.Tensor,
                **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(hidden_states)
        spans = re_spans.long()
        hs, he, ts, te = spans.unbind(dim=-1)
        cls = h[:, :1].expand(-1, spans.shape[1], -1)
        between = mean_pool(h, torch.minimum(he, te), torch.maximum(hs, ts))
        features = torch.cat([
            cls, gather_tokens(h, hs), mean_pool(h, hs, he), gather_tokens(h, ts), mean_pool(h, ts, te), between,
        ], dim=-1)
        return {"logits": self.mlp(features)}
