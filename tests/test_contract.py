"""Every registered task plugin through the whole contract on a tiny random BERT, plus registry behaviour.

Parametrised over ``TASKS.names()``, so a new plugin (built-in or installed from another distribution) is tested
as soon as it registers; one without an entry in ``tests/plugin_fixtures.py`` fails rather than being skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from conftest import tiny_bert
from plugin_fixtures import PLUGIN_FIXTURES

from compressor.errors import RegistryError
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.registry import Registry
from compressor.report.measure import torch_forward
from compressor.tasks import (
    BASE_INPUTS, TASKS, DistillTarget, MetricSpec, TaskPlugin, build_task, register_task, validate_plugin,
)
from compressor_plugins.ner import NerTask

BATCH = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup_tasks(plugin: str) -> tuple[dict[str, TaskPlugin], dict[str, list[Any]], dict[str, Any]]:
    """Build, bind and label the task under test (named after its plugin) and its siblings, like DataStore."""
    entry = PLUGIN_FIXTURES.get(plugin)
    if entry is None:
        pytest.fail(f"task plugin '{plugin}' (from {TASKS.source(plugin)}) has no entry in tests/plugin_fixtures.py; "
                    "every registered plugin must pass the contract test")
    specs = {plugin: {**entry, "plugin": plugin}, **entry.get("siblings", {})}
    tasks = {name: build_task(s["plugin"], name, s.get("labels"), s.get("options")) for name, s in specs.items()}
    for task in tasks.values():
        task.bind(tasks)
    examples = {}
    for name, task in tasks.items():
        examples[name] = task.read(specs[name]["path"], specs[name].get("format"))
        assert examples[name], f"fixture of '{name}' read no examples"
        if not task.labels:
            task.labels = list(task.fit_labels(examples[name]))
    return tasks, examples, specs[plugin]


@pytest.mark.parametrize("plugin", TASKS.names())
def test_plugin_contract(plugin, tokenizer, tmp_path):
    tasks, all_examples, spec = setup_tasks(plugin)
    task, examples = tasks[plugin], all_examples[plugin]
    assert isinstance(task.metric, MetricSpec)
    max_length = spec.get("max_length", 64)

    # read -> encode
    encoded = task.encode(examples, tokenizer, max_length, True)
    assert encoded.num_examples == len(examples)
    assert encoded.features and all(0 <= f["example_index"] < len(examples) for f in encoded.features)
    assert all(len(f["input_ids"]) <= max_length for f in encoded.features)

    # collate
    feats = encoded.features[:BATCH]
    batch = task.collate(feats)
    assert {"input_ids", "attention_mask"} <= set(batch)
    n, seq = batch["input_ids"].shape
    assert n == len(feats) and batch["attention_mask"].shape == (n, seq)
    for spec_in in task.onnx_inputs():
        assert spec_in.name in batch, f"extra input '{spec_in.name}' missing from the collated batch"
        # example_shape is every dim after the batch dim (as dummy_inputs and runtime.spec.ExtraInput read it)
        assert batch[spec_in.name].dim() == 1 + len(spec_in.example_shape)
        assert batch[spec_in.name].shape[0] == n

    # forward: outputs named and shaped as onnx_outputs says
    model = MultiTaskModel(tiny_bert(), tasks)
    model.train()
    outputs = model.forward_batch(plugin, batch).outputs
    assert list(outputs) == [o.name for o in task.onnx_outputs()]
    for out in task.onnx_outputs():
        t = outputs[out.name]
        assert max(out.dynamic_axes) < t.dim(), f"{out.name}: dynamic axes {dict(out.dynamic_axes)} vs rank {t.dim()}"
        for axis, axis_name in out.dynamic_axes.items():
            if axis_name == "batch":
                assert t.shape[axis] == n
            if axis_name == "sequence":
                assert t.shape[axis] == seq
        assert out.atol > 0

    # loss -> backward reaches the head and the encoder
    loss = task.loss(outputs, batch)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.requires_grad
    loss.backward()
    head_grads = [p.grad for p in model.heads[plugin].parameters()]
    assert head_grads and all(g is not None for g in head_grads), "a head parameter got no gradient"
    assert any(g.abs().sum() > 0 for g in head_grads)
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.encoder.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0

    # distillation targets
    targets = task.distill_targets(outputs, batch)
    assert targets
    for name, target in targets.items():
        assert isinstance(target, DistillTarget) and target.logits.shape[0] == n, name
        if target.mask is not None:
            assert target.mask.dtype == torch.bool and target.mask.shape == target.logits.shape[:-1], name

    # decode -> aggregate -> score
    model.eval()
    forward = torch_forward(model)
    results = []
    for lo in range(0, len(encoded.features), BATCH):
        chunk = encoded.features[lo : lo + BATCH]
        np_batch = {k: v.numpy() for k, v in task.collate(chunk).items()}
        decoded = task.decode(forward(plugin, np_batch), np_batch, chunk)
        assert len(decoded) == len(chunk)
        results.extend(decoded)
    predictions = task.aggregate(results, encoded)
    assert len(predictions) == len(examples)
    _check_metrics(task, task.score(predictions, examples))
    metrics, predictions = task.evaluate(forward, encoded, examples, BATCH)
    _check_metrics(task, metrics)
    assert len(predictions) == len(examples)

    # what the manifest and the runtime store is JSON
    json.dumps(task.describe())
    assert "decoder" in json.loads(json.dumps(task.export_spec()))

    # save -> load gives the same model
    with torch.no_grad():
        before = model.forward_batch(plugin, batch).outputs
    directory = save_model(model, tokenizer, tmp_path / "model", max_length)
    loaded, _, manifest = load_model(directory)
    assert loaded.tasks[plugin].labels == task.labels
    assert loaded.tasks[plugin].describe() == task.describe()
    with torch.no_grad():
        after = loaded.forward_batch(plugin, batch).outputs
    for key in before:
        assert torch.equal(before[key], after[key]), key


def _check_metrics(task: TaskPlugin, metrics: Mapping[str, float]) -> None:
    assert task.metric.name in metrics, f"score() lacks the primary metric '{task.metric.name}': {metrics}"
    assert all(math.isfinite(float(v)) for v in metrics.values()), metrics


# ---- registry -----------------------------------------------------------------------------------------------
class _Complete(NerTask):
    """A valid plugin used to derive broken ones."""


def test_plugin_missing_a_part_is_rejected_naming_plugin_and_part():
    class NoScore(TaskPlugin):  # every part but distill_targets and score
        metric = MetricSpec("f1")
        read, fit_labels, encode, collate = NerTask.read, NerTask.fit_labels, NerTask.encode, NerTask.collate
        build_head, loss, decode, onnx_outputs = NerTask.build_head, NerTask.loss, NerTask.decode, NerTask.onnx_outputs

    with pytest.raises(RegistryError, match=r"task plugin 'broken': missing part\(s\) distill_targets, score"):
        TASKS.register("broken", NoScore)
    assert "broken" not in TASKS


def test_plugin_with_wrong_signature_is_rejected_at_registration():
    class WrongDecode(_Complete):
        def decode(self, outputs):  # the contract passes (outputs, batch, features)
            return []

    with pytest.raises(RegistryError, match=r"task plugin 'wrong': part 'decode' has signature"):
        register_task("wrong")(WrongDecode)
    assert "wrong" not in TASKS

    class WrongMetric(_Complete):
        metric = "f1"

    with pytest.raises(RegistryError, match=r"'wrongmetric': part 'metric' must be a MetricSpec"):
        validate_plugin("wrongmetric", WrongMetric)
    with pytest.raises(RegistryError, match="not a subclass"):
        validate_plugin("plain", object)


def test_duplicate_name_raises_and_unknown_name_suggests():
    with pytest.raises(RegistryError, match=r"task 'ner' is registered twice"):
        TASKS.register("ner", _Complete)
    with pytest.raises(RegistryError, match=r"unknown task 'nre'; did you mean 'ner'\?"):
        TASKS.get("nre")
    with pytest.raises(RegistryError, match=r"unknown task 'classifcation'; did you mean 'classification'\?"):
        build_task("classifcation", "x")


def test_runtime_registration_and_lazy_entries():
    registry: Registry[type[TaskPlugin]] = Registry("task", validate=validate_plugin)
    registry.register("mine", _Complete)
    assert registry.get("mine") is _Complete and registry.source("mine") == "<runtime>"
    registry.register("lazy", "compressor_plugins.ner:NerTask", source="somewhere")
    assert registry.get("lazy") is NerTask and registry.source("lazy") == "somewhere"
    registry.register("missing", "compressor_plugins.ner:Nope")
    with pytest.raises(RegistryError, match=r"task 'missing': cannot load 'compressor_plugins.ner:Nope'"):
        registry.get("missing")
    registry.register("invalid", "compressor_plugins.ner:NerExample")
    with pytest.raises(RegistryError, match=r"task plugin 'invalid': .* is not a subclass"):
        registry.get("invalid")


def test_builtin_plugins_come_from_the_compressor_distribution():
    for name in ("ner", "classification"):
        assert name in TASKS.names()
        assert TASKS.source(name) == "compressor"
        assert set(BASE_INPUTS) <= set(TASKS.get(name)(name, ["x"]).input_names())
