"""Load an edge bundle and predict with it: ONNX Runtime + ``tokenizers`` + numpy, no torch.

A bundle directory holds ``model.onnx`` (one graph for every task), ``tokenizer.json`` (a Hugging Face fast
tokenizer) and ``tasks.json`` (the graph contract, :class:`compressor.runtime.spec.GraphSpec`, with each task's
decoder settings: the plugin's ``export_spec()``, whose ``"decoder"`` names a decoder of the registry in
:mod:`compressor.runtime.decoders`). Each task is decoded by the decoder its plugin registered (entry-point group
``compressor.decoders``), with the numpy functions of :mod:`compressor.runtime.decoding` that the plugins use on
PyTorch outputs, so both give the same predictions for the same logits.

Texts are split into words by the bundle's word splitter (``metadata.word_splitter``, :mod:`compressor.runtime.words`:
by default the tokenizer's pre-tokenisation, whitespace and punctuation for BERT), then tokenised the way the
plugins tokenise words, so entities come back as character spans of whole words. Tasks whose
decoders read the same input share one ``session.run`` (NER, classification over a sentence); a decoder that
builds on another task's predictions (relation extraction over the entities) costs one more run over the same
texts; QA (question + context, in overlapping windows) and text-pair classification run on their own encodings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import RegistryError
from compressor.runtime._bundle_io import (
    FILES,
    MODEL,
    TASKS,
    TOKENIZER,
    check_classes,
    check_graph,
    check_max_length,
    open_session,
    read_spec,
    read_tokenizer,
    check_vocabulary,
    vocabulary_digest,
)
from compressor.runtime.decoders import DECODERS, BundleError, Decoder, get_decoder
from compressor.runtime.spec import GraphSpec
from compressor.runtime.words import DEFAULT as DEFAULT_SPLITTER
from compressor.runtime.words import check_splitter, encode_words

BATCH_SIZE = 32

__all__ = ["Bundle", "BundleError", "vocabulary_digest"]


class Bundle:
    """A loaded edge bundle. Build it with :meth:`load`."""

    batch_size = BATCH_SIZE

    def __init__(self, directory: Path, spec: GraphSpec, tokenizer: Any, session: Any,
                 decoders: Mapping[str, Decoder] | None = None):
        self.directory = directory
        self.spec = spec
        self.tokenizer = tokenizer
        self.session = session
        self.pad_id = int(spec.metadata.get("pad_id", 0))
        self.word_splitter: str = spec.metadata.get("word_splitter") or DEFAULT_SPLITTER
        self.decoders: dict[str, Decoder] = dict(decoders) if decoders is not None else \
            make_decoders(spec, Path(directory) / TASKS)

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
        spec = read_spec(directory / TASKS)
        try:
            check_splitter(spec.metadata.get("word_splitter") or DEFAULT_SPLITTER)
        except ValueError as exc:
            raise BundleError(f"{directory / TASKS}: field 'metadata.word_splitter': {exc}") from None
        decoders = make_decoders(spec, directory / TASKS)
        tokenizer = read_tokenizer(directory / TOKENIZER)
        session = open_session(directory / MODEL, threads)
        check_graph(directory, spec, session)
        check_classes(directory, spec, decoders, session)
        check_vocabulary(directory, spec, tokenizer, session)
        check_max_length(directory, spec, session)
        return cls(directory, spec, tokenizer, session, decoders)

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.tasks)

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    # ---- prediction ---------------------------------------------------------------------------------------
    def predict(self, texts: str | Sequence[str], tasks: Sequence[str] | None = None, *,
                questions: str | Sequence[str] | None = None,
                text_pairs: str | Sequence[str] | None = None, **inputs: Any) -> list[dict[str, Any]]:
        """Decoded predictions of every requested task for every text.

        Args:
            texts: one text or a list; for QA these are the contexts.
            tasks: task names (default: every task of the bundle).
            questions: QA questions, one per text (or one for all).
            text_pairs: second texts of text-pair classification, one per text (or one for all).
            inputs: further request inputs a plugin's decoder reads (e.g. ``spans`` for a span-pair decoder).

        Returns:
            One ``{"text", "truncated", "predictions": {task: prediction}}`` per text. Predictions by decoder:
            ``bio`` -> ``{"entities": [{"text", "type", "start", "end"}]}``; ``classification`` -> ``{"label",
            "score", "scores"}``; ``relation`` -> ``{"entities", "relations": [{"head", "tail", "type",
            "score"}]}``; ``qa_span`` -> ``{"answer", "start", "end", "score"}``; ``word_tags`` -> ``{"words":
            [{"text", "label", "start", "end"}], "tags"}``; a plugin's own decoder -> what it documents; no
            decoder -> raw outputs.
            Each carries ``"truncated"``: the input did not fit ``max_length`` and its end was cut off.
        """
        texts, wanted = self.check_request(texts, tasks)
        order = self._order(wanted)
        inputs = {**inputs, "questions": questions, "text_pairs": text_pairs}
        done: dict[str, list[dict[str, Any]]] = {}
        shared = [t for t in order if self.decoders[t].shared and not self.decoders[t].requires()]
        if shared:
            done.update(self._predict_shared(texts, shared))
        for t in order:
            if t not in done:
                preds = self.decoders[t].predict(self, texts, inputs, done)
                if len(preds) != len(texts):
                    raise BundleError(f"decoder {self.spec.tasks[t].decoder.get('decoder')!r} of task '{t}' returned "
                                      f"{len(preds)} predictions for {len(texts)} texts")
                done[t] = preds
        results: list[dict[str, Any]] = []
        for i, text in enumerate(texts):
            predictions = {t: {k: v for k, v in done[t][i].items() if not k.startswith("_")} for t in wanted}
            for p in predictions.values():
                p.setdefault("truncated", False)
            results.append({"text": text, "truncated": any(p["truncated"] for p in predictions.values()),
                            "predictions": predictions})
        return results

    def check_request(self, texts: str | Sequence[str], tasks: Sequence[str] | None = None
                      ) -> tuple[list[str], list[str]]:
        """(the texts as a list, the task names) of a request, checked before anything runs.

        Raises:
            BundleError: no text, a text that is not a string, empty (whitespace or control characters only) or
                not valid Unicode (undecodable bytes from a command line), or a task the bundle does not serve.
        """
        if tasks is not None and (isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks)):
            raise BundleError("tasks: expected a list of task names")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise BundleError("nothing to predict: no text given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise BundleError(f"text {i}: expected a string, got {type(t).__name__}")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates: undecodable argv bytes or a JSON "\udcxx" escape
                raise BundleError(f"text {i}: not valid UTF-8 text (an undecodable byte at character {exc.start})"
                                  ) from None
            if not any(c.isprintable() and not c.isspace() for c in t):  # control characters only count as empty
                raise BundleError(f"text {i}: empty text")
        wanted = list(tasks) if tasks else self.tasks
        unknown = [t for t in wanted if t not in self.spec.tasks]
        if unknown:
            raise BundleError(f"this bundle does not serve task(s) {', '.join(repr(t) for t in unknown)}; "
                              f"it serves: {', '.join(self.tasks)}")
        return texts, wanted

    def decoder(self, task: str) -> Decoder:
        """The decoder of ``task`` (e.g. for :meth:`Decoder.describe`)."""
        return self.decoders[task]

    def _order(self, wanted: Sequence[str]) -> list[str]:
        """``wanted`` and the tasks their decoders require, each after what it requires (in bundle order)."""
        order: list[str] = []

        def visit(task: str, path: tuple[str, ...]) -> None:
            if task in order:
                return
            if task in path:
                raise BundleError(f"{self.directory / TASKS}: decoders require each other in a cycle: "
                                  f"{' -> '.join([*path, task])}")
            for dep in self.decoders[task].requires():
                if dep not in self.decoders:
                    raise BundleError(f"{self.directory / TASKS}: task '{task}' requires task '{dep}', which this "
                                      "bundle does not have")
                visit(dep, (*path, task))
            order.append(task)

        for t in sorted(wanted, key=list(self.spec.tasks).index):
            visit(t, ())
        return order

    def _predict_shared(self, texts: list[str], tasks: list[str]) -> dict[str, list[dict[str, Any]]]:
        """One encoder pass per batch of texts for every task decoded from the plain text."""
        out: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
        for lo in range(0, len(texts), self.batch_size):
            chunk = texts[lo : lo + self.batch_size]
            encs = self.encode(chunk)
            outs = self.run(tasks, self.pad(encs))
            for t in tasks:
                preds = self.decoders[t].decode_batch(outs[t], encs, chunk)
                if len(preds) != len(chunk):
                    raise BundleError(f"decoder {self.spec.tasks[t].decoder.get('decoder')!r} of task '{t}' returned "
                                      f"{len(preds)} predictions for {len(chunk)} texts")
                out[t] += preds
        return out

    @staticmethod
    def second_inputs(values: str | Sequence[str] | None, n: int, missing: str) -> list[str]:
        """Second inputs of a request (questions, text pairs): one for all texts or one per text."""
        return _broadcast(values, n, missing)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Any]:
        tok = self.tokenizer
        tok.enable_truncation(self.max_length)  # longest_first, like the plugins' truncation=True
        try:
            if pairs is None:  # words as the bundle's word splitter cuts them (compressor.runtime.words)
                return encode_words(tok, texts, self.word_splitter)
            return tok.encode_batch(list(zip(texts, pairs)))
        finally:
            tok.no_truncation()

    def pad(self, encs: Sequence[Any]) -> dict[str, np.ndarray]:
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

    def run(self, tasks: Sequence[str], batch: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """One ``session.run`` fetching every output of ``tasks``: {task: {output name: array}}."""
        from compressor.runtime.session import build_feeds

        fetch = [(t, name, g) for t in tasks for name, g in self.spec.tasks[t].outputs.items()]
        values = self.session.run([g for _, _, g in fetch], build_feeds(self.spec, batch, tasks))
        out: dict[str, dict[str, np.ndarray]] = {t: {} for t in tasks}
        for (t, name, _), v in zip(fetch, values):
            out[t][name] = v
        return out


# ---- helpers ----------------------------------------------------------------------------------------------------
def _broadcast(values: str | Sequence[str] | None, n: int, missing: str) -> list[str]:
    if values is None:
        raise BundleError(missing)
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise BundleError(f"{len(values)} second inputs for {n} texts (give one, or one per text)")
    return values


def make_decoders(spec: GraphSpec, path: Path) -> dict[str, Decoder]:
    """One decoder per task of ``spec`` from the registry; ``path`` (the bundle's tasks.json) names errors.

    Raises:
        BundleError: a task names a decoder no installed plugin registers (with a did-you-mean), or the
            decoder rejects the task's settings.
    """
    decoders: dict[str, Decoder] = {}
    for name, task in spec.tasks.items():
        decoder = task.decoder.get("decoder")
        if decoder is not None and not isinstance(decoder, str):
            raise BundleError(f"{path}: task '{name}': field 'decoder' must be a decoder name or null, got {decoder!r}")
        try:
            cls = get_decoder(decoder)
        except RegistryError as exc:
            if decoder in DECODERS:  # registered but broken (cannot load, not a Decoder)
                raise BundleError(f"{path}: task '{name}': {exc}") from None
            import difflib

            close = difflib.get_close_matches(decoder, DECODERS.names(), n=1)
            hint = (f"did you mean '{close[0]}'?" if close else
                    f"known: {', '.join(DECODERS.names()) or 'none'}")
            raise BundleError(f"{path}: task '{name}' uses unknown decoder '{decoder}' ({hint}); install the plugin "
                              "that registers it in the 'compressor.decoders' entry-point group") from None
        try:
            decoders[name] = cls(name, task, spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}: task '{name}' (decoder {decoder!r}): {exc}") from None
    return decoders
