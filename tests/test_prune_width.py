"""The hidden width as a knob: cutting the residual stream consistently (embeddings, every layer, LayerNorms, task
heads of every built-in plugin), exactly equal to the old model with the removed channels silenced where that is
exact, saved and reloaded through the manifest; the prune stage's hidden_size; bad widths name the field."""

from __future__ import annotations

import pytest
import torch

from _prune_helpers import stage_context
from compressor.errors import RecipeError
from compressor.model.architecture import read_architecture
from compressor.model.io import load_model, save_model
from compressor.prune.width import channel_scores, check_width, choose_channels, cut_width

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def four_tasks(tmp_path_factory):
    """A tiny random model with the four built-in plugins' heads (NER, relation, classification, QA) and a real
    collated batch of every task."""
    from transformers import AutoTokenizer

    from _export_helpers import data_store, recipe_dict, save_tiny_model
    from compressor.recipe import Recipe

    recipe = Recipe.model_validate(recipe_dict([{"kind": "export"}]))
    data = data_store(recipe)
    directory = save_tiny_model(recipe, data, tmp_path_factory.mktemp("width") / "model")
    model, tokenizer, _ = load_model(directory)
    probe = {t: model.tasks[t].collate(data.encoded(t, "train", tokenizer, 48, train=True).features[:4])
             for t in model.tasks}
    return directory, probe


def test_head_inputs_and_encoder_are_cut_consistently_for_every_plugin(four_tasks, tmp_path):
    directory, probe = four_tasks
    model, tokenizer, _ = load_model(directory)
    old = model.encoder.config.hidden_size  # 32, 4 heads of 8
    params = model.num_parameters()
    keep = choose_channels(channel_scores(model, {t: [b] for t, b in probe.items()}), 16)
    assert len(keep) == 16 and keep == sorted(keep)
    # the heads, checked on their own: the cut head on the kept channels == the old head with the others zeroed
    heads_before = {t: model.heads[t] for t in model.tasks}
    cut_width(model, keep, probe)
    enc = model.encoder
    assert enc.config.hidden_size == 16 and enc.embeddings.word_embeddings.weight.shape[1] == 16
    assert enc.embeddings.position_embeddings.weight.shape[1] == 16
    for layer in enc.encoder.layer:
        assert layer.attention.self.query.weight.shape == (32, 16)  # 4 heads x 8 stay
        assert layer.attention.output.dense.weight.shape == (16, 32)
        assert layer.intermediate.dense.weight.shape == (64, 16) and layer.output.dense.weight.shape == (16, 64)
        assert layer.attention.output.LayerNorm.weight.shape == (16,) and layer.output.LayerNorm.weight.shape == (16,)
    assert [(a.heads, a.head_size) for a in read_architecture(enc)] == [(4, 8), (4, 8)]
    assert model.heads["sst"].classifier.weight.shape[1] == 16 and model.heads["ner"].classifier.weight.shape[1] == 16
    # relation: [max-pool; first token; width emb] x 2 + between -> 2 * (2 * 16 + 25) + 16 inputs, width pinned
    assert model.heads["rel"].mlp[0].weight.shape == (old, 2 * (2 * 16 + 25) + 16)
    assert model.tasks["rel"].options.width == old
    assert all(model.heads[t] is not heads_before[t] for t in model.tasks)
    assert model.num_parameters() < params
    # every task still runs, and the model saves and reloads to identical outputs
    save_model(model, tokenizer, tmp_path / "cut", max_length=48)
    again, _, manifest = load_model(tmp_path / "cut")
    assert manifest["architecture"]["hidden_size"] == 16
    for t, batch in probe.items():
        inputs = {k: batch[k] for k in model.tasks[t].input_names() if k in batch}
        with torch.no_grad():
            a, b = model(t, **inputs).outputs, again(t, **inputs).outputs
        for name in a:
            assert torch.equal(a[name], b[name]), (t, name)


def test_embedding_columns_are_the_kept_channels(four_tasks):
    directory, probe = four_tasks
    model, _, _ = load_model(directory)
    word = model.encoder.embeddings.word_embeddings.weight.detach().clone()
    ln = model.encoder.encoder.layer[1].output.LayerNorm.weight.detach().clone()
    keep = [0, 3, 4, 7, 8, 11, 12, 15, 16, 19, 20, 23, 24, 27, 28, 31]
    cut_width(model, keep, probe)
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, word[:, keep])
    assert torch.equal(model.encoder.encoder.layer[1].output.LayerNorm.weight, ln[keep])


