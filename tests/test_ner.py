"""The NER plugin: readers, BIO decoding, first-sub-token encoding, head, loss, strict entity F1."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import FIXTURES, tiny_bert

from compressor.errors import DataError, RecipeError
from compressor.model.forward import torch_forward
from compressor.model.multitask import MultiTaskModel
from compressor.runtime.decoding import (
    bio_decode, bio_tags, bio_to_spans, first_subtoken_word_tags, repair_iob, spans_to_bio,
)
from compressor.tasks import build_task
from compressor_plugins.ner import NerExample, NerTask

NER = FIXTURES / "ner"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, shared cores


def make_task(labels=None, **options) -> NerTask:
    return build_task("ner", "ner", labels, options)


# ---- decoding primitives ------------------------------------------------------------------------------------
def test_tag_set_has_fixed_order():
    assert bio_tags(["Loc", "Org"]) == ["O", "B-Loc", "I-Loc", "B-Org", "I-Org"]
    assert make_task(["Loc", "Org", "Other", "Peop"]).tags[:3] == ["O", "B-Loc", "I-Loc"]


def test_bio_to_spans_reads_a_stray_i_as_the_start_of_an_entity():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-LOC", "B-LOC", "B-LOC", "I-LOC"]
    # I-LOC at 3 after O starts a LOC entity that I-LOC at 4 continues; I-LOC at 6 after B-ORG ends ORG and starts
    # a LOC of one word; B-LOC B-LOC are two entities.
    assert bio_to_spans(tags) == [(0, 2, "PER"), (3, 5, "LOC"), (5, 6, "ORG"), (6, 7, "LOC"), (7, 8, "LOC"),
                                  (8, 10, "LOC")]
    assert bio_to_spans(["I-PER", "I-PER"]) == [(0, 2, "PER")]  # at the start of the sentence
    assert bio_to_spans(["B-PER", "I-LOC", "I-PER"]) == [(0, 1, "PER"), (1, 2, "LOC"), (2, 3, "PER")]
    assert bio_to_spans(["O", "I-X", "O", "B-X", "I-X"]) == [(1, 2, "X"), (3, 5, "X")]
    assert bio_to_spans([]) == []
    with pytest.raises(ValueError, match="not IOB2"):
        bio_to_spans(["S-PER"])


def test_bio_to_spans_agrees_with_seqeval_default_mode_on_random_sequences():
    """seqeval's default mode is conlleval's chunking: the reading the field's NER scores use."""
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tags = ["O", "B-A", "I-A", "B-B", "I-B"]
    for _ in range(300):
        seq = [rng.choice(tags) for _ in range(rng.randint(1, 12))]
        expected = sorted((start, end + 1, typ) for typ, start, end in get_entities(seq))
        assert sorted(bio_to_spans(seq)) == expected, seq


def test_bio_to_spans_equals_seqeval_strict_on_well_formed_iob2():
    from seqeval.scheme import IOB2, Entities

    rng = random.Random(1)
    tags = ["O", "B-A", "I-A", "B-B", "I-B"]
    for _ in range(300):
        seq = repair_iob([rng.choice(tags) for _ in range(rng.randint(1, 12))])
        expected = sorted((e.start, e.end, e.tag) for e in Entities([seq], IOB2).entities[0])
        assert sorted(bio_to_spans(seq)) == expected, seq


