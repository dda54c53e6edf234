"""``compressor.testing``: the contract kit catches each mistake a plugin author makes, with a message naming the
plugin, the method and what was expected; and it passes correct plugins, registered or not."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import FIXTURES

from compressor.tasks import DistillTarget, OnnxOutput
from compressor.testing import ContractError, check_plugin, contract_test
from compressor_plugins.classification import ClassificationTask
from compressor_plugins.ner import NerTask

NER_DATA = FIXTURES / "ner" / "conll04_tiny.json"
SST_DATA = FIXTURES / "classification" / "sst_tiny.txt"
FAST = {"runtime": False, "save_load": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, shared cores


def fails(cls, data, message: str, tokenizer, **kwargs) -> str:
    with pytest.raises(ContractError) as info:
        check_plugin(cls, data, tokenizer=tokenizer, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text
    return text


# ---- correct plugins pass ---------------------------------------------------------------------------------------
def test_a_correct_unregistered_plugin_passes_every_part(tokenizer):
    class MyTagger(NerTask):
        """Not registered anywhere: the kit registers it for save/load and removes it afterwards."""

    from compressor.tasks import TASKS

    report = check_plugin(MyTagger, NER_DATA, tokenizer=tokenizer)
    assert report.plugin == "mytagger" and report.examples > 0 and "f1" in report.metrics
    for part in ("encode", "first-sub-token labels", "collate", "onnx_outputs", "loss", "distill_targets",
                 "decode", "aggregate", "score", "evaluate", "export_spec", "runtime decoder", "save/load"):
        assert part in report.checked
    assert "mytagger" not in TASKS.names()
    assert report.summary().startswith("plugin 'mytagger': contract ok")


def test_contract_test_is_a_pytest_test_function(tokenizer):
    test = contract_test("classification", SST_DATA, format="label_text", tokenizer=tokenizer, **FAST)
    assert test.__name__ == "test_plugin_contract" and "classification" in test.__doc__
    test()  # passes


# ---- each mistake, caught with a clear message -------------------------------------------------------------------
def test_collate_returning_a_list(tokenizer):
    class ListCollate(ClassificationTask):
        def collate(self, features):
            batch = super().collate(features)
            return [batch["input_ids"], batch["attention_mask"]]

    fails(ListCollate, SST_DATA, r"^plugin 'listcollate': collate: returned list; expected a dict of name -> "
          r"torch.Tensor", tokenizer, format="label_text", **FAST)


def test_collate_returning_lists_inside_the_dict(tokenizer):
    class PlainLists(ClassificationTask):
        def collate(self, features):
            return {k: v.tolist() for k, v in super().collate(features).items()}

    fails(PlainLists, SST_DATA, r"collate: batch\['input_ids'\] is list; expected a torch.Tensor", tokenizer,
          format="label_text", **FAST)


def test_non_bool_distillation_mask(tokenizer):
    class LongMask(NerTask):
        def distill_targets(self, outputs, batch):
            return {"logits": DistillTarget(outputs["logits"], mask=(batch["labels"] != -100).long())}

    fails(LongMask, NER_DATA, r"^plugin 'longmask': distill_targets: mask of 'logits' has dtype torch.int64; "
          r"expected torch.bool", tokenizer, **FAST)


def test_decode_returning_the_wrong_count(tokenizer):
    class OneResult(ClassificationTask):
        def decode(self, outputs, batch, features):
            return super().decode(outputs, batch, features)[:1]

    fails(OneResult, SST_DATA, r"^plugin 'oneresult': decode: returned 1 result\(s\) for a batch of 4 features; "
          r"expected a list with one result per feature", tokenizer, format="label_text", **FAST)


def test_onnx_output_lacking_its_sequence_axis(tokenizer):
    class NoSequenceAxis(NerTask):
        def onnx_outputs(self):
            return [OnnxOutput("logits", {0: "batch"})]

    fails(NoSequenceAxis, NER_DATA, r"^plugin 'nosequenceaxis': onnx_outputs: output 'logits' changes size along "
          r"axis 1 with the sequence \(\d+ vs \d+\) but its dynamic_axes \{0: 'batch'\} do not declare it; expected "
          r"e.g. \{0: 'batch', 1: 'sequence'\}", tokenizer, **FAST)


def test_onnx_output_lacking_its_batch_axis(tokenizer):
    class NoBatchAxis(ClassificationTask):
        def onnx_outputs(self):
            return [OnnxOutput("logits", {})]

    fails(NoBatchAxis, SST_DATA, r"onnx_outputs: output 'logits' changes size along axis 0 with the batch", tokenizer,
          format="label_text", **FAST)


def test_labels_on_non_first_subtokens(tokenizer):
    class EveryPiece(NerTask):
        def encode(self, examples, tokenizer, max_length, train):
            encoded = super().encode(examples, tokenizer, max_length, train)
            for f in encoded.features:  # copy each word's label onto all its sub-tokens
                first = {}
                for pos, (w, lab) in enumerate(zip(f["word_ids"], f["labels"])):
                    if w is not None:
                        first.setdefault(w, lab)
                        f["labels"][pos] = first[w]
            return encoded

    fails(EveryPiece, NER_DATA, r"^plugin 'everypiece': encode: feature \d+ labels position \d+ \(a non-first "
          r"sub-token of word \d+\) with \d+; expected -100 everywhere but each word's first sub-token", tokenizer,
          **FAST)
    # a plugin that means it can switch the check off
    check_plugin(EveryPiece, NER_DATA, tokenizer=tokenizer, first_subtoken_labels=False, **FAST)


def test_export_spec_naming_an_unknown_decoder(tokenizer):
    class Typo(NerTask):
        def export_spec(self):
            return {**super().export_spec(), "decoder": "bioo"}

    fails(Typo, NER_DATA, r"^plugin 'typo': export_spec: task 'typo' uses unknown decoder 'bioo' \(did you mean "
          r"'bio'\?\)", tokenizer, save_load=False)


def test_missing_sibling_and_score_without_primary_metric(tokenizer):
    fails("relation", FIXTURES / "re_conll04_tiny.json", r"^plugin 'relation': requires: needs task\(s\) ner beside "
          r"it; pass siblings=", tokenizer, **FAST)

    class NoF1(NerTask):
        def score(self, predictions, examples):
            return {"accuracy": 0.5}

    fails(NoF1, NER_DATA, r"^plugin 'nof1': score: returned \{'accuracy': 0.5\}; expected a dict holding the "
          r"primary metric 'f1'", tokenizer, **FAST)


def test_score_that_looks_examples_up_by_id(tokenizer):
    class ById(ClassificationTask):
        def score(self, predictions, examples):
            by_text = {ex.text: (p, ex.label) for p, ex in zip(predictions, examples)}  # one entry per example
            right = sum(p == g for p, g in by_text.values())
            return {"accuracy": (right + 1) / (len(predictions) + 1), "macro_f1": 0.0}

    fails(ById, SST_DATA, r"^plugin 'byid': score: scored 'accuracy' .* on the same \(prediction, example\) pairs "
          r"every pair twice, .*score must read the two lists by position", tokenizer, format="label_text", **FAST)


def test_missing_part_is_reported_as_registration(tokenizer):
    class NoDecode(ClassificationTask):
        decode = None

    fails(NoDecode, SST_DATA, r"^plugin 'nodecode': registration: task plugin 'nodecode': part 'decode' is not "
          r"callable", tokenizer, format="label_text")
