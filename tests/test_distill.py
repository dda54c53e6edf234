"""Distillation: the loss terms against hand-computed values, the loop lowering them, and the ``distill`` stage."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from test_student import make_teacher

from compressor.data.store import DataStore
from compressor.distill.losses import (
    PARTS, DistillLoss, KDConfig, capture_qkv, hidden_mse, kl_last_dim, pick_relation_heads, relation_kl,
    relation_log_probs,
)
from compressor.errors import RecipeError
from compressor.model.io import load_model, save_model
from compressor.model.student import student_from_config, student_from_teacher
from compressor.recipe import DistillStage, Recipe
from compressor.report.rows import Reporter
from compressor.stages import StageContext

PIPE = FIXTURES / "pipeline"


# ---- the terms ----------------------------------------------------------------------------------------------
def test_kl_last_dim_matches_hand_computation_with_mask_and_temperature():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [3.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 9.0]])
    T = 2.0

    def kl(si, ti):
        p = [math.exp(x / T) for x in ti]
        q = [math.exp(x / T) for x in si]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    rows = [kl(s[i].tolist(), t[i].tolist()) for i in range(3)]
    assert float(kl_last_dim(s, t, T)) == pytest.approx(sum(rows) / 3 * T**2, rel=1e-5)
    mask = torch.tensor([True, False, True])
    assert float(kl_last_dim(s, t, T, mask)) == pytest.approx((rows[0] + rows[2]) / 2 * T**2, rel=1e-5)
    assert float(kl_last_dim(t, t, T)) == pytest.approx(0.0, abs=1e-7)
    # classes masked with -inf by both (e.g. QA positions outside the context) add nothing instead of NaN
    s_inf = torch.tensor([[1.0, float("-inf"), 0.0]], requires_grad=True)
    t_inf = torch.tensor([[0.0, float("-inf"), 1.0]])
    value = kl_last_dim(s_inf, t_inf)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s_inf.grad).all()
    assert float(value.detach()) == pytest.approx(kl([1.0 * T, 0.0], [0.0, 1.0 * T]), rel=1e-5)


def test_hidden_mse_masks_padding_and_uses_the_projection():
    s = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert float(hidden_mse(s, t, mask)) == pytest.approx((1 + 4) / 2)
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    t3 = torch.zeros(1, 2, 3)
    assert float(hidden_mse(s, t3, mask, proj).detach()) == pytest.approx((1 + 4 + 9) / 3)


def test_relation_of_q_and_k_is_the_models_attention_distribution(tokenizer):
    """The hooked Q/K give exactly the probabilities BERT's eager attention returns."""
    teacher = make_teacher(layers=2)
    enc = tokenizer(["Anna works for Acme .", "fun"], padding=True, return_tensors="pt")
    with torch.no_grad(), capture_qkv(teacher, [0, 1]) as qkv:
        out = teacher("sst", enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_attentions=True)
    for layer in (0, 1):
        probs = relation_log_probs(qkv[layer]["query"], qkv[layer]["key"], 4, enc["attention_mask"]).exp()
        real = enc["attention_mask"].bool()
        # rows of real query tokens (padding rows differ only in the masked-key value HF adds)
        torch.testing.assert_close(probs[real[:, None, :].expand(-1, 4, -1)],
                                   out.attentions[layer][real[:, None, :].expand(-1, 4, -1)], atol=1e-6, rtol=1e-5)


def test_relation_kl_is_zero_for_equal_relations_and_positive_otherwise():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    same = relation_kl(relation_log_probs(x, x, 2, mask), relation_log_probs(x, x, 2, mask), mask)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    diff = relation_kl(relation_log_probs(y, y, 2, mask), relation_log_probs(x, x, 2, mask), mask)
    log_s, log_t = relation_log_probs(y, y, 2, mask), relation_log_probs(x, x, 2, mask)
    by_hand = []
    for b in range(2):
        for h in range(2):
            for q in range(int(mask[b].sum())):
                keep = mask[b].bool()
                by_hand.append(F.kl_div(log_s[b, h, q, keep], log_t[b, h, q, keep], log_target=True, reduction="sum"))
    assert float(diff) == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-5)
    assert float(diff) > 0


