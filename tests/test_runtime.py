"""The edge bundle and the torch-free runtime: same predictions as the PyTorch model, no torch imported,
one session.run for tasks that share an input, and clear errors for bad bundles and bad requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _export_helpers import build_run, make_run
from compressor.runtime import Bundle, BundleError


@pytest.fixture(scope="module")
def run():
    return build_run()


@pytest.fixture(scope="module")
def fp32_bundle(run, tmp_path_factory):
    """A bundle of the fp32 graph (bit-for-bit decisions equal to PyTorch), next to the INT8 one the run made."""
    r = make_run([{"kind": "export"}, {"kind": "bundle"}], tmp_path_factory.mktemp("fp32"), model_dir=run.model_dir)
    r.outputs["export"] = run.outputs["export"]
    r.run_stage(1)
    return Path(r.outputs["bundle"]["bundle"])


@pytest.fixture(scope="module")
def torch_predictions(run):
    """PyTorch predictions of every task on its dev split, plus the examples."""
    from compressor.model.io import load_model
    from compressor.model.forward import torch_forward

    model, tokenizer, _ = load_model(run.model_dir)
    out = {}
    for name, plugin in model.tasks.items():
        examples = run.data.examples(name, "dev")
        encoded = run.data.encoded(name, "dev", tokenizer, run.recipe.model.max_length)
        _, predictions = plugin.evaluate(torch_forward(model), encoded, examples)
        out[name] = (examples, predictions)
    return out, tokenizer


def _char_spans(tokens: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for t in tokens:
        spans.append((pos, pos + len(t)))
        pos += len(t) + 1
    return spans


def _single_word_sentences(examples, tokenizer):
    """Examples whose whitespace tokens are exactly the tokenizer's words (so word spans map 1:1)."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    return [i for i, ex in enumerate(examples)
            if [w for w, _ in pre.pre_tokenize_str(" ".join(ex.tokens))] == list(ex.tokens)]


def test_bundle_files_and_tasks_json(run, fp32_bundle):
    bundle_dir = Path(run.outputs["bundle"]["bundle"])
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["config.json", "model.onnx", "special_tokens_map.json",
                                                            "tasks.json", "tokenizer.json", "tokenizer_config.json"]
    assert (bundle_dir / "model.onnx").read_bytes() == Path(run.outputs["quantize"]["onnx"]).read_bytes()
    assert (fp32_bundle / "model.onnx").read_bytes() == Path(run.outputs["export"]["onnx"]).read_bytes()
    tasks = json.loads((bundle_dir / "tasks.json").read_text())
    assert tasks["format"] == "compressor-bundle" and tasks["version"] == 1 and tasks["max_length"] == 48
    assert tasks["metadata"]["format"] == "onnx-int8" and tasks["metadata"]["quantization"]["mode"] == "dynamic"
    rel = tasks["tasks"]["rel"]
    assert rel["plugin"] == "relation" and rel["outputs"] == {"logits": "rel.logits"}
    assert rel["inputs"] == ["input_ids", "attention_mask", "token_type_ids", "re_spans"]
    assert rel["decoder"]["decoder"] == "relation" and rel["decoder"]["entity_task"] == "ner"
    assert tasks["tasks"]["ner"]["decoder"]["tags"][0] == "O" and tasks["tasks"]["sst"]["labels"] == ["0", "1"]
    assert run.results["bundle"].outputs["format"] == "onnx-int8"


