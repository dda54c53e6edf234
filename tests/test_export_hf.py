"""The Hugging Face ecosystem: ``compressor export-hf`` directories loaded by transformers (AutoModel,
AutoTokenizer, the task auto classes, a token-classification pipeline) with compressor's outputs, for a plain
and a pruned model (per-layer heads and FFN widths, a dropped layer); and edge bundles loaded by optimum's
``ORTModelForCustomTasks`` and ``AutoTokenizer`` with the outputs of ``compressor predict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _export_helpers import data_store, make_run, recipe_dict
from compressor.cli.main import app
from conftest import tiny_bert

runner = CliRunner()
TEXTS = ["John Smith lives in Paris and works for Acme Corp .", "a gorgeous , witty , seductive movie .", "Oslo ."]
CONTEXT = "Anna Schmidt works for Acme Corp in Oslo since 2019 ."
pytestmark = pytest.mark.usefixtures("one_thread")


def _four_task_model(layers: int, seed: int):
    """A random BERT (hidden 32, 4 heads, FFN 64) with NER, relation, classification and QA heads."""
    from compressor.model.multitask import MultiTaskModel
    from compressor.recipe import Recipe
    from compressor.tasks import build_task

    data = data_store(Recipe.model_validate(recipe_dict([{"kind": "export"}])))
    tasks = {n: build_task(p.plugin_name, n, p.labels, p.options.model_dump()) for n, p in data.tasks.items()}
    model = MultiTaskModel(tiny_bert(hidden=32, layers=layers, heads=4, ffn=64, seed=seed), tasks).eval()
    with torch.no_grad():  # larger head weights than BERT's init, so argmax decisions differ from token to token
        for head in model.heads.values():
            for p in head.parameters():
                p.mul_(30.0)
    return model


def _pruned(model):
    """Layer 1 of 3 dropped, two heads of layer 0 removed, 40% of FFN neurons removed across layers."""
    from compressor.prune.pruner import StructuredPruner
    from compressor.recipe import PruneStage

    cfg = PruneStage(kind="prune", importance="magnitude", heads={0: [1, 3]}, ffn_ratio=0.4, scope="global",
                     drop_layers=[1])
    StructuredPruner(model, cfg).run()
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """name -> (model directory, export directory written by `compressor export-hf`); the pruned model lies in a
    run directory with a report, as a prune stage leaves it."""
    from compressor.fsutil import atomic_write_text
    from compressor.model.io import save_model
    from compressor.report.rows import Reporter, make_row
    from compressor.rundir import RunDir

    root = tmp_path_factory.mktemp("export-hf")
    plain = save_model(_four_task_model(2, 0), tokenizer, root / "plain", 48)
    run = RunDir(root / "run")
    pruned = save_model(_pruned(_four_task_model(3, 1)), tokenizer, run.stage_dir(1, "prune") / "model", 48)
    run.write_state({"completed": [{"name": "teacher", "kind": "load", "outputs": {}, "model_dir": str(plain)},
                                   {"name": "prune", "kind": "prune", "outputs": {}, "model_dir": str(pruned)}]})
    reporter = Reporter("export-hf-test")
    for stage, value, size in (("teacher", 0.8, 4_000_000), ("prune", 0.76, 3_000_000)):
        reporter.add(make_row(stage, stage, "ner", "test", "f1", {"f1": value}, params=1, task_params=1,
                              size_bytes=size, latency={"p50": 1.5, "p95": 2.0}, fmt="pytorch"))
    reporter.write(run.path)
    atomic_write_text(run.path / "report.md", "# report\n")
    out = {}
    for name, model_dir in (("plain", plain), ("pruned", pruned)):
        dest = root / f"hf-{name}"
        result = runner.invoke(app, ["export-hf", str(model_dir), "--out", str(dest)])
        assert result.exit_code == 0, result.output
        out[name] = (model_dir, dest)
    return out


def _compressor(model_dir):
    from compressor.model.io import load_model

    model, tokenizer, _ = load_model(model_dir)
    return model, tokenizer


def _batch(tokenizer, texts=TEXTS):
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))


@pytest.mark.parametrize("name", ["plain", "pruned"])
def test_encoder_loads_in_automodel_with_compressors_outputs(models, name):
    from transformers import AutoModel, AutoTokenizer

    model_dir, out = models[name]
    model, ours_tok = _compressor(model_dir)
    encoder = AutoModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = _batch(tokenizer)
    assert torch.equal(batch["input_ids"], _batch(ours_tok)["input_ids"])
    with torch.no_grad():
        theirs = encoder(**batch).last_hidden_state
        ours = model.encoder(**batch).last_hidden_state
    assert float((theirs - ours).abs().max()) <= 1e-5
    assert tokenizer.model_max_length == 48
    from tokenizers import Tokenizer

    assert len(Tokenizer.from_file(str(out / "tokenizer.json")).encode(" ".join(["word"] * 700)).ids) == 48
    state = json.loads((out / "compressor.json").read_text())
    assert state["parity_max_abs_diff"]["encoder"] <= 1e-5


def test_pruned_widths_become_pruned_heads_and_zero_padding(models):
    from transformers import AutoConfig, AutoModel

    model_dir, out = models["pruned"]
    manifest = json.loads((model_dir / "manifest.json").read_text())
    layers = manifest["architecture"]["layers"]
    assert len(layers) == 2 and [la["heads"] for la in layers] == [2, 4]
    assert len({la["ffn"] for la in layers}) == 2, "global FFN pruning should leave the layers different widths"
    config = AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 2 and config.pruned_heads == {0: [2, 3]}
    assert config.intermediate_size == max(la["ffn"] for la in layers)
    encoder = AutoModel.from_pretrained(out)
    for block, la in zip(encoder.encoder.layer, layers):
        assert block.attention.self.num_attention_heads == la["heads"]
        w_in, w_out = block.intermediate.dense.weight, block.output.dense.weight
        assert torch.count_nonzero(w_in[la["ffn"]:]) == 0 and torch.count_nonzero(w_out[:, la["ffn"]:]) == 0
        assert torch.count_nonzero(block.intermediate.dense.bias[la["ffn"]:]) == 0
        assert bool((w_in[: la["ffn"]].abs().sum(dim=1) > 0).all())


@pytest.mark.parametrize("name", ["plain", "pruned"])
def test_task_heads_load_in_their_auto_classes(models, name):
    from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    model_dir, out = models[name]
    model, tokenizer = _compressor(model_dir)
    batch = _batch(tokenizer)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ner = AutoModelForTokenClassification.from_pretrained(out / "ner").eval()
        assert ner.config.id2label == dict(enumerate(model.tasks["ner"].tags))
        assert ner.config.label2id["B-Peop"] == model.tasks["ner"].tags.index("B-Peop")
        diff = (ner(**batch).logits - model.forward_batch("ner", batch).outputs["logits"])[mask]
        assert float(diff.abs().max()) <= 1e-5

        sst = AutoModelForSequenceClassification.from_pretrained(out / "sst").eval()
        assert list(sst.config.id2label.values()) == model.tasks["sst"].labels
        ours = model.forward_batch("sst", batch).outputs["logits"]
        assert float((sst(**batch).logits - ours).abs().max()) <= 1e-5 * max(1.0, float(ours.abs().max()))

        qa_batch = dict(tokenizer(["Where does Anna work ?"], [CONTEXT], return_tensors="pt"))
        qa = AutoModelForQuestionAnswering.from_pretrained(out / "qa").eval()
        theirs, ours = qa(**qa_batch), model.forward_batch("qa", qa_batch).outputs
        assert float((theirs.start_logits - ours["start_logits"]).abs().max()) <= 1e-5
        assert float((theirs.end_logits - ours["end_logits"]).abs().max()) <= 1e-5


def test_ner_head_works_in_a_transformers_pipeline(models):
    from transformers import pipeline

    model_dir, out = models["plain"]
    model, tokenizer = _compressor(model_dir)
    tagger = pipeline("token-classification", model=str(out / "ner"), device="cpu")
    text = TEXTS[0]
    found = tagger(text)
    batch = _batch(tokenizer, [text])
    with torch.no_grad():
        tags = model.forward_batch("ner", batch).outputs["logits"][0].argmax(-1).tolist()
    expected = [(i, model.tasks["ner"].tags[t]) for i, t in enumerate(tags)
                if model.tasks["ner"].tags[t] != "O" and batch["input_ids"][0, i] not in tokenizer.all_special_ids]
    assert expected, "the random head should tag some tokens"
    assert [(e["index"], e["entity"]) for e in found] == expected
    grouped = pipeline("token-classification", model=str(out / "ner"), aggregation_strategy="simple")(text)
    assert grouped and {g["entity_group"] for g in grouped} <= set(model.tasks["ner"].labels)


def test_relation_head_rebuilds_from_its_documented_form(models):
    import safetensors.torch
    from transformers import AutoModel

    from compressor.tasks import build_task

    model_dir, out = models["pruned"]
    model, tokenizer = _compressor(model_dir)
    spec = json.loads((out / "rel" / "head.json").read_text())
    assert spec["format"] == "compressor-head" and spec["inputs"][-1] == "re_spans" and spec["encoder"] == ".."
    head = build_task(spec["plugin"], spec["name"], spec["labels"], spec["options"]).build_head(spec["hidden_size"])
    head.load_state_dict(safetensors.torch.load_file(out / "rel" / "head.safetensors"))
    head.eval()
    encoder = AutoModel.from_pretrained(out).eval()
    batch = _batch(tokenizer)
    spans = torch.tensor([[[1, 3, 5, 6], [5, 6, 1, 3]]] * len(TEXTS))
    with torch.no_grad():
        theirs = head(encoder(**batch).last_hidden_state, batch["attention_mask"], re_spans=spans)["logits"]
        ours = model.forward_batch("rel", {**batch, "re_spans": spans}).outputs["logits"]
    assert float((theirs - ours).abs().max()) <= 1e-5
    state = json.loads((out / "compressor.json").read_text())
    assert state["tasks"]["rel"]["class"] is None and state["tasks"]["ner"]["class"] == "BertForTokenClassification"


def test_model_card_names_tasks_labels_results_and_limits(models):
    _, plain = models["plain"]
    _, pruned = models["pruned"]
    card = (pruned / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for text in ("| ner | ner | `ner/` | BertForTokenClassification | O, B-Loc", "`sst/` | BertForSequenceClassification",
                 "| rel | relation | `rel/` | none (compressor head)", "this model: stage `prune`",
                 "| **prune** | ner | test | f1 | 0.7600 | 0.950 | 3.0 | 1.50 | pytorch |",
                 "| teacher | ner | test | f1 | 0.8000 | 1.000 | 4.0 | 1.50 | pytorch |",
                 "attention heads per layer [2, 4]", "teacher (load) -> prune (prune)", "`pruned_heads`",
                 "zero-padded", 'pipeline("token-classification", model="PATH/ner"'):
        assert text in card, text
    assert card.count("# run/stages/01-prune/model (exported by compressor)") == 1
    assert str(pruned.parent) not in card and str(pruned.parent) not in (pruned / "compressor.json").read_text()
    plain_card = (plain / "README.md").read_text()
    assert "No run report" in plain_card and "zero-padded" not in plain_card


def test_push_to_hub_offline_is_refused_before_anything_is_written(models, tmp_path):
    model_dir, _ = models["plain"]
    result = runner.invoke(app, ["export-hf", str(model_dir), "--out", str(tmp_path / "x"), "--push-to-hub",
                                 "someone/tiny"])
    assert result.exit_code == 2 and "offline" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


# ---- bundles that optimum loads ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    run = make_run([{"kind": "export", "optimize": False, "evaluate": False}, {"kind": "bundle"}],
                   tmp_path_factory.mktemp("bundle-hf"))
    run.run_stage(0)
    run.run_stage(1)
    return Path(run.outputs["bundle"]["bundle"])


def test_optimum_and_auto_tokenizer_load_the_bundle_with_predicts_outputs(bundle):
    from optimum.onnxruntime import ORTModelForCustomTasks
    from transformers import AutoTokenizer

    from compressor.runtime import Bundle
    from compressor.runtime.decoding import bio_decode, classify

    spec = json.loads((bundle / "tasks.json").read_text())
    model = ORTModelForCustomTasks.from_pretrained(bundle)
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    assert tokenizer.model_max_length == spec["max_length"]
    enc = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    outputs = model(**feeds, re_spans=np.zeros((len(TEXTS), 0, 4), dtype=np.int64))
    session = Bundle.load(bundle).session
    names = [o.name for o in session.get_outputs()]
    reference = dict(zip(names, session.run(None, {**feeds, "re_spans": np.zeros((len(TEXTS), 0, 4), np.int64)})))
    for name in ("ner.logits", "sst.logits"):
        np.testing.assert_array_equal(outputs[name], reference[name])

    result = runner.invoke(app, ["predict", str(bundle), "--task", "ner", "--task", "sst", "--json", *TEXTS])
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)
    tags = spec["tasks"]["ner"]["decoder"]["tags"]
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    for i, (text, row) in enumerate(zip(TEXTS, predicted)):
        label, score = classify(outputs["sst.logits"][i : i + 1], spec["tasks"]["sst"]["labels"])[0]
        assert row["predictions"]["sst"]["label"] == label
        assert row["predictions"]["sst"]["score"] == pytest.approx(score, abs=1e-6)
        words = pre.pre_tokenize_str(text)
        spans = bio_decode(outputs["ner.logits"][i], enc.word_ids(i), len(words), tags)
        expected = [(text[words[a][1][0] : words[b - 1][1][1]], t) for a, b, t in spans]
        assert [(e["text"], e["type"]) for e in row["predictions"]["ner"]["entities"]] == expected


def test_bundle_tokenizer_truncates_to_max_length_for_plain_onnxruntime(bundle):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from compressor.runtime import Bundle

    spec = json.loads((bundle / "tasks.json").read_text())
    long_text = " ".join(["word"] * 700)
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    enc = tok.encode(long_text)
    assert len(enc.ids) == spec["max_length"] and enc.ids[-1] == tok.token_to_id("[SEP]")
    short = tok.encode_batch(["Oslo .", "Anna lives in Oslo ."])
    assert [len(e.ids) for e in short] == [7, 7] and short[0].attention_mask == [1, 1, 1, 1, 0, 0, 0]
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([enc.ids], dtype=np.int64),
             "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
             "token_type_ids": np.array([enc.type_ids], dtype=np.int64),
             "re_spans": np.zeros((1, 0, 4), dtype=np.int64)}
    assert sess.run(["sst.logits"], feeds)[0].shape == (1, 2)
    # the torch-free runtime reads the bundle as before: it truncates itself and says so
    row = Bundle.load(bundle).predict(long_text, tasks=["sst"])[0]
    assert row["truncated"] is True
    assert spec["metadata"]["files"]["config.json"] > 0