def test_pick_relation_heads():
    assert pick_relation_heads(2, 16, 4, 32) == 2  # the student's heads split the teacher's width
    assert pick_relation_heads(3, 24, 4, 32) == 4  # 32 % 3 != 0, 24 % 4 == 0
    assert pick_relation_heads(6, 30, 4, 32) == 2  # neither: gcd of the head counts
    assert pick_relation_heads(2, 16, 4, 32, requested=8) == 8
    with pytest.raises(RecipeError, match="does not divide"):
        pick_relation_heads(2, 16, 4, 32, requested=3)


# ---- the loop -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tokenizer) -> DataStore:
    data = DataStore(tiny_recipe().data_options(), PIPE)
    data.fit_labels()
    return data


def tiny_recipe() -> Recipe:
    return Recipe.model_validate({
        "name": "tiny", "seed": 3, "data_root": str(PIPE), "model": {"max_length": 32},
        "tasks": [
            {"name": "ner", "plugin": "ner", "format": "conll",
             "data": {"train": "ner.train.conll", "dev": "ner.dev.conll", "test": "ner.test.conll"}},
            {"name": "sst", "plugin": "classification", "format": "label_text",
             "data": {"train": "sst.train.txt", "dev": "sst.dev.txt", "test": "sst.test.txt"}},
        ],
        "stages": [{"kind": "train"}, {"kind": "distill", "steps": 4}],
        "report": {"latency": False},
    })


def fixed_batches(store: DataStore, tokenizer, n: int = 8):
    """The first batch of each task, repeated in turn: the loss on it must fall."""
    batches = []
    for task in ("ner", "sst"):
        feats = store.encoded(task, "train", tokenizer, 32, train=True).features[:n]
        batches.append((task, store.tasks[task].collate(feats)))
    return itertools.cycle(batches)


def teacher_for(store: DataStore, layers: int = 4) -> torch.nn.Module:
    from conftest import tiny_bert
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    torch.manual_seed(0)
    tasks = {t: build_task(p.plugin_name, t, p.labels) for t, p in store.tasks.items()}
    teacher = MultiTaskModel(tiny_bert(layers=layers, heads=4, hidden=32, ffn=64), tasks).eval()
    # BERT's init (std 0.02) makes layers near-identities with uniform attention; a trained teacher's layers,
    # attention and heads are far from that, and only then is there something to distil
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("weight") and p.ndim == 2 and "embeddings" not in name:
                p.normal_(0.0, 0.5 if name.startswith("heads.") else 0.25)
    return teacher


def evaluate_parts(loss: DistillLoss, student, teacher, batches) -> dict[str, float]:
    student.eval()
    with torch.no_grad():
        parts = [loss(student, teacher, *next(batches)) for _ in range(2)]
    return {k: sum(float(p[k]) for p in parts) / 2 for k in parts[0]}


def kd_engine(student, teacher, store, tokenizer, config: KDConfig, steps: int, *, lr: float, layer_map=None,
              optimizer: str = "adamw", dropout: float | None = None, batch_size: int = 8, **objective_kwargs):
    """The training engine distilling ``student`` from ``teacher`` on the store's training data for ``steps``
    steps (round robin over the tasks, constant lr, no weight decay); returns it and its objective."""
    from compressor.distill.objective import Distillation
    from compressor.train.loop import build_engine
    from compressor.train.options import TrainOptions

    objective = Distillation(student, teacher, config, layer_map=layer_map, **objective_kwargs)
    cfg = TrainOptions(batch_size=batch_size, lr=lr, head_lr=lr, weight_decay=0.0, warmup_ratio=0.0,
                       optimizer=optimizer, dropout=dropout, max_steps=steps, steps_per_epoch=steps,
                       sampling={"strategy": "round_robin"}, mixed_precision="no")
    return build_engine(student, tokenizer, store, cfg, seed=0, objective=objective), objective


