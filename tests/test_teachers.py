"""Per-task teachers of the distill stage: named (a twin, a fine-tuned model, another multi-task model) and
``auto`` (the best dev metric), recorded in the outputs, and really used (the KD targets are that teacher's)."""

from __future__ import annotations

import copy
import json

import torch

from compressor.distill.cache import INDEX_KEY, TeacherCache
from compressor.distill.losses import KDConfig, logits_kd
from compressor.model.student import student_from_teacher
from test_distill import kd_engine, store, teacher_for  # noqa: F401  (fixture)
from test_pipeline import invoke, recipe_text, tiny_model_path  # noqa: F401  (fixture)

FINETUNE = """  - kind: finetune
    name: ft
    epochs: 1
    batch_size: 8
    lr: 1.0e-3
    head_lr: 3.0e-3
    sampling: {strategy: round_robin}
"""

DISTILL = """  - kind: distill
    name: {name}
    steps: 4
    batch_size: 8
    eval_batch_size: 16
    student: {{from_teacher: {{layers: 1}}}}
    sampling: {{strategy: round_robin}}
    teachers: {teachers}
{extra}"""


def _run(tmp_path, tiny_model_path, stages: str):
    text = recipe_text(tiny_model_path, epochs=1, baselines=True).replace("report:", stages + "report:")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    state = json.loads((out / "state.json").read_text())
    return out, {s["name"]: s for s in state["completed"]}, json.loads((out / "report.json").read_text())


def test_named_and_auto_teachers_are_recorded_and_auto_takes_the_best_dev_candidate(tmp_path, tiny_model_path):
    stages = (FINETUNE
              + DISTILL.format(name="named", teachers="{ner: 'single:ner', sst: ft}", extra="")
              + DISTILL.format(name="picked", teachers="{ner: auto, sst: auto}", extra="    teacher_cache: {}\n"))
    _, done, report = _run(tmp_path, tiny_model_path, stages)  # (state.json keeps paths relative to the run)
    twin_dir = done["teacher"]["outputs"]["baselines"]["ner"]
    named = done["named"]["outputs"]["teachers"]
    assert named["ner"]["teacher"] == "single:ner" and named["ner"]["model_dir"] == twin_dir
    assert named["sst"]["teacher"] == "ft" and named["sst"]["model_dir"] == done["ft"]["outputs"]["models"]["sst"]
    notes = next(s["notes"] for s in report["stages"] if s["name"] == "named")
    assert "named: task ner learns from single:ner (named in the recipe)" in notes

    picked = done["picked"]["outputs"]["teachers"]
    for task in ("ner", "sst"):
        dev = {r["model"]: r["value"] for r in report["rows"] if r["task"] == task and r["split"] == "dev"}
        candidates = {"teacher": dev["teacher"], f"single:{task}": dev[f"single:{task}"], "ft": dev[f"ft:{task}"]}
        best = max(candidates.values())
        first_best = next(name for name, v in candidates.items() if v == best)  # ties: the earlier candidate
        assert picked[task]["teacher"] == first_best, (picked[task], candidates)
        assert picked[task]["dev"] == best and picked[task]["reason"].startswith("auto: best dev")
    # one cache per teacher: the run teacher's when a task kept it, one folder per other teacher
    caches = done["picked"]["outputs"].get("teacher_caches", {})
    others = {c["teacher"] for c in picked.values() if c["teacher"] != "teacher"}
    assert set(caches) == others
    assert len({c["path"] for c in caches.values()}) == len(others)
    assert all(c["built"] > 0 for c in caches.values())
    notes = next(s["notes"] for s in report["stages"] if s["name"] == "picked")
    assert any(n.startswith("picked: task sst learns from ") and "auto: best dev" in n for n in notes)


def test_auto_takes_the_best_dev_metric_in_the_metric_direction(tmp_path):
    from compressor.distill.teachers import Candidate, choose

    found = [Candidate("teacher", "sst", tmp_path / "t", 0.80), Candidate("single:sst", "sst", tmp_path / "s", 0.85),
             Candidate("ft", "sst", tmp_path / "f", 0.83), Candidate("other", "sst", tmp_path / "o", None)]
    pick, reason = choose("stages[2].teachers.sst", "auto", "sst", found, higher_is_better=True)
    assert pick.name == "single:sst" and "single:sst 0.8500" in reason and "other n/a" in reason
    pick, _ = choose("stages[2].teachers.sst", "auto", "sst", found, higher_is_better=False)
    assert pick.name == "teacher"
    pick, reason = choose("w", "ft", "sst", found, higher_is_better=True)
    assert pick.name == "ft" and reason == "named in the recipe"


