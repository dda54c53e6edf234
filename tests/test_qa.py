"""The extractive-QA plugin: readers, windows and offsets, decoding, SQuAD metrics, head and training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.errors import DataError, RecipeError
from compressor.runtime.decoding import qa_best_answer, qa_span_candidates
from compressor.tasks import build_task
from compressor_plugins.qa.metrics import normalize_answer, squad_scores
from compressor_plugins.qa.task import answer_tokens
from conftest import FIXTURES, tiny_bert

SQUAD = FIXTURES / "qa_squad.json"
JSONL = FIXTURES / "qa_tiny.jsonl"


@pytest.fixture
def task():
    return build_task("qa", "qa", options={"dev_articles": 1, "doc_stride": 16})


# ---- readers ----------------------------------------------------------------------------------------------
def test_read_squad_jsonl_and_article_split(task):
    full = task.read(SQUAD)
    assert [e.id for e in full] == [f"q{i}" for i in range(1, 8)]
    assert [e.id for e in task.read(JSONL)] == [e.id for e in full]
    assert task.read(JSONL) [1].context == full[1].context
    train, dev = task.read(SQUAD, "squad-train"), task.read(SQUAD, "squad-dev")
    assert [e.id for e in dev] == ["q6", "q7"]  # the last article
    assert [e.id for e in train] + [e.id for e in dev] == [e.id for e in full]
    assert full[0].answers == (("1917", full[0].context.index("1917")), ("in 1917", full[0].context.index("in 1917")))


def test_reader_errors_name_file_and_record(task, tmp_path):
    bad = json.loads(SQUAD.read_text())
    del bad["data"][1]["paragraphs"][0]["qas"][0]["question"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad\.json \[record q5 at data\[1\]\.paragraphs\[0\]\.qas\[0\]\]: field 'question'"):
        task.read(path)
    lines = JSONL.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "answers": [{"text": "x"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: answers\[0\] must be"):
        task.read(path)
    with pytest.raises(DataError, match="cannot tell the QA format"):
        task.read(tmp_path / "x.txt")
    with pytest.raises(DataError, match="dev_articles=5"):
        build_task("qa", "qa").read(SQUAD, "squad-dev")  # 3 articles cannot hold out 5
    dup = tmp_path / "dup.jsonl"
    dup.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(DataError, match="duplicate question id 'q1'"):
        task.read(dup)


# ---- encoding ---------------------------------------------------------------------------------------------
def test_windows_and_offsets_round_trip(task, tokenizer):
    examples = task.read(SQUAD)
    enc = task.encode(examples, tokenizer, max_length=48, train=True)
    windows = [f for f in enc.features if f["example_index"] == 0]
    assert len(windows) >= 4  # the long context needs several overlapping windows
    assert all(len(f["input_ids"]) <= 48 for f in enc.features)
    assert {f["example_index"] for f in enc.features} == set(range(len(examples)))
    inside = 0
    for f in enc.features:
        ex = examples[f["example_index"]]
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0
            continue
        inside += 1
        assert f["offsets"][s] is not None and f["offsets"][e] is not None
        assert ex.context[f["offsets"][s][0] : f["offsets"][e][1]] == ex.answers[0][0]
    assert inside >= len(examples)  # every answer lies wholly inside at least one window
    # the answer with a word split into many sub-tokens
    q2 = next(f for f in enc.features if f["example_index"] == 1 and f["start_positions"])
    pieces = tokenizer.convert_ids_to_tokens(q2["input_ids"][q2["start_positions"] : q2["end_positions"] + 1])
    assert sum(p.startswith("##") for p in pieces) >= 3
    # question tokens and special tokens carry no offsets
    f0 = enc.features[0]
    assert f0["offsets"][0] is None and f0["offsets"][1] is None
    # features of the first window: the answer "1917" lies in it
    assert f0["start_positions"] > 0


def test_answer_tokens_outside_window_is_cls():
    offsets = [None, None, (0, 3), (4, 9), (9, 12), None]
    assert answer_tokens(offsets, 4, 12) == (3, 4)
    assert answer_tokens(offsets, 5, 9) == (3, 3)  # inside a token: the token covering it
    assert answer_tokens(offsets, 10, 20) == (0, 0)  # runs past the window
    assert answer_tokens(offsets, 3, 4) == (0, 0)  # only the space between tokens


def test_bad_records_skipped_in_training_and_rejected_in_evaluation(task, tokenizer, tmp_path):
    rows = [json.loads(line) for line in JSONL.read_text().splitlines()]
    rows[0]["answers"][0]["answer_start"] += 1  # points at "917" + next char
    rows[1]["answers"] = []
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = task.read(path)
    enc = task.encode(examples, tokenizer, 64, train=True)
    assert enc.skipped == {"answer_start_mismatch": 1, "no_answer": 1}
    assert {f["example_index"] for f in enc.features} == set(range(2, len(rows)))
    with pytest.raises(DataError, match=r"bad\.jsonl:2 \(id q2\).*no answer"):
        task.encode(examples, tokenizer, 64, train=False)


def test_long_question_is_truncated_not_dropped(task, tokenizer):
    examples = task.read(JSONL)
    long_q = examples[4].__class__(**{**examples[4].__dict__, "question": "why " * 100 + "where?"})
    enc = task.encode([long_q], tokenizer, 48, train=True)
    assert enc.truncated == 1
    assert all(len(f["input_ids"]) <= 48 for f in enc.features)
    assert all(sum(o is not None for o in f["offsets"]) > 16 for f in enc.features)  # > doc_stride context
    f = next(f for f in enc.features if f["start_positions"])
    assert long_q.context[f["offsets"][f["start_positions"]][0] : f["offsets"][f["end_positions"]][1]] == "chloroplasts"
    with pytest.raises(RecipeError, match="no room for a question"):
        build_task("qa", "qa", options={"doc_stride": 60}).encode([long_q], tokenizer, 48, train=True)


# ---- decoding ---------------------------------------------------------------------------------------------
def test_span_candidates_hand_computed():
    start = np.array([9.0, 0.0, 2.0, 1.0, 0.5, -100.0])
    end = np.array([9.0, 0.0, 0.0, 3.0, 2.5, -100.0])
    offsets = [None, (0, 2), (3, 5), (6, 8), (9, 11), None]
    got = qa_span_candidates(start, end, offsets, max_answer_length=2, n_best=3)
    # (2,3)=5.0  (3,3)=4.0  (3,4)=3.5 ; (2,4) is 3 tokens long and CLS/padding never count
    assert got == [(5.0, 3, 8), (4.0, 6, 8), (3.5, 6, 11)]
    assert qa_best_answer(got, "ab cd ef gh") == {"text": "cd ef", "start": 3, "end": 8, "score": 5.0}
    assert qa_best_answer([], "x")["text"] == ""


def test_oracle_logits_decode_to_exact_answer_text(task, tokenizer):
    """Logits peaked at the labelled positions must come back as exactly the answer text, across windows."""
    examples = task.read(SQUAD)
    enc = task.encode(examples, tokenizer, max_length=48, train=True)
    batch = task.collate(enc.features)
    seq = batch["input_ids"].shape[1]
    start, end = np.zeros((len(enc.features), seq)), np.zeros((len(enc.features), seq))
    for i, f in enumerate(enc.features):
        if f["start_positions"]:
            start[i, f["start_positions"]] = end[i, f["end_positions"]] = 10.0
    results = task.decode({"start_logits": start, "end_logits": end}, {}, enc.features)
    preds = task.aggregate(results, enc)
    assert [p["text"] for p in preds] == [ex.answers[0][0] for ex in examples]
    assert task.score(preds, examples) == {"exact_match": 1.0, "f1": 1.0}


# ---- metrics ----------------------------------------------------------------------------------------------
def test_squad_metrics_hand_computed():
    assert normalize_answer("  The  Eiffel-Tower, a landmark!") == "eiffeltower landmark"
    preds = ["the Eiffel Tower!", "in Paris France", "nothing", "An apple a day"]
    refs = [["Eiffel Tower"], ["Paris", "France"], ["something"], ["apple day", "an apple"]]
    # EM: 1, 0, 0, 1 ("apple day" after dropping articles) -> 2/4
    # F1: 1; max(2*(1/3*1)/(4/3)=0.5, 0.5)=0.5; 0; 1  -> 2.5/4
    got = squad_scores(preds, refs)
    assert got["exact_match"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(0.625)
    # partial overlap: pred "red big car" vs "big red truck": common {big, red} p=2/3 r=2/3 -> f1 2/3
    assert squad_scores(["red big car"], [["big red truck"]])["f1"] == pytest.approx(2 / 3)


# ---- model ------------------------------------------------------------------------------------------------
def test_head_masks_padding_and_training_lowers_loss(task, tokenizer):
    import torch

    from compressor.model.multitask import MultiTaskModel
    from compressor.model.forward import torch_forward

    torch.manual_seed(0)
    model = MultiTaskModel(tiny_bert(), {"qa": task})
    examples = task.read(SQUAD)
    enc = task.encode(examples, tokenizer, max_length=48, train=True)
    batch = task.collate(enc.features)
    out = model.forward_batch("qa", batch).outputs
    assert set(out) == {"start_logits", "end_logits"}
    assert out["start_logits"].shape == batch["input_ids"].shape
    pad = batch["attention_mask"] == 0
    assert pad.any() and bool((out["start_logits"][pad] <= -1e4 + 1).all())
    targets = task.distill_targets(out, batch)
    assert set(targets) == {"start", "end"} and targets["start"].logits is out["start_logits"]

    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # speed: 30k x 32 dense grads
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = task.loss(model.forward_batch("qa", batch).outputs, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]

    model.eval()
    metrics, preds = task.evaluate(torch_forward(model), enc, examples, batch_size=8)
    assert set(metrics) == {"exact_match", "f1"} and 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 1.0
    assert metrics["f1"] > 0.5  # memorised the seven questions
    assert all(p["text"] == examples[i].context[p["start"] : p["end"]] for i, p in enumerate(preds))


def test_export_spec(task, tokenizer):
    spec = task.export_spec()
    assert spec["decoder"] == "qa_span" and spec["max_length"] is None and spec["doc_stride"] == 16
    task.encode(task.read(JSONL), tokenizer, 48, train=False)
    spec = task.export_spec()
    assert spec == {"decoder": "qa_span", "max_answer_length": 30, "n_best": 20, "doc_stride": 16,
                    "max_length": 48, "max_query_length": 64}
    assert build_task("qa", "qa").doc_stride(128) == 64