def test_bad_widths_name_the_field(four_tasks):
    directory, probe = four_tasks
    model, _, _ = load_model(directory)
    with pytest.raises(RecipeError, match=r"hidden_size: 18 is not divisible by the model's 4 attention heads"):
        check_width(model.encoder, 18, "hidden_size")
    with pytest.raises(RecipeError, match=r"space\.hidden: 32 must be smaller than the model's hidden size 32"):
        check_width(model.encoder, 32, "space.hidden")
    with pytest.raises(RecipeError, match=r"hidden_size: 10 is not divisible"):
        cut_width(model, list(range(10)), probe)
    assert model.encoder.config.hidden_size == 32  # nothing changed


@pytest.mark.usefixtures("tiny_cls_plugin")
def test_prune_stage_hidden_size_then_heads(tmp_path, tokenizer):
    from test_prune_posttrain import make_model

    from compressor.stages.prune import run

    save_model(make_model(vocab=len(tokenizer)), tokenizer, tmp_path / "input", max_length=32)
    stage = {"kind": "prune", "hidden_size": 24, "head_ratio": 0.5, "importance_batches": 2, "batch_size": 4}
    ctx = stage_context(tmp_path / "run", stage, tmp_path / "input")
    result = run(ctx)
    assert result.outputs["hidden_size"] == {"before": 32, "after": 24}
    assert [a["heads"] for a in result.outputs["architecture"]] == [2, 2]
    assert any("hidden width 32 -> 24" in n for n in result.notes)
    model, _, manifest = load_model(ctx.out_dir / "model")
    assert model.encoder.config.hidden_size == manifest["architecture"]["hidden_size"] == 24

    bad = stage_context(tmp_path / "bad", {**stage, "hidden_size": 30}, tmp_path / "input")
    with pytest.raises(RecipeError, match=r"stage 'prune': hidden_size: 30 is not divisible by the model's 4"):
        run(bad)
    assert not (bad.out_dir / "model").exists()


@pytest.mark.usefixtures("tiny_cls_plugin")
def test_search_knob_hidden_checks_the_source_and_builds_the_width(tmp_path, tokenizer):
    from test_prune_posttrain import make_model

    from compressor.recipe import SearchSpace, SearchStage
    from compressor.search.candidate import CandidateBuilder
    from compressor.search.space import Space

    model = make_model(vocab=len(tokenizer))
    arch = read_architecture(model.encoder)
    space = Space(SearchSpace(hidden=[None, 16, 24], head_ratio=[0.0], ffn_ratio=[0.0]), arch, "stages[1].space",
                  32, 4)
    assert space.distributions()["hidden"].choices == (None, 16, 24)
    assert space.uncut_params()["hidden"] is None and space.size == 2 * 3  # layers 1..2 x hidden
    knobs = space.knobs({**space.uncut_params(), "hidden": 16})
    assert knobs.hidden == 16 and knobs.cuts_encoder and "hidden 16" in knobs.describe()
    # a space without the knob has no "hidden" parameter (its studies keep their parameters)
    assert "hidden" not in Space(SearchSpace(), arch, "s", 32, 4).distributions()
    for values, pattern in (([18], r"stages\[1\]\.space\.hidden: 18 is not divisible by the source model's 4"),
                            ([32], r"stages\[1\]\.space\.hidden: the source model's hidden size is 32; cannot cut "
                                   r"it to 32")):
        with pytest.raises(RecipeError, match=pattern):
            Space(SearchSpace(hidden=values), arch, "stages[1].space", 32, 4)

    ctx = stage_context(tmp_path, {"kind": "prune", "head_ratio": 0.5}, None)
    stage = SearchStage(kind="search", importance_batches=2, batch_size=4)
    builder = CandidateBuilder(stage, model, tokenizer, model, None, ctx.data, 32, {"a": 1.0, "b": 1.0}, 1, 0)
    built, kept = builder.build(knobs, 0)
    assert built.encoder.config.hidden_size == 16 and kept == [0, 1]
    assert model.encoder.config.hidden_size == 32  # the source is untouched
    batch = builder.batches["a"][0]
    with torch.no_grad():
        out = built("a", **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    assert out.outputs["logits"].shape == (len(batch["input_ids"]), 2)


def test_a_width_cut_model_exports_with_parity(four_tasks, tmp_path):
    from _export_helpers import make_run

    directory, probe = four_tasks
    model, tokenizer, _ = load_model(directory)
    cut_width(model, choose_channels(channel_scores(model), 16), probe)
    save_model(model, tokenizer, tmp_path / "cut", max_length=48)
    r = make_run([{"kind": "export", "evaluate": False}], tmp_path / "run", model_dir=tmp_path / "cut")
    out = r.run_stage(0).outputs  # the export stage refuses a graph that fails its parity check
    import onnx

    graph = onnx.load(out["onnx"])
    word = next(i for i in graph.graph.initializer if "word_embeddings" in i.name)
    assert list(word.dims)[1] == 16
