"""The relation-extraction plugin: reader errors, pair encoding, head and ONNX export, strict end-to-end scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.errors import DataError, RecipeError
from compressor.runtime.decoding import (
    bio_tags, relation_candidates, relation_decode, span_token_range, spans_to_bio, word_token_ranges,
)
from compressor.tasks import build_task
from conftest import FIXTURES, tiny_bert

DATA = FIXTURES / "re_conll04_tiny.json"
RELATIONS = ["Kill", "Live_In", "Located_In", "OrgBased_In", "Work_For"]


def make_tasks(**options):
    ner = build_task("ner", "ner")
    rel = build_task("relation", "relation", options=options)
    tasks = {"ner": ner, "relation": rel}
    for t in tasks.values():
        t.bind(tasks)
    examples = rel.read(DATA)
    ner.labels = ner.fit_labels(ner.read(DATA))
    rel.labels = rel.fit_labels(examples)
    return ner, rel, examples


# ---- reader and labels ------------------------------------------------------------------------------------
def test_fit_labels_learns_relation_types_and_type_constraints():
    _, rel, examples = make_tasks()
    assert rel.labels == RELATIONS
    assert rel.classes == ["no_relation", *RELATIONS]
    assert rel.options.allowed_pairs == {
        "Kill": [("Peop", "Peop")], "Live_In": [("Peop", "Loc")], "Located_In": [("Loc", "Loc")],
        "OrgBased_In": [("Org", "Loc")], "Work_For": [("Peop", "Org")],
    }
    spec = rel.export_spec()
    assert spec["decoder"] == "relation" and spec["entity_task"] == "ner" and spec["labels"] == RELATIONS
    assert spec["type_constraints"]["Work_For"] == [["Peop", "Org"]] and spec["max_pairs"] == 256
    json.dumps(spec)
    # the learned constraints travel in the options, i.e. in the model manifest
    again = build_task("relation", "relation", rel.labels, rel.describe()["options"])
    assert again.allowed() == rel.allowed()
    assert build_task("relation", "r", options={"type_constraints": False}).export_spec()["type_constraints"] is None


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["relations"].append([0, 1, 2, 4, "Kill"]), r"\[record 3\]: relations\[1\].*tail span \[2, 4\) is not an entity"),
    (lambda r: r["entities"].append([2, 5, "Loc"]), r"\[record 3\]: entities .* overlap"),
    (lambda r: r["entities"].append([5, 9, "Loc"]), r"\[record 3\]: entities\[3\] .* outside the sentence"),
    (lambda r: r["relations"].append([0, 1, 0, 1, "Kill"]), r"\[record 3\]: relations\[1\] .* same entity"),
    (lambda r: r["relations"].append([0, 1, 2, 3, "Kill"]), r"\[record 3\]: relations\[1\] .* listed twice"),
])
def test_bad_records_are_errors_naming_file_and_record(tmp_path, mutate, message):
    records = json.loads(DATA.read_text())
    mutate(records[3])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"bad\.json " + message):
        build_task("relation", "relation").read(path)


def test_unknown_format_and_relation_outside_labels(tmp_path, tokenizer):
    with pytest.raises(DataError, match="unknown relation-extraction format"):
        build_task("relation", "relation").read(tmp_path / "x.tsv")
    _, rel, examples = make_tasks()
    rel.labels = ["Kill", "Live_In"]
    with pytest.raises(DataError, match=r"re_conll04_tiny\.json \[record 0\]: relations\[0\]: relation type 'Work_For'"):
        rel.encode(examples, tokenizer, 64, train=True)
    with pytest.raises(RecipeError, match="no_relation"):
        build_task("relation", "relation", ["Kill", "no_relation"])


def test_bind_needs_the_entity_task():
    rel = build_task("relation", "relation", RELATIONS, {"entity_task": "entities"})
    with pytest.raises(RecipeError, match=r"entity_task 'entities' is not a task of this model \(tasks: relation, sst2\)"):
        rel.bind({"relation": rel, "sst2": build_task("classification", "sst2", ["a", "b"])})
    with pytest.raises(RecipeError, match="cannot decode entities"):
        rel.bind({"relation": rel, "entities": build_task("classification", "entities", ["a", "b"])})


# ---- encoding ---------------------------------------------------------------------------------------------
def _span_words(feature, span):
    """Word ids covered by a sub-token span [start, end)."""
    return sorted({feature["word_ids"][p] for p in range(span[0], span[1])})


def test_training_pairs_gold_relations_and_seeded_negatives(tokenizer):
    _, rel, examples = make_tasks(negatives_per_sentence=2)
    enc = rel.encode(examples, tokenizer, 64, train=True)
    assert enc.num_examples == len(examples) and not enc.skipped and enc.truncated == 0
    for f in enc.features:
        ex = examples[f["example_index"]]
        gold = {(r[0], r[1], r[2], r[3]): r[4] for r in ex.relations}
        assert len(f["re_pairs"]) == len(f["re_spans"]) == len(f["re_labels"])
        positives = [p for p, label in zip(f["re_pairs"], f["re_labels"]) if label]
        assert len(positives) == len(ex.relations)  # every gold relation is a training pair
        assert sum(label == 0 for label in f["re_labels"]) <= 2
        for (h, t), span, label in zip(f["re_pairs"], f["re_spans"], f["re_labels"]):
            head, tail = ex.entities[h], ex.entities[t]
            # sub-token spans cover exactly the words of the entities
            assert _span_words(f, span[0:2]) == list(range(head[0], head[1]))
            assert _span_words(f, span[2:4]) == list(range(tail[0], tail[1]))
            assert rel.classes[label] == gold.get((*head[:2], *tail[:2]), "no_relation")
            # negatives are drawn only from type-allowed pairs
            assert (head[2], tail[2]) in {tuple(p) for ps in rel.allowed().values() for p in ps}
    # the sub-word split name of sentence 0 spans several sub-tokens
    f0 = enc.features[0]
    assert f0["re_spans"][0][1] - f0["re_spans"][0][0] >= 3
    # sampling is seeded: the same pairs again, other pairs with another seed
    assert [f["re_pairs"] for f in rel.encode(examples, tokenizer, 64, train=True).features] == \
        [f["re_pairs"] for f in enc.features]
    _, rel_all, _ = make_tasks(negatives_per_sentence=50, type_constraints=False)
    f4 = rel_all.encode(examples, tokenizer, 64, train=True).features[4]
    assert len(f4["re_pairs"]) == 5 * 4  # every ordered pair of the 5 entities without constraints


def test_evaluation_pairs_are_all_candidates_and_capped(tokenizer):
    _, rel, examples = make_tasks()
    f4 = rel.encode(examples, tokenizer, 64, train=False).features[4]
    # entities 0 Peop(1,3) 1 Org(7,8) 2 Loc(9,10) 3 Peop(12,14) 4 Org(16,17); types some relation allows:
    # Peop-Peop, Peop-Loc, Peop-Org, Loc-Loc, Org-Loc
    assert f4["re_pairs"] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (3, 0), (3, 1), (3, 2), (3, 4), (4, 2)]
    named = dict(zip(f4["re_pairs"], (rel.classes[label] for label in f4["re_labels"])))
    assert {p: n for p, n in named.items() if n != "no_relation"} == {
        (0, 1): "Work_For", (1, 2): "OrgBased_In", (3, 4): "Work_For"}
    _, capped, _ = make_tasks(max_pairs=3)
    assert capped.encode(examples, tokenizer, 64, train=False).features[4]["re_pairs"] == [(0, 1), (0, 2), (0, 3)]


def test_truncated_entities_are_not_paired(tokenizer):
    _, rel, examples = make_tasks()
    # 24 sub-tokens keep words 0-11 and part of word 12: entities Peop(12,14) and Org(16,17) are cut off
    enc = rel.encode(examples[4:], tokenizer, 24, train=True)
    assert enc.truncated == 1
    f = enc.features[0]
    assert sorted(f["re_pairs"]) == [(0, 1), (0, 2), (1, 2)]
    assert sum(label > 0 for label in f["re_labels"]) == 2  # the third gold relation is lost to truncation
    assert all(max(s) <= 23 for s in f["re_spans"])


# ---- decoding primitives ----------------------------------------------------------------------------------
def test_relation_decode_applies_type_constraints():
    entities = [(0, 1, "Peop"), (2, 3, "Org"), (4, 5, "Loc")]
    classes = ["no_relation", "Live_In", "Work_For"]
    allowed = {"Live_In": [("Peop", "Loc")], "Work_For": [("Peop", "Org")]}
    pairs, spans = relation_candidates(entities, [None, 0, 1, 2, 3, 4, None], allowed)
    assert pairs == [(0, 1), (0, 2)] and spans.tolist() == [[1, 2, 3, 4], [1, 2, 5, 6]]
    logits = np.array([[0.0, 5.0, 1.0],    # Live_In best, but Peop-Org only allows Work_For -> Work_For
                       [0.0, 3.0, 4.0],    # Work_For best, not allowed for Peop-Loc -> Live_In
                       [9.0, 9.0, 9.0]])   # a padding row: ignored
    assert relation_decode(logits, pairs, entities, classes, allowed) == [(0, 1, 2, 3, "Work_For"),
                                                                         (0, 1, 4, 5, "Live_In")]
    assert relation_decode(logits, pairs, entities, classes, None) == [(0, 1, 2, 3, "Live_In"),
                                                                      (0, 1, 4, 5, "Work_For")]
    assert relation_candidates(entities, [None, 0, 1, 2, 3, 4, None])[1].shape == (6, 4)
    assert relation_candidates([], [None, None])[1].shape == (0, 4)


# ---- scoring ----------------------------------------------------------------------------------------------
def test_strict_scores_hand_computed():
    _, rel, examples = make_tasks()
    predictions = [
        # right relation types, but "Acme Corp" cut to "Acme": both relations are wrong
        {"entities": [(0, 2, "Peop"), (4, 5, "Org"), (7, 8, "Loc")],
         "relations": [(0, 2, 4, 5, "Work_For"), (4, 5, 7, 8, "OrgBased_In")]},
        # right spans and relation, wrong tail type (Org for Loc): wrong
        {"entities": [(0, 1, "Loc"), (3, 4, "Org")], "relations": [(0, 1, 3, 4, "Located_In")]},
        # right, plus a false positive
        {"entities": [(0, 2, "Peop"), (4, 5, "Loc"), (8, 10, "Other")],
         "relations": [(0, 2, 4, 5, "Live_In"), (0, 2, 8, 10, "Live_In")]},
        # direction reversed: wrong
        {"entities": [(0, 1, "Peop"), (2, 3, "Peop"), (4, 5, "Loc")], "relations": [(2, 3, 0, 1, "Kill")]},
        None,  # nothing predicted
    ]
    got = rel.score(predictions, examples)
    # relations: 6 predicted, 8 gold, 1 right; entities: 11 predicted, 16 gold, 9 right
    assert got["precision"] == pytest.approx(1 / 6)
    assert got["recall"] == pytest.approx(1 / 8)
    assert got["f1"] == pytest.approx(2 * 1 / (6 + 8))
    assert got["entity_precision"] == pytest.approx(9 / 11)
    assert got["entity_recall"] == pytest.approx(9 / 16)
    assert got["entity_f1"] == pytest.approx(2 * 9 / (11 + 16))


class OracleForward:
    """A numpy ``Forward`` that tags given entities and classifies pairs by their first tokens.

    The relation oracle looks only at each argument's first sub-token, so a pair with a wrong entity end still
    gets the gold relation: exactly the case strict scoring must count as wrong.
    """

    def __init__(self, ner, rel, features, entities, relations):
        self.ner, self.rel = ner, rel
        self.rows = {}
        for f in features:
            ranges = word_token_ranges(f["word_ids"])
            starts = {(r[0], r[2]): r[4] for r in relations[f["example_index"]]}
            by_first = {(ranges[h][0], ranges[t][0]): label for (h, t), label in starts.items()}
            self.rows[tuple(f["input_ids"])] = (f, entities[f["example_index"]], by_first)
        self.calls = []

    def _row(self, ids):
        return self.rows[tuple(int(i) for i in ids if i != 0)]

    def __call__(self, task, batch):
        self.calls.append(task)
        ids = batch["input_ids"]
        if task == "ner":
            tags = bio_tags(self.ner.labels)
            logits = np.zeros((*ids.shape, len(tags)), dtype=np.float32)
            for i, row in enumerate(ids):
                f, ents, _ = self._row(row)
                word_tags = spans_to_bio(ents, f["num_words"])
                for pos, w in enumerate(f["word_ids"]):
                    logits[i, pos, tags.index(word_tags[w]) if w is not None else 0] = 10.0
            return {"logits": logits}
        spans = batch["re_spans"]
        logits = np.zeros((*spans.shape[:2], len(self.rel.classes)), dtype=np.float32)
        for i, row in enumerate(ids):
            _, _, by_first = self._row(row)
            for p, (hs, _, ts, _) in enumerate(spans[i]):
                label = by_first.get((int(hs), int(ts)), "no_relation")
                logits[i, p, self.rel.classes.index(label)] = 10.0
        return {"logits": logits}


def test_end_to_end_evaluate_with_oracle_forward(tokenizer):
    ner, rel, examples = make_tasks()
    enc = rel.encode(examples, tokenizer, 64, train=False)
    gold_entities = [ex.entities for ex in examples]
    gold_relations = [ex.relations for ex in examples]

    perfect = OracleForward(ner, rel, enc.features, gold_entities, gold_relations)
    metrics, preds = rel.evaluate(perfect, enc, examples, batch_size=2)
    assert metrics["f1"] == metrics["entity_f1"] == metrics["f1_gold_entities"] == 1.0
    assert perfect.calls == ["ner", "relation"] * 3  # two forwards per batch of 2
    assert preds[0] == {"entities": [(0, 2, "Peop"), (4, 6, "Org"), (7, 8, "Loc")],
                        "relations": [(0, 2, 4, 6, "Work_For"), (4, 6, 7, 8, "OrgBased_In")]}

    # NER cuts "Acme Corp" to "Acme": the pair classifier still says Work_For / OrgBased_In, both count as wrong
    entities = [list(e) for e in gold_entities]
    entities[0] = [(0, 2, "Peop"), (4, 5, "Org"), (7, 8, "Loc")]
    wrong_end = OracleForward(ner, rel, enc.features, entities, gold_relations)
    metrics, preds = rel.evaluate(wrong_end, enc, examples, batch_size=4)
    assert preds[0]["relations"] == [(0, 2, 4, 5, "Work_For"), (4, 5, 7, 8, "OrgBased_In")]
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == pytest.approx(6 / 8)
    assert metrics["entity_f1"] == pytest.approx(15 / 16)
    assert metrics["f1_gold_entities"] == 1.0  # gold entities: the classifier is perfect


def test_evaluate_needs_bind(tokenizer):
    rel = build_task("relation", "relation", RELATIONS)
    enc = rel.encode(rel.read(DATA), tokenizer, 64, train=False)
    with pytest.raises(RecipeError, match="not bound"):
        rel.evaluate(lambda task, batch: {}, enc, rel.read(DATA))


# ---- head, ONNX, training ---------------------------------------------------------------------------------
def test_head_gives_finite_logits_for_any_pairs_and_handles_zero_pairs():
    import torch

    from compressor_plugins.relation.head import PairHead

    h = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)

    head = PairHead(3, 6, dropout=0.0).eval()
    mask = torch.ones(2, 5, dtype=torch.long)
    out = head(h, mask, re_spans=torch.tensor([[[1, 2, 3, 5], [0, 0, 0, 0]], [[3, 5, 0, 1], [0, 1, 3, 5]]]))
    assert out["logits"].shape == (2, 2, 6) and torch.isfinite(out["logits"]).all()
    assert head(h, mask, re_spans=torch.zeros(2, 0, 4, dtype=torch.long))["logits"].shape == (2, 0, 6)


def test_max_pool_takes_the_elementwise_max_of_each_span_and_zeros_when_empty():
    import torch

    from compressor_plugins.relation.head import max_pool

    h = torch.tensor([[[1.0, -5.0], [3.0, -2.0], [-1.0, -9.0]]])  # [1, 3, 2]
    out = max_pool(h, torch.tensor([[0, 1, 2]]), torch.tensor([[2, 3, 2]]))
    assert torch.equal(out[0, 0], torch.tensor([3.0, -2.0]))  # tokens 0..1
    assert torch.equal(out[0, 1], torch.tensor([3.0, -2.0]))  # tokens 1..2
    assert torch.equal(out[0, 2], torch.zeros(2))  # empty span


def test_sigmoid_head_decodes_by_threshold_and_its_loss_falls():
    import math

    import torch

    from compressor_plugins.relation.head import PairHead

    torch.manual_seed(0)
    head = PairHead(8, 3, dropout=0.0, classifier="sigmoid", threshold=0.4)
    h = torch.randn(2, 6, 8)
    spans = torch.tensor([[[1, 2, 3, 4], [3, 4, 1, 2]], [[0, 1, 4, 6], [0, 0, 0, 0]]])
    logits = head(h, torch.ones(2, 6, dtype=torch.long), re_spans=spans)["logits"]
    assert logits.shape == (2, 2, 3)
    # column 0 is the threshold's logit, so argmax = the best type above the threshold, else no_relation
    assert torch.allclose(logits[..., 0], torch.full((2, 2), math.log(0.4 / 0.6)))
    rel = build_task("relation", "relation", ["A", "B"], {"classifier": "sigmoid"})
    labels = torch.tensor([[1, 0], [2, -100]])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = rel.loss(head(h, None, re_spans=spans), {"re_labels": labels})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    pred = head(h, None, re_spans=spans)["logits"].argmax(-1)
    assert pred[0].tolist() == [1, 0] and int(pred[1, 0]) == 2


def test_onnx_export_matches_torch_with_any_number_of_pairs(tmp_path, tokenizer):
    import warnings

    import onnxruntime as ort
    import torch

    from compressor.model.multitask import MultiTaskModel

    torch.set_num_threads(1)
    ner, rel, examples = make_tasks()
    model = MultiTaskModel(tiny_bert(layers=1), {"ner": ner, "relation": rel}).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids, re_spans):
            return self.model(rel.name, input_ids, attention_mask, token_type_ids, re_spans=re_spans).outputs["logits"]

    batch = rel.collate(rel.encode(examples, tokenizer, 64, train=False).features)
    names = ["input_ids", "attention_mask", "token_type_ids", "re_spans"]
    path = tmp_path / "re.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names[:3]}
    axes.update(re_spans={0: "batch", 1: "pairs"}, logits={0: "batch", 1: "pairs"})
    wrapper = Wrapper().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(batch[n][:2] if n != "re_spans" else batch[n][:2, :3] for n in names),
                          str(path), dynamo=False, input_names=names, output_names=["logits"], dynamic_axes=axes,
                          opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for pairs in (batch["re_spans"].shape[1], 1, 0):
        feeds = {n: batch[n].numpy() for n in names}
        feeds["re_spans"] = feeds["re_spans"][:, :pairs]
        got = session.run(None, feeds)[0]
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
        assert got.shape == (len(examples), pairs, len(rel.classes))
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_joint_training_lowers_relation_loss_and_evaluates(tokenizer):
    import torch

    from compressor.model.multitask import MultiTaskModel
    from compressor.model.forward import torch_forward

    torch.manual_seed(0)
    ner, rel, examples = make_tasks()
    model = MultiTaskModel(tiny_bert(), {"ner": ner, "relation": rel})
    ner_batch = ner.collate(ner.encode(ner.read(DATA), tokenizer, 64, train=True).features)
    re_batch = rel.collate(rel.encode(examples, tokenizer, 64, train=True).features)
    out = model.forward_batch("relation", re_batch).outputs
    assert out["logits"].shape == (*re_batch["re_spans"].shape[:2], 6)
    targets = rel.distill_targets(out, re_batch)
    assert targets["logits"].mask.shape == out["logits"].shape[:2]
    assert int(targets["logits"].mask.sum()) == sum(len(f) for f in re_batch["re_labels"].tolist()
                                                    for f in [[x for x in f if x != -100]])

    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # speed: 30k x 32 dense grads
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = ner.loss(model.forward_batch("ner", ner_batch).outputs, ner_batch)
        re_loss = rel.loss(model.forward_batch("relation", re_batch).outputs, re_batch)
        opt.zero_grad()
        (loss + re_loss).backward()
        opt.step()
        losses.append(float(re_loss.detach()))
    assert losses[-1] < 0.3 * losses[0]

    model.eval()
    enc = rel.encode(examples, tokenizer, 64, train=False)
    metrics, preds = rel.evaluate(torch_forward(model), enc, examples, batch_size=4)
    assert set(metrics) == {"f1", "precision", "recall", "entity_f1", "entity_precision", "entity_recall",
                            "f1_gold_entities", "precision_gold_entities", "recall_gold_entities"}
    assert metrics["f1_gold_entities"] >= 0.75  # memorised the eight gold relations
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(preds) == len(examples)
