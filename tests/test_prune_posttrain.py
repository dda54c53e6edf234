"""Post-training pruning (Kwon et al. 2022): mask Fisher information, masks under a FLOPs / parameter budget, and
the layer-wise least-squares reconstruction; the prune stage's ``method: posttrain``; bad budgets."""

from __future__ import annotations

import copy

import pytest
import torch

from _prune_helpers import PLUGIN, stage_context
from compressor.errors import RecipeError
from compressor.model.architecture import read_architecture
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.prune.posttrain import (
    Budget, Fisher, encoder_cost, fisher_scores, posttrain_prune, ratio_masks, reconstruct, search_masks,
)
from compressor.recipe import PruneStage
from compressor.tasks import build_task
from conftest import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cls_plugin")

HIDDEN, HEADS, FFN = 32, 4, 64


def make_model(layers: int = 2, vocab: int = 100, seed: int = 0) -> MultiTaskModel:
    """A tiny model whose attention and FFN matter (random init barely moves the residual stream otherwise)."""
    enc = tiny_bert(vocab_size=vocab, layers=layers, heads=HEADS, hidden=HIDDEN, ffn=FFN, seed=seed)
    model = MultiTaskModel(enc, {t: build_task(PLUGIN, t) for t in ("a", "b")}).eval()
    with torch.no_grad():
        for layer in model.encoder.encoder.layer:
            for w in (layer.attention.self.value.weight, layer.attention.output.dense.weight,
                      layer.intermediate.dense.weight, layer.output.dense.weight):
                w.mul_(4.0)
        for head in model.heads.values():
            head.out.weight.mul_(5)
    return model


