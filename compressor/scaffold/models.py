"""Templates of each kind's head (``head.py``, torch) and torch-free runtime decoder (``decoder.py``) (string.Template: ``$$`` is a literal dollar; ``$name``, ``$module``, ``$Class``, ``$Decoder``, ``$dist``, ``$kind`` are filled in)."""

from __future__ import annotations

_HEAD_HEADER = '''\
"""The head of the `$name` task (imports torch; loaded only when a model is built)."""

from __future__ import annotations

import torch
from torch import nn

'''

HEADS = {
    "token": _HEAD_HEADER + '''
class Head(nn.Module):
    """Dropout + a linear layer over every token: ``{"logits": [batch, sequence, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        return {"logits": self.classifier(self.dropout(hidden_states))}
''',
    "sequence": _HEAD_HEADER + '''
class Head(nn.Module):
    """Mean of the real tokens, dropout, a linear layer: ``{"logits": [batch, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return {"logits": self.classifier(self.dropout(pooled))}
''',
    "span": _HEAD_HEADER + '''
class Head(nn.Module):
    """Start and end logits per token (padding at -10000): ``{"start_logits", "end_logits"}: [batch, sequence]``."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.qa = nn.Linear(hidden_size, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor):
        logits = self.qa(self.dropout(hidden_states))
        pad = attention_mask == 0
        start = logits[..., 0].masked_fill(pad, -10000.0)
        end = logits[..., 1].masked_fill(pad, -10000.0)
        return {"start_logits": start, "end_logits": end}
''',
    "span-pair": _HEAD_HEADER + '''
class Head(nn.Module):
    """The first sub-token of each span, concatenated, dropout, a linear layer: ``{"logits": [batch, labels]}``."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, pair_spans: torch.Tensor,
                **extra: torch.Tensor):
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        head = hidden_states[rows, pair_spans[:, 0]]
        tail = hidden_states[rows, pair_spans[:, 2]]
        return {"logits": self.classifier(self.dropout(torch.cat([head, tail], dim=-1)))}
''',
}

_DEC_HEADER = '''\
"""The torch-free runtime decoder of `$name` (registered as `$name` in the `compressor.decoders` entry-point
group; a bundle's tasks.json names it through the plugin's export_spec). numpy and compressor.runtime only."""

from __future__ import annotations

import numpy as np

'''

DECODERS_ = {
    "token": _DEC_HEADER + '''from compressor.runtime.decoders import WordTagDecoder


class $Decoder(WordTagDecoder):
    """A label per word, read at its first sub-token: ``{"words": [{"text", "label", "start", "end"}], "tags"}``.

    The project's word-level tagging decoder does the work; override ``decode_batch`` to shape the output.
    """
''',
    "sequence": _DEC_HEADER + '''from compressor.runtime.decoders import Decoder, classification


class $Decoder(Decoder):
    """``{"label", "score", "scores": {label: probability}}`` per text."""

    def check(self) -> None:
        if not self.labels():
            raise ValueError("needs 'labels'")

    def decode_batch(self, outputs, encodings, texts):
        logits = np.asarray(self.output(outputs))
        return [{**classification(logits[i], self.labels()), "truncated": bool(enc.overflowing)}
                for i, enc in enumerate(encodings)]

    def describe(self, prediction):
        return f"{prediction['label']} ({prediction['score']:.3f})"
''',
    "span": _DEC_HEADER + '''from compressor.runtime.decoders import Decoder
from compressor.runtime.decoding import qa_best_answer, qa_span_candidates


class $Decoder(Decoder):
    """The best span of each text: ``{"text", "start", "end", "score"}`` (character offsets)."""

    def check(self) -> None:
        if {"start_logits", "end_logits"} - set(self.graph.outputs):
            raise ValueError("needs outputs start_logits and end_logits")

    def decode_batch(self, outputs, encodings, texts):
        out = []
        for i, (enc, text) in enumerate(zip(encodings, texts)):
            offsets = [tuple(o) if s == 0 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
            cands = qa_span_candidates(outputs["start_logits"][i], outputs["end_logits"][i], offsets,
                                       int(self.settings.get("max_answer_length", 30)), 1)
            best = qa_best_answer(cands, text)
            out.append({"text": best["text"], "start": best["start"], "end": best["end"], "score": best["score"],
                        "truncated": bool(enc.overflowing)})
        return out

    def describe(self, prediction):
        return f"{prediction['text']!r} @{prediction['start']}:{prediction['end']}"
''',
    "span-pair": _DEC_HEADER + '''from compressor.runtime.decoders import BundleError, Decoder, classification


class $Decoder(Decoder):
    """A label for two character spans of each text: ``Bundle.predict(texts, spans=[[[hs, he], [ts, te]], ...])``
    gives ``{"label", "score", "scores", "head", "tail"}`` per text."""

    shared = False  # needs the spans of the request

    def check(self) -> None:
        if not self.labels():
            raise ValueError("needs 'labels'")

    def predict(self, bundle, texts, inputs, done):
        spans = inputs.get("spans")
        if spans is None or len(spans) != len(texts):
            raise BundleError(f"task '{self.task}' classifies span pairs: give spans=[[[head_start, head_end], "
                              "[tail_start, tail_end]], ...] (character offsets), one per text")
        out = []
        for lo in range(0, len(texts), bundle.batch_size):
            chunk, pairs = list(texts[lo : lo + bundle.batch_size]), spans[lo : lo + bundle.batch_size]
            encs = bundle.encode(chunk)
            rows = np.zeros((len(chunk), 4), dtype=np.int64)
            for i, (enc, (head, tail)) in enumerate(zip(encs, pairs)):
                offsets = [tuple(o) if s == 0 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
                rows[i] = [*_token_range(offsets, head), *_token_range(offsets, tail)]
            logits = self.output(bundle.run([self.task], {**bundle.pad(encs), "pair_spans": rows})[self.task])
            for i, (enc, text, (head, tail)) in enumerate(zip(encs, chunk, pairs)):
                out.append({**classification(logits[i], self.labels()), "head": text[head[0]:head[1]],
                            "tail": text[tail[0]:tail[1]], "truncated": bool(enc.overflowing)})
        return out

    def describe(self, prediction):
        return f"{prediction['head']} --{prediction['label']}--> {prediction['tail']} ({prediction['score']:.3f})"


def _token_range(offsets, span):
    inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < span[1] and o[1] > span[0]]
    return (inside[0], inside[-1] + 1) if inside else (0, 1)
''',
}
