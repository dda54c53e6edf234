"""Vocabulary pruning: the rebuilt tokenizer agrees with the old one on kept text, logits do not change, the
embedding matrix shrinks, and the stage reports how much test text tokenises differently."""

from __future__ import annotations

import pytest
import torch

from _prune_helpers import FIXTURES, PLUGIN, stage_context
from compressor.errors import DataError, RecipeError
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.prune.vocab import changed_tokens, prune_embeddings, prune_tokenizer, remap, select_vocab
from compressor.tasks import build_task
from conftest import tiny_bert

pytestmark = pytest.mark.usefixtures("tiny_cls_plugin")  # conftest

TRAIN = ["John Smith works for Acme Corp. in Boston.", "The film was surprisingly good, wasn't it?"]
# every word here occurs in TRAIN, in a new order
IN_VOCAB = ["the film works in boston, wasn't it?", "john smith was surprisingly good."]


def make_model(tokenizer, tasks=("a",)) -> MultiTaskModel:
    torch.set_num_threads(1)
    return MultiTaskModel(tiny_bert(vocab_size=len(tokenizer), layers=2, heads=4, hidden=32, ffn=64),
                          {t: build_task(PLUGIN, t) for t in tasks}).eval()


def test_pruned_tokenizer_and_embeddings_agree_with_the_originals(tokenizer):
    kept, sources = select_vocab(tokenizer, tokenizer(TRAIN)["input_ids"], keep_chars="none")
    assert sources["special"] == 5 and len(kept) == len(set(kept))
    new = prune_tokenizer(tokenizer, kept)
    assert len(new) == len(kept)
    for text in TRAIN + IN_VOCAB:
        assert new(text)["input_ids"] == remap(tokenizer(text)["input_ids"], kept)
    pair = new(IN_VOCAB[0], IN_VOCAB[1])
    assert pair["input_ids"] == remap(tokenizer(IN_VOCAB[0], IN_VOCAB[1])["input_ids"], kept)
    assert pair["token_type_ids"] == tokenizer(IN_VOCAB[0], IN_VOCAB[1])["token_type_ids"]
    assert new.pad_token_id == 0 and new.convert_ids_to_tokens(new.unk_token_id) == "[UNK]"
    # keep_chars="none": an unseen word has no pieces left and becomes [UNK]
    assert new.convert_ids_to_tokens(new("good zebra")["input_ids"]) == ["[CLS]", "good", "[UNK]", "[SEP]"]

    model = make_model(tokenizer)
    old_batch = tokenizer(IN_VOCAB, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model("a", **old_batch).outputs["logits"]
    params = model.num_parameters()
    prune_embeddings(model.encoder, kept)
    assert model.encoder.get_input_embeddings().weight.shape == (len(kept), 32)
    assert model.encoder.config.vocab_size == len(kept)
    assert params - model.num_parameters() == (len(tokenizer) - len(kept)) * 32
    new_batch = new(IN_VOCAB, padding=True, return_tensors="pt")
    with torch.no_grad():
        after = model("a", **new_batch).outputs["logits"]
    assert torch.equal(before, after)


def test_character_fallback_and_extras(tokenizer):
    ids = tokenizer(TRAIN)["input_ids"]
    kept, sources = select_vocab(tokenizer, ids, keep_chars="ascii", extra_tokens=["zebra"],
                                 extra_texts=["penguins"])
    new = prune_tokenizer(tokenizer, kept)
    assert sources["extra_tokens"] == 1 and sources["chars"] > 0
    assert new.convert_ids_to_tokens(new("zebra penguins")["input_ids"])[1:-1] == \
        tokenizer.convert_ids_to_tokens(tokenizer("zebra penguins")["input_ids"])[1:-1]
    # an unseen word falls back to kept pieces instead of [UNK]
    pieces = new.convert_ids_to_tokens(new("okapi")["input_ids"])[1:-1]
    assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == "okapi"
    with pytest.raises(RecipeError, match="'notatoken123' is not in the vocabulary"):
        select_vocab(tokenizer, ids, extra_tokens=["notatoken123"])
    # min_count drops the rare training tokens
    rare, _ = select_vocab(tokenizer, ids, keep_chars="none", min_count=2)
    assert set(rare) < set(select_vocab(tokenizer, ids, keep_chars="none")[0])


def test_changed_tokens_counts_whole_words(tokenizer):
    kept, _ = select_vocab(tokenizer, tokenizer(["a good film"])["input_ids"], keep_chars="none")
    text = tokenizer(["a good zebra film", "good"])["input_ids"]
    # "zebra" is one piece, dropped: 1 of 5 sub-tokens changes
    assert changed_tokens(text, kept, tokenizer) == (1, 5)
    word = tokenizer(["unhappily good"])["input_ids"]  # un ##ha ##pp ##ily: all four change
    n = len(tokenizer.tokenize("unhappily"))
    assert changed_tokens(word, kept, tokenizer) == (n, n + 1)


def test_non_wordpiece_tokenizer_is_rejected():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[],
                                                                         unk_token="<unk>")))
    with pytest.raises(RecipeError, match="supports WordPiece tokenizers.*BPE"):
        select_vocab(bpe, [[0]])


