"""The classification plugin's torch-free decoder (``classification``), registered in ``compressor.decoders``.

Settings (``ClassificationTask.export_spec``): ``{"decoder": "classification", "labels": [...], "text_pair":
bool}``. A single-text task is decoded from the shared pass over the texts; a text-pair task tokenises each text
with its ``text_pairs`` entry and runs on its own. Imports numpy and ``compressor.runtime`` only (no torch).
"""

from __future__ import annotations

import numpy as np

from compressor.runtime.decoders import BundleError, Decoder, classification


class ClassificationDecoder(Decoder):
    """``{"label", "score", "scores": {label: probability}}`` per text (or text pair)."""

    def __init__(self, task, graph, spec):
        super().__init__(task, graph, spec)
        self.shared = not bool(self.settings.get("text_pair"))  # a pair task encodes its own inputs

    def check(self) -> None:
        if not self.labels():
            raise ValueError("a classification decoder needs 'labels'")

    def output_classes(self):
        return next(iter(self.graph.outputs)), len(self.labels())

    def decode_batch(self, outputs, encodings, texts):
        labels = self.labels()
        logits = np.asarray(self.output(outputs))
        return [{**classification(logits[i], labels), "truncated": bool(enc.overflowing)}
                for i, enc in enumerate(encodings)]

    def predict(self, bundle, texts, inputs, done):
        if self.shared:
            return super().predict(bundle, texts, inputs, done)
        pairs = bundle.second_inputs(inputs.get("text_pairs"), len(texts),
                                     f"task '{self.task}' classifies text pairs: give text_pairs")
        for i, p in enumerate(pairs):
            if not p.strip():
                raise BundleError(f"text pair {i}: empty text")
        out = []
        for lo in range(0, len(texts), bundle.batch_size):
            encs = bundle.encode(texts[lo : lo + bundle.batch_size], pairs[lo : lo + bundle.batch_size])
            out += self.decode_batch(bundle.run([self.task], bundle.pad(encs))[self.task], encs, [])
        return out

    def describe(self, prediction):
        return f"{prediction['label']} ({prediction['score']:.3f})"
