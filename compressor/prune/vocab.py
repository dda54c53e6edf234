"""Vocabulary pruning: keep the tokens a model's tasks use, shrink the word embeddings, rebuild the tokenizer.

WordPiece tokenises each pre-token greedily, longest match first. Removing vocabulary entries therefore never
changes the pieces of a word whose pieces are all kept (a longer match in the smaller vocabulary would have
been a longer match in the original one too); a word with a removed piece is split differently or becomes
``[UNK]``. That makes ``new_tokenizer(text) == remap(old_tokenizer(text))`` for text made of kept pieces, and it
lets us count exactly how much held-out text changes (:func:`changed_tokens`).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import RecipeError


def backend_json(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizers`` JSON of a fast tokenizer; ``RecipeError`` unless its model is WordPiece."""
    if not getattr(tokenizer, "is_fast", False):
        raise RecipeError("vocabulary pruning needs a fast tokenizer")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = data.get("model", {}).get("type")
    if kind != "WordPiece":
        raise RecipeError(f"vocabulary pruning supports WordPiece tokenizers (BERT family); this one is {kind}")
    return data


@dataclass
class VocabCandidates:
    """Every token a pruned vocabulary may keep, ranked, with the ones it must keep.

    ``required`` (special tokens, single characters, ``extra_tokens``) is in every vocabulary; ``ranked`` holds the
    other candidates, most useful first: a token's score is its mean share of the occurrences over the sources
    (each task's training text, the corpus files, the English word list weighted by word frequency), so a small
    task's words rank beside a large task's. Tokens no source uses are never candidates.
    """

    required: list[int]
    ranked: list[int]
    sources: dict[str, int]  # tokens each source contributed (sources overlap)
    scores: dict[int, float] = field(default_factory=dict)

    @property
    def max_size(self) -> int:
        return len(self.required) + len(self.ranked)

    def kept(self, size: int | None = None) -> list[int]:
        """Old ids of a vocabulary of ``size`` tokens (``None`` or more than :attr:`max_size`: every candidate)."""
        size = self.max_size if size is None else min(size, self.max_size)
        if size < len(self.required):
            raise RecipeError(f"sizes: {size:,} is smaller than the {len(self.required):,} tokens every pruned "
                              "vocabulary keeps (special tokens, single characters, extra_tokens)")
        return sorted(set(self.required) | set(self.ranked[: size - len(self.required)]))


def english_words(tokenizer: Any, n: int, lang: str = "en") -> list[tuple[list[int], float]]:
    """The ``n`` most frequent words of ``lang`` (``wordfreq``), each as (token ids, word frequency).

    A cased tokenizer also gets each word capitalised (at the same frequency), as it starts sentences.
    """
    if n <= 0:
        return []
    try:
        import wordfreq
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RecipeError("english_words needs the 'wordfreq' package (pip install wordfreq)") from exc
    words = wordfreq.top_n_list(lang, n)
    freqs = [wordfreq.word_frequency(w, lang) for w in words]
    cased = tokenizer("The", add_special_tokens=False)["input_ids"] != tokenizer("the", add_special_tokens=False)["input_ids"]
    forms = words + ([w.capitalize() for w in words] if cased else [])
    weights = freqs + (freqs if cased else [])
    ids = tokenizer(forms, add_special_tokens=False)["input_ids"]
    return [(list(i), f) for i, f in zip(ids, weights) if i]


def rank_vocab(tokenizer: Any, sources: Mapping[str, Iterable[Sequence[int]]], *,
               weighted: Mapping[str, Iterable[tuple[Sequence[int], float]]] | None = None,
               extra_tokens: Sequence[str] = (), keep_chars: str = "ascii", min_count: int = 1) -> VocabCandidates:
    """Rank the candidate tokens of a pruned vocabulary (see :class:`VocabCandidates`).

    Args:
        tokenizer: the original fast WordPiece tokenizer.
        sources: source name -> token id sequences (e.g. ``"train:ner"`` -> every training feature's
            ``input_ids``, ``"corpus"`` -> the corpus files' lines). ``min_count`` applies per source.
        weighted: source name -> (token ids, weight) pairs, e.g. English words with their frequencies.
        extra_tokens, keep_chars: as in :func:`select_vocab`.
    """
    model = backend_json(tokenizer)["model"]
    vocab: dict[str, int] = model["vocab"]
    prefix = model.get("continuing_subword_prefix", "##")
    size = len(tokenizer)
    missing = [t for t in extra_tokens if t not in vocab]
    if missing:
        raise RecipeError(f"extra_tokens: {missing[0]!r} is not in the vocabulary")
    required: dict[str, set[int]] = {
        "special": set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder},
        "extra_tokens": {vocab[t] for t in extra_tokens},
    }
    if keep_chars != "none":
        required["chars"] = set()
        for token, i in vocab.items():
            char = token[len(prefix):] if token.startswith(prefix) else token
            if len(char) == 1 and (keep_chars == "all" or ord(char) < 128):
                required["chars"].add(i)
    shares: dict[str, dict[int, float]] = {}
    for name, id_lists in sources.items():
        counts: Counter[int] = Counter()
        for ids in id_lists:
            counts.update(int(i) for i in ids)
        counts = Counter({i: n for i, n in counts.items() if n >= min_count and 0 <= i < size})
        total = sum(counts.values())
        shares[name] = {i: n / total for i, n in counts.items()} if total else {}
    for name, pairs in (weighted or {}).items():
        acc: dict[int, float] = {}
        for ids, w in pairs:
            for i in ids:
                if 0 <= int(i) < size:
                    acc[int(i)] = acc.get(int(i), 0.0) + float(w)
        total = sum(acc.values())
        shares[name] = {i: v / total for i, v in acc.items()} if total else {}
    n_sources = max(1, len(shares))
    scores: dict[int, float] = {}
    for share in shares.values():
        for i, v in share.items():
            scores[i] = scores.get(i, 0.0) + v / n_sources
    must = set().union(*required.values()) & set(range(size))
    ranked = sorted((i for i in scores if i not in must), key=lambda i: (-scores[i], i))
    counts_out = {k: len(v) for k, v in required.items()} | {k: len(v) for k, v in shares.items()}
    return VocabCandidates(sorted(must), ranked, counts_out, scores)


