"""Load an edge bundle and predict with it: ONNX Runtime + ``tokenizers`` + numpy, no torch.

A bundle directory holds ``model.onnx`` (one graph for every task), ``tokenizer.json`` (a Hugging Face fast
tokenizer) and ``tasks.json`` (the graph contract, :class:`compressor.runtime.spec.GraphSpec`, with each task's
decoder settings). Decoding uses :mod:`compressor.runtime.decoding`, the same functions the task plugins use on
PyTorch outputs, so both give the same predictions for the same logits.

Texts are tokenised the way the plugins tokenise them: words are the tokenizer's pre-tokenisation of the text
(whitespace and punctuation for BERT), so entities come back as character spans of whole words. Tasks that read
the same input share one ``session.run`` (NER, classification and relation extraction over a sentence); relation
extraction needs the entities first, so it costs one more run over the same batch; QA (question + context, in
overlapping windows) and text-pair classification run on their own encodings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import CompressorError
from compressor.runtime import decoding as D
from compressor.runtime.spec import GraphSpec

MODEL = "model.onnx"
TOKENIZER = "tokenizer.json"
TASKS = "tasks.json"
FILES = (MODEL, TOKENIZER, TASKS)
DECODERS = ("bio", "classification", "relation", "qa_span", None)
BATCH_SIZE = 32


class BundleError(CompressorError):
    """A bundle is missing files or inconsistent, or a prediction request is invalid."""


class Bundle:
    """A loaded edge bundle. Build it with :meth:`load`."""

    def __init__(self, directory: Path, spec: GraphSpec, tokenizer: Any, session: Any):
        self.directory = directory
        self.spec = spec
        self.tokenizer = tokenizer
        self.session = session
        self.pad_id = int(spec.metadata.get("pad_id", 0))

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path | str, threads: int | None = None) -> Bundle:
        """Open and validate a bundle directory.

        Raises:
            BundleError: a file is missing or unreadable, ``tasks.json`` is malformed or names outputs/inputs the
                graph does not have, or a task's decoder is unknown.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"{directory}: bundle directory does not exist")
        for name in FILES:
            if not (directory / name).is_file():
                raise BundleError(f"{directory}: missing {name} (a bundle holds {', '.join(FILES)})")
        spec = _read_spec(directory / TASKS)
        tokenizer = _read_tokenizer(directory / TOKENIZER)
        session = _open_session(directory / MODEL, threads)
        _check_graph(directory, spec, session)
        return cls(directory, spec, tokenizer, session)

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.tasks)

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    # ---- prediction ---------------------------------------------------------------------------------------
    def predict(self, texts: str | Sequence[str], tasks: Sequence[str] | None = None, *,
                questions: str | Sequence[str] | None = None,
                text_pairs: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Decoded predictions of every requested task for every text.

        Args:
            texts: one text or a list; for QA these are the contexts.
            tasks: task names (default: every task of the bundle).
            questions: QA questions, one per text (or one for all).
            text_pairs: second texts of text-pair classification, one per text (or one for all).

        Returns:
            One ``{"text", "truncated", "predictions": {task: prediction}}`` per text. Predictions by decoder:
            ``bio`` -> ``{"entities": [{"text", "type", "start", "end"}]}``; ``classification`` -> ``{"label",
            "score", "scores"}``; ``relation`` -> ``{"entities", "relations": [{"head", "tail", "type",
            "score"}]}``; ``qa_span`` -> ``{"answer", "start", "end", "score"}``; no decoder -> raw outputs.
            Each carries ``"truncated"``: the input did not fit ``max_length`` and its end was cut off.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise BundleError("nothing to predict: no text given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise BundleError(f"text {i}: expected a string, got {type(t).__name__}")
            if not t.strip():
                raise BundleError(f"text {i}: empty text")
        wanted = list(tasks) if tasks else self.tasks
        unknown = [t for t in wanted if t not in self.spec.tasks]
        if unknown:
            raise BundleError(f"this bundle does not serve task(s) {', '.join(repr(t) for t in unknown)}; "
                              f"it serves: {', '.join(self.tasks)}")
        results: list[dict[str, Any]] = [{"text": t, "truncated": False, "predictions": {}} for t in texts]

        single = [t for t in wanted if self._kind(t) == "single"]
        if single:
            self._predict_single(texts, single, results)
        for t in (t for t in wanted if self._kind(t) == "pair"):
            pairs = _broadcast(text_pairs, len(texts), f"task '{t}' classifies text pairs: give text_pairs")
            self._predict_pair(texts, pairs, t, results)
        for t in (t for t in wanted if self._kind(t) == "qa"):
            qs = _broadcast(questions, len(texts), f"task '{t}' answers questions: give questions")
            self._predict_qa(texts, qs, t, results)
        for r in results:
            r["truncated"] = any(p.get("truncated", False) for p in r["predictions"].values())
        return results

    def _kind(self, task: str) -> str:
        decoder = self.spec.tasks[task].decoder
        if decoder.get("decoder") == "qa_span":
            return "qa"
        if decoder.get("decoder") == "classification" and decoder.get("text_pair"):
            return "pair"
        return "single"

    # ---- single texts: bio, classification, relation, raw -------------------------------------------------
    def _predict_single(self, texts: list[str], tasks: list[str], results: list[dict[str, Any]]) -> None:
        entity_tasks = {self.spec.tasks[t].decoder["entity_task"] for t in tasks
                        if self.spec.tasks[t].decoder.get("decoder") == "relation"}
        first = [t for t in self.spec.tasks if t in tasks or t in entity_tasks]
        first = [t for t in first if self.spec.tasks[t].decoder.get("decoder") != "relation"]
        for lo in range(0, len(texts), BATCH_SIZE):
            chunk = texts[lo : lo + BATCH_SIZE]
            encs = self._encode(chunk)
            batch = self._pad(encs)
            outs = self._run(first, batch)
            entities: dict[str, list[list[D.Span]]] = {}
            for i, enc in enumerate(encs):
                res = results[lo + i]
                truncated = bool(enc.overflowing)
                for t in first:
                    spans = None
                    pred = self._decode_single(t, outs[t], i, enc, chunk[i])
                    if self.spec.tasks[t].decoder.get("decoder") == "bio":
                        spans = pred.pop("_spans")
                        entities.setdefault(t, []).append(spans)
                    if t in tasks:
                        res["predictions"][t] = {**pred, "truncated": truncated}
            for t in (t for t in tasks if self.spec.tasks[t].decoder.get("decoder") == "relation"):
                self._predict_relation(t, chunk, encs, batch, entities, results[lo : lo + len(chunk)])

    def _decode_single(self, task: str, outputs: Mapping[str, np.ndarray], i: int, enc: Any, text: str) -> dict:
        graph = self.spec.tasks[task]
        decoder = graph.decoder.get("decoder")
        if decoder == "bio":
            logits = outputs[_first(graph.outputs)][i]
            word_ids = list(enc.word_ids)
            num_words = max((w for w in word_ids if w is not None), default=-1) + 1
            spans = D.bio_decode(logits, word_ids, num_words, graph.decoder["tags"])
            chars = _word_chars(enc)
            return {"entities": [_entity(s, chars, text) for s in spans], "_spans": spans}
        if decoder == "classification":
            return _classification(outputs[_first(graph.outputs)][i], graph.decoder.get("labels") or graph.labels)
        return {name: outputs[name][i].tolist() for name in graph.outputs}

    def _predict_relation(self, task: str, texts: list[str], encs: list[Any], batch: dict[str, np.ndarray],
                          entities: dict[str, list[list[D.Span]]], results: list[dict[str, Any]]) -> None:
        graph = self.spec.tasks[task]
        dec = graph.decoder
        ents_all = entities[dec["entity_task"]]
        allowed = dec.get("type_constraints")
        classes = dec.get("classes") or [dec.get("no_relation", D.NO_RELATION), *graph.labels]
        no_rel = dec.get("no_relation", D.NO_RELATION)
        cands = [D.relation_candidates(ents, list(enc.word_ids), allowed, dec.get("max_pairs"))
                 for ents, enc in zip(ents_all, encs)]
        width = max(1, max(len(p) for p, _ in cands))
        spans = np.zeros((len(encs), width, 4), dtype=np.int64)
        for i, (_, s) in enumerate(cands):
            spans[i, : len(s)] = s
        extra = graph.extra_inputs[0].name if graph.extra_inputs else "re_spans"
        logits = self._run([task], {**batch, extra: spans})[task][_first(graph.outputs)]
        for i, (enc, text, ents, (pairs, _)) in enumerate(zip(encs, texts, ents_all, cands)):
            chars = _word_chars(enc)
            rels = D.relation_decode(logits[i], pairs, ents, classes, allowed, no_rel)
            probs = D.softmax(np.asarray(logits[i][: len(pairs)], dtype=np.float64), axis=-1)
            row_of = {(int(ents[h][0]), int(ents[h][1]), int(ents[t][0]), int(ents[t][1])): r
                      for r, (h, t) in enumerate(pairs)}
            by_span = {(s[0], s[1]): s for s in ents}
            out = []
            for hs, he, ts, te, rel in rels:
                row = row_of[(hs, he, ts, te)]
                out.append({"head": _entity(by_span[(hs, he)], chars, text),
                            "tail": _entity(by_span[(ts, te)], chars, text),
                            "type": rel, "score": float(probs[row, classes.index(rel)])})
            results[i]["predictions"][task] = {"entities": [_entity(s, chars, text) for s in ents],
                                               "relations": out, "truncated": bool(enc.overflowing)}

    # ---- text pairs -----------------------------------------------------------------------------------------
    def _predict_pair(self, texts: list[str], pairs: list[str], task: str, results: list[dict[str, Any]]) -> None:
        graph = self.spec.tasks[task]
        for i, p in enumerate(pairs):
            if not p.strip():
                raise BundleError(f"text pair {i}: empty text")
        for lo in range(0, len(texts), BATCH_SIZE):
            encs = self._encode(texts[lo : lo + BATCH_SIZE], pairs[lo : lo + BATCH_SIZE])
            logits = self._run([task], self._pad(encs))[task][_first(graph.outputs)]
            for i, enc in enumerate(encs):
                pred = _classification(logits[i], graph.decoder.get("labels") or graph.labels)
                results[lo + i]["predictions"][task] = {**pred, "truncated": bool(enc.overflowing)}

    # ---- question answering ---------------------------------------------------------------------------------
    def _predict_qa(self, contexts: list[str], questions: list[str], task: str, results: list[dict[str, Any]]) -> None:
        graph = self.spec.tasks[task]
        dec = graph.decoder
        for i, q in enumerate(questions):
            if not q.strip():
                raise BundleError(f"question {i}: empty question")
        max_length = int(dec.get("max_length") or self.max_length)
        stride = int(dec.get("doc_stride") or max(1, max_length // 2))
        special = self.tokenizer.post_processor.num_special_tokens_to_add(True) if self.tokenizer.post_processor else 0
        budget = min(int(dec.get("max_query_length", 64)), max_length - special - stride - 1)
        if budget < 1:
            raise BundleError(f"task '{task}': max_length {max_length} leaves no room for a question next to "
                              f"doc_stride {stride}")
        windows: list[tuple[int, Any]] = []  # (question index, window encoding)
        cut: list[bool] = []
        tok = self.tokenizer
        for qi, (question, context) in enumerate(zip(questions, contexts)):
            fitted = _fit_question(tok, question, budget)
            cut.append(fitted != question)
            tok.enable_truncation(max_length, stride=stride, strategy="only_second")
            try:
                enc = tok.encode(fitted, context)
            finally:
                tok.no_truncation()
            windows += [(qi, w) for w in [enc, *enc.overflowing]]
        candidates: dict[int, list[D.QaCandidate]] = {i: [] for i in range(len(contexts))}
        starts, ends = graph.outputs.get("start_logits"), graph.outputs.get("end_logits")
        if starts is None or ends is None:
            raise BundleError(f"task '{task}': a qa_span decoder needs outputs start_logits and end_logits")
        for lo in range(0, len(windows), BATCH_SIZE):
            part = windows[lo : lo + BATCH_SIZE]
            out = self._run([task], self._pad([w for _, w in part]))[task]
            for i, (qi, w) in enumerate(part):
                offsets = [tuple(o) if s == 1 else None for o, s in zip(w.offsets, w.sequence_ids)]
                candidates[qi] += D.qa_span_candidates(out["start_logits"][i], out["end_logits"][i], offsets,
                                                       int(dec.get("max_answer_length", 30)),
                                                       int(dec.get("n_best", 20)))
        for qi, context in enumerate(contexts):
            best = D.qa_best_answer(candidates[qi], context)
            results[qi]["predictions"][task] = {"answer": best["text"], "start": best["start"], "end": best["end"],
                                                "score": best["score"], "question": questions[qi],
                                                "truncated": cut[qi]}

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Any]:
        tok = self.tokenizer
        tok.enable_truncation(self.max_length)  # longest_first, like the plugins' truncation=True
        try:
            if pairs is None:
                return tok.encode_batch(list(texts))
            return tok.encode_batch(list(zip(texts, pairs)))
        finally:
            tok.no_truncation()

    def _pad(self, encs: Sequence[Any]) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = e.attention_mask
            types[i, :n] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _run(self, tasks: Sequence[str], batch: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """One ``session.run`` fetching every output of ``tasks``: {task: {output name: array}}."""
        from compressor.runtime.session import build_feeds

        fetch = [(t, name, g) for t in tasks for name, g in self.spec.tasks[t].outputs.items()]
        values = self.session.run([g for _, _, g in fetch], build_feeds(self.spec, batch, tasks))
        out: dict[str, dict[str, np.ndarray]] = {t: {} for t in tasks}
        for (t, name, _), v in zip(fetch, values):
            out[t][name] = v
        return out


# ---- helpers ----------------------------------------------------------------------------------------------------
def _read_spec(path: Path) -> GraphSpec:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    try:
        spec = GraphSpec.from_json(data, str(path))
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    for name, task in spec.tasks.items():
        decoder = task.decoder.get("decoder")
        if decoder not in DECODERS:
            raise BundleError(f"{path}: task '{name}' has decoder {decoder!r}; this runtime knows "
                              f"{', '.join(str(d) for d in DECODERS)}")
        if decoder == "relation":
            entity = task.decoder.get("entity_task")
            if entity not in spec.tasks or spec.tasks[entity].decoder.get("decoder") != "bio":
                raise BundleError(f"{path}: task '{name}' decodes relations over entity task {entity!r}, which "
                                  "is not a bio task of this bundle")
        if decoder == "bio" and not task.decoder.get("tags"):
            raise BundleError(f"{path}: task '{name}': a bio decoder needs 'tags'")
    return spec


def _read_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise BundleError(f"{path}: not a Hugging Face tokenizers file: {exc}") from exc
    tok.no_padding()
    tok.no_truncation()
    return tok


def _open_session(path: Path, threads: int | None) -> Any:
    from compressor.runtime.session import make_session

    try:
        return make_session(path, threads)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: not a loadable ONNX model: {first}") from exc


def _check_graph(directory: Path, spec: GraphSpec, session: Any) -> None:
    outputs = {o.name for o in session.get_outputs()}
    inputs = {i.name for i in session.get_inputs()}
    missing = [n for n in spec.output_names if n not in outputs]
    if missing:
        raise BundleError(f"{directory / TASKS}: output(s) {', '.join(missing)} are not outputs of {MODEL} "
                          f"(it has {', '.join(sorted(outputs))})")
    want = set(spec.input_names)
    if want != inputs:
        raise BundleError(f"{directory / TASKS}: inputs {sorted(want)} do not match the inputs of {MODEL} "
                          f"{sorted(inputs)}")


def _broadcast(values: str | Sequence[str] | None, n: int, missing: str) -> list[str]:
    if values is None:
        raise BundleError(missing)
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise BundleError(f"{len(values)} second inputs for {n} texts (give one, or one per text)")
    return values


def _first(outputs: Mapping[str, str]) -> str:
    return next(iter(outputs))


def _word_chars(enc: Any) -> dict[int, tuple[int, int]]:
    """Word index -> character span ``(start, end)`` in the text, from its sub-tokens' offsets."""
    chars: dict[int, tuple[int, int]] = {}
    for w, (s, e), seq in zip(enc.word_ids, enc.offsets, enc.sequence_ids):
        if w is None or seq != 0:
            continue
        chars[w] = (min(s, chars[w][0]), max(e, chars[w][1])) if w in chars else (s, e)
    return chars


def _entity(span: Sequence, chars: Mapping[int, tuple[int, int]], text: str) -> dict[str, Any]:
    start, end = chars[int(span[0])][0], chars[int(span[1]) - 1][1]
    return {"text": text[start:end], "type": span[2], "start": start, "end": end}


def _classification(logits: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    probs = D.softmax(np.asarray(logits, dtype=np.float64)[None], axis=-1)[0]
    (label, score), = D.classify(np.asarray(logits)[None], labels)
    return {"label": label, "score": score, "scores": {lab: float(p) for lab, p in zip(labels, probs)}}


def _fit_question(tok: Any, question: str, budget: int) -> str:
    """``question`` cut at a token boundary to at most ``budget`` tokens (as the QA plugin does)."""
    offsets = tok.encode(question, add_special_tokens=False).offsets
    while len(offsets) > budget:
        question = question[: offsets[budget - 1][1]]
        offsets = tok.encode(question, add_special_tokens=False).offsets
    return question
