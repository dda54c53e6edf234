"""The NER plugin's torch-free decoder (``bio``), registered in the ``compressor.decoders`` entry-point group.

Settings (``NerTask.export_spec``): ``{"decoder": "bio", "tags": [...], "first_subtoken": True}``. Each word's
tag is the argmax at its first sub-token; tags become entities with
:func:`compressor.runtime.decoding.bio_to_spans` (a stray ``I-X`` starts an entity), the function the plugin's
PyTorch ``decode`` uses, so both give the same entities for the same logits.

Imports numpy and ``compressor.runtime`` only (no torch).
"""

from __future__ import annotations

import numpy as np

from compressor.runtime.decoders import Decoder, span_entity, word_chars
from compressor.runtime.decoding import bio_decode, split_tag


class BioDecoder(Decoder):
    """Entities of a sentence: ``{"entities": [{"text", "type", "start", "end"}]}`` (character offsets)."""

    produces_spans = True

    def check(self) -> None:
        tags = self.settings.get("tags")
        if not tags:
            raise ValueError("a bio decoder needs 'tags'")
        for tag in tags:
            split_tag(tag)  # ValueError naming a tag that is not IOB2

    def output_classes(self):
        return next(iter(self.graph.outputs)), len(self.settings["tags"])

    def decode_batch(self, outputs, encodings, texts):
        tags = self.settings["tags"]
        logits = np.asarray(self.output(outputs))
        preds = []
        for i, (enc, text) in enumerate(zip(encodings, texts)):
            word_ids = [w if s == 0 else None for w, s in zip(enc.word_ids, enc.sequence_ids)]
            n = max((w for w in word_ids if w is not None), default=-1) + 1
            spans = bio_decode(logits[i], word_ids, n, tags)
            chars = word_chars(enc)
            preds.append({"entities": [span_entity(s, chars, text) for s in spans], "_spans": spans,
                          "truncated": bool(enc.overflowing)})
        return preds

    def describe(self, prediction):
        return ", ".join(f"{e['text']} [{e['type']}] @{e['start']}:{e['end']}"
                         for e in prediction["entities"]) or "no entity"