def test_runtime_decodes_like_pytorch(fp32_bundle, torch_predictions):
    preds, tokenizer = torch_predictions
    bundle = Bundle.load(fp32_bundle)

    # NER and relations (end to end over the predicted entities) on CoNLL04-style sentences
    examples, ner_pred = preds["ner"]
    _, rel_pred = preds["rel"]
    keep = _single_word_sentences(examples, tokenizer)
    assert len(keep) >= 4
    texts = [" ".join(examples[i].tokens) for i in keep]
    results = bundle.predict(texts, tasks=["ner", "rel"])
    compared_relations = 0
    for i, res in zip(keep, results):
        chars = _char_spans(examples[i].tokens)
        start_word = {s: w for w, (s, _) in enumerate(chars)}
        end_word = {e: w + 1 for w, (_, e) in enumerate(chars)}
        expected = [(chars[s][0], chars[e - 1][1], t) for s, e, t in ner_pred[i]]
        got = [(e["start"], e["end"], e["type"]) for e in res["predictions"]["ner"]["entities"]]
        assert got == expected, res["text"]
        for e in res["predictions"]["ner"]["entities"]:
            assert res["text"][e["start"]:e["end"]] == e["text"]
        got_rel = sorted((start_word[r["head"]["start"]], end_word[r["head"]["end"]],
                          start_word[r["tail"]["start"]], end_word[r["tail"]["end"]], r["type"])
                         for r in res["predictions"]["rel"]["relations"])
        assert got_rel == sorted(tuple(r) for r in rel_pred[i]["relations"]), res["text"]
        compared_relations += len(got_rel)
    assert compared_relations > 0  # the random model predicts some relations: the comparison is not vacuous

    # classification
    examples, sst_pred = preds["sst"]
    results = bundle.predict([ex.text for ex in examples], tasks=["sst"])
    assert [r["predictions"]["sst"]["label"] for r in results] == sst_pred
    for r in results:
        scores = r["predictions"]["sst"]["scores"]
        assert sum(scores.values()) == pytest.approx(1.0) and r["predictions"]["sst"]["score"] == max(scores.values())

    # QA: answers over several windows per context
    examples, qa_pred = preds["qa"]
    results = [bundle.predict(ex.context, tasks=["qa"], questions=ex.question)[0] for ex in examples]
    for ex, r, p in zip(examples, results, qa_pred):
        got = r["predictions"]["qa"]
        assert (got["answer"], got["start"], got["end"]) == (p["text"], p["start"], p["end"])
        assert got["score"] == pytest.approx(p["score"], abs=1e-3)
        assert ex.context[got["start"]:got["end"]] == got["answer"]


def test_tasks_sharing_an_input_share_one_session_run(run):
    bundle = Bundle.load(run.outputs["bundle"]["bundle"])

    class Counting:
        def __init__(self, session):
            self.session, self.runs = session, []

        def run(self, names, feeds):
            self.runs.append(list(names))
            return self.session.run(names, feeds)

    bundle.session = counting = Counting(bundle.session)
    texts = ["Anna Schmidt works for Acme Corp in Oslo .", "Paris is in France ."]
    bundle.predict(texts, tasks=["ner", "sst"])
    assert counting.runs == [["ner.logits", "sst.logits"]]  # one encoder pass for both tasks and both texts
    counting.runs.clear()
    out = bundle.predict(texts, tasks=["ner", "rel", "sst"])
    # relation needs the entities first: one more run, for its own output only
    assert counting.runs == [["ner.logits", "sst.logits"], ["rel.logits"]]
    assert set(out[0]["predictions"]) == {"ner", "rel", "sst"}


def test_long_text_is_truncated_and_flagged(run):
    bundle = Bundle.load(run.outputs["bundle"]["bundle"])
    long_text = " ".join(["Oslo"] * 200)
    res = bundle.predict([long_text, "Paris is nice ."], tasks=["ner", "sst"])
    assert res[0]["truncated"] and res[0]["predictions"]["ner"]["truncated"]
    assert not res[1]["truncated"]
    assert all(e["end"] <= 48 * 5 for e in res[0]["predictions"]["ner"]["entities"])  # only the kept words