@pytest.mark.parametrize("kind", ["from_teacher", "from_config"])
def test_distillation_on_the_engine_lowers_every_kd_term(store, tokenizer, kind):
    torch.manual_seed(0)
    teacher = teacher_for(store)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    if kind == "from_teacher":
        student = student_from_teacher(teacher, layers=[1, 3], heads=4)
        lr = 2e-3
    else:  # narrower (projection) and with other head counts (MiniLM relation path)
        student = student_from_config(teacher, hidden_size=16, num_layers=2, heads=2, ffn=32, seed=1)
        lr = 1e-2
    config = KDConfig(alpha=0.0, temperature=2.0, logits=1.0, hidden=1.0, attention=2.0)
    engine, objective = kd_engine(student, teacher, store, tokenizer, config, 30, lr=lr, layer_map={0: 1, 1: 3})
    if kind == "from_config":
        assert set(objective.loss.projections) == {"0", "1", "2"}  # embeddings + two student layers
        proj_before = objective.loss.projections["2"].weight.detach().clone()
    batches = fixed_batches(store, tokenizer)
    before = evaluate_parts(objective.loss, student, teacher, batches)
    for _ in range(30):
        parts = engine.run(1).means()
        assert set(parts) == set(PARTS)
    assert engine.steps_done == 30
    after = evaluate_parts(objective.loss, student, teacher, batches)

    for term in ("kd_logits", "kd_hidden", "kd_attention", "loss"):
        assert before[term] > 0
        assert after[term] < 0.75 * before[term], (term, before[term], after[term])
    assert after["task"] == 0.0  # alpha = 0: the task loss is not computed
    # the teacher never changes; projections train but are not part of the student
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert not any("projection" in k for k in student.state_dict())
    if kind == "from_config":
        assert not torch.equal(objective.loss.projections["2"].weight, proj_before)


def test_loss_is_alpha_blend_of_the_named_parts(store, tokenizer):
    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=2, heads=2)
    config = KDConfig(alpha=0.3, temperature=3.0, logits=0.5, hidden=2.0, attention=0.25)
    loss = DistillLoss(student, teacher, config)
    assert loss.layer_map == {0: 1, 1: 3}
    student.eval()
    task, batch = next(fixed_batches(store, tokenizer))
    parts = loss(student, teacher, task, batch)
    kd = 0.5 * parts["kd_logits"] + 2.0 * parts["kd_hidden"] + 0.25 * parts["kd_attention"]
    torch.testing.assert_close(parts["loss"].detach(), 0.3 * parts["task"] + 0.7 * kd)
    assert parts["loss"].requires_grad and all(float(parts[k].detach()) > 0 for k in parts if k != "kd_transfer")
    assert float(parts["kd_transfer"]) == 0.0  # no transfer asked
    # the task part is the plugin's own loss
    with torch.no_grad():
        expected_task = student.tasks[task].loss(student.forward_batch(task, batch).outputs, batch)
    torch.testing.assert_close(parts["task"], expected_task)


def test_transfer_distils_a_head_on_another_tasks_inputs_against_its_teacher(store, tokenizer):
    from compressor.distill.losses import logits_kd
    from compressor.tasks import DistillTarget

    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=2, heads=2)
    config = KDConfig(alpha=0.0, logits=1.0, transfer={"sst": ("ner",)}, transfer_weight=0.5)
    loss = DistillLoss(student, teacher, config)
    assert loss.transfer_heads == {"ner": ["sst"]}
    student.eval()
    batches = dict(itertools.islice(fixed_batches(store, tokenizer), 2))
    ner = batches["ner"]
    parts = loss(student, teacher, "ner", ner)
    with torch.no_grad():  # by hand: the sst heads of both models on the NER sentences
        inputs = {k: ner[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in ner}
        s = student.heads["sst"](student.encoder(**inputs).last_hidden_state, ner["attention_mask"])["logits"]
        t = teacher.heads["sst"](teacher.encoder(**inputs).last_hidden_state, ner["attention_mask"])["logits"]
        expected = logits_kd({"logits": DistillTarget(s)}, {"logits": DistillTarget(t)}, 2.0)
    torch.testing.assert_close(parts["kd_transfer"], expected)
    assert float(expected) > 0
    torch.testing.assert_close(parts["loss"].detach(), parts["kd_logits"] + 0.5 * parts["kd_transfer"])
    assert float(loss(student, teacher, "sst", batches["sst"])["kd_transfer"]) == 0.0  # nothing taught on sst

    # "all": every other task's inputs; a student equal to its teacher has nothing to learn from them
    import copy

    same = copy.deepcopy(teacher)
    both = DistillLoss(same, teacher, KDConfig(alpha=0.0, transfer={"sst": "all", "ner": "all"}))
    assert both.transfer_heads == {"ner": ["sst"], "sst": ["ner"]}
    assert float(both(same, teacher, "sst", batches["sst"])["kd_transfer"]) < 1e-6


def test_transfer_refuses_a_head_that_needs_inputs_of_its_own_and_unknown_tasks(store):
    from compressor.tasks import TaskPlugin

    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=1)
    with pytest.raises(RecipeError, match="transfer.sst: the student has no task 'qa'"):
        DistillLoss(student, teacher, KDConfig(transfer={"sst": ("qa",)}))
    plugin = student.tasks["sst"]
    own_inputs = type("PairsOnly", (type(plugin),), {"transfer_targets": TaskPlugin.transfer_targets})
    plugin.__class__ = own_inputs
    with pytest.raises(RecipeError, match="transfer.sst: task 'sst' .*PairsOnly.* cannot be taught on other tasks"):
        DistillLoss(student, teacher, KDConfig(transfer={"sst": "all"}))


