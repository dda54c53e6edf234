"""A stage kind is its config model, its runner and one registration: everything else is derived from it.

Copy the second test when you add a stage kind: it registers one at run time and checks that the recipe's stage
union, the stage-chain check, the run directory's artefact lookup and the teacher lookup all know it.
"""

from __future__ import annotations

import importlib
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
from pydantic import Field, TypeAdapter

from compressor.errors import RecipeError
from compressor.recipe import Stage
from compressor.recipe._base import NAME, Strict
from compressor.recipe.schema import stage_union
from compressor.stage_kinds import STAGE_KINDS, StageKind, kinds_giving, register


class ToyStage(Strict):
    """A stage kind that exists only in this test."""

    kind: Literal["toy"]
    name: str = Field("toy", pattern=NAME)


def test_every_registered_kind_has_its_config_in_the_union_and_an_importable_runner():
    union = typing.get_args(typing.get_args(Stage)[0])
    for kind in STAGE_KINDS.names():
        spec = STAGE_KINDS.get(kind)
        config = spec.config_class()
        assert typing.get_args(config.model_fields["kind"].annotation) == (kind,), kind
        assert config in union, kind
        module, _, attr = spec.runner.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), spec.runner


@pytest.fixture
def toy_kind():
    register("toy", StageKind(f"{__name__}:ToyStage", f"{__name__}:_run_toy", needs="teacher",
                              gives=frozenset({"model"})), source="tests")
    yield
    STAGE_KINDS.unregister("toy")


def _run_toy(ctx):  # the toy kind's runner: never called here
    raise AssertionError("not run in these tests")


def test_one_registration_makes_a_kind_known_everywhere(toy_kind):
    from compressor.checks import check_stage_chain
    from compressor.rundir import ModelDir, StageRecord, latest, teacher

    stages = TypeAdapter(list[stage_union()]).validate_python(
        [{"kind": "train"}, {"kind": "toy"}, {"kind": "export"}, {"kind": "bundle"}])
    assert isinstance(stages[1], ToyStage)  # the union has the new config model
    assert "toy" in kinds_giving("model") and "toy" not in kinds_giving("teacher")
    check_stage_chain(SimpleNamespace(stages=stages), Path("recipe.yaml"))  # export takes the toy's model

    with pytest.raises(RecipeError, match=r"stage 'toy' \(toy\) needs a teacher model from an earlier stage "
                                          r"\(of kind load, train\)"):
        check_stage_chain(SimpleNamespace(stages=stages[1:]), Path("recipe.yaml"))
    bad_source = TypeAdapter(list[stage_union()]).validate_python(
        [{"kind": "train"}, {"kind": "toy"}, {"kind": "bundle", "source": "toy"}])
    with pytest.raises(RecipeError, match="source 'toy' is a toy stage; expected export or quantize"):
        check_stage_chain(SimpleNamespace(stages=bad_source), Path("recipe.yaml"))

    records = [StageRecord("teacher", "train", {}, Path("t")), StageRecord("toy", "toy", {}, Path("m"))]
    assert latest(records, ModelDir) == ("toy", ModelDir(Path("m")))  # the latest model stage
    assert teacher(records).name == "teacher"


def test_a_stage_of_a_kind_no_longer_registered_leaves_nothing_typed():
    from compressor.rundir import ModelDir, OnnxGraph, StageRecord, latest

    gone = StageRecord("old", "retired_kind", {"onnx": "x.onnx", "graph": "g.json", "model_dir": "m"}, Path("m"))
    assert gone.artefacts() == [ModelDir(Path("m"))]
    with pytest.raises(RecipeError, match="needs an export stage before it"):
        latest([gone], OnnxGraph, consumer="q")


def test_registration_refuses_unknown_tokens_and_duplicates():
    with pytest.raises(ValueError, match="unknown stage token"):
        StageKind("m:C", "m:run", needs="modle")
    with pytest.raises(Exception, match="registered twice"):
        register("train", STAGE_KINDS.get("train"))
    assert kinds_giving("teacher") == ("load", "train")