def test_a_wider_teacher_teaches_logits_only(tmp_path, tiny_model_path, tokenizer, store):  # noqa: F811
    from conftest import tiny_bert
    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    tasks = {t: build_task(p.plugin_name, t, p.labels) for t, p in store.tasks.items()}
    wide = save_model(MultiTaskModel(tiny_bert(hidden=64, layers=1, heads=4, ffn=64), tasks), tokenizer,
                      tmp_path / "wide", 32)
    stages = (f"  - {{kind: load, name: wide, path: {wide}}}\n"
              + DISTILL.format(name="d", teachers="{sst: wide}", extra=""))
    _, done, _ = _run(tmp_path, tiny_model_path, stages)
    chosen = done["d"]["outputs"]["teachers"]
    assert chosen["sst"]["teacher"] == "wide" and chosen["ner"]["teacher"] == "teacher"
    assert chosen["ner"]["reason"] == "the run's teacher (default)"


def test_each_task_is_distilled_from_its_own_teacher_and_has_its_own_cache(store, tokenizer, tmp_path):  # noqa: F811
    joint = teacher_for(store)
    other = copy.deepcopy(joint)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    student = student_from_teacher(joint, [1, 3])
    cache_joint = TeacherCache.open(tmp_path / "cache", joint, dtype="float32")
    cache_other = TeacherCache.open(tmp_path / "cache", other, dtype="float32")
    assert cache_joint.root != cache_other.root  # keyed per teacher fingerprint
    engine, distiller = kd_engine(student, joint, store, tokenizer, KDConfig(alpha=0.0), 2, lr=5e-5, batch_size=4,
                                  teacher_cache=cache_joint, teachers={"sst": other},
                                  teacher_caches={"sst": cache_other})
    assert distiller.teacher_of("sst") is other and distiller.teacher_of("ner") is joint
    assert set(cache_joint.keys) == {"ner"} and set(cache_other.keys) == {"sst"}

    # the cached KD targets of sst are the other teacher's outputs, not the joint teacher's
    feats = store.encoded("sst", "train", tokenizer, 32, train=True).features[:4]
    batch = store.tasks["sst"].collate(feats)
    with torch.no_grad():
        want = other.forward_batch("sst", batch).outputs
        joint_out = joint.forward_batch("sst", batch).outputs
    sig = distiller.loss.needs().signature("float32")
    for i in range(4):
        row = cache_other.rows[sig][cache_other.keys["sst"][i]]
        for name, value in want.items():
            if f"out.{name}" in row:
                assert torch.allclose(row[f"out.{name}"], value[i].float(), atol=1e-5)
                assert not torch.allclose(row[f"out.{name}"], joint_out[name][i].float(), atol=1e-3)

    # and the loss on an sst batch is the KL against the other teacher's targets
    batch[INDEX_KEY] = torch.arange(4)
    student.eval()
    with torch.no_grad():
        parts = distiller.loss(student, distiller.teacher_of("sst"), "sst", batch)
        s_out = student.forward_batch("sst", batch).outputs
        plugin = student.tasks["sst"]
        expected = logits_kd(plugin.distill_targets(s_out, batch), other.tasks["sst"].distill_targets(want, batch), 2.0)
        from_joint = logits_kd(plugin.distill_targets(s_out, batch),
                               joint.tasks["sst"].distill_targets(joint_out, batch), 2.0)
    assert torch.allclose(parts["kd_logits"], expected, rtol=1e-4)
    assert not torch.allclose(parts["kd_logits"], from_joint, rtol=1e-2)
    engine.run(2)  # trains
    assert cache_other.stats["hits"] + cache_other.stats["misses"] >= 1 or cache_joint.stats["hits"] >= 1


def test_a_shallower_fine_tuned_teacher_with_hidden_kd_fails_before_the_stage_trains(tmp_path, tiny_model_path):
    """Checked when the stage starts (the finetune stage's models exist only then): one error line naming
    stages[i].teachers.<task>, exit 2, the stage writes nothing."""
    stages = ("  - {kind: distill, name: small, steps: 2, batch_size: 8, student: {from_teacher: {layers: 1}}}\n"
              + FINETUNE.replace("name: ft", "name: ft\n    source: small")
              + DISTILL.format(name="d", teachers="{sst: ft}", extra="    weights: {logits: 1, hidden: 1}\n"))
    text = recipe_text(tiny_model_path, epochs=1, baselines=False).replace("report:", stages + "report:")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 2, result.output
    err = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "stages[3].teachers.sst: 'ft'" in err[0] and "has 1 layers" in err[0], result.output
    state = json.loads((out / "state.json").read_text())
    assert [s["name"] for s in state["completed"]] == ["teacher", "small", "ft"]
    assert not list((out / "stages").glob("*-d")) and not list((out / "stages").glob(".*-d.partial"))
