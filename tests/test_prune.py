"""Structured pruning: heads, FFN neurons and layers of a tiny random BERT, and the prune stage end to end."""

from __future__ import annotations

import json

import pytest
import torch

from _prune_helpers import PLUGIN, stage_context
from compressor.errors import RecipeError
from compressor.model.architecture import read_architecture
from compressor.model.io import load_model, read_manifest, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.prune import select
from compressor.prune.groups import check_architecture, remove_heads
from compressor.prune.pruner import StructuredPruner
from compressor.recipe import PruneStage, load_recipe
from compressor.tasks import build_task
from conftest import tiny_bert

HIDDEN, HEADS, HEAD_SIZE, FFN = 32, 4, 8, 64


pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cls_plugin")  # conftest: tiny models, shared cores


def make_model(layers: int = 2, vocab: int = 100, seed: int = 0, tasks=("a", "b")) -> MultiTaskModel:
    enc = tiny_bert(vocab_size=vocab, layers=layers, heads=HEADS, hidden=HIDDEN, ffn=FFN, seed=seed)
    return MultiTaskModel(enc, {t: build_task(PLUGIN, t) for t in tasks}).eval()


def random_batches(tasks, seed=0, vocab=50, n=2):
    g = torch.Generator().manual_seed(seed)
    return {t: [{"input_ids": torch.randint(5, vocab, (8, 10), generator=g),
                 "attention_mask": torch.ones(8, 10, dtype=torch.long),
                 "token_type_ids": torch.zeros(8, 10, dtype=torch.long),
                 "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(n)] for t in tasks}


def prune(model, batches=None, **cfg):
    return StructuredPruner(model, PruneStage(kind="prune", **cfg), batches).run()


def surviving_heads(original_query: torch.Tensor, query: torch.Tensor) -> list[int]:
    """Which original heads the pruned query rows came from."""
    blocks = original_query.view(-1, HEAD_SIZE, HIDDEN)
    return [next(h for h in range(len(blocks)) if torch.equal(blocks[h], row))
            for row in query.view(-1, HEAD_SIZE, HIDDEN)]


def test_half_the_heads_per_layer_removes_the_hand_computed_parameters():
    model = make_model()
    before = model.num_parameters()
    prune(model, head_ratio=0.5, importance="magnitude")
    removed_heads = HEADS // 2
    # per layer: Q, K, V lose removed_heads * head_size rows (weights + bias); the output dense loses as many
    # input columns (its bias is on the hidden side and stays)
    width = removed_heads * HEAD_SIZE
    per_layer = 3 * (width * HIDDEN + width) + width * HIDDEN
    assert before - model.num_parameters() == 2 * per_layer == 4192
    for layer in model.encoder.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.attention_head_size == HEAD_SIZE
        assert attn.num_attention_heads * attn.attention_head_size == attn.query.out_features == attn.all_head_size
        assert attn.key.out_features == attn.value.out_features == layer.attention.output.dense.in_features == 16
        assert layer.attention.output.dense.out_features == HIDDEN  # hidden size untouched
    assert model.heads["a"].out.in_features == HIDDEN
    out = model("a", **{k: v for k, v in random_batches("a")["a"][0].items() if k != "labels"}).outputs["logits"]
    assert out.shape == (8, 2) and torch.isfinite(out).all()


def test_ffn_pruning_removes_the_least_important_neurons():
    model = make_model()
    layer = model.encoder.encoder.layer[0]
    weak = [3, 10, 17, 20, 33, 41, 50, 63, 1, 5, 7, 9, 11, 13, 15, 19]  # 16 = 25% of 64
    with torch.no_grad():
        layer.intermediate.dense.weight[weak] *= 1e-3
        layer.output.dense.weight[:, weak] *= 1e-3
    original = layer.intermediate.dense.weight.detach().clone()
    before = model.num_parameters()
    prune(model, ffn_ratio=0.25, importance="magnitude")
    kept = [i for i in range(FFN) if i not in weak]
    assert torch.equal(layer.intermediate.dense.weight, original[kept])
    assert [a.ffn for a in read_architecture(model.encoder)] == [48, 48]
    per_layer = 16 * (HIDDEN + 1) + 16 * HIDDEN  # intermediate rows + biases, output-dense columns
    assert before - model.num_parameters() == 2 * per_layer


def _two_task_model():
    """One layer; head 0 feeds only task a's features, head 1 only task b's, head 2 weakly task a's, head 3
    nothing. Heads 2 and 3 have the largest weights (magnitude keeps them), heads 0 and 1 the smallest."""
    model = make_model(layers=1, vocab=50)
    a, b = slice(0, 16), slice(16, 32)
    attn = model.encoder.encoder.layer[0].attention
    with torch.no_grad():
        for proj in (attn.self.query, attn.self.key):
            w = proj.weight.view(HEADS, HEAD_SIZE, HIDDEN)
            w[0:2] *= 0.1
            w[2:4] *= 5
        o = attn.output.dense.weight.view(HIDDEN, HEADS, HEAD_SIZE)
        o[b, 0] = 0
        o[a, 1] = 0
        o[b, 2] = 0
        o[a, 2] *= 0.3
        o[:, 3] = 0
        model.encoder.encoder.layer[0].output.dense.weight.zero_()  # the FFN mixes no features
        model.heads["a"].out.weight[:, b] = 0
        model.heads["b"].out.weight[:, a] = 0
    return model, attn.self.query.weight.detach().clone()


def test_taylor_on_the_multi_task_loss_keeps_the_head_each_task_needs():
    model, query = _two_task_model()
    prune(model, random_batches("ab"), head_ratio=0.5, importance="taylor")
    assert surviving_heads(query, model.encoder.encoder.layer[0].attention.self.query.weight) == [0, 1]

    # scored on task a alone, head 1 (task b's only head) goes
    model, query = _two_task_model()
    prune(model, random_batches("a"), head_ratio=0.5, importance="taylor")
    assert surviving_heads(query, model.encoder.encoder.layer[0].attention.self.query.weight) == [0, 2]

    # magnitude keeps the big useless heads
    model, query = _two_task_model()
    prune(model, head_ratio=0.5, importance="magnitude")
    assert surviving_heads(query, model.encoder.encoder.layer[0].attention.self.query.weight) == [2, 3]


def test_pruned_model_saves_and_reloads_to_identical_logits(tmp_path, tokenizer):
    model = make_model(layers=3, vocab=len(tokenizer))
    reports = prune(model, random_batches("ab", vocab=200), head_ratio=0.5, ffn_ratio=0.5, scope="global",
                    importance="taylor", drop_layers=[1])
    assert reports[0].dropped_layers == [1] and reports[0].layers == [0, 2]
    arch = read_architecture(model.encoder)
    assert len(arch) == 2 and sum(a.heads for a in arch) == 4 and sum(a.ffn for a in arch) == FFN
    assert all(a.heads >= 1 for a in arch)
    save_model(model, tokenizer, tmp_path / "m", max_length=32)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["architecture"]["layers"] == [a.to_dict() for a in arch]
    loaded, _, _ = load_model(tmp_path / "m")
    check_architecture(loaded.encoder)
    batch = tokenizer(["a fine example", "another, longer example sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for task in ("a", "b"):
            assert torch.equal(model(task, **batch).outputs["logits"], loaded(task, **batch).outputs["logits"])


def test_iterative_steps_reach_the_ratio_gradually_and_drop_layers_by_importance():
    model = make_model(layers=3)
    reports = prune(model, random_batches("ab"), head_ratio=0.5, steps=2, drop_num_layers=1)
    assert [r.architecture[0]["heads"] for r in reports] == [3, 2]  # round(4 * 0.5 * 1/2) = 1, then 2
    assert sum(len(r.dropped_layers) for r in reports) == 1 and len(reports[-1].layers) == 2


def test_ratio_outside_the_open_interval_is_rejected(tmp_path):
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="head_ratio"):
            PruneStage(kind="prune", head_ratio=bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntasks:\n  - {name: a, plugin: x, data: {train: t.txt}}\nstages:\n"
                      "  - kind: prune\n    ffn_ratio: 1.2\n")
    with pytest.raises(RecipeError, match=r"r.yaml:6: stages\[0\].ffn_ratio"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match="nothing to prune"):
        PruneStage(kind="prune")


def test_removing_every_head_of_a_layer_raises():
    with pytest.raises(RecipeError, match="remove all 4 heads of layer 0"):
        prune(make_model(), head_ratio=0.9)  # round(4 * 0.9) = 4
    with pytest.raises(RecipeError, match="remove all 4 heads of layer 1"):
        prune(make_model(), head_ratio=0.5, layer_ratios={1: {"head_ratio": 0.95}})
    with pytest.raises(RecipeError, match="every head of layer 1"):
        prune(make_model(), heads={1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="without attention heads"):
        remove_heads(make_model().encoder, {0: [0, 1, 2, 3]})
    with pytest.raises(RecipeError, match="no layer 5"):
        prune(make_model(), drop_layers=[5])


def test_explicit_heads_and_per_layer_overrides():
    model = make_model()
    query = model.encoder.encoder.layer[1].attention.self.query.weight.detach().clone()
    prune(model, heads={1: [0, 2]}, ffn_ratio=0.5, layer_ratios={0: {"ffn_ratio": 0.0}}, importance="magnitude")
    assert [a.heads for a in read_architecture(model.encoder)] == [4, 2]
    assert surviving_heads(query, model.encoder.encoder.layer[1].attention.self.query.weight) == [1, 3]
    assert [a.ffn for a in read_architecture(model.encoder)] == [64, 32]


def test_global_ranking_keeps_one_unit_per_layer():
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.full((4,), 0.01)]
    removed, left = select.global_ranking(scores, [4, 4], [4, 4], ratio=0.75, step=1, steps=1)
    assert sum(len(v) for v in removed.values()) == 6 and left == 0
    assert removed == {0: [0, 1, 2], 1: [0, 1, 2]}
    removed, left = select.global_ranking(scores, [4, 4], [4, 4], ratio=0.9, step=1, steps=1)
    assert left == 1  # round(7.2) = 7 asked, 6 possible


def test_prune_stage_end_to_end_with_recovery(tmp_path, tokenizer):
    # the input model differs from the teacher, so distillation recovery has a gap to close
    save_model(make_model(vocab=len(tokenizer), seed=1), tokenizer, tmp_path / "input", max_length=32)
    teacher = make_model(vocab=len(tokenizer))
    with torch.no_grad():  # random init: attention and FFN barely move the residual stream; make them matter
        for layer in teacher.encoder.encoder.layer:
            for w in (layer.attention.self.value.weight, layer.attention.output.dense.weight,
                      layer.intermediate.dense.weight, layer.output.dense.weight):
                w.mul_(4.5)
        for head in teacher.heads.values():
            head.out.weight.mul_(5)
    save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    stage = {"kind": "prune", "head_ratio": 0.5, "ffn_ratio": 0.5, "steps": 2, "importance": "taylor",
             "importance_batches": 2, "batch_size": 4}

    def kd_gap(ctx):
        """Sum over tasks of the mean KL(teacher || pruned) on the training sentences."""
        pruned, tok, _ = load_model(ctx.out_dir / "model")
        total = 0.0
        for task in ("a", "b"):
            batch = pruned.tasks[task].collate(ctx.data.encoded(task, "train", tok, 32).features)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                t = teacher(task, **inputs).outputs["logits"].log_softmax(-1)
                s = pruned(task, **inputs).outputs["logits"].log_softmax(-1)
            total += float((t.exp() * (t - s)).sum(-1).mean())
        return total

    from compressor.stages.prune import run

    ctx = stage_context(tmp_path / "plain", stage, tmp_path / "input", tmp_path / "teacher")
    result = run(ctx)
    assert result.model_dir == ctx.final_dir / "model"
    assert [a["heads"] for a in result.outputs["architecture"]] == [2, 2]
    assert [a["ffn"] for a in result.outputs["architecture"]] == [32, 32]
    assert result.outputs["parameters_before"] - result.outputs["parameters_after"] == 4192 + 4160
    assert "parameters" in result.notes[0] and "heads per layer [2, 2]" in result.notes[1]
    assert [s["architecture"][0]["heads"] for s in result.outputs["steps"]] == [3, 2]
    assert {(r["stage"], r["task"], r["split"]) for r in ctx.reporter.rows} == {("prune", t, "test") for t in "ab"}
    gap_plain = kd_gap(ctx)

    stage = {**stage, "recovery_steps": 10, "recovery": {"lr": 1e-3, "alpha": 0.0, "batch_size": 4}}
    ctx = stage_context(tmp_path / "recovered", stage, tmp_path / "input", tmp_path / "teacher")
    result = run(ctx)
    assert result.outputs["teacher"] == "teacher"
    first, second = (s["recovery"]["kd_logits"] for s in result.outputs["steps"])
    assert second < first
    assert kd_gap(ctx) < 0.25 * gap_plain


def test_a_second_prune_stage_distils_each_layer_against_the_teacher_layer_it_came_from(tmp_path, tokenizer,
                                                                                         monkeypatch):
    # depth (teacher -> layers kept) then width on that model: the width recovery must compare hidden states
    # with the teacher layers the depth stage kept, not a uniform map; each manifest records them
    from compressor.distill import objective
    from compressor.stages.prune import run

    save_model(make_model(layers=4, vocab=len(tokenizer)), tokenizer, tmp_path / "teacher", max_length=32)
    depth = {"kind": "prune", "drop_layers": [1, 2], "importance_batches": 2, "batch_size": 4}
    ctx = stage_context(tmp_path / "depth", depth, tmp_path / "teacher", tmp_path / "teacher")
    run(ctx)
    depth_dir = ctx.out_dir / "model"
    assert read_manifest(depth_dir)["teacher_layers"] == [0, 3]

    maps = []
    engine = objective.recovery_engine
    monkeypatch.setattr(objective, "recovery_engine", lambda *a, **k: maps.append(k["layer_map"]) or engine(*a, **k))
    width = {"kind": "prune", "head_ratio": 0.5, "importance_batches": 2, "batch_size": 4, "recovery_steps": 2,
             "recovery": {"alpha": 0.0, "batch_size": 4, "weights": {"hidden": 1.0}}}
    ctx = stage_context(tmp_path / "width", width, depth_dir, tmp_path / "teacher")
    result = run(ctx)
    assert maps == [{0: 0, 1: 3}]  # the uniform map of 2 layers in 4 would be {0: 1, 1: 3}
    assert result.outputs["teacher_layers"] == [0, 3]
    assert read_manifest(ctx.out_dir / "model")["teacher_layers"] == [0, 3]


def test_prune_stage_needs_a_model(tmp_path):
    from compressor.stages.prune import run

    with pytest.raises(RecipeError, match="put a train or distill stage before it"):
        run(stage_context(tmp_path, {"kind": "prune", "head_ratio": 0.5}, None))
