"""PCGrad task balancing: the projection, the grouping of draws, and training with it."""

from __future__ import annotations

import random

import pytest
import torch

from compressor.train.pcgrad import group_draws, project_conflicts


def test_conflicting_gradients_lose_their_component_along_each_other():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    summed = project_conflicts([g1, g2], random.Random(0))
    # g1' = g1 - (g1.g2/|g2|^2) g2 = [0.5, 0.5]; g2' = g2 - (g2.g1/|g1|^2) g1 = [0, 1]
    assert torch.allclose(summed, torch.tensor([0.5, 1.5]))
    assert torch.dot(torch.tensor([0.5, 0.5]), g2) >= 0 and torch.dot(torch.tensor([0.0, 1.0]), g1) >= 0


def test_agreeing_gradients_are_summed_unchanged():
    grads = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.5, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])]
    assert torch.allclose(project_conflicts(grads, random.Random(0)), sum(grads))
    assert torch.allclose(project_conflicts(grads[:1], random.Random(0)), grads[0])


def test_with_two_tasks_the_step_never_goes_against_either_task():
    torch.manual_seed(0)
    for _ in range(50):
        g = [torch.randn(8), torch.randn(8)]
        summed = project_conflicts(g, random.Random(0))
        assert torch.dot(summed, g[0]) >= -1e-5 and torch.dot(summed, g[1]) >= -1e-5
    conflicting = [torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.1])]
    assert torch.dot(sum(conflicting), conflicting[0]) < 0  # the plain sum would undo task 0


def test_a_zero_gradient_is_left_alone():
    grads = [torch.tensor([1.0, -1.0]), torch.zeros(2)]
    assert torch.equal(project_conflicts(grads, random.Random(0)), grads[0])


def test_draws_group_until_a_task_repeats_or_the_limit():
    draws = iter(["b", "a", "c", "a"])
    assert group_draws("a", draws, 4) == (["a", "b"], "a")
    assert group_draws("a", draws, 4) == (["a", "c"], "a")
    assert group_draws("x", iter(["y", "z"]), 2) == (["x", "y"], None)
    assert group_draws("x", iter([]), 1) == (["x"], None)


def test_training_with_pcgrad_takes_every_draw_and_learns(tmp_path):
    from conftest import FIXTURES, tiny_bert
    from test_pipeline import recipe_text
    from transformers import AutoTokenizer

    from compressor.data.store import DataStore
    from compressor.model.multitask import build_model, resolve_encoder_path
    from compressor.recipe import load_recipe
    from compressor.train.loop import train_model

    model_dir = tmp_path / "enc"
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_encoder_path("offline-default")).save_pretrained(model_dir)
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(model_dir, epochs=3, baselines=False).replace("strategy: uncertainty",
                                                                              "strategy: pcgrad"))
    recipe = load_recipe(path)
    data = DataStore(recipe.data_options(), FIXTURES / "pipeline")
    data.fit_labels()
    model, tok = build_model(str(model_dir), data.tasks)
    result = train_model(model, tok, data, recipe.stages[0], seed=1)
    draws = sum(sum(h["steps"].values()) for h in result.history)
    assert result.optimizer_steps == draws  # the schedule advanced once per draw
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    assert all(last[t] < first[t] for t in first)
    assert result.history[-1]["task_weights"] == {"ner": 1.0, "sst": 1.0}


def test_pcgrad_is_a_known_strategy_and_a_typo_is_named():
    from pydantic import ValidationError

    from compressor.train.options import LossWeighting

    assert LossWeighting(strategy="pcgrad").strategy == "pcgrad"
    with pytest.raises(ValidationError, match="pcgrad"):
        LossWeighting(strategy="pcgrd")