def test_a_recipe_naming_an_unknown_task_or_the_head_itself_in_transfer_is_refused():
    base = tiny_recipe().model_dump(mode="json")
    for transfer, message in (({"sst": ["trec"]}, "transfer.sst names task 'trec'"),
                              ({"sst": ["sst"]}, "transfer.sst lists 'sst' itself")):
        spec = {**base, "stages": [{"kind": "train"}, {"kind": "distill", "steps": 4, "transfer": transfer}]}
        with pytest.raises(ValueError, match=message):
            Recipe.model_validate(spec)


def test_transfer_on_the_engine_lowers_kd_transfer(store, tokenizer):
    torch.manual_seed(0)
    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=[1, 3], heads=4)
    config = KDConfig(alpha=0.0, logits=0.0, transfer={"sst": ("ner",)})  # the sst head learns from NER inputs only
    engine, objective = kd_engine(student, teacher, store, tokenizer, config, 20, lr=2e-3)
    ner = dict(itertools.islice(fixed_batches(store, tokenizer), 2))["ner"]
    student.eval()
    with torch.no_grad():
        before = float(objective.loss(student, teacher, "ner", ner)["kd_transfer"])
    engine.run(20)
    student.eval()
    with torch.no_grad():
        after = float(objective.loss(student, teacher, "ner", ner)["kd_transfer"])
    assert before > 0 and after < 0.75 * before, (before, after)


def test_distill_loss_rejects_a_layer_map_naming_a_missing_layer(store):
    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=2)
    with pytest.raises(RecipeError, match="teacher layer 9 .*does not exist; the teacher has 4 layers"):
        DistillLoss(student, teacher, KDConfig(), layer_map={0: 1, 1: 9})