def test_prune_vocab_stage(tmp_path, tokenizer):
    model = make_model(tokenizer, tasks=("a", "b"))
    save_model(model, tokenizer, tmp_path / "input", max_length=32)
    from compressor.stages.prune_vocab import run

    ctx = stage_context(tmp_path, {"kind": "prune_vocab", "keep_chars": "none", "extra_files": ["extra.txt"],
                                   "english_words": 0},
                        tmp_path / "input")
    result = run(ctx)
    out = result.outputs
    train_text = [line.split(" ", 1)[1] for t in "ab" for line in (FIXTURES / f"{t}.train.txt").read_text().splitlines()]
    vocab = {i for ids in tokenizer(train_text + ["penguins"])["input_ids"] for i in ids} | set(tokenizer.all_special_ids)
    assert out["vocab_size_after"] == len(vocab) and out["vocab_size_before"] == len(tokenizer)
    assert out["parameters_before"] - out["parameters_after"] == (len(tokenizer) - len(vocab)) * 32
    # test splits: "a good zebra film" / "the dull plot was bad" (zebra unseen: 1 of 9 pieces);
    # "fast and friendly" / "slow and rude staff" (all seen)
    assert out["test_tokens_changed_per_task"] == {"a": pytest.approx(1 / 9), "b": 0.0}
    assert out["test_tokens_changed"] == pytest.approx(1 / 16)
    assert any("6.25% of test-set sub-tokens" in n for n in result.notes)
    assert {(r["stage"], r["task"]) for r in ctx.reporter.rows} == {("prune_vocab", "a"), ("prune_vocab", "b")}

    loaded, new_tok, manifest = load_model(ctx.out_dir / "model")
    assert manifest["architecture"]["vocab_size"] == len(vocab) == len(new_tok)
    text = ["the service was good", "a dull film"]
    with torch.no_grad():
        for task in ("a", "b"):
            before = model(task, **tokenizer(text, padding=True, return_tensors="pt")).outputs["logits"]
            after = loaded(task, **new_tok(text, padding=True, return_tensors="pt")).outputs["logits"]
            assert torch.equal(before, after)


def test_prune_vocab_stage_errors(tmp_path, tokenizer):
    from compressor.stages.prune_vocab import run

    with pytest.raises(RecipeError, match="put a train or distill stage before it"):
        run(stage_context(tmp_path, {"kind": "prune_vocab"}, None))
    save_model(make_model(tokenizer), tokenizer, tmp_path / "input", max_length=32)
    with pytest.raises(DataError, match="missing.txt: .*extra_files entry not found"):
        run(stage_context(tmp_path, {"kind": "prune_vocab", "extra_files": ["missing.txt"]}, tmp_path / "input",
                          tasks=("a",)))
