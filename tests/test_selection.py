"""Per-task selection after joint training: each head from the epoch that serves its task best on dev."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
from test_pipeline import recipe_text, tiny_model_path  # noqa: F401  (fixture)

PIPE = FIXTURES / "pipeline"




def test_a_head_is_swapped_in_only_when_it_scores_better(tiny_model_path, tmp_path):
    from compressor.data.store import DataStore
    from compressor.model.multitask import build_model
    from compressor.recipe import load_recipe
    from compressor.train.selection import head_state, select_heads

    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_model_path, baselines=False))
    data = DataStore(load_recipe(path).data_options(), PIPE)
    data.fit_labels()
    model, _ = build_model(str(tiny_model_path), data.tasks)
    original = {t: head_state(model, t) for t in model.tasks}
    # epoch-2 heads: every weight shifted, so the model shows which one it holds
    later = {t: (2, {k: v + 1.0 for k, v in original[t].items()}) for t in model.tasks}

    def holds_later(task):
        key = next(iter(original[task]))
        return bool(torch.equal(model.state_dict()[key], later[task][1][key]))

    def score(tasks):  # ner's later head is better, sst's later head is worse
        return {t: (0.9 if holds_later(t) else 0.5) if t == "ner" else (0.3 if holds_later(t) else 0.6)
                for t in tasks}

    chosen = select_heads(model, 1, {"ner": 0.5, "sst": 0.6}, later, score)
    assert holds_later("ner") and not holds_later("sst")
    assert chosen["ner"] == {"head_epoch": 2, "dev": 0.9, "tried_epoch": 2, "tried_dev": 0.9}
    assert chosen["sst"] == {"head_epoch": 1, "dev": 0.6, "tried_epoch": 2, "tried_dev": 0.3}
    for k, v in original["sst"].items():  # the rejected head is restored exactly
        assert torch.equal(model.state_dict()[k], v)


def test_required_by_and_with_required_follow_requires():
    from compressor.tasks import required_by, with_required

    class Plugin:
        def __init__(self, req):
            self._req = req

        def requires(self):
            return self._req

    tasks = {"ner": Plugin([]), "re": Plugin(["ner"]), "sst": Plugin([]), "x": Plugin(["re"])}
    assert required_by(tasks, "ner") == ["ner", "re", "x"]
    assert required_by(tasks, "sst") == ["sst"]
    assert with_required(tasks, "x") == ["x", "ner", "re"]
    assert with_required(tasks, "sst") == ["sst"]


@pytest.mark.parametrize("rule", ["per_task", "best_mean"])
def test_training_reports_where_each_head_came_from_and_the_final_model_scores_it(tiny_model_path, tmp_path, rule):
    from compressor.data.store import DataStore
    from compressor.model.forward import dev_metrics
    from compressor.model.multitask import build_model
    from compressor.recipe import load_recipe
    from compressor.train.loop import train_model

    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_model_path, epochs=3, baselines=False))
    recipe = load_recipe(path)
    data = DataStore(recipe.data_options(), PIPE)
    data.fit_labels()
    model, tok = build_model(str(tiny_model_path), data.tasks)
    cfg = recipe.stages[0].model_copy(update={"head_selection": rule})
    result = train_model(model, tok, data, cfg, seed=1, checkpoint_dir=tmp_path / "ck")
    assert set(result.selection) == {"ner", "sst"}
    final = dev_metrics(model, tok, data, ["ner", "sst"], data.max_length)
    by_epoch = {h["epoch"]: h["dev"] for h in result.history}
    for task, chosen in result.selection.items():
        assert chosen["dev"] == pytest.approx(final[task], abs=1e-9)
        # no task decodes over another here, so each is never worse on dev than in the best-mean-epoch model
        assert final[task] >= by_epoch[result.best_epoch][task] - 1e-9
        if rule == "best_mean":
            assert chosen["head_epoch"] == result.best_epoch
