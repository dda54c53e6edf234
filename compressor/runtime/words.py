"""How raw text becomes words for token tasks (NER, word tags, relations) at predict time: the word splitter.

Training data comes split into words (CoNLL columns, token lists); a text given to ``predict`` does not. The
splitter decides what a word is, and so which character spans entities and word tags can have. A bundle stores
it in ``tasks.json`` (``metadata.word_splitter``, set by the bundle stage's ``word_splitter`` field) and the
torch-free runtime and the PyTorch side (:func:`split_words`, then the plugins' ``is_split_into_words``
encoding, as in training) use this one function, so both see the same words.

Splitters:

* ``punct`` (default): the tokenizer's own pre-tokenisation; for BERT whitespace *and* every punctuation mark,
  so ``didn't`` is three words ``didn ' t`` (how CoNLL data is usually split).
* ``whitespace``: runs of non-space characters, so ``didn't`` and ``U.S.`` are one word each.
* ``regex:<pattern>``: each non-empty match of the Python regular expression is a word, e.g.
  ``regex:\\w+(?:'\\w+)?|[^\\w\\s]`` keeps ``didn't`` whole but splits off other punctuation.

Torch-free: the standard library and ``tokenizers`` only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT = "punct"
NAMED = ("punct", "whitespace")
REGEX_PREFIX = "regex:"


def check_splitter(value: Any) -> str:
    """``value`` when it names a splitter; else a ``ValueError`` saying what is expected."""
    if not isinstance(value, str):
        raise ValueError(f"word splitter must be a string, got {value!r}"[:120])
    if value in NAMED:
        return value
    if value.startswith(REGEX_PREFIX):
        pattern = value[len(REGEX_PREFIX):]
        if not pattern:
            raise ValueError("word splitter 'regex:' needs a pattern after the colon")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"word splitter {value[:60]!r}: invalid regular expression ({exc})") from None
        if compiled.fullmatch(""):
            raise ValueError(f"word splitter {value[:60]!r}: the pattern matches the empty string")
        return value
    raise ValueError(f"unknown word splitter {value[:60]!r} (expected punct, whitespace or regex:<pattern>)")


def split_words(text: str, splitter: str, tokenizer: Any = None) -> list[tuple[int, int]]:
    """The words of ``text`` as character spans ``(start, end)``, in order. ``punct`` needs ``tokenizer`` (a
    ``tokenizers.Tokenizer`` without truncation, e.g. :func:`plain_tokenizer`)."""
    check_splitter(splitter)
    if splitter == "punct":
        if tokenizer is None:
            raise ValueError("word splitter 'punct' uses the tokenizer's pre-tokenisation: give the tokenizer")
        enc = tokenizer.encode(text, add_special_tokens=False)
        spans: dict[int, tuple[int, int]] = {}
        for w, (s, e) in zip(enc.word_ids, enc.offsets):
            if w is not None:
                spans[w] = (min(s, spans[w][0]), max(e, spans[w][1])) if w in spans else (s, e)
        return [spans[w] for w in sorted(spans)]
    pattern = r"\S+" if splitter == "whitespace" else splitter[len(REGEX_PREFIX):]
    return [m.span() for m in re.finditer(pattern, text) if m.end() > m.start() and text[m.start():m.end()].strip()]


def plain_tokenizer(hf_tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` copy of a Hugging Face fast tokenizer, without padding or truncation (what a
    bundle's ``tokenizer.json`` loads as)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


@dataclass(frozen=True)
class WordEncoding:
    """An encoding of pre-split words with offsets into the whole text (``tokenizers`` gives them per word):
    the attributes the decoders read of a ``tokenizers.Encoding``."""

    ids: list[int]
    attention_mask: list[int]
    type_ids: list[int]
    word_ids: list[int | None]
    sequence_ids: list[int | None]
    offsets: list[tuple[int, int]]
    tokens: list[str]
    overflowing: list[Any]


def encode_words(tokenizer: Any, texts: Sequence[str], splitter: str) -> list[Any]:
    """Encode ``texts`` word by word as ``splitter`` splits them (``tokenizer`` as the bundle set it up, with its
    truncation). ``punct`` encodes the raw text: the tokenizer's own words, the same spans."""
    if splitter == "punct":
        return tokenizer.encode_batch(list(texts))
    words = [split_words(t, splitter) for t in texts]
    encs = tokenizer.encode_batch([[t[s:e] for s, e in w] or [""] for t, w in zip(texts, words)],
                                  is_pretokenized=True)
    out = []
    for enc, spans in zip(encs, words):
        offsets = [(spans[w][0] + s, spans[w][0] + e) if w is not None and seq == 0 and spans else (0, 0)
                   for w, (s, e), seq in zip(enc.word_ids, enc.offsets, enc.sequence_ids)]
        out.append(WordEncoding(list(enc.ids), list(enc.attention_mask), list(enc.type_ids), list(enc.word_ids),
                                list(enc.sequence_ids), offsets, list(enc.tokens), list(enc.overflowing)))
    return out