def select_vocab(tokenizer: Any, id_lists: Iterable[Sequence[int]], *, extra_tokens: Sequence[str] = (),
                 extra_texts: Iterable[str] = (), keep_chars: str = "ascii", min_count: int = 1) -> tuple[list[int], dict[str, int]]:
    """Old token ids to keep, ascending, and how many each source contributed.

    Args:
        tokenizer: the original fast WordPiece tokenizer.
        id_lists: token id sequences of the data (e.g. every training feature's ``input_ids``).
        extra_tokens: vocabulary entries to keep whatever the data says.
        extra_texts: texts whose pieces (under the original tokenizer) are kept.
        keep_chars: ``"ascii"`` / ``"all"`` keeps the single-character pieces (with and without the ``##``
            prefix) of ASCII / every character, so unseen words fall back to characters instead of ``[UNK]``.
        min_count: data tokens seen fewer times than this are dropped.
    """
    model = backend_json(tokenizer)["model"]
    vocab: dict[str, int] = model["vocab"]
    prefix = model.get("continuing_subword_prefix", "##")
    counts: Counter[int] = Counter()
    for ids in id_lists:
        counts.update(int(i) for i in ids)
    sources: dict[str, set[int]] = {
        "special": set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder},
        "data": {i for i, n in counts.items() if n >= min_count},
    }
    missing = [t for t in extra_tokens if t not in vocab]
    if missing:
        raise RecipeError(f"extra_tokens: {missing[0]!r} is not in the vocabulary")
    sources["extra_tokens"] = {vocab[t] for t in extra_tokens}
    texts = list(extra_texts)
    sources["extra_files"] = set()
    if texts:
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            sources["extra_files"].update(ids)
    if keep_chars != "none":
        sources["chars"] = set()
        for token, i in vocab.items():
            char = token[len(prefix):] if token.startswith(prefix) else token
            if len(char) == 1 and (keep_chars == "all" or ord(char) < 128):
                sources["chars"].add(i)
    size = len(tokenizer)
    kept = sorted(i for s in sources.values() for i in s if 0 <= i < size)
    kept = sorted(set(kept))
    return kept, {k: len(v) for k, v in sources.items()}


def prune_tokenizer(tokenizer: Any, kept: Sequence[int]) -> Any:
    """A fast tokenizer over the ``kept`` old ids only, renumbered 0..n-1 in their old order.

    Rewrites ``tokenizer.json`` (WordPiece vocab, added tokens, post-processor and padding ids), ``vocab.txt``
    and the ids in ``tokenizer_config.json``, then loads the result with ``AutoTokenizer`` (local files only).
    """
    from transformers import AutoTokenizer

    data = backend_json(tokenizer)
    old_to_new = {old: new for new, old in enumerate(kept)}
    unk = data["model"].get("unk_token")
    vocab: dict[str, int] = data["model"]["vocab"]
    if unk is not None and vocab.get(unk) not in old_to_new:
        raise RecipeError(f"vocabulary pruning must keep the unknown token {unk!r}")
    id_to_token = {i: t for t, i in vocab.items()}
    data["model"]["vocab"] = {id_to_token[old]: new for old, new in old_to_new.items() if old in id_to_token}
    for added in data.get("added_tokens") or []:
        added["id"] = _remap(added["id"], old_to_new, added["content"])
    if data.get("post_processor"):
        data["post_processor"] = _remap_processor(data["post_processor"], old_to_new)
    # the backend's truncation is call-time state (set by the last call with truncation=True, reset per call by
    # transformers and by the runtime), not part of the vocabulary: without this the saved tokenizer.json differed
    # with what the process had tokenised before (a resumed run vs an uninterrupted one)
    data["truncation"] = None
    if data.get("padding"):
        data["padding"]["pad_id"] = _remap(data["padding"]["pad_id"], old_to_new, data["padding"].get("pad_token"))

    with tempfile.TemporaryDirectory(prefix="compressor-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        by_id = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
        Path(tmp, "vocab.txt").write_text("".join(f"{t}\n" for t, _ in by_id), encoding="utf-8")
        config_path = Path(tmp, "tokenizer_config.json")
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            decoder = config.get("added_tokens_decoder") or {}
            config["added_tokens_decoder"] = {
                str(_remap(int(i), old_to_new, spec.get("content"))): spec for i, spec in decoder.items()
            }
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        new = AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)
        new.name_or_path = getattr(tokenizer, "name_or_path", "")
    _check_tokenizer(tokenizer, new, kept)
    return new


