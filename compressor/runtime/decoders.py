"""Torch-free decoders of a bundle's graph outputs, and their registry (entry-point group ``compressor.decoders``).

A task plugin tells the runtime how to decode its outputs through ``export_spec()``, whose ``"decoder"`` key names
a decoder registered here (the bundle's ``tasks.json`` stores that dict for each task). A decoder is a subclass of
:class:`Decoder`; a plugin package registers it the way it registers its task::

    [project.entry-points."compressor.decoders"]
    pos_tags = "my_pos_plugin.decoder:PosDecoder"

The built-in decoders live with their plugins and register through the same group: ``bio``
(``compressor_plugins.ner.decoder``), ``classification``, ``relation`` and ``qa_span``. :class:`WordTagDecoder`
(``word_tags``: each word's label read at its first sub-token) serves any token-classification plugin.

Only numpy, ``tokenizers`` (the encodings handed to a decoder) and the standard library may be imported by a
decoder module: the runtime must run without torch.

How the runtime calls a decoder (see :class:`compressor.runtime.Bundle`):

* ``shared = True`` (the default): the texts are tokenised once, one ``session.run`` fetches the outputs of every
  shared task, and :meth:`Decoder.decode_batch` turns each task's batch of outputs into one prediction per text.
* otherwise :meth:`Decoder.predict` does its own encoding and runs (question + context windows, text pairs, or
  a second pass over tasks named in :meth:`Decoder.requires`, whose predictions it receives).

A prediction is a JSON-able dict; keys starting with ``_`` are private (passed to dependent decoders, removed
before the runtime returns), and ``"truncated"`` says the input did not fit ``max_length``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from compressor.errors import CompressorError, RegistryError
from compressor.registry import Registry
from compressor.runtime.decoding import first_subtoken_word_tags, softmax

if TYPE_CHECKING:
    from compressor.runtime.spec import GraphSpec, TaskGraph


class Bundle(Protocol):
    """What a decoder's ``predict`` may use of the bundle it serves (:class:`compressor.runtime.Bundle` is one)."""

    batch_size: int
    tokenizer: Any

    @property
    def max_length(self) -> int: ...

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Any]: ...

    def pad(self, encs: Sequence[Any]) -> dict[str, np.ndarray]: ...

    def run(self, tasks: Sequence[str], batch: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]: ...

    @staticmethod
    def second_inputs(values: str | Sequence[str] | None, n: int, missing: str) -> list[str]: ...


class BundleError(CompressorError):
    """A bundle is missing files or inconsistent, or a prediction request is invalid."""


