"""The relation plugin's torch-free decoder (``relation``), registered in ``compressor.decoders``.

Settings (``RelationTask.export_spec``): ``{"decoder": "relation", "entity_task", "labels", "classes",
"no_relation", "max_pairs", "type_constraints"}``. Relations are decoded end to end: the entity task (a decoder
that produces word spans, e.g. ``bio``) is decoded first, then one more run over the same texts feeds the
candidate pairs (``relation_candidates``) and classifies them (``relation_decode``), the functions the plugin's
PyTorch ``decode`` uses. Imports numpy and ``compressor.runtime`` only (no torch).
"""

from __future__ import annotations

import numpy as np

from compressor.runtime.decoders import Decoder, get_decoder, span_entity, word_chars
from compressor.runtime.decoding import NO_RELATION, relation_candidates, relation_decode, softmax


class RelationDecoder(Decoder):
    """``{"entities": [...], "relations": [{"head", "tail", "type", "score"}]}`` per text."""

    shared = False

    def check(self) -> None:
        entity = self.settings.get("entity_task")
        other = self.spec.tasks.get(entity) if isinstance(entity, str) else None
        if other is None:
            raise ValueError(f"decodes relations over entity task {entity!r}, which is not a task of this bundle")
        try:
            produces = get_decoder(other.decoder.get("decoder")).produces_spans
        except Exception:  # noqa: BLE001 - the entity task's own check reports an unknown decoder
            produces = False
        if not produces:
            raise ValueError(f"decodes relations over entity task {entity!r}, whose decoder "
                             f"{other.decoder.get('decoder')!r} produces no entity spans (e.g. a bio task)")

    def output_classes(self):
        dec = self.settings
        classes = dec.get("classes") or [dec.get("no_relation", NO_RELATION), *self.graph.labels]
        return next(iter(self.graph.outputs)), len(classes)

    def requires(self) -> list[str]:
        return [self.settings["entity_task"]]

    def predict(self, bundle, texts, inputs, done):
        dec = self.settings
        allowed = dec.get("type_constraints")
        no_rel = dec.get("no_relation", NO_RELATION)
        classes = dec.get("classes") or [no_rel, *self.graph.labels]
        extra = self.graph.extra_inputs[0].name if self.graph.extra_inputs else "re_spans"
        entities = [p["_spans"] for p in done[dec["entity_task"]]]
        out = []
        for lo in range(0, len(texts), bundle.batch_size):
            chunk = list(texts[lo : lo + bundle.batch_size])
            encs = bundle.encode(chunk)
            ents_all = entities[lo : lo + len(chunk)]
            cands = [relation_candidates(ents, list(enc.word_ids), allowed, dec.get("max_pairs"))
                     for ents, enc in zip(ents_all, encs)]
            width = max(1, max(len(p) for p, _ in cands))
            spans = np.zeros((len(encs), width, 4), dtype=np.int64)
            for i, (_, s) in enumerate(cands):
                spans[i, : len(s)] = s
            logits = self.output(bundle.run([self.task], {**bundle.pad(encs), extra: spans})[self.task])
            for i, (enc, text, ents, (pairs, _)) in enumerate(zip(encs, chunk, ents_all, cands)):
                chars = word_chars(enc)
                rels = relation_decode(logits[i], pairs, ents, classes, allowed, no_rel)
                probs = softmax(np.asarray(logits[i][: len(pairs)], dtype=np.float64), axis=-1)
                row_of = {(int(ents[h][0]), int(ents[h][1]), int(ents[t][0]), int(ents[t][1])): r
                          for r, (h, t) in enumerate(pairs)}
                by_span = {(s[0], s[1]): s for s in ents}
                found = []
                for hs, he, ts, te, rel in rels:
                    row = row_of[(hs, he, ts, te)]
                    found.append({"head": span_entity(by_span[(hs, he)], chars, text),
                                  "tail": span_entity(by_span[(ts, te)], chars, text),
                                  "type": rel, "score": float(probs[row, classes.index(rel)])})
                out.append({"entities": [span_entity(s, chars, text) for s in ents], "relations": found,
                            "truncated": bool(enc.overflowing)})
        return out

    def describe(self, prediction):
        rels = [f"{x['head']['text']} --{x['type']}--> {x['tail']['text']} ({x['score']:.2f})"
                for x in prediction["relations"]]
        return "; ".join(rels) or "no relation"