def prune_embeddings(encoder: nn.Module, kept: Sequence[int]) -> None:
    """Keep only the ``kept`` rows of the word embeddings and update the config's vocabulary size and pad id."""
    old = encoder.get_input_embeddings()
    old_to_new = {o: n for n, o in enumerate(kept)}
    pad = getattr(encoder.config, "pad_token_id", None)
    new_pad = old_to_new.get(pad) if pad is not None else None
    new = nn.Embedding(len(kept), old.embedding_dim, padding_idx=new_pad,
                       device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[torch.as_tensor(list(kept), device=old.weight.device)])
    new.weight.requires_grad_(old.weight.requires_grad)
    encoder.set_input_embeddings(new)
    encoder.config.vocab_size = len(kept)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(encoder.config, key, None)
        if value is not None:
            setattr(encoder.config, key, old_to_new.get(value))


def remap(ids: Sequence[int], kept: Sequence[int]) -> list[int]:
    """Old ids -> new ids (every id must be kept)."""
    old_to_new = {o: n for n, o in enumerate(kept)}
    return [old_to_new[i] for i in ids]


def changed_tokens(id_lists: Iterable[Sequence[int]], kept: Sequence[int], tokenizer: Any) -> tuple[int, int]:
    """(sub-token occurrences whose word tokenises differently after pruning, all non-special occurrences).

    A word is a piece without the ``##`` prefix and the prefixed pieces after it; it changes (is split
    differently or becomes ``[UNK]``) exactly when one of its pieces is not kept.
    """
    prefix = backend_json(tokenizer)["model"].get("continuing_subword_prefix", "##")
    keep = set(kept)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    continuing = {i for t, i in tokenizer.get_vocab().items() if t.startswith(prefix)}
    changed = total = 0
    for ids in id_lists:
        word: list[int] = []
        for i in [*ids, None]:
            if i is None or i in special or i not in continuing:
                if word:
                    total += len(word)
                    changed += len(word) if any(w not in keep for w in word) else 0
                word = []
            if i is not None and i not in special:
                word.append(int(i))
    return changed, total


def _remap(old: int, old_to_new: Mapping[int, int], what: Any = None) -> int:
    if old not in old_to_new:
        raise RecipeError(f"vocabulary pruning dropped token id {old} ({what!r}) that the tokenizer needs")
    return old_to_new[old]


def _remap_processor(node: Any, old_to_new: Mapping[int, int]) -> Any:
    """Remap ids inside a post-processor (TemplateProcessing, BertProcessing, Sequence of them)."""
    if isinstance(node, dict):
        kind = node.get("type")
        if kind in ("BertProcessing", "RobertaProcessing"):
            return {**node, **{k: [node[k][0], _remap(node[k][1], old_to_new, node[k][0])]
                               for k in ("sep", "cls") if k in node}}
        if kind == "TemplateProcessing":
            specials = {name: {**spec, "ids": [_remap(i, old_to_new, name) for i in spec.get("ids", [])]}
                        for name, spec in (node.get("special_tokens") or {}).items()}
            return {**node, "special_tokens": specials}
        return {k: _remap_processor(v, old_to_new) for k, v in node.items()}
    if isinstance(node, list):
        return [_remap_processor(v, old_to_new) for v in node]
    return node


def _check_tokenizer(old: Any, new: Any, kept: Sequence[int]) -> None:
    """Every kept token must have its new id, and the special tokens must agree."""
    old_tokens = old.convert_ids_to_tokens(list(kept))
    new_ids = new.convert_tokens_to_ids(old_tokens)
    wrong = [(t, i, n) for n, (t, i) in enumerate(zip(old_tokens, new_ids)) if i != n]
    if wrong or len(new) != len(kept):
        detail = f"token {wrong[0][0]!r} has id {wrong[0][1]}, expected {wrong[0][2]}" if wrong else \
            f"{len(new)} tokens, expected {len(kept)}"
        raise RuntimeError(f"rebuilt tokenizer disagrees with the kept vocabulary: {detail}")
    for name in ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token"):
        if getattr(old, name, None) != getattr(new, name, None):
            raise RuntimeError(f"rebuilt tokenizer changed {name}: {getattr(old, name)!r} -> {getattr(new, name)!r}")