def test_runtime_and_cli_import_no_torch(run, tmp_path):
    bundle = run.outputs["bundle"]["bundle"]
    inputs = tmp_path / "in.txt"
    inputs.write_text("Anna works for Acme in Oslo .\n\nParis is in France .\n")
    code = f"""
import json, sys
from compressor.runtime import Bundle
b = Bundle.load({bundle!r})
r = b.predict(["Anna works for Acme in Oslo ."], tasks=["ner", "rel", "sst", "qa"], questions="Who works?")
assert set(r[0]["predictions"]) == {{"ner", "rel", "sst", "qa"}}
import typer
from typer.testing import CliRunner
from compressor.cli.predict import predict
app = typer.Typer()
app.command()(predict)
app.command("other")(lambda: None)
res = CliRunner().invoke(app, ["predict", {bundle!r}, "--file", {str(inputs)!r}, "-t", "sst", "--json"])
assert res.exit_code == 0, res.output
out = json.loads(res.output)
assert [o["text"] for o in out] == ["Anna works for Acme in Oslo .", "Paris is in France ."]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "optimum"))
assert not heavy, heavy
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_predict_output_and_user_errors(run):
    from typer.testing import CliRunner

    from compressor.cli.main import app

    if not any(c.name == "predict" for c in app.registered_commands):
        pytest.skip("compressor.cli.main does not register predict")
    runner = CliRunner()
    bundle = run.outputs["bundle"]["bundle"]
    res = runner.invoke(app, ["predict", bundle, "Anna works in Oslo .", "-t", "ner", "-t", "sst"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "Anna works in Oslo ." and "ner:" in res.output and "sst:" in res.output
    res = runner.invoke(app, ["predict", bundle, "Where ?", "-t", "qa"])
    assert res.exit_code == 2 and "task 'qa' answers questions: give questions" in res.output
    res = runner.invoke(app, ["predict", bundle, "x", "-t", "pos"])
    assert res.exit_code == 2 and "does not serve task(s) 'pos'; it serves: ner, rel, sst, qa" in res.output


# ---- bad bundles and bad requests ---------------------------------------------------------------------------
@pytest.fixture
def bundle_copy(run, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(run.outputs["bundle"]["bundle"], dst)
    return dst


@pytest.mark.parametrize("missing", ["model.onnx", "tokenizer.json", "tasks.json"])
def test_missing_file(bundle_copy, missing):
    (bundle_copy / missing).unlink()
    with pytest.raises(BundleError, match=rf"bundle: missing {missing} \(a bundle holds model.onnx, tokenizer.json"):
        Bundle.load(bundle_copy)


def test_output_names_not_in_graph(bundle_copy):
    tasks = json.loads((bundle_copy / "tasks.json").read_text())
    tasks["tasks"]["sst"]["outputs"] = {"logits": "sst.scores"}
    (bundle_copy / "tasks.json").write_text(json.dumps(tasks))
    with pytest.raises(BundleError, match=r"tasks.json: output\(s\) sst.scores are not outputs of model.onnx"):
        Bundle.load(bundle_copy)


def test_file_that_is_not_onnx(bundle_copy):
    (bundle_copy / "model.onnx").write_text("this is not a protobuf")
    with pytest.raises(BundleError, match=r"model.onnx: not a loadable ONNX model"):
        Bundle.load(bundle_copy)


def test_malformed_tasks_json(bundle_copy):
    (bundle_copy / "tasks.json").write_text('{"format": "compressor-bundle",\n "version": 1,,}')
    with pytest.raises(BundleError, match=r"tasks.json:2: invalid JSON"):
        Bundle.load(bundle_copy)
    (bundle_copy / "tasks.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match=r"field 'format' is 'something-else'"):
        Bundle.load(bundle_copy)


def test_bad_requests(run):
    bundle = Bundle.load(run.outputs["bundle"]["bundle"])
    with pytest.raises(BundleError, match="text 1: empty text"):
        bundle.predict(["fine", "   "])
    with pytest.raises(BundleError, match="no text given"):
        bundle.predict([])
    with pytest.raises(BundleError, match=r"does not serve task\(s\) 'nerr'; it serves: ner, rel, sst, qa"):
        bundle.predict("Paris", tasks=["nerr"])
    with pytest.raises(BundleError, match="give questions"):
        bundle.predict("Paris is nice .", tasks=["qa"])
    with pytest.raises(BundleError, match="question 0: empty question"):
        bundle.predict("Paris is nice .", tasks=["qa"], questions=" ")


def test_text_pair_classification_matches_pytorch(tokenizer, tmp_path):
    from conftest import tiny_bert
    from plugin_fixtures import PLUGIN_FIXTURES

    from compressor.export.bundle import write_bundle
    from compressor.export.onnx_export import export_onnx, graph_spec
    from compressor.model.multitask import MultiTaskModel
    from compressor.model.forward import torch_forward
    from compressor.tasks import build_task

    entry = PLUGIN_FIXTURES["classification"]
    task = build_task("classification", "nli", None, entry["options"])
    examples = task.read(entry["path"], entry["format"])
    task.labels = task.fit_labels(examples)
    model = MultiTaskModel(tiny_bert(hidden=32, layers=2, heads=4, ffn=64, seed=3), {"nli": task}).eval()
    spec = graph_spec(model, 64)
    graph = export_onnx(model, tmp_path / "model.onnx", spec)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    bundle_dir = write_bundle(tmp_path / "bundle", graph, spec, tmp_path / "tok" / "tokenizer.json",
                              tokenizer.pad_token_id)
    encoded = task.encode(examples, tokenizer, 64, False)
    _, expected = task.evaluate(torch_forward(model), encoded, examples)
    bundle = Bundle.load(bundle_dir)
    res = bundle.predict([ex.text for ex in examples], text_pairs=[ex.text_pair for ex in examples])
    assert [r["predictions"]["nli"]["label"] for r in res] == expected
    with pytest.raises(BundleError, match="classifies text pairs: give text_pairs"):
        bundle.predict("a premise")


# ---- decoders come from the registry ----------------------------------------------------------------------------
def _set_decoder(bundle_dir: Path, task: str, decoder: dict) -> None:
    tasks = json.loads((bundle_dir / "tasks.json").read_text())
    tasks["tasks"][task]["decoder"] = decoder
    (bundle_dir / "tasks.json").write_text(json.dumps(tasks))


def test_unknown_decoder_names_the_file_and_suggests(bundle_copy):
    _set_decoder(bundle_copy, "ner", {"decoder": "bioo", "tags": ["O"]})
    with pytest.raises(BundleError) as info:
        Bundle.load(bundle_copy)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{bundle_copy / 'tasks.json'}: task 'ner' uses unknown decoder 'bioo'")
    assert "did you mean 'bio'?" in msg and "compressor.decoders" in msg


def test_decoder_settings_are_checked_at_load(bundle_copy):
    _set_decoder(bundle_copy, "ner", {"decoder": "bio"})
    with pytest.raises(BundleError, match=r"tasks.json: task 'ner' \(decoder 'bio'\): a bio decoder needs 'tags'"):
        Bundle.load(bundle_copy)
    _set_decoder(bundle_copy, "ner", {"decoder": "classification", "labels": ["a"]})
    with pytest.raises(BundleError, match=r"task 'rel' \(decoder 'relation'\): .*produces no entity spans"):
        Bundle.load(bundle_copy)


def test_builtin_decoders_are_registered_by_their_plugins():
    from compressor.runtime.decoders import DECODERS

    assert {"bio", "classification", "relation", "qa_span", "word_tags"} <= set(DECODERS.names())
    for name, module in [("bio", "compressor_plugins.ner.decoder"), ("relation", "compressor_plugins.relation.decoder"),
                         ("qa_span", "compressor_plugins.qa.decoder"),
                         ("classification", "compressor_plugins.classification.decoder")]:
        assert DECODERS.get(name).__module__ == module and DECODERS.source(name) == "compressor"


def test_a_plugin_decoder_registered_at_runtime_is_served_by_bundle_and_cli(bundle_copy):
    from typer.testing import CliRunner

    from compressor.cli.main import app
    from compressor.runtime.decoders import DECODERS, Decoder, register_decoder

    @register_decoder("length_bucket")
    class LengthBucket(Decoder):
        """A made-up decoder: the argmax label and how many tokens the text had."""

        def decode_batch(self, outputs, encodings, texts):
            logits = self.output(outputs)
            return [{"label": self.labels()[int(logits[i].argmax())], "tokens": len(enc.ids),
                     "truncated": bool(enc.overflowing)} for i, enc in enumerate(encodings)]

        def describe(self, prediction):
            return f"{prediction['label']} / {prediction['tokens']} tokens"

    try:
        _set_decoder(bundle_copy, "sst", {"decoder": "length_bucket", "labels": ["neg", "pos"]})
        bundle = Bundle.load(bundle_copy)
        (res,) = bundle.predict("Paris is nice .", tasks=["sst"])
        pred = res["predictions"]["sst"]
        assert pred["label"] in ("neg", "pos") and pred["tokens"] == 6 and pred["truncated"] is False
        out = CliRunner().invoke(app, ["predict", str(bundle_copy), "Paris is nice .", "-t", "sst"])
        assert out.exit_code == 0, out.output
        assert out.output.splitlines()[1] == f"  sst: {pred['label']} / 6 tokens"
    finally:
        DECODERS.unregister("length_bucket")


def test_word_tags_decoder_labels_each_word_at_its_first_subtoken(bundle_copy):
    tags = json.loads((bundle_copy / "tasks.json").read_text())["tasks"]["ner"]["decoder"]["tags"]
    _set_decoder(bundle_copy, "ner", {"decoder": "word_tags", "labels": tags})
    tasks = json.loads((bundle_copy / "tasks.json").read_text())
    del tasks["tasks"]["rel"]  # relations build on bio entities
    (bundle_copy / "tasks.json").write_text(json.dumps(tasks))
    bundle = FakeLogits.bundle(bundle_copy, {})
    text = "Schmidtkowski lives in Oslo ."
    # every sub-token of the first word scores B-<type 1>, except the first, which scores I-<type 1>
    enc = bundle.tokenizer.encode(text)
    first = [i for i, w in enumerate(enc.word_ids) if w is not None and enc.word_ids.index(w) == i]
    assert len([w for w in enc.word_ids if w == 0]) > 1  # the word is split into several pieces
    per_token = [1] * len(enc.ids)
    for pos, tag in zip(first, [2, 0, 0, 1, 0]):
        per_token[pos] = tag
    bundle.session.logits = {"ner.logits": per_token}
    (res,) = bundle.predict(text, tasks=["ner"])
    words = res["predictions"]["ner"]["words"]
    assert [(w["text"], w["label"]) for w in words] == [
        ("Schmidtkowski", tags[2]), ("lives", "O"), ("in", "O"), ("Oslo", tags[1]), (".", "O")]
    assert text[words[3]["start"]:words[3]["end"]] == "Oslo"
    assert res["predictions"]["ner"]["tags"] == [tags[2], "O", "O", tags[1], "O"]


class FakeLogits:
    """An ONNX Runtime stand-in: returns one-hot logits whose argmax per sub-token is ``logits[name][pos]``."""

    def __init__(self, spec):
        self.spec = spec
        self.logits: dict[str, list[int]] = {}

    @classmethod
    def bundle(cls, directory: Path, logits: dict[str, list[int]]) -> Bundle:
        from compressor.runtime.bundle import read_spec, read_tokenizer

        spec = read_spec(directory / "tasks.json")
        fake = cls(spec)
        fake.logits = logits
        return Bundle(directory, spec, read_tokenizer(directory / "tokenizer.json"), fake)

    def run(self, names, feeds):
        import numpy as np

        n, seq = feeds["input_ids"].shape
        out = []
        for name in names:
            task = next(t for t in self.spec.tasks.values() if name in t.outputs.values())
            width = len(task.decoder.get("tags") or task.decoder.get("labels") or task.labels)
            ids = self.logits[name]
            arr = np.zeros((n, seq, width), dtype=np.float32)
            for row in range(n):
                for pos in range(seq):
                    arr[row, pos, ids[pos] if pos < len(ids) else 0] = 1.0
            out.append(arr)
        return out


def test_runtime_reads_a_stray_i_as_the_start_of_an_entity(bundle_copy):
    """The torch-free bio decoder gives the entities the PyTorch plugin gives: a stray I-X starts one."""
    from compressor_plugins.ner import NerTask

    spec = json.loads((bundle_copy / "tasks.json").read_text())
    tags = spec["tasks"]["ner"]["decoder"]["tags"]
    typ = tags[1][2:]
    i_x, b_x = tags.index(f"I-{typ}"), tags.index(f"B-{typ}")
    text = "Anna met Bob in Oslo"
    #          [CLS] Anna  met Bob  in Oslo [SEP]: O I-X O I-X O B-X
    per_token = [0, i_x, 0, i_x, 0, b_x, 0]
    bundle = FakeLogits.bundle(bundle_copy, {"ner.logits": per_token})
    assert bundle.tokenizer.encode(text).word_ids == [None, 0, 1, 2, 3, 4, None]
    (res,) = bundle.predict(text, tasks=["ner"])
    got = [(e["text"], e["type"]) for e in res["predictions"]["ner"]["entities"]]
    assert got == [("Anna", typ), ("Bob", typ), ("Oslo", typ)]
    # the PyTorch side decodes the same logits to the same word spans
    import numpy as np

    task = NerTask("ner", [t[2:] for t in tags[1::2]])
    logits = np.eye(len(tags), dtype=np.float32)[per_token][None]
    feature = {"word_ids": [None, 0, 1, 2, 3, 4, None], "num_words": 5}
    assert task.decode({"logits": logits}, {}, [feature]) == [[(0, 1, typ), (2, 3, typ), (4, 5, typ)]]