def test_spans_to_bio_inverts_bio_to_spans():
    spans = [(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC")]
    tags = spans_to_bio(spans, 7)
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert bio_to_spans(tags) == spans
    with pytest.raises(ValueError, match="overlaps"):
        spans_to_bio([(0, 2, "A"), (1, 3, "B")], 4)


def test_repair_iob_converts_iob1_and_keeps_iob2():
    assert repair_iob(["I-PER", "I-PER", "O", "I-LOC", "I-ORG", "B-ORG"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-ORG"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O"]
    assert repair_iob(iob2) == iob2


def test_first_subtoken_word_tags_reads_first_piece_and_fills_missing_words_with_o():
    tags = ["O", "B-X", "I-X"]
    word_ids = [None, 0, 0, 1, 2, 2, None]  # word 3 was cut off by truncation
    tag_ids = [0, 1, 0, 2, 0, 1, 0, 0, 0]  # padding positions after the sequence are ignored
    assert first_subtoken_word_tags(tag_ids, word_ids, 4, tags) == ["B-X", "I-X", "O", "O"]


def test_decoding_and_plugin_modules_import_without_torch():
    """The ONNX runtime decodes with compressor.runtime.decoding; `compressor tasks list` loads plugin classes."""
    import subprocess
    import sys

    code = ("import sys, compressor.runtime.decoding, compressor_plugins.ner, compressor_plugins.classification; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- readers ------------------------------------------------------------------------------------------------
def test_read_conll_skips_docstart_takes_last_column_and_converts_iob1():
    examples = make_task().read(NER / "tiny.conll")
    assert [ex.tokens for ex in examples][:2] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"]]
    assert examples[0].tags == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert examples[0].entities == [(0, 1, "ORG"), (2, 3, "MISC")]
    # the last sentence is IOB1: "I-PER I-PER O I-PER" reads as two PER entities
    assert examples[3].tags == ["B-PER", "I-PER", "O", "B-PER", "O"]
    assert examples[3].entities == [(0, 2, "PER"), (3, 4, "PER")]
    assert str(examples[1].source).endswith("tiny.conll:9")


def test_read_jsonl_accepts_tags_or_entities():
    examples = make_task().read(NER / "tiny.jsonl")
    assert len(examples) == 3
    assert examples[0].entities == [(0, 2, "PER"), (3, 4, "LOC")]
    assert examples[1].tags == ["B-ORG", "O", "O", "B-LOC", "I-LOC", "I-LOC"]
    assert examples[2].entities == [] and examples[2].source.line == 4


def test_read_conll04_keeps_relations_and_records():
    examples = make_task().read(NER / "conll04_tiny.json")
    assert len(examples) == 6
    assert examples[0].tags == ["B-Peop", "I-Peop", "O", "O", "B-Org", "I-Org", "O", "B-Loc", "O"]
    assert examples[0].relations == [(0, 2, 4, 6, "Work_For"), (4, 6, 7, 8, "OrgBased_In")]
    assert examples[4].source.record == 4
    assert make_task().fit_labels(examples) == ["Loc", "Org", "Other", "Peop"]


def test_format_detection_and_explicit_format(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text(json.dumps({"tokens": ["a"], "tags": ["B-X"]}) + "\n")
    with pytest.raises(DataError, match=r"data\.txt:1: tag .* is not IOB2"):
        make_task().read(p)  # .txt -> conll, whose last column here is not a tag
    assert make_task().read(p, "jsonl")[0].entities == [(0, 1, "X")]
    with pytest.raises(DataError, match="unknown NER format 'xml'"):
        make_task().read(p, "xml")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.conll", "EU B-ORG\nrejects\n", r"bad\.conll:2: expected '<token> \.\.\. <tag>'"),
        ("bad.conll", "EU B-ORG\n\nBonn S-LOC\n", r"bad\.conll:3: tag 'S-LOC' is not IOB2"),
        ("bad.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
         r"bad\.jsonl:2: 2 tokens but 1 tags"),
        ("bad.jsonl", '{"tokens": ["a", "b"], "entities": [[1, 3, "X"]]}\n', r"bad\.jsonl:1: entities\[0\] .* outside"),
        ("bad.jsonl", '{"tokens": ["a", "b"]}\n', r"bad\.jsonl:1: expected field 'tags' or 'entities'"),
        ("bad.jsonl", '{"tokens": ["a"], "tags": ["B-X"], "entities": []}\n', r"bad\.jsonl:1: .* disagree"),
        ("bad.json", '[{"tokens": ["a", "b"], "entities": [[0, 2, "X"], [1, 2, "Y"]]}]',
         r"bad\.json \[record 0\]: .*overlap"),
        ("bad.json", '[{"tokens": ["a"], "entities": [[0, 1, "X"]]}, {"tokens": ["a"], "entities": [[0, 5, "X"]]}]',
         r"bad\.json \[record 1\]: .*outside"),
    ],
)
def test_malformed_files_name_file_and_line_or_record(tmp_path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        make_task().read(p)


def test_labels_must_be_types_not_tags():
    with pytest.raises(RecipeError, match="entity types"):
        make_task(["O", "B-PER", "I-PER"])


# ---- encoding -----------------------------------------------------------------------------------------------
def test_encode_labels_first_subtoken_only(tokenizer):
    task = make_task(["LOC", "ORG", "PER"])
    examples = task.read(NER / "tiny.jsonl")
    enc = task.encode(examples, tokenizer, max_length=32, train=True)
    assert enc.num_examples == 3 and enc.truncated == 0 and len(enc.features) == 3
    multi_piece_words = 0
    for feat, ex in zip(enc.features, examples):
        assert len(feat["input_ids"]) == len(feat["labels"]) == len(feat["word_ids"]) == len(feat["attention_mask"])
        assert feat["num_words"] == len(ex.tokens)
        seen = set()
        for w, label in zip(feat["word_ids"], feat["labels"]):
            if w is None or w in seen:
                assert label == -100
                multi_piece_words += w is not None
            else:
                seen.add(w)
                assert task.tags[label] == ex.tags[w]
        assert seen == set(range(len(ex.tokens)))
    assert multi_piece_words > 0  # e.g. "Lovelace" is several WordPieces: the fixture exercises the rule


def test_encode_rejects_type_outside_schema_naming_the_record(tokenizer):
    task = make_task(["Loc", "Org", "Peop"])  # no "Other"
    examples = task.read(NER / "conll04_tiny.json")
    with pytest.raises(DataError, match=r"conll04_tiny\.json \[record 2\]: entity type 'Other' is not in the labels"):
        task.encode(examples, tokenizer, 32, train=True)
    conll = make_task(["PER"])
    with pytest.raises(DataError, match=r"tiny\.conll:3: entity type 'ORG'"):
        conll.encode(conll.read(NER / "tiny.conll"), tokenizer, 32, train=True)


def test_truncation_keeps_sentence_predicts_o_for_cut_words_and_scores_honestly(tokenizer):
    task = make_task(["LOC", "PER"])
    tokens = ["Ann"] + ["word"] * 17 + ["New", "York"]
    ex = NerExample(tokens, spans_to_bio([(0, 1, "PER"), (18, 20, "LOC")], 20), [(0, 1, "PER"), (18, 20, "LOC")],
                    source=None)
    enc = task.encode([ex], tokenizer, max_length=8, train=False)
    assert enc.truncated == 1 and len(enc.features) == 1
    feat = enc.features[0]
    assert len(feat["input_ids"]) == 8 and max(w for w in feat["word_ids"] if w is not None) == 5
    # perfect logits on every visible word
    logits = np.zeros((1, 8, len(task.tags)), dtype=np.float32)
    for pos, label in enumerate(feat["labels"]):
        logits[0, pos, max(label, 0)] = 5.0
    spans = task.spans_from_logits(logits, [feat])
    assert spans == [[(0, 1, "PER")]]  # New York was cut off: predicted O
    metrics = task.score(spans, [ex])
    assert metrics == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})


def test_collate_pads_inputs_and_labels(tokenizer):
    task = make_task(["LOC", "ORG", "PER"])
    enc = task.encode(task.read(NER / "tiny.jsonl"), tokenizer, 32, train=True)
    batch = task.collate(enc.features)
    lengths = [len(f["input_ids"]) for f in enc.features]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == -100).all()
    assert (batch["input_ids"][short, min(lengths):] == tokenizer.pad_token_id).all()


# ---- model --------------------------------------------------------------------------------------------------
def _model_and_batch(tokenizer, **options):
    task = make_task(**options)
    examples = task.read(NER / "conll04_tiny.json")
    task.labels = task.fit_labels(examples)
    enc = task.encode(examples, tokenizer, 32, train=True)
    model = MultiTaskModel(tiny_bert(), {"ner": task})
    return task, model, examples, enc, task.collate(enc.features)


def test_head_loss_and_distill_targets(tokenizer):
    task, model, _, _, batch = _model_and_batch(tokenizer)
    model.eval()
    out = model.forward_batch("ner", batch).outputs
    assert list(out) == ["logits"]
    assert out["logits"].shape == (*batch["input_ids"].shape, 9)  # O + B/I x 4 types
    loss = task.loss(out, batch)
    # cross-entropy over first sub-tokens only
    keep = batch["labels"] != -100
    logp = torch.log_softmax(out["logits"][keep], -1)
    expected = -logp.gather(1, batch["labels"][keep].unsqueeze(1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    target = task.distill_targets(out, batch)["logits"]
    assert target.logits is out["logits"] and torch.equal(target.mask, keep)
    assert task.options.dropout is None and model.heads["ner"].dropout.p == 0.1
    assert make_task(["X"], dropout=0.3).build_head(8).dropout.p == 0.3


def test_loss_without_labelled_words_is_zero_not_nan():
    task = make_task(["X"])
    logits = torch.randn(1, 4, 3, requires_grad=True)
    loss = task.loss({"logits": logits}, {"labels": torch.full((1, 4), -100)})
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_training_on_fixture_learns_the_entities(tokenizer):
    torch.manual_seed(0)
    task, model, examples, enc, batch = _model_and_batch(tokenizer, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = task.loss(model.forward_batch("ner", batch).outputs, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    metrics, predictions = task.evaluate(torch_forward(model), enc, examples, batch_size=4)
    assert metrics["f1"] == 1.0, (metrics, predictions)
    assert predictions[0] == [(0, 2, "Peop"), (4, 6, "Org"), (7, 8, "Loc")]


# ---- decoding and scoring -----------------------------------------------------------------------------------
def test_spans_from_logits_reads_a_leading_stray_i_as_an_entity(tokenizer):
    task = make_task(["LOC", "PER"])  # tags: O B-LOC I-LOC B-PER I-PER
    ex = NerExample(["a", "b", "c", "d"], ["O"] * 4, [], source=None)
    feat = task.encode([ex], tokenizer, 16, train=False).features[0]
    assert feat["word_ids"] == [None, 0, 1, 2, 3, None]
    logits = np.zeros((1, 6, 5), dtype=np.float32)
    for pos, tag in zip(range(1, 5), [4, 4, 3, 4]):  # I-PER I-PER B-PER I-PER
        logits[0, pos, tag] = 1.0
    # the leading I-PER I-PER is an entity (conlleval), B-PER I-PER another
    assert task.spans_from_logits(logits, [feat]) == [[(0, 2, "PER"), (2, 4, "PER")]]
    batch = {k: v.numpy() for k, v in task.collate([feat]).items()}
    assert task.decode({"logits": logits}, batch, [feat]) == [[(0, 2, "PER"), (2, 4, "PER")]]


def test_score_matches_hand_computed_strict_f1():
    task = make_task(["LOC", "ORG", "PER"])
    examples = task.read(NER / "score3.jsonl")
    # gold: s1 PER[0,2) LOC[4,6); s2 ORG[0,2) PER[3,4); s3 LOC[0,1)           -> 5 gold entities
    predictions = [
        [(0, 2, "PER"), (5, 6, "LOC")],  # PER right; LOC boundary error ("York" only): FP + FN
        [(0, 2, "ORG"), (3, 4, "LOC")],  # ORG right; Mary typed LOC instead of PER: FP + FN
        [(0, 1, "LOC"), (2, 3, "ORG")],  # LOC right; "big" as ORG: FP
    ]
    # TP = 3, predicted = 6, gold = 5: P = 3/6 = 0.5, R = 3/5 = 0.6, F1 = 2PR/(P+R) = 0.6/1.1 = 6/11
    metrics = task.score(predictions, examples)
    assert metrics == pytest.approx({"precision": 0.5, "recall": 0.6, "f1": 6 / 11})
    assert task.score([[], [], []], examples) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert task.score([ex.entities for ex in examples], examples)["f1"] == 1.0


def test_bio_decode_is_what_the_plugin_uses():
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]  # O B-X I-X I-X over words 0..3 (no specials)
    assert bio_decode(logits, [0, 1, 2, 3], 4, ["O", "B-X", "I-X"]) == [(1, 4, "X")]


def test_stray_i_decodes_to_an_entity_in_pytorch_and_in_the_runtime_alike():
    """O I-X I-X O B-X at the words' first sub-tokens: the stray I-X run is an entity, not dropped."""
    from compressor.runtime.decoders import get_decoder

    task = make_task(["X"])
    word_ids = [None, 0, 1, 1, 2, 3, 4, None]
    per_word = [0, 2, 2, 0, 1]  # O I-X I-X O B-X
    ids = [0, per_word[0], per_word[1], 1, per_word[2], per_word[3], per_word[4], 0]  # word 1's 2nd piece: B-X
    logits = np.eye(3, dtype=np.float32)[ids][None]
    feature = {"word_ids": word_ids, "num_words": 5}
    assert task.decode({"logits": logits}, {}, [feature]) == [[(1, 3, "X"), (4, 5, "X")]]
    decoder_cls = get_decoder("bio")
    assert decoder_cls.__module__ == "compressor_plugins.ner.decoder"
    assert bio_decode(logits[0], word_ids, 5, task.tags) == [(1, 3, "X"), (4, 5, "X")]


def test_export_spec_and_onnx_outputs():
    task = make_task(["Loc", "Org"])
    assert task.export_spec() == {"decoder": "bio", "tags": ["O", "B-Loc", "I-Loc", "B-Org", "I-Org"],
                                  "first_subtoken": True}
    (out,) = task.onnx_outputs()
    assert out.name == "logits" and dict(out.dynamic_axes) == {0: "batch", 1: "sequence"}


@pytest.mark.slow
def test_reads_real_conll04_splits():
    from conftest import SHARED_DATA

    root = SHARED_DATA / "conll04"
    if not root.is_dir():
        pytest.skip("no shared CoNLL04 data")
    task = make_task()
    counts = {}
    for split, n_sent, n_ent, n_rel in [("train", 922, 3377, 1283), ("valid", 231, 893, 343), ("test", 288, 1079, 422)]:
        examples = task.read(root / f"{split}.CoNLL04.json")
        counts[split] = (len(examples), sum(len(e.entities) for e in examples), sum(len(e.relations) for e in examples))
        assert counts[split] == (n_sent, n_ent, n_rel)
    assert task.fit_labels(task.read(root / "train.CoNLL04.json")) == ["Loc", "Org", "Other", "Peop"]