class Decoder:
    """Base class of a torch-free decoder of one task's outputs.

    An instance is made per task when a bundle loads: ``task`` (its name), ``graph`` (its
    :class:`~compressor.runtime.spec.TaskGraph`: outputs, labels, extra inputs), ``settings`` (the plugin's
    ``export_spec()``) and ``spec`` (the whole graph contract). :meth:`check` runs then, so a bundle with bad
    settings fails at load, not at the first prediction.
    """

    #: Decoded from the shared pass over the tokenised texts (:meth:`decode_batch`); False: :meth:`predict`.
    shared: ClassVar[bool] = True
    #: Predictions carry ``"_spans"``: word spans ``(start, end_exclusive, type)`` other decoders can build on.
    produces_spans: ClassVar[bool] = False

    def __init__(self, task: str, graph: TaskGraph, spec: GraphSpec):
        self.task = task
        self.graph = graph
        self.spec = spec
        self.settings: dict[str, Any] = dict(graph.decoder)
        self.check()

    # ---- what a decoder implements ------------------------------------------------------------------------
    def check(self) -> None:
        """Validate ``settings`` against the graph; raise ``ValueError`` with what is wrong (default: nothing)."""

    def output_classes(self) -> tuple[str, int] | None:
        """``(output name, classes)``: the output whose last axis must have one entry per class this decoder
        names (checked against the graph when the bundle loads); None: nothing to check (default)."""
        return None

    def requires(self) -> list[str]:
        """Tasks whose predictions :meth:`predict` needs (decoded first, passed in ``done``)."""
        return []

    def decode_batch(self, outputs: Mapping[str, np.ndarray], encodings: Sequence[Any],
                     texts: Sequence[str]) -> list[dict[str, Any]]:
        """One prediction per text from this task's outputs over the batch (``{output name: [batch, ...]}``).

        ``encodings`` are the ``tokenizers.Encoding`` of each text (word ids, character offsets, ``overflowing``
        when it was truncated); rows of ``outputs`` past an encoding's length are padding.
        """
        raise NotImplementedError(f"decoder of task '{self.task}' implements neither decode_batch nor predict")

    def predict(self, bundle: Bundle, texts: Sequence[str], inputs: Mapping[str, Any],
                done: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """One prediction per text. ``inputs`` holds the second inputs of the request (``questions``,
        ``text_pairs``); ``done`` the predictions of the tasks named by :meth:`requires`.

        Default: tokenise the texts, run this task's outputs and :meth:`decode_batch`, batch by batch.
        """
        out: list[dict[str, Any]] = []
        for lo in range(0, len(texts), bundle.batch_size):
            chunk = list(texts[lo : lo + bundle.batch_size])
            encs = bundle.encode(chunk)
            outputs = bundle.run([self.task], bundle.pad(encs))[self.task]
            out += self.decode_batch(outputs, encs, chunk)
        return out

    def describe(self, prediction: Mapping[str, Any]) -> str:
        """One line for ``compressor predict``'s text output."""
        return json.dumps({k: v for k, v in prediction.items() if k != "truncated" and not k.startswith("_")},
                          ensure_ascii=False)

    # ---- helpers ------------------------------------------------------------------------------------------
    def output(self, outputs: Mapping[str, np.ndarray], name: str | None = None) -> np.ndarray:
        """The task's output ``name`` (default: its first output)."""
        return outputs[name or next(iter(self.graph.outputs))]

    def labels(self, key: str = "labels") -> list[str]:
        """``settings[key]``, or the task's labels."""
        return list(self.settings.get(key) or self.graph.labels)


class RawDecoder(Decoder):
    """``{"decoder": None}``: every output of the task for the text, as nested lists (padding included)."""

    def decode_batch(self, outputs, encodings, texts):
        return [{**{name: np.asarray(outputs[name][i]).tolist() for name in self.graph.outputs},
                 "truncated": bool(enc.overflowing)} for i, enc in enumerate(encodings)]


# ---- helpers shared by token decoders ----------------------------------------------------------------------
def word_chars(enc: Any) -> dict[int, tuple[int, int]]:
    """Word index -> character span ``(start, end)`` in the (first) text, from its sub-tokens' offsets."""
    chars: dict[int, tuple[int, int]] = {}
    for w, (s, e), seq in zip(enc.word_ids, enc.offsets, enc.sequence_ids):
        if w is None or seq != 0:
            continue
        chars[w] = (min(s, chars[w][0]), max(e, chars[w][1])) if w in chars else (s, e)
    return chars


def num_words(enc: Any) -> int:
    """Words of the first text that kept at least one sub-token (after truncation)."""
    return max((w for w, s in zip(enc.word_ids, enc.sequence_ids) if w is not None and s == 0), default=-1) + 1


def span_entity(span: Sequence, chars: Mapping[int, tuple[int, int]], text: str) -> dict[str, Any]:
    """A word span ``(start_word, end_word_exclusive, type)`` as ``{"text", "type", "start", "end"}`` (chars)."""
    start, end = chars[int(span[0])][0], chars[int(span[1]) - 1][1]
    return {"text": text[start:end], "type": span[2], "start": start, "end": end}


def classification(logits: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """``{"label", "score", "scores"}`` of one row of logits (argmax; first label wins ties)."""
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    best = int(probs.argmax())
    return {"label": labels[best], "score": float(probs[best]),
            "scores": {lab: float(p) for lab, p in zip(labels, probs)}}


class WordTagDecoder(Decoder):
    """``word_tags``: a label per word, read at the word's first sub-token (argmax over the last axis).

    Settings: ``{"decoder": "word_tags", "labels": [...]}`` (class index -> label; default the task's labels) and
    optionally ``"output"`` (which output holds the ``[batch, sequence, labels]`` logits; default the first).
    Prediction: ``{"words": [{"text", "label", "start", "end"}], "tags": [label per word]}``; words cut off by
    truncation are not listed. Any token-classification plugin can name this decoder in its ``export_spec``.
    """

    def check(self) -> None:
        if not self.labels():
            raise ValueError("a word_tags decoder needs 'labels' (class index -> label)")
        out = self.settings.get("output")
        if out is not None and out not in self.graph.outputs:
            raise ValueError(f"output {out!r} is not an output of the task ({', '.join(self.graph.outputs)})")

    def output_classes(self):
        return self.settings.get("output") or next(iter(self.graph.outputs)), len(self.labels())

    def decode_batch(self, outputs, encodings, texts):
        labels = self.labels()
        tag_ids = np.asarray(self.output(outputs, self.settings.get("output"))).argmax(axis=-1)
        preds = []
        for i, (enc, text) in enumerate(zip(encodings, texts)):
            word_ids = [w if s == 0 else None for w, s in zip(enc.word_ids, enc.sequence_ids)]
            n = num_words(enc)
            tags = first_subtoken_word_tags(tag_ids[i], word_ids, n, labels)
            chars = word_chars(enc)
            words = [{"text": text[chars[w][0]:chars[w][1]], "label": tags[w], "start": chars[w][0],
                      "end": chars[w][1]} for w in range(n) if w in chars]
            preds.append({"words": words, "tags": [w["label"] for w in words], "truncated": bool(enc.overflowing)})
        return preds

    def describe(self, prediction):
        return " ".join(f"{w['text']}/{w['label']}" for w in prediction["words"]) or "no word"


# ---- the registry ------------------------------------------------------------------------------------------
def validate_decoder(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise RegistryError(f"decoder '{name}': {cls!r} is not a subclass of compressor.runtime.decoders.Decoder")
    if cls.shared and cls.decode_batch is Decoder.decode_batch:
        raise RegistryError(f"decoder '{name}': a shared decoder must implement decode_batch")
    if not cls.shared and cls.predict is Decoder.predict and cls.decode_batch is Decoder.decode_batch:
        raise RegistryError(f"decoder '{name}': implement predict (or decode_batch)")


DECODERS: Registry[type[Decoder]] = Registry("decoder", validate=validate_decoder, group="compressor.decoders")


def register_decoder(name: str):
    """Decorator registering a decoder at run time (tests, notebooks); packages use the entry-point group."""

    def deco(cls: type[Decoder]) -> type[Decoder]:
        DECODERS.register(name, cls)
        return cls

    return deco


def get_decoder(name: str | None) -> type[Decoder]:
    """The decoder class registered as ``name`` (``None``: :class:`RawDecoder`). Raises ``RegistryError``."""
    return RawDecoder if name is None else DECODERS.get(name)
