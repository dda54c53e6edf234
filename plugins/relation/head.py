"""The entity-pair head of relation extraction (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_WIDTH = 32  # span widths (sub-tokens) at or above this share the last width embedding


def max_pool(hidden: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``hidden[b, start:end]`` for every ``[batch, pairs]`` span; zeros for an empty span
    (SpERT's span and context pooling). Memory is batch x pairs x seq x hidden for the masked tensor."""
    pos = torch.arange(hidden.shape[1], device=hidden.device)
    mask = (pos >= start.unsqueeze(-1)) & (pos < end.unsqueeze(-1))  # [batch, pairs, seq]
    floor = torch.finfo(hidden.dtype).min
    masked = torch.where(mask.unsqueeze(-1), hidden.unsqueeze(1), torch.full((), floor, dtype=hidden.dtype,
                                                                             device=hidden.device))
    pooled = masked.amax(dim=2)
    return torch.where(mask.any(dim=-1, keepdim=True), pooled, torch.zeros_like(pooled))


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b, p]]`` -> ``[batch, pairs, hidden]``."""
    return torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


class PairHead(nn.Module):
    """Classifies entity pairs given as sub-token spans ``re_spans [batch, pairs, 4]`` (SpERT's design).

    Each argument is ``[max-pool of its sub-tokens; its first sub-token; width embedding]``; the pair is
    ``[head; tail; max-pool of the tokens between the two (zeros when they touch)]`` -> Linear -> GELU -> Linear.

    ``classifier='softmax'``: ``num_classes`` logits, class 0 is ``no_relation``, trained with cross-entropy.
    ``classifier='sigmoid'``: one independent logit per relation type (binary cross-entropy, as SpERT), and
    column 0 is the constant logit of ``threshold``, so ``argmax`` over the output still decodes a pair: the
    best relation type whose probability exceeds ``threshold``, else ``no_relation``. Either way the output is
    ``{"logits": [batch, pairs, num_classes]}``; padding pairs (``[0, 0, 0, 0]``) give finite logits that loss
    and decoding ignore. Ends are exclusive.
    """

    def __init__(self, hidden_size: int, num_classes: int, dropout: float, width: int | None = None,
                 classifier: str = "softmax", threshold: float = 0.5, width_dim: int = 25):
        super().__init__()
        width = width or hidden_size
        self.classifier = classifier
        self.no_relation_logit = math.log(threshold / (1.0 - threshold))
        self.dropout = nn.Dropout(dropout)
        self.width_embedding = nn.Embedding(MAX_WIDTH, width_dim)
        out = num_classes if classifier == "softmax" else num_classes - 1
        arg = 2 * hidden_size + width_dim
        self.mlp = nn.Sequential(
            nn.Linear(2 * arg + hidden_size, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, out),
        )
        for layer in (self.mlp[0], self.mlp[3]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.width_embedding.weight, std=0.02)

    def _argument(self, h: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        width = (end - start).clamp(min=0, max=MAX_WIDTH - 1)
        return torch.cat([max_pool(h, start, end), gather_tokens(h, start), self.width_embedding(width)], dim=-1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, re_spans: torch.Tensor,
                **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(hidden_states)
        spans = re_spans.long()
        hs, he, ts, te = spans.unbind(dim=-1)
        between = max_pool(h, torch.minimum(he, te), torch.maximum(hs, ts))
        features = torch.cat([self._argument(h, hs, he), self._argument(h, ts, te), between], dim=-1)
        logits = self.mlp(features)
        if self.classifier == "sigmoid":
            constant = torch.full_like(logits[..., :1], self.no_relation_logit)
            logits = torch.cat([constant, logits], dim=-1)
        return {"logits": logits}
