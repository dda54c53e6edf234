"""The QA plugin's torch-free decoder (``qa_span``), registered in ``compressor.decoders``.

Settings (``QaTask.export_spec``): ``{"decoder": "qa_span", "max_answer_length", "n_best", "doc_stride",
"max_length", "max_query_length"}``. Each question is cut to its token budget and its context split into
overlapping windows the way the plugin encodes them; answers are scored with ``qa_span_candidates`` and
``qa_best_answer``, the functions the plugin's PyTorch ``decode`` uses. Imports numpy and ``compressor.runtime``
only (no torch).
"""

from __future__ import annotations

from typing import Any

from compressor.runtime.decoders import BundleError, Decoder
from compressor.runtime.decoding import QaCandidate, qa_best_answer, qa_span_candidates


class QaSpanDecoder(Decoder):
    """``{"answer", "start", "end", "score", "question"}`` per context (character offsets into the context)."""

    shared = False

    def check(self) -> None:
        missing = [o for o in ("start_logits", "end_logits") if o not in self.graph.outputs]
        if missing:
            raise ValueError(f"a qa_span decoder needs outputs start_logits and end_logits (missing "
                             f"{', '.join(missing)})")

    def predict(self, bundle, texts, inputs, done):
        dec = self.settings
        contexts = list(texts)
        questions = bundle.second_inputs(inputs.get("questions"), len(contexts),
                                         f"task '{self.task}' answers questions: give questions")
        for i, q in enumerate(questions):
            if not q.strip():
                raise BundleError(f"question {i}: empty question")
        tok = bundle.tokenizer
        max_length = int(dec.get("max_length") or bundle.max_length)
        stride = int(dec.get("doc_stride") or max(1, max_length // 2))
        special = tok.post_processor.num_special_tokens_to_add(True) if tok.post_processor else 0
        budget = min(int(dec.get("max_query_length", 64)), max_length - special - stride - 1)
        if budget < 1:
            raise BundleError(f"task '{self.task}': max_length {max_length} leaves no room for a question next to "
                              f"doc_stride {stride}")
        windows: list[tuple[int, Any]] = []  # (question index, window encoding)
        cut: list[bool] = []
        for question, context in zip(questions, contexts):
            fitted = fit_question(tok, question, budget)
            cut.append(fitted != question)
            tok.enable_truncation(max_length, stride=stride, strategy="only_second")
            try:
                enc = tok.encode(fitted, context)
            finally:
                tok.no_truncation()
            windows += [(len(cut) - 1, w) for w in [enc, *enc.overflowing]]
        candidates: dict[int, list[QaCandidate]] = {i: [] for i in range(len(contexts))}
        for lo in range(0, len(windows), bundle.batch_size):
            part = windows[lo : lo + bundle.batch_size]
            out = bundle.run([self.task], bundle.pad([w for _, w in part]))[self.task]
            for i, (qi, w) in enumerate(part):
                offsets = [tuple(o) if s == 1 else None for o, s in zip(w.offsets, w.sequence_ids)]
                candidates[qi] += qa_span_candidates(out["start_logits"][i], out["end_logits"][i], offsets,
                                                     int(dec.get("max_answer_length", 30)), int(dec.get("n_best", 20)))
        preds = []
        for qi, context in enumerate(contexts):
            best = qa_best_answer(candidates[qi], context)
            preds.append({"answer": best["text"], "start": best["start"], "end": best["end"], "score": best["score"],
                          "question": questions[qi], "truncated": cut[qi]})
        return preds

    def describe(self, prediction):
        score = "-" if prediction["score"] is None else f"{prediction['score']:.2f}"
        return f"{prediction['answer']!r} @{prediction['start']}:{prediction['end']} (score {score})"


def fit_question(tok: Any, question: str, budget: int) -> str:
    """``question`` cut at a token boundary to at most ``budget`` tokens (as the QA plugin does)."""
    offsets = tok.encode(question, add_special_tokens=False).offsets
    while len(offsets) > budget:
        question = question[: offsets[budget - 1][1]]
        offsets = tok.encode(question, add_special_tokens=False).offsets
    return question
