"""Every registered task plugin through the whole contract (``compressor.testing.check_plugin``), plus registry
behaviour.

Parametrised over ``TASKS.names()``: a built-in plugin is checked on its fixture in ``tests/plugin_fixtures.py``;
a plugin installed from another distribution is checked there when it has an entry, and skipped with a message
when it has none (its own test suite runs the same kit on its own fixture).
"""

from __future__ import annotations

import pytest
from plugin_fixtures import PLUGIN_FIXTURES

from compressor.errors import RegistryError
from compressor.registry import Registry
from compressor.tasks import BASE_INPUTS, TASKS, MetricSpec, TaskPlugin, build_task, register_task, validate_plugin
from compressor.testing import check_plugin
from compressor_plugins.ner import NerTask

BUILTIN = ("ner", "classification", "relation", "qa")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, shared cores


@pytest.mark.parametrize("plugin", TASKS.names())
def test_plugin_contract(plugin, tokenizer):
    entry = PLUGIN_FIXTURES.get(plugin)
    if entry is None:
        if plugin in BUILTIN:
            pytest.fail(f"built-in plugin '{plugin}' has no entry in tests/plugin_fixtures.py")
        pytest.skip(f"task plugin '{plugin}' (installed from {TASKS.source(plugin)}) has no fixture in "
                    "tests/plugin_fixtures.py; its own tests run compressor.testing.check_plugin")
    siblings = {name: {**spec, "path": spec["path"]} for name, spec in entry.get("siblings", {}).items()}
    report = check_plugin(plugin, entry["path"], format=entry.get("format"), options=entry.get("options"),
                          labels=entry.get("labels"), siblings=siblings, max_length=entry.get("max_length", 64),
                          tokenizer=tokenizer)
    for part in ("encode", "collate", "onnx_outputs", "loss", "distill_targets", "decode", "score",
                 "runtime decoder", "save/load"):
        assert part in report.checked, (part, report.checked)
    assert report.plugin == plugin and report.examples > 0


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
