"""Distillation recovers a hard-pruned model: a tiny teacher learns an easy synthetic task (the majority of
sentiment words in a sentence), loses dev accuracy when most of its heads and FFN neurons are pruned, and the prune
stage's ``recovery_until`` distils it back to within a tolerance of its pre-pruning dev accuracy."""

from __future__ import annotations

import json
import random

import pytest
import torch

from _prune_helpers import PLUGIN
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.tasks import build_task
from conftest import tiny_bert

POS = ["good", "great", "fine", "nice", "happy"]
NEG = ["bad", "poor", "awful", "sad", "ugly"]
FILLER = ["the", "a", "film", "was", "and", "it", "plot", "cast", "story", "day", "very", "so"]
TOLERANCE = 0.05


pytestmark = pytest.mark.usefixtures("one_thread", "tiny_cls_plugin")  # conftest: tiny models, shared cores


def sentences(n: int, seed: int) -> list[str]:
    """``<label> <text>`` lines: 5 sentiment words (3 of one polarity, 2 of the other) among 4 filler words; the
    label is the majority's."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        pos = rng.choice([2, 3])
        words = [rng.choice(POS) for _ in range(pos)] + [rng.choice(NEG) for _ in range(5 - pos)]
        words += [rng.choice(FILLER) for _ in range(4)]
        rng.shuffle(words)
        lines.append(f"{int(pos >= 3)} {' '.join(words)}")
    return lines


def recipe(root, stage: dict):
    from compressor.recipe import Recipe

    return Recipe.model_validate({
        "name": "recovery_test", "seed": 0, "data_root": str(root), "model": {"max_length": 16},
        "tasks": [{"name": "maj", "plugin": PLUGIN,
                   "data": {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}}],
        "stages": [stage], "report": {"latency": False},
    })


def context(tmp, root, stage: dict, model_dir):
    from compressor.data.store import DataStore
    from compressor.report.rows import Reporter
    from compressor.stages import StageContext

    r = recipe(root, stage)
    out = tmp / "stage.tmp"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(recipe=r, stage=r.stages[0], index=0, run_dir=tmp, out_dir=out, final_dir=tmp / "stage",
                        data=DataStore(r.data_options(), root), reporter=Reporter("recovery_test"), model_dir=model_dir,
                        teacher_dir=None)


def dev_accuracy(ctx, model, tokenizer) -> float:
    from compressor.model.forward import dev_metrics

    return dev_metrics(model, tokenizer, ctx.data, ["maj"], ctx.recipe.model.max_length, 64)["maj"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """Data files and a converged tiny teacher (dev accuracy >= 0.9)."""
    tmp = tmp_path_factory.mktemp("recovery")
    root = tmp / "data"
    root.mkdir()
    for split, n, seed in (("train", 512, 0), ("dev", 96, 1), ("test", 96, 2)):
        (root / f"{split}.txt").write_text("\n".join(sentences(n, seed)) + "\n")
    ctx = context(tmp / "train", root, {"kind": "prune", "head_ratio": 0.5}, None)
    ctx.data.fit_labels()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the function-scoped one_thread fixture runs after this module fixture)
    torch.manual_seed(0)
    enc = tiny_bert(vocab_size=len(tokenizer), layers=2, heads=4, hidden=32, ffn=64, seed=0)
    model = MultiTaskModel(enc, {"maj": build_task(PLUGIN, "maj", ["0", "1"])})
    plugin = model.tasks["maj"]
    feats = ctx.data.encoded("maj", "train", tokenizer, 16, train=True).features
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        idx = torch.randint(0, len(feats), (32,), generator=g).tolist()
        batch = plugin.collate([feats[i] for i in idx])
        loss = plugin.loss(model.forward_batch("maj", batch).outputs, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    torch.set_num_threads(threads)
    acc = dev_accuracy(ctx, model, tokenizer)
    assert acc >= 0.9, f"the toy teacher did not learn its task (dev accuracy {acc})"
    save_model(model, tokenizer, tmp / "teacher", max_length=16)
    return {"tmp": tmp, "root": root, "teacher": tmp / "teacher", "dev": acc}


# one of the two layers, 3 of the 4 heads and 90% of the FFN neurons of the other
PRUNE = {"kind": "prune", "importance": "magnitude", "drop_layers": [0], "head_ratio": 0.75, "ffn_ratio": 0.9, "steps": 1}


def test_hard_pruning_loses_the_task_and_recovery_by_distillation_brings_it_back(trained, tokenizer):
    from compressor.stages.prune import run

    stage = {**PRUNE, "recovery_until": {"tolerance": TOLERANCE, "eval_every": 25, "max_steps": 600},
             "recovery": {"teacher": "input", "alpha": 0.0, "lr": 3e-3, "batch_size": 32, "warmup_ratio": 0.0,
                          "weights": {"logits": 1.0, "hidden": 1.0, "attention": 1.0}}}
    ctx = context(trained["tmp"] / "recovered", trained["root"], stage, trained["teacher"])
    result = run(ctx)
    rec = result.outputs["steps"][0]["recovery"]
    before = result.outputs["dev_before"]["maj"]
    assert before == pytest.approx(trained["dev"])
    # pruning alone really hurt: right after it, retention is well below the tolerance
    assert rec["checks"][0]["steps"] == 0 and rec["checks"][0]["retention"]["maj"] < 1 - 2 * TOLERANCE
    # ...and distillation brought the dev metric back within the tolerance, before the budget ran out
    assert rec["reached"] and 0 < rec["steps"] < rec["budget"] == 600
    assert rec["retention"]["maj"] >= 1 - TOLERANCE
    assert [c["steps"] for c in rec["checks"]] == list(range(0, rec["steps"] + 1, 25))  # stops at the first pass
    assert rec["task"] == 0.0  # alpha 0: distillation only, of logits, hidden states and attention relations
    assert min(rec["kd_logits"], rec["kd_hidden"], rec["kd_attention"]) > 0
    # the saved model is the recovered one: its dev accuracy is the one recorded
    pruned, tok, _ = load_model(ctx.out_dir / "model")
    assert [layer.attention.self.num_attention_heads for layer in pruned.encoder.encoder.layer] == [1]
    assert dev_accuracy(ctx, pruned, tok) == pytest.approx(rec["dev"]["maj"])
    assert any("step 1: dev retention right after pruning" in n and "back within 5.0%" in n for n in result.notes)


def test_a_budget_too_small_keeps_the_best_check_and_says_so(trained, tokenizer):
    from compressor.stages.prune import run

    stage = {**PRUNE, "recovery_until": {"tolerance": 0.001, "eval_every": 5, "max_steps": 10},
             "recovery": {"teacher": "input", "alpha": 0.0, "lr": 1e-5, "batch_size": 8}}
    ctx = context(trained["tmp"] / "short", trained["root"], stage, trained["teacher"])
    result = run(ctx)
    rec = result.outputs["steps"][0]["recovery"]
    assert not rec["reached"] and rec["steps"] == rec["budget"] == 10
    assert [c["steps"] for c in rec["checks"]] == [0, 5, 10]
    best = max(rec["checks"], key=lambda c: c["retention"]["maj"])
    assert rec["retention"]["maj"] == best["retention"]["maj"]
    assert any("NOT back within 0.1%" in n for n in result.notes)


def test_recovery_until_needs_a_budget_and_dev_splits(tmp_path):
    from pydantic import ValidationError

    from compressor.recipe import PruneStage, Recipe

    with pytest.raises(ValidationError, match="give a budget"):
        PruneStage.model_validate({**PRUNE, "recovery_until": {"tolerance": 0.01}})
    with pytest.raises(ValidationError, match="not both"):
        PruneStage.model_validate({**PRUNE, "recovery_steps": 5, "recovery_until": {"max_steps": 5}})
    with pytest.raises(ValidationError, match="tolerance"):
        PruneStage.model_validate({**PRUNE, "recovery_until": {"max_steps": 5, "tolerance": 1.5}})
    no_dev = {"name": "x", "tasks": [{"name": "t", "plugin": PLUGIN, "data": {"train": "a", "test": "b"}}],
              "stages": [{**PRUNE, "recovery_until": {"max_epochs": 2}}]}
    with pytest.raises(ValidationError, match=r"tasks\[0\]\.data\.dev: task 't' has no dev split"):
        Recipe.model_validate(no_dev)


def test_every_recovery_step_of_every_pruning_step_reads_one_teacher_cache(trained, tokenizer):
    """Two pruning steps, five recovery steps each: the teacher runs once per training feature in all."""
    from compressor.stages.prune import run

    stage = {"kind": "prune", "importance": "magnitude", "head_ratio": 0.5, "steps": 2, "recovery_steps": 5,
             "recovery": {"teacher": "input", "lr": 1e-3, "batch_size": 16, "teacher_cache": {}}}
    ctx = context(trained["tmp"] / "cached", trained["root"], stage, trained["teacher"])
    result = run(ctx)
    n_train = len(ctx.data.encoded("maj", "train", tokenizer, 16, train=True).features)
    stats = result.outputs["teacher_cache"]
    assert stats["built"] == n_train and stats["loaded"] == 0
    assert stats["hits"] == 2 * 5 * 16 and stats["misses"] == 0
    assert stats["path"].startswith(str(ctx.run_dir / "teacher-cache"))


def test_a_killed_recovery_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(trained, monkeypatch):
    """Two pruning steps, each recovered until within the tolerance in 5-step runs; the run is stopped before its
    last run of 5 steps (inside the second recovery). ``--resume`` replays the pruning, takes the first recovery's
    saved result and weights, continues the second from its checkpoint (one run left), and ends with the
    uninterrupted run's checks and weights, bit for bit."""
    import dataclasses

    from compressor.stages.prune import run
    from compressor.train.loop import Engine

    stage = {**PRUNE, "steps": 2, "recovery_until": {"tolerance": 0.001, "eval_every": 5, "max_steps": 10},
             "recovery": {"teacher": "input", "alpha": 0.0, "lr": 1e-4, "batch_size": 8}}

    def ctx(name: str, resume: bool = False):
        c = context(trained["tmp"] / name, trained["root"], stage, trained["teacher"])
        return dataclasses.replace(c, checkpoint_dir=trained["tmp"] / name / "checkpoints", resume=resume)

    class Killed(Exception):
        pass

    calls: list[int] = []
    stop = {"at": None}
    original = Engine.run

    def counted(self, n_steps, description=None):
        calls.append(n_steps)
        if len(calls) == stop["at"]:
            raise Killed
        return original(self, n_steps, description)

    monkeypatch.setattr(Engine, "run", counted)
    whole = run(ctx("whole"))
    recoveries = [s["recovery"] for s in whole.outputs["steps"]]
    assert recoveries[1]["steps"] == 10 and len(calls) >= 2  # the second recovery ran two 5-step runs
    stop["at"], total = len(calls), len(calls)
    calls.clear()
    with pytest.raises(Killed):
        run(ctx("killed"))
    assert (trained["tmp"] / "killed" / "checkpoints" / "recovery-2" / "trainer.json").is_file()
    calls.clear()
    stop["at"] = None
    resumed = run(ctx("killed", resume=True))
    assert len(calls) == 1 < total  # only the run the second recovery had left
    assert [s["recovery"] for s in resumed.outputs["steps"]] == recoveries
    a, _, _ = load_model(trained["tmp"] / "whole" / "stage.tmp" / "model")
    b, _, _ = load_model(trained["tmp"] / "killed" / "stage.tmp" / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    # a checkpoint whose recovery started from other weights (a replayed pruning step that came out differently)
    # is not continued: that recovery runs afresh, to the same end
    trainer = trained["tmp"] / "killed" / "checkpoints" / "recovery-2" / "trainer.json"
    state = json.loads(trainer.read_text())
    trainer.write_text(json.dumps({**state, "start": "other weights"}))
    calls.clear()
    again = run(ctx("killed", resume=True))
    assert len(calls) == 2 and [s["recovery"] for s in again.outputs["steps"]] == recoveries