def test_recovery_engine_takes_its_steps_in_chunks_and_trains_in_place(store, tokenizer):
    from compressor.distill.objective import recovery_engine
    from compressor.recipe import DistillOptions

    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opts = DistillOptions(alpha=0.5, lr=1e-3, batch_size=4, sampling={"strategy": "round_robin"})
    engine = recovery_engine(student, teacher, tokenizer, store, opts, steps=5, seed=0)
    first = engine.run(3)
    assert first.counts == {"ner": 2, "sst": 1} and first.examples == 12  # round robin, batches of 4
    parts = engine.run(10).means()  # only what the schedule has left
    assert engine.steps_done == 5 and engine.scheduler.get_last_lr()[0] == 0.0
    assert set(parts) == set(PARTS)
    assert parts["kd_hidden"] == 0.0 and parts["kd_logits"] > 0 and parts["task"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


# ---- the stage ----------------------------------------------------------------------------------------------
def make_ctx(store: DataStore, tmp_path, stage: dict, teacher_dir=None, model_dir=None, outputs=None) -> StageContext:
    cfg = DistillStage.model_validate({"kind": "distill", **stage})
    out = tmp_path / "partial"
    out.mkdir(parents=True)
    return StageContext(
        recipe=tiny_recipe(), stage=cfg, index=1, run_dir=tmp_path, out_dir=out, final_dir=tmp_path / "final",
        data=store, reporter=Reporter("tiny"), model_dir=model_dir or teacher_dir, teacher_dir=teacher_dir,
        outputs=outputs or {},
    )


def test_distill_stage_needs_a_teacher(store, tmp_path):
    from compressor.stages.distill import run

    with pytest.raises(RecipeError, match="distill stage needs a teacher: put a train stage first"):
        run(make_ctx(store, tmp_path, {"steps": 2}))


def test_distill_stage_saves_evaluates_and_reports_the_student(store, tokenizer, tmp_path):
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    ctx = make_ctx(store, tmp_path, {
        "name": "small", "student": {"from_teacher": {"layers": 2, "heads": 2}}, "steps": 6, "batch_size": 4,
        "lr": 1e-3, "weights": {"logits": 1.0, "hidden": 1.0, "attention": 1.0}, "warmup_ratio": 0.0,
    }, teacher_dir=teacher_dir)
    result = run(ctx)

    assert result.model_dir == tmp_path / "final" / "model"
    student, _, manifest = load_model(ctx.out_dir / "model")
    assert [layer["heads"] for layer in manifest["architecture"]["layers"]] == [2, 2]
    assert manifest["distilled_by"]["teacher_layers"] == [1, 3]
    assert result.outputs["teacher_layers"] == [1, 3] and result.outputs["steps"] == 6
    assert result.outputs["params"] == student.num_parameters() < result.outputs["teacher_params"]
    assert set(result.outputs["loss_last"]) == set(PARTS)
    rows = ctx.reporter.rows
    assert {(r["model"], r["task"], r["split"]) for r in rows} == {
        ("small", t, s) for t in ("ner", "sst") for s in ("dev", "test")}
    assert all(r["stage"] == "small" and r["size_bytes"] > 0 and r["params"] == student.num_parameters()
               for r in rows)
    assert any("kd_logits=" in n for n in result.notes)

    # from_previous continues from the saved student with the same teacher-layer map; a bad map fails early
    prev = make_ctx(store, tmp_path / "prev", {"student": {"from_previous": True}, "steps": 2, "batch_size": 4},
                    teacher_dir=teacher_dir, model_dir=ctx.out_dir / "model", outputs={"small": result.outputs})
    again = run(prev)
    assert again.outputs["layer_map"] == {"0": 1, "1": 3}
    bad = make_ctx(store, tmp_path / "bad", {"student": {"from_teacher": {"layers": 2}}, "layer_map": {0: 1, 1: 4},
                                             "steps": 2}, teacher_dir=teacher_dir)
    with pytest.raises(RecipeError, match="teacher layer 4 .*does not exist"):
        run(bad)


def test_word_table_int4_puts_the_table_on_the_export_grid_and_trains_around_it(store, tokenizer, tmp_path):
    import numpy as np

    from compressor.export.embedding_rows import int4_blocks
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    ctx = make_ctx(store, tmp_path, {"student": {"from_teacher": {"layers": 2}}, "steps": 4, "batch_size": 4,
                                     "lr": 1e-3, "warmup_ratio": 0.0, "word_table_int4": 16}, teacher_dir=teacher_dir)
    run(ctx)
    student, _, _ = load_model(ctx.out_dir / "model")
    table = student.encoder.get_input_embeddings().weight.detach().numpy()
    before = teacher.encoder.get_input_embeddings().weight.detach().numpy()
    _, _, on_grid = int4_blocks(before, 16)
    # the teacher's table snapped to the INT4 grid (the export's own function) and left there by training ...
    assert np.array_equal(table, on_grid) and not np.array_equal(table, before)
    _, _, again = int4_blocks(table, 16)
    assert np.array_equal(again, table)  # ... so the quantize stage's int4_block stores it exactly
    # while the rest trained, the other embedding tables included (copied from the teacher, then moved)
    positions = "embeddings.position_embeddings.weight"
    assert not torch.equal(dict(student.encoder.named_parameters())[positions],
                           dict(teacher.encoder.named_parameters())[positions])


def test_distill_stage_config_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="word_table_int4\n.*power of two of at least 16"):
        DistillStage.model_validate({"kind": "distill", "word_table_int4": 48})

    with pytest.raises(ValidationError, match="exactly one of"):
        DistillStage.model_validate({"kind": "distill", "student": {"from_previous": True,
                                                                   "from_teacher": {"layers": 2}}})
    with pytest.raises(ValidationError, match="not a multiple of heads"):
        DistillStage.model_validate({"kind": "distill", "student": {"from_config": {
            "hidden_size": 30, "num_layers": 2, "heads": 4}}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        DistillStage.model_validate({"kind": "distill", "weights": {"logit": 1.0}})
    cfg = DistillStage.model_validate({"kind": "distill", "student": {"from_teacher": {"layers": [0, 2]}},
                                       "layer_map": {"0": 0, "1": 2}})
    assert cfg.student.from_teacher.layers == [0, 2] and cfg.layer_map == {0: 0, 1: 2}


def test_distill_stage_measures_dev_retention_per_epoch_and_keeps_the_best(store, tokenizer, tmp_path):
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    ctx = make_ctx(store, tmp_path, {
        "student": {"from_teacher": {"layers": 1}}, "epochs": 6, "steps_per_epoch": 2, "batch_size": 4,
        "lr": 5e-3, "warmup_ratio": 0.0, "early_stopping_patience": 2,
    }, teacher_dir=teacher_dir)
    result = run(ctx)
    out = result.outputs
    history = out["epochs"]
    assert history and [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert [h["steps"] for h in history] == [2 * h["epoch"] for h in history] and out["steps_done"] == 2 * len(history)
    for h in history:
        assert set(h["retention"]) == {"ner", "sst"}
        assert h["mean_retention"] == pytest.approx(sum(h["retention"].values()) / 2)
    scores = [h["mean_retention"] for h in history]
    best = out["best_epoch"]
    assert best == scores.index(max(scores)) + 1
    # stops once `patience` epochs in a row bring no better retention, and not before
    if out["stopped_early"]:
        assert len(history) - best == 2 and len(history) < 6
    else:
        assert len(history) == 6 and len(history) - best < 2
    # the saved student is the best epoch's: its dev rows are that epoch's dev metrics
    dev = {r["task"]: r["value"] for r in ctx.reporter.rows if r["split"] == "dev"}
    assert dev == pytest.approx(history[best - 1]["dev"])
    assert any("mean dev retention per epoch" in n and f"kept epoch {best}" in n for n in result.notes)


def test_single_task_students_share_the_architecture_and_the_per_task_budget(store, tokenizer, tmp_path):
    from compressor.model.architecture import read_architecture
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    ctx = make_ctx(store, tmp_path, {
        "student": {"from_teacher": {"layers": 2, "heads": 2, "ffn": 32}}, "epochs": 2, "steps_per_epoch": 6,
        "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "single_task_students": True,
        "sampling": {"strategy": "proportional"}, "weights": {"logits": 1.0, "hidden": 1.0, "attention": 1.0},
    }, teacher_dir=teacher_dir)
    result = run(ctx)
    out = result.outputs
    multi, _, _ = load_model(ctx.out_dir / "model")
    assert sum(out["task_steps"].values()) == out["steps_done"] == 12
    assert set(out["single_task_students"]) == {"ner", "sst"}
    for task in ("ner", "sst"):
        assert out["single_task_students"][task] == str(tmp_path / "final" / f"single-{task}")
        single, _, manifest = load_model(ctx.out_dir / f"single-{task}")
        assert list(single.tasks) == [task] and list(single.heads) == [task]
        assert manifest["distilled_by"]["single_task"] == task
        assert read_architecture(single.encoder) == read_architecture(multi.encoder)  # same encoder shape
        assert single.heads[task].state_dict().keys() == multi.heads[task].state_dict().keys()
        training = out["single_task_training"][task]
        # the same per-task budget: the steps the multi-head student spent on this task, all on this task
        assert training["steps"] == training["steps_done"] == out["task_steps"][task] > 0
        assert training["task_steps"] == {task: out["task_steps"][task]}
        assert training["epochs"] and set(training["epochs"][-1]["retention"]) == {task}
    # each single-task student is scored on its own task only, beside the multi-head student's rows
    rows = {(r["model"], r["task"], r["split"]) for r in ctx.reporter.rows}
    assert {("distill:single:ner", "ner", "test"), ("distill:single:sst", "sst", "test")} <= rows
    assert not any(m == "distill:single:ner" and t == "sst" for m, t, _ in rows)
    assert any("single-task student of ner" in n and "saved as single-ner/" in n for n in result.notes)


def test_a_narrower_student_from_config_distils_through_projections_in_the_stage(store, tokenizer, tmp_path):
    """hidden 16 against the teacher's 32, 2 heads against 4: projected hidden-state KD and MiniLM relations."""
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    ctx = make_ctx(store, tmp_path, {
        "student": {"from_config": {"hidden_size": 16, "num_layers": 2, "heads": 2, "ffn": 32}}, "epochs": 3,
        "steps_per_epoch": 10, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "alpha": 0.0,
        "weights": {"logits": 1.0, "hidden": 1.0, "attention": 1.0},
    }, teacher_dir=teacher_dir)
    result = run(ctx)
    student, _, manifest = load_model(ctx.out_dir / "model")
    assert student.config.hidden_size == 16 and manifest["architecture"]["layers"][0]["heads"] == 2
    assert student.encoder.get_input_embeddings().weight.shape == (len(tokenizer), 16)
    assert not any("projection" in k for k in student.state_dict())  # projections train but are not saved
    first, last = result.outputs["loss_first"], result.outputs["loss_last"]
    for part in ("kd_hidden", "kd_attention", "loss"):
        assert 0 < last[part] < first[part], (part, first[part], last[part])
    assert result.outputs["layer_map"] == {"0": 1, "1": 3}


@pytest.mark.parametrize("dropout", [0.0, None])
def test_recovery_without_dropout_leaves_a_student_equal_to_its_teacher_where_it_is(store, tokenizer, dropout):
    """A student that equals its teacher has nothing to learn: with ``dropout=0`` (hidden and attention dropout)
    every KD term is zero and SGD leaves the weights where they are, up to rounding; with the model's own dropout
    (0.3 here) the noise alone moves them. (SGD, because Adam normalises even rounding-level gradients up to
    lr-sized steps.)"""
    import copy

    teacher = teacher_for(store)
    student = copy.deepcopy(teacher)
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
        if hasattr(m, "dropout_prob"):  # BERT's SDPA attention reads this rate, not an nn.Dropout
            m.dropout_prob = 0.3
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = KDConfig(alpha=0.0, temperature=2.0, logits=1.0, hidden=1.0)
    engine, _ = kd_engine(student, teacher, store, tokenizer, config, 4, lr=1e-3, layer_map={i: i for i in range(4)},
                          optimizer="sgd", dropout=dropout)
    losses = [engine.run(1).means()["loss"] for _ in range(4)]
    moved = max(float((v.float() - before[k].float()).abs().max()) for k, v in student.state_dict().items())
    if dropout == 0.0:
        assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
        assert all(m.dropout_prob == 0.0 for m in student.modules() if hasattr(m, "dropout_prob"))
        assert max(abs(x) for x in losses) < 1e-6 and moved < 1e-6, (losses, moved)
    else:
        assert min(losses) > 1e-3 and moved > 1e-4, (losses, moved)


# ---- unlabeled text as a transfer source ----------------------------------------------------------------------
def test_unlabeled_text_teaches_the_heads_that_name_it_one_batch_a_step_in_a_fixed_order(store, tokenizer, tmp_path):
    from compressor.distill.objective import Distillation, unlabeled_features
    from compressor.recipe import DistillOptions

    (tmp_path / "reviews.txt").write_text("a fine film .\n\n  \nthe plot is thin .\nJohn Smith lives in Paris .\n"
                                          "dull .\nwhat a ride !\n")
    opts = DistillOptions(unlabeled={"reviews": {"path": str(tmp_path / "reviews.txt"), "limit": 4}},
                          transfer={"sst": ["reviews"]}, batch_size=3)
    feats = unlabeled_features(opts, store, tokenizer, 32)
    assert len(feats["reviews"]) == 4  # blank lines skipped, the first 4 texts
    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=2, heads=2)
    objective = Distillation(student, teacher, KDConfig(alpha=0.0, transfer={"sst": ("reviews",)}),
                             unlabeled=feats, batch_size=3, seed=1)
    assert objective.loss.transfer_heads == {"reviews": ["sst"]}
    first = [objective._unlabeled_batch(s)[1]["input_ids"].tolist() for s in range(4)]
    assert first == [objective._unlabeled_batch(s)[1]["input_ids"].tolist() for s in range(4)]  # a function of the step
    seen = {tuple(x for x in row if x) for rows in first[:2] for row in rows}  # two batches of 3 cover a pass of 4
    assert len(seen) == 4

    student.eval()
    batch = dict(itertools.islice(fixed_batches(store, tokenizer), 2))["ner"]
    with torch.no_grad():
        alone = float(objective(student, "ner", batch)["kd_transfer"])  # no step told yet: no unlabeled batch
        objective.at_step(0)
        parts = objective(student, "ner", batch)
        _, texts = objective._unlabeled_batch(0)
        expected = float(objective.loss.transfer_on(student, texts, ["sst"]))
    assert alone == 0.0 and expected > 0
    assert float(parts["kd_transfer"]) == pytest.approx(expected, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(float(parts["kd_logits"]) + expected, rel=1e-5)


def test_an_empty_unlabeled_file_is_named_and_a_single_task_student_keeps_its_own_transfer(store, tokenizer, tmp_path):
    from compressor.distill.objective import Distillation, unlabeled_features
    from compressor.errors import DataError
    from compressor.model.multitask import keep_tasks
    from compressor.recipe import DistillOptions

    (tmp_path / "empty.txt").write_text("\n \n")
    opts = DistillOptions(unlabeled={"x": {"path": str(tmp_path / "empty.txt")}}, transfer={"sst": ["x"]})
    with pytest.raises(DataError, match="empty.txt.*unlabeled.x: no text"):
        unlabeled_features(opts, store, tokenizer, 32)
    teacher = teacher_for(store)
    single = student_from_teacher(teacher, layers=1)
    keep_tasks(single, ["ner"])
    objective = Distillation(single, teacher, KDConfig(alpha=0.5, transfer={"sst": ("ner",), "ner": ("sst",)}))
    assert objective.loss.transfer_heads == {}  # neither the sst head nor sst batches are in it


def test_a_recipe_checks_the_unlabeled_sets_against_transfer():
    base = tiny_recipe().model_dump(mode="json")
    for stage, message in (
            ({"unlabeled": {"sst": {"path": "x.txt"}}, "transfer": {"ner": ["sst"]}}, "unlabeled.sst has the name of a task"),
            ({"unlabeled": {"web": {"path": "x.txt"}}}, "unlabeled.web is named by no transfer"),
            ({"transfer": {"ner": ["web"]}}, "transfer.ner names task 'web'.*unlabeled sets: none")):
        spec = {**base, "stages": [{"kind": "train"}, {"kind": "distill", "steps": 4, **stage}]}
        with pytest.raises(ValueError, match=message):
            Recipe.model_validate(spec)
    ok = {**base, "stages": [{"kind": "train"}, {"kind": "distill", "steps": 4, "transfer": {"ner": ["web", "sst"]},
                                                  "unlabeled": {"web": {"path": "x.txt"}}}]}
    Recipe.model_validate(ok)


def test_distill_stage_transfers_on_other_tasks_and_on_unlabeled_text_from_the_data_root(store, tokenizer, tmp_path):
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    ctx = make_ctx(store, tmp_path, {
        "name": "tr", "student": {"from_teacher": {"layers": 2}}, "steps": 6, "batch_size": 4, "lr": 1e-3,
        "transfer": {"sst": ["ner", "web"], "ner": "all"}, "unlabeled": {"web": {"path": "sst.dev.txt"}},
    }, teacher_dir=teacher_dir)  # the set's path is relative to the data root (tests/fixtures/pipeline)
    result = run(ctx)
    assert result.outputs["loss_last"]["kd_transfer"] > 0 and result.outputs["steps_done"] == 6
    assert any("transfer=1.0 (sst on ['ner', 'web'], ner on all)" in n for n in result.notes)
