"""The classification plugin: readers, encoding (pairs, truncation), pooling heads, accuracy and macro-F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES, tiny_bert

from compressor.errors import DataError, RecipeError
from compressor.model.forward import torch_forward
from compressor.model.multitask import MultiTaskModel
from compressor.runtime.decoding import classify, softmax
from compressor.tasks import build_task
from compressor_plugins.classification import ClassificationTask, TextExample, accuracy, macro_f1

CLS = FIXTURES / "classification"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, shared cores


def make_task(labels=None, **options) -> ClassificationTask:
    return build_task("classification", "cls", labels, options)


# ---- readers ------------------------------------------------------------------------------------------------
def test_read_label_text_like_sst2():
    examples = make_task().read(CLS / "sst_tiny.txt")
    assert len(examples) == 6  # the blank line is skipped
    assert examples[0].label == "1" and examples[0].text.startswith("a stirring , funny")
    assert examples[4].source.line == 6 and examples[4].text == "warm , witty and wise ."
    assert make_task().fit_labels(examples) == ["0", "1"]


def test_read_tsv_pairs_and_jsonl():
    pairs = make_task(text_pair=True).read(CLS / "pairs.tsv")
    assert len(pairs) == 6 and pairs[1].label == "contradiction"
    assert pairs[1].text_pair == "The dog is running in a park."
    jsonl = make_task().read(CLS / "tiny.jsonl")
    assert [ex.label for ex in jsonl] == ["pos", "neg", "1"]  # integer labels become strings


@pytest.mark.parametrize(
    ("name", "text", "fmt", "message"),
    [
        ("bad.txt", "1 fine\nnolabel\n", None, r"bad\.txt:2: expected '<label> <text>'"),
        ("bad.txt", "1 fine\n0 \n", None, r"bad\.txt:2: expected '<label> <text>'"),
        ("bad.tsv", "pos\tok\npos\n", None, r"bad\.tsv:2: expected 'label<TAB>text"),
        ("bad.tsv", "pos\ta\tb\tc\n", None, r"bad\.tsv:1: .*4 column"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"label": "x"}\n', None, r"bad\.jsonl:2: field 'text'"),
        ("bad.jsonl", '{"text": "a", "label": null}\n', None, r"bad\.jsonl:1: field 'label'"),
        ("bad.jsonl", '{"text": "a", "text_pair": "b", "label": "x"}\n', None,
         r"bad\.jsonl:1: this record has a text pair .* text_pair: false"),
        ("x.txt", "1 a\n", "xml", r"x\.txt: unknown classification format 'xml'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, fmt, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        make_task().read(p, fmt)


def test_text_pair_option_requires_pairs():
    with pytest.raises(DataError, match=r"sst_tiny\.txt:1: .*text_pair: true but this record has no text pair"):
        make_task(text_pair=True).read(CLS / "sst_tiny.txt")


def test_invalid_options_are_recipe_errors():
    with pytest.raises(RecipeError, match="pooling"):
        make_task(pooling="max")
    with pytest.raises(RecipeError, match="unknown"):
        make_task(unknown=1)


# ---- encoding -----------------------------------------------------------------------------------------------
def test_encode_single_and_pair(tokenizer):
    task = make_task(["0", "1"])
    enc = task.encode(task.read(CLS / "sst_tiny.txt"), tokenizer, 64, train=True)
    assert enc.num_examples == 6 and enc.truncated == 0
    assert [f["labels"] for f in enc.features] == [1, 0, 1, 0, 1, 0]
    assert all(f["input_ids"][0] == tokenizer.cls_token_id for f in enc.features)

    pair_task = make_task(["contradiction", "entailment", "neutral"], text_pair=True)
    pairs = pair_task.encode(pair_task.read(CLS / "pairs.tsv"), tokenizer, 64, train=True)
    f = pairs.features[0]
    assert set(f["token_type_ids"]) == {0, 1} and f["labels"] == 1
    assert tokenizer.decode(f["input_ids"]).count("[SEP]") == 2


def test_encode_counts_truncation_and_rejects_unknown_label(tokenizer):
    task = make_task(["0", "1"])
    examples = task.read(CLS / "sst_tiny.txt")
    enc = task.encode(examples, tokenizer, 8, train=False)
    assert len(enc.features) == 6  # truncated, never dropped
    assert all(len(f["input_ids"]) <= 8 for f in enc.features)
    assert enc.truncated == 5  # all but "warm , witty and wise ." (6 words + [CLS] + [SEP] = 8)
    with pytest.raises(DataError, match=r"sst_tiny\.txt:2: label '0' is not in the labels of task 'cls'"):
        make_task(["1"]).encode(examples, tokenizer, 8, train=False)


def test_collate_pads(tokenizer):
    task = make_task(["0", "1"])
    feats = task.encode(task.read(CLS / "sst_tiny.txt"), tokenizer, 64, train=True).features
    batch = task.collate(feats)
    assert batch["labels"].tolist() == [1, 0, 1, 0, 1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in feats]
    assert batch["input_ids"].shape == batch["token_type_ids"].shape


# ---- model --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_heads_pool_as_configured(tokenizer, pooling):
    task = make_task(["0", "1"], pooling=pooling, dropout=0.0)
    head = task.build_head(4)
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logits = head(hidden, mask)["logits"]
    pooled = hidden[:, 0] if pooling == "cls" else torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    assert torch.allclose(logits, head.classifier(pooled))


def test_loss_distill_targets_and_learning(tokenizer):
    torch.manual_seed(0)
    task = make_task(dropout=0.0)
    examples = task.read(CLS / "sst_tiny.txt")
    task.labels = task.fit_labels(examples)
    enc = task.encode(examples, tokenizer, 64, train=True)
    batch = task.collate(enc.features)
    model = MultiTaskModel(tiny_bert(), {"cls": task})
    out = model.forward_batch("cls", batch).outputs
    assert list(out) == ["logits"] and out["logits"].shape == (6, 2)
    loss = task.loss(out, batch)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(out["logits"], batch["labels"]))
    target = task.distill_targets(out, batch)["logits"]
    assert target.logits is out["logits"] and target.mask is None
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(30):
        loss = task.loss(model.forward_batch("cls", batch).outputs, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    model.eval()
    metrics, predictions = task.evaluate(torch_forward(model), enc, examples, batch_size=4)
    assert metrics == {"accuracy": 1.0, "macro_f1": 1.0}
    assert predictions == ["1", "0", "1", "0", "1", "0"]


# ---- decoding and scoring -----------------------------------------------------------------------------------
def test_decode_argmax_and_classify_probabilities():
    task = make_task(["a", "b", "c"])
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    assert task.decode({"logits": logits}, {}, [{}, {}, {}]) == ["b", "a", "a"]  # ties go to the first label
    (label, prob), *_ = classify(logits, task.labels)
    assert label == "b" and prob == pytest.approx(np.exp(2) / (1 + np.exp(2) + np.exp(1)))
    assert np.allclose(softmax(logits).sum(-1), 1.0)


def test_score_matches_hand_computed_accuracy_and_macro_f1():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    # a: tp 2, fp 0, fn 1 -> F1 = 2*2/(2*2+0+1) = 4/5
    # b: tp 1, fp 1, fn 1 -> F1 = 2/4 = 1/2
    # c: tp 1, fp 1, fn 0 -> F1 = 2/3
    # macro = (4/5 + 1/2 + 2/3) / 3 = 59/90; accuracy = 4/6
    examples = [TextExample("t", g, source=None) for g in gold]
    metrics = make_task(["a", "b", "c"]).score(pred, examples)
    assert metrics == pytest.approx({"accuracy": 4 / 6, "macro_f1": 59 / 90})


def test_macro_f1_equals_sklearn_on_random_labels():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        gold = rng.choice(list("abcd"), size=15).tolist()
        pred = rng.choice(list("abce"), size=15).tolist()
        assert macro_f1(pred, gold) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    assert accuracy([], []) == 0.0 and macro_f1([], []) == 0.0


def test_export_spec():
    assert make_task(["neg", "pos"]).export_spec() == {"decoder": "classification", "labels": ["neg", "pos"],
                                                       "text_pair": False}
    assert make_task(["x"], text_pair=True).export_spec()["text_pair"] is True
    (out,) = make_task(["x"]).onnx_outputs()
    assert out.name == "logits" and dict(out.dynamic_axes) == {0: "batch"}


@pytest.mark.slow
def test_reads_real_sst2_splits():
    from conftest import SHARED_DATA

    root = SHARED_DATA / "sst2"
    if not root.is_dir():
        pytest.skip("no shared SST-2 data")
    task = make_task()
    for split, n in [("train", 6920), ("dev", 872), ("test", 1821)]:
        examples = task.read(root / f"stsa.binary.{split}")
        assert len(examples) == n and {ex.label for ex in examples} == {"0", "1"}