def batches(n: int, size: int, seed: int, vocab: int = 100, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(size, 12, dtype=torch.long)
        if pad:
            mask[: size // 2, 9:] = 0  # some padding, which reconstruction must ignore
        out.append({"input_ids": torch.randint(5, vocab, (size, 12), generator=g) * mask, "attention_mask": mask,
                    "token_type_ids": torch.zeros(size, 12, dtype=torch.long),
                    "labels": torch.randint(0, 2, (size,), generator=g)})
    return out


def fisher_batches(seed: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    return {"a": batches(12, 1, seed, pad=False), "b": batches(12, 1, seed + 1, pad=False)}


def test_fisher_is_the_squared_mask_gradient_and_zero_for_a_unit_without_effect():
    model = make_model()
    layer = model.encoder.encoder.layer[0]
    with torch.no_grad():
        layer.attention.output.dense.weight[:, 16:24] = 0  # head 2 (head size 8) writes nothing
        layer.output.dense.weight[:, 5] = 0  # FFN neuron 5 writes nothing
    one = {"a": batches(1, 1, 3, pad=False)}
    fisher = fisher_scores(model, one)
    assert float(fisher.heads[0][2]) == 0 and float(fisher.ffn[0][5]) == 0
    assert all(float(h.sum()) > 0 for h in fisher.heads)
    total = sum(float(h.sum()) for h in fisher.heads) + sum(float(f.sum()) for f in fisher.ffn)
    assert total == pytest.approx(1.0)  # normalised per task
    # by hand: d loss / d (scale of head 1's context), squared, over the same total
    from compressor.prune.importance import batch_loss

    scale = torch.ones((), requires_grad=True)

    def hook(_m, args):
        x = torch.cat([args[0][..., 0:8] * scale, args[0][..., 8:]], -1)  # head 0's context scaled
        return (x, *args[1:])

    handle = layer.attention.output.register_forward_pre_hook(hook)
    (g,) = torch.autograd.grad(batch_loss(model, "a", one["a"][0]), [scale])
    handle.remove()
    raw = float(fisher.heads[0][0]) * _raw_total(model, one)
    assert raw == pytest.approx(float(g) ** 2, rel=1e-4)


def _raw_total(model, one) -> float:
    """The unnormalised Fisher total of ``one``'s single task (to undo the normalisation)."""
    from compressor.prune.posttrain import UnitMasks
    from compressor.prune.importance import batch_loss

    with UnitMasks(model.encoder) as masks:
        (task, bs), = one.items()
        grads = torch.autograd.grad(batch_loss(model, task, bs[0]), [*masks.heads, *masks.ffn])
    return sum(float((g**2).sum()) for g in grads)


@pytest.mark.parametrize("budget", [Budget(flops_ratio=0.5), Budget(params_ratio=0.4),
                                    Budget(flops_ratio=0.6, params_ratio=0.3, seq_len=64)])
def test_masks_respect_the_budget_and_keep_the_most_fisher(budget):
    gen = torch.Generator().manual_seed(1)
    fisher = Fisher([torch.rand(HEADS, generator=gen) for _ in range(3)],
                    [torch.rand(FFN, generator=gen) for _ in range(3)])
    from compressor.model.architecture import LayerArch

    arch = [LayerArch(HEADS, HIDDEN // HEADS, FFN)] * 3
    keep_h, keep_f = search_masks(fisher, arch, HIDDEN, budget)
    kept = [LayerArch(len(h), HIDDEN // HEADS, len(f)) for h, f in zip(keep_h, keep_f)]
    flops, params = encoder_cost(kept, HIDDEN, budget.seq_len)
    full_flops, full_params = encoder_cost(arch, HIDDEN, budget.seq_len)
    if budget.flops_ratio:
        assert flops <= budget.flops_ratio * full_flops
    if budget.params_ratio:
        assert params <= budget.params_ratio * full_params
    assert all(h and f for h, f in zip(keep_h, keep_f))  # every layer keeps a head and a neuron
    # within each kind, nothing dropped has more Fisher than something kept (beyond the one-per-layer floor)
    for scores, keep in ((fisher.heads, keep_h), (fisher.ffn, keep_f)):
        best = [int(torch.argmax(s)) for s in scores]
        kept_v = [float(s[j]) for i, s in enumerate(scores) for j in keep[i] if j != best[i]]
        dropped = [float(s[j]) for i, s in enumerate(scores) for j in range(len(s)) if j not in keep[i]]
        assert not kept_v or not dropped or min(kept_v) >= max(dropped)
    # the budget is used: one more neuron of the cheapest kind would break it (or none is left)
    costs_f = 2.0 * 2 * HIDDEN
    if budget.flops_ratio and not budget.params_ratio and sum(map(len, keep_f)) < 3 * FFN:
        assert flops + costs_f > budget.flops_ratio * full_flops


def test_reconstruction_lowers_the_layer_output_error():
    model = make_model(layers=3)
    calib = batches(6, 8, seed=5)
    held_out = batches(3, 8, seed=9)
    fb = fisher_batches()
    plain, rebuilt = copy.deepcopy(model), copy.deepcopy(model)
    budget = Budget(flops_ratio=0.5)
    r_plain = posttrain_prune(plain, fb, budget)
    r_rebuilt = posttrain_prune(rebuilt, fb, budget, calibration=calib)
    assert r_plain.heads_kept == r_rebuilt.heads_kept and r_plain.ffn_kept == r_rebuilt.ffn_kept
    assert r_rebuilt.flops["after"] <= r_rebuilt.flops["budget"] and r_plain.reconstruction == []
    # per layer, on the calibration data: both sums closer to the unpruned model's after the solve
    for layer in r_rebuilt.reconstruction:
        assert layer["attention_after"] < layer["attention_before"] and layer["ffn_after"] < layer["ffn_before"]

    def error(m: MultiTaskModel, which: int) -> float:
        """Relative error of every layer's output (``which``: hidden state index) on held-out tokens."""
        num = den = 0.0
        for b in held_out:
            inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                ref = model.encoder(**inputs, output_hidden_states=True).hidden_states[which]
                out = m.encoder(**inputs, output_hidden_states=True).hidden_states[which]
            keep = b["attention_mask"].bool()
            num += float(((out - ref)[keep] ** 2).sum())
            den += float((ref[keep] ** 2).sum())
        return (num / den) ** 0.5

    for which in (1, 2, 3):  # the output of every layer, on tokens the solve never saw
        assert error(rebuilt, which) < error(plain, which)
    assert error(rebuilt, 3) < 0.8 * error(plain, 3)
    # the pruned architecture is what the masks say
    assert [a.heads for a in read_architecture(rebuilt.encoder)] == [len(h) for h in r_rebuilt.heads_kept]


def test_reconstruct_is_exact_when_nothing_was_pruned():
    model = make_model()
    same = copy.deepcopy(model)
    errors = reconstruct(same.encoder, model.encoder, batches(2, 4, seed=2), damp=0.0)
    assert all(v < 1e-5 for layer in errors for v in layer.values())


def test_ratio_masks_cut_each_layer_by_its_ratio():
    fisher = Fisher([torch.tensor([0.1, 0.4, 0.3, 0.2])] * 2, [torch.arange(8.0)] * 2)
    keep_h, keep_f = ratio_masks(fisher, [0.5, 0.0], [0.25, 0.75])
    assert keep_h == [[1, 2], [0, 1, 2, 3]] and keep_f == [list(range(2, 8)), [6, 7]]


def test_a_budget_below_any_candidate_is_an_error_naming_the_field():
    from compressor.model.architecture import LayerArch

    fisher = Fisher([torch.rand(HEADS)] * 2, [torch.rand(FFN)] * 2)
    arch = [LayerArch(HEADS, HIDDEN // HEADS, FFN)] * 2
    with pytest.raises(RecipeError, match=r"posttrain\.flops_ratio: 0\.01 of the encoder layers' FLOPs .* is below "
                                          r"what any pruned model keeps"):
        search_masks(fisher, arch, HIDDEN, Budget(flops_ratio=0.01))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.posttrain\.params_ratio: 0\.02 .*parameters"):
        search_masks(fisher, arch, HIDDEN, Budget(params_ratio=0.02, field="stages[0].posttrain"))


def test_prune_stage_method_posttrain_saves_a_reloadable_model(tmp_path, tokenizer):
    from compressor.stages.prune import run

    model = make_model(vocab=len(tokenizer))
    save_model(model, tokenizer, tmp_path / "input", max_length=32)
    stage = {"kind": "prune", "method": "posttrain",
             "posttrain": {"flops_ratio": 0.5, "examples": 6, "batch_size": 4}}
    ctx = stage_context(tmp_path / "run", stage, tmp_path / "input")
    result = run(ctx)
    post = result.outputs["posttrain"]
    assert post["flops"]["after"] <= post["flops"]["budget"] and len(post["reconstruction"]) == 2
    arch = result.outputs["architecture"]
    assert [a["heads"] for a in arch] == [len(h) for h in post["heads_kept"]]
    assert result.outputs["parameters_after"] < result.outputs["parameters_before"]
    assert any("posttrain" in n and "FLOPs" in n for n in result.notes)
    reloaded, _, _ = load_model(ctx.out_dir / "model")
    assert [a.to_dict() for a in read_architecture(reloaded.encoder)] == arch


def test_recipe_checks_the_posttrain_fields():
    PruneStage.model_validate({"kind": "prune", "method": "posttrain", "posttrain": {"params_ratio": 0.5}})
    for bad, pattern in (
        ({"method": "posttrain"}, "method posttrain needs posttrain"),
        ({"method": "posttrain", "posttrain": {}}, "give flops_ratio and/or params_ratio"),
        ({"method": "posttrain", "posttrain": {"flops_ratio": 0.5}, "head_ratio": 0.5}, "posttrain chooses"),
        ({"head_ratio": 0.5, "posttrain": {"flops_ratio": 0.5}}, "posttrain is read only with method posttrain"),
        ({"method": "posttrain", "posttrain": {"flops_ratio": 1.5}}, "less than 1"),
    ):
        with pytest.raises(ValueError, match=pattern):
            PruneStage.model_validate({"kind": "prune", **bad})


def test_search_cut_posttrain_builds_the_knobs_architecture(tmp_path, tokenizer):
    from compressor.recipe import SearchStage
    from compressor.search.candidate import CandidateBuilder
    from compressor.search.space import Knobs

    model = make_model(layers=3, vocab=len(tokenizer))
    ctx = stage_context(tmp_path, {"kind": "prune", "head_ratio": 0.5}, None)
    stage = SearchStage(kind="search", cut="posttrain", importance_batches=2, batch_size=4)
    builder = CandidateBuilder(stage, model, tokenizer, model, None, ctx.data, 32, {"a": 1.0, "b": 1.0}, 1, 0)
    knobs = Knobs(2, (0.5, 0.5, 0.25), (0.5, 0.75, 0.5), None, "none")
    built, kept = builder.build(knobs, 0)
    assert len(kept) == 2 and model.num_parameters() > built.num_parameters()
    arch = read_architecture(built.encoder)
    # each kept source layer cut at its own ratios (heads 4 -> 2 or 3, FFN 64 -> 32 / 16)
    assert [a.heads for a in arch] == [HEADS - int(HEADS * knobs.head_ratios[i]) for i in kept]
    assert [a.ffn for a in arch] == [FFN - int(FFN * knobs.ffn_ratios[i]) for i in kept]
    assert len(read_architecture(model.encoder)) == 3  # the source is never modified
    with pytest.raises(ValueError, match="cut"):
        SearchStage(kind="search", cut="fisher")


def test_layers_removed_one_at_a_time_with_reconstruction_stay_closer(tmp_path, tokenizer):
    """drop_num_layers: 2, steps: 2, reconstruct: one layer at a time by measured importance, each followed by the
    least-squares reconstruction: the output stays closer to the input model's than the same drops without it."""
    from compressor.stages.prune import run

    model = make_model(layers=4, vocab=len(tokenizer))
    save_model(model, tokenizer, tmp_path / "input", max_length=32)
    stage = {"kind": "prune", "drop_num_layers": 2, "steps": 2, "importance_batches": 2, "batch_size": 4}
    results = {}
    for name, extra in (("plain", {}), ("rebuilt", {"reconstruct": True})):
        ctx = stage_context(tmp_path / name, {**stage, **extra}, tmp_path / "input")
        results[name] = (run(ctx), ctx)
    (plain, ctx_plain), (rebuilt, ctx) = results["plain"], results["rebuilt"]
    # one layer a step, the least important by measurement; the first is the same layer either way (the second
    # is measured on the reconstructed model, so it may differ)
    assert [len(s["dropped_layers"]) for s in rebuilt.outputs["steps"]] == [1, 1]
    assert plain.outputs["steps"][0]["dropped_layers"] == rebuilt.outputs["steps"][0]["dropped_layers"]
    log = rebuilt.outputs["reconstruction"]
    assert [r["layers"] for r in log] == [s["layers"] for s in rebuilt.outputs["steps"]]
    assert all(r["worst_after"] < r["worst_before"] for r in log)
    assert any("least-squares reconstruction after each of 2 pruning step(s)" in n for n in rebuilt.notes)

    def error(directory) -> float:
        pruned, tok, _ = load_model(directory)
        num = den = 0.0
        for task in ("a", "b"):
            batch = pruned.tasks[task].collate(ctx.data.encoded(task, "train", tok, 32).features)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                ref = model.encoder(**inputs).last_hidden_state
                out = pruned.encoder(**inputs).last_hidden_state
            keep = inputs["attention_mask"].bool()
            num += float(((out - ref)[keep] ** 2).sum())
            den += float((ref[keep] ** 2).sum())
        return (num / den) ** 0.5

    assert error(ctx.out_dir / "model") < error(ctx_plain.out_dir / "model")
