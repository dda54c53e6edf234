"""The teacher cache: cached teacher outputs give the losses the on-the-fly teacher's values (every built-in
plugin, every part), hits run no teacher pass, misses fall back to it, a changed teacher gets a fresh cache, an
interrupted build is resumed from its finished shards, and a distillation trains the same with it."""

from __future__ import annotations

import pytest
import torch
from plugin_fixtures import PLUGIN_FIXTURES
from test_distill import kd_engine, store, teacher_for  # noqa: F401 (fixture)

from compressor.distill.cache import INDEX_KEY, TeacherCache, teacher_fingerprint
from compressor.distill.losses import DistillLoss, KDConfig
from compressor.errors import RecipeError
from compressor.model.student import student_from_config, student_from_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


class Passes:
    """Counts the teacher's forward passes and the rows they see."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.encoder.register_forward_hook(self)

    def __call__(self, _m, args, kwargs_or_out, *rest):
        self.calls += 1

    def close(self):
        self.handle.remove()


def parts_of(loss, student, teacher, batches, n=4):
    student.eval()
    out = []
    with torch.no_grad():
        for task, batch in batches[:n]:
            out.append({k: float(v) for k, v in loss(student, teacher, task, batch).items()})
    return out


class RoundRobin:
    """``(task, batch)`` pairs, the tasks in turn, each batch the next ``batch_size`` features of its task with
    their indices (``feature_index``, as the engine's batches carry them under a teacher cache)."""

    def __init__(self, features, collate, batch_size):
        self.features, self.collate, self.batch_size = dict(features), dict(collate), batch_size
        self._pos = {t: 0 for t in self.features}
        self._turn = 0

    def __iter__(self):
        return self

    def __next__(self):
        task = list(self.features)[self._turn % len(self.features)]
        self._turn += 1
        feats, start = self.features[task], self._pos[task]
        idx = [(start + i) % len(feats) for i in range(self.batch_size)]
        self._pos[task] = (start + self.batch_size) % len(feats)
        batch = self.collate[task]([feats[i] for i in idx])
        batch[INDEX_KEY] = torch.tensor(idx, dtype=torch.long)
        return task, batch


def task_batches(store, tokenizer, batch_size=4):
    tasks = ["ner", "sst"]
    return RoundRobin({t: store.encoded(t, "train", tokenizer, 32, train=True).features for t in tasks},
                      {t: store.tasks[t].collate for t in tasks}, batch_size)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_parts_equal_the_on_the_fly_teacher(store, tokenizer, tmp_path, dtype, tol):
    teacher = teacher_for(store)
    student = student_from_config(teacher, hidden_size=16, num_layers=2, heads=2, ffn=32, seed=1)
    config = KDConfig(alpha=0.3, temperature=2.0, logits=1.0, hidden=1.0, attention=1.0)
    batches = task_batches(store, tokenizer)
    seen = [next(batches) for _ in range(6)]
    plain = DistillLoss(student, teacher, config, {0: 1, 1: 3})
    cache = TeacherCache.open(tmp_path / "cache", teacher, dtype=dtype, build_batch_size=5)
    cached = DistillLoss(student, teacher, config, {0: 1, 1: 3}, cache)
    cached.projections.load_state_dict(plain.projections.state_dict())
    cache.prepare(teacher, batches.features, batches.collate, cached.needs(), torch.device("cpu"))
    assert cached.needs().hidden == (0, 2, 4) and cached.needs().qkv == (1, 3)
    passes = Passes(teacher)
    got = parts_of(cached, student, teacher, seen, 6)
    passes.close()
    want = parts_of(plain, student, teacher, seen, 6)
    assert passes.calls == 0 and cache.stats["misses"] == 0 and cache.stats["hits"] == 24
    for g, w in zip(got, want):
        for k in ("kd_logits", "kd_hidden", "kd_attention", "loss"):
            assert g[k] == pytest.approx(w[k], rel=tol, abs=tol), (k, g, w)


@pytest.mark.parametrize("plugin", ["ner", "classification", "qa", "relation"])
def test_every_builtin_plugin_reads_the_same_logits_from_the_cache(plugin, tokenizer, tmp_path):
    """Head outputs of every plugin (token, sentence, span-start/end with masked padding, entity pairs) are
    re-padded to the student's batch so the KL is the on-the-fly one."""
    from conftest import tiny_bert

    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    entry = PLUGIN_FIXTURES[plugin]
    max_length = entry.get("max_length", 64)
    specs = {plugin: {**entry, "plugin": plugin}, **entry.get("siblings", {})}
    tasks, feats = {}, {}
    for name, spec in specs.items():
        task = build_task(spec["plugin"], name, spec.get("labels"), spec.get("options"))
        examples = task.read(spec["path"], spec.get("format"))
        task.labels = task.fit_labels(examples)
        tasks[name] = (task, examples)
    plugins = {n: t for n, (t, _) in tasks.items()}
    for t in plugins.values():
        t.bind(plugins)
    for name, (task, examples) in tasks.items():
        feats[name] = task.encode(examples, tokenizer, max_length, train=True).features
    torch.manual_seed(0)
    teacher = MultiTaskModel(tiny_bert(layers=2, heads=4, hidden=32, ffn=64), plugins).eval()
    with torch.no_grad():
        for n, p in teacher.heads.named_parameters():
            p.normal_(0, 0.5)
    student = student_from_teacher(teacher, layers=1)
    batches = RoundRobin(feats, {n: t.collate for n, t in plugins.items()}, batch_size=3)
    config = KDConfig(alpha=0.0, temperature=1.0)
    cache = TeacherCache.open(tmp_path, teacher, dtype="float32", build_batch_size=7)  # other batch widths
    plain, cached = DistillLoss(student, teacher, config), DistillLoss(student, teacher, config, teacher_cache=cache)
    cache.prepare(teacher, batches.features, batches.collate, cached.needs(), torch.device("cpu"))
    seen = [next(batches) for _ in range(2 * len(plugins))]
    got, want = parts_of(cached, student, teacher, seen, len(seen)), parts_of(plain, student, teacher, seen, len(seen))
    assert cache.stats["misses"] == 0
    for g, w in zip(got, want):
        assert g["kd_logits"] == pytest.approx(w["kd_logits"], rel=1e-4, abs=1e-5)
        assert w["kd_logits"] > 0


def test_cap_holds_some_rows_and_the_teacher_computes_only_the_rest(store, tokenizer, tmp_path):
    teacher = teacher_for(store)
    student = student_from_teacher(teacher, layers=2)
    batches = task_batches(store, tokenizer)
    n_rows = sum(len(f) for f in batches.features.values())
    config = KDConfig(alpha=0.5)
    plain = DistillLoss(student, teacher, config)
    full = TeacherCache.open(tmp_path / "full", teacher, dtype="float32")
    full.prepare(teacher, batches.features, batches.collate, plain.needs(), torch.device("cpu"))
    row_bytes = sum(t.nbytes for r in full.rows[plain.needs().signature("float32")].values() for t in r.values())
    cap_mb = row_bytes / 2 / 2**20  # about half the rows fit
    cache = TeacherCache.open(tmp_path / "half", teacher, dtype="float32", max_mb=cap_mb, build_batch_size=4)
    cached = DistillLoss(student, teacher, config, teacher_cache=cache)
    cache.prepare(teacher, batches.features, batches.collate, cached.needs(), torch.device("cpu"))
    held = len(cache.rows[cached.needs().signature("float32")])
    assert 0 < cache.stats["built"] == held < n_rows
    assert cache.bytes[cached.needs().signature("float32")] <= cap_mb * 2**20
    seen = [next(batches) for _ in range(10)]
    got, want = parts_of(cached, student, teacher, seen, 10), parts_of(plain, student, teacher, seen, 10)
    assert cache.stats["hits"] > 0 and cache.stats["misses"] > 0  # both paths taken, same values
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)


def test_a_changed_teacher_gets_a_fresh_cache_and_a_named_cache_of_another_teacher_is_an_error(store, tokenizer,
                                                                                            tmp_path):
    teacher = teacher_for(store)
    batches = task_batches(store, tokenizer)
    loss = DistillLoss(student_from_teacher(teacher, layers=2), teacher, KDConfig())
    first = TeacherCache.open(tmp_path / "run", teacher)
    first.prepare(teacher, batches.features, batches.collate, loss.needs(), torch.device("cpu"))
    n_rows = first.stats["built"]
    again = TeacherCache.open(tmp_path / "run", teacher)
    again.prepare(teacher, batches.features, batches.collate, loss.needs(), torch.device("cpu"))
    assert again.stats == {"built": 0, "loaded": n_rows, "hits": 0, "misses": 0}
    fp = teacher_fingerprint(teacher)
    with torch.no_grad():
        teacher.heads["sst"].classifier.bias.add_(0.5) if hasattr(teacher.heads["sst"], "classifier") else \
            next(teacher.heads["sst"].parameters()).add_(0.5)
    assert teacher_fingerprint(teacher) != fp
    changed = TeacherCache.open(tmp_path / "run", teacher)
    changed.prepare(teacher, batches.features, batches.collate, loss.needs(), torch.device("cpu"))
    assert changed.root != first.root and changed.stats["loaded"] == 0 and changed.stats["built"] == n_rows
    # a path the recipe names is one teacher's cache: another teacher's is refused, naming the field
    TeacherCache.open(tmp_path / "named", teacher_for(store), shared=True)
    with pytest.raises(RecipeError, match=r"teacher_cache\.path: .* holds the cache of another teacher"):
        TeacherCache.open(tmp_path / "named", teacher, shared=True)


def test_an_interrupted_build_is_resumed_from_its_finished_shards(store, tokenizer, tmp_path):
    teacher = teacher_for(store)
    batches = task_batches(store, tokenizer)
    n_rows = sum(len(f) for f in batches.features.values())
    loss = DistillLoss(student_from_teacher(teacher, layers=2), teacher, KDConfig())
    cache = TeacherCache.open(tmp_path, teacher, build_batch_size=4)
    calls = []

    def kill(*_):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed during the third teacher pass

    handle = teacher.encoder.register_forward_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(teacher, batches.features, batches.collate, loss.needs(), torch.device("cpu"))
    handle.remove()
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written shard
    resumed = TeacherCache.open(tmp_path, teacher, build_batch_size=4)
    resumed.prepare(teacher, batches.features, batches.collate, loss.needs(), torch.device("cpu"))
    assert resumed.stats["loaded"] == 8 and resumed.stats["built"] == n_rows - 8


def test_distillation_with_the_cache_trains_like_without(store, tokenizer, tmp_path):
    torch.manual_seed(0)
    lr = 1e-3
    teacher = teacher_for(store)
    results = []
    for cache in (None, TeacherCache.open(tmp_path, teacher, dtype="float32")):
        student = student_from_teacher(teacher, layers=[1, 3])
        engine, _ = kd_engine(student, teacher, store, tokenizer, KDConfig(alpha=0.5, hidden=1.0), 6, lr=lr,
                              dropout=0.0, batch_size=4, teacher_cache=cache)
        passes = Passes(teacher)
        parts = engine.run(6).means()
        passes.close()
        results.append((parts, student.state_dict(), passes.calls))
    (p0, s0, calls0), (p1, s1, calls1) = results
    assert calls0 == 6 and calls1 == 0  # the teacher ran at every step without the cache, never with it
    assert p1["loss"] == pytest.approx(p0["loss"], rel=1e-4)
    # Adam normalises every step to about lr, so float-rounding noise on a near-zero gradient (the cached and the
    # computed teacher outputs agree to rounding, not bit for bit, on every CPU) can move a weight by a fraction
    # of one step (2.3e-4 seen on an AMD EPYC), never by the several steps a wrong teacher output would
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], atol=lr / 2, rtol=1e-3)


def test_the_engine_gives_an_objective_that_asks_for_it_the_feature_index_of_every_row(store, tokenizer):
    """What an outsider's objective sees: the engine's batches carry each row's index into its task's features."""
    from compressor.train.loop import build_engine
    from compressor.train.options import TrainOptions

    seen = []

    class Recording:  # a minimal objective: the task loss, recording its batches
        module = None
        wants_index = True

        def prepare(self, features, collate, accelerator):
            self.features = features

        def __call__(self, model, task, batch):
            seen.append((task, batch))
            return {"loss": model.tasks[task].loss(model.forward_batch(task, batch).outputs, batch)}

    torch.manual_seed(0)
    model = teacher_for(store)
    objective = Recording()
    cfg = TrainOptions(batch_size=4, max_steps=4, steps_per_epoch=4, sampling={"strategy": "round_robin"})
    build_engine(model, tokenizer, store, cfg, seed=0, objective=objective).run(4)
    assert [t for t, _ in seen] == ["ner", "sst", "ner", "sst"]
    for task, batch in seen:
        feats = objective.features[task]
        for row, i in enumerate(batch[INDEX_KEY].tolist()):
            n = len(feats[i]["input_ids"])
            assert batch["input_ids"][row, :n].tolist() == feats[i]["input_ids"]


def test_distill_stage_fills_the_run_cache_and_a_rerun_reads_it(store, tokenizer, tmp_path):
    """A stage killed after its cache was filled (its outputs never moved into place) is run again: the teacher
    runs for no training feature, and the student matches the one distilled without a cache."""
    from test_distill import make_ctx

    from compressor.model.io import save_model
    from compressor.stages.distill import run

    teacher = teacher_for(store)
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher", max_length=32)
    stage = {"name": "small", "student": {"from_teacher": {"layers": 2}}, "steps": 6, "batch_size": 4, "lr": 1e-3,
             "weights": {"logits": 1.0, "hidden": 1.0}, "warmup_ratio": 0.0, "single_task_students": True}
    plain = run(make_ctx(store, tmp_path / "plain", stage, teacher_dir=teacher_dir))
    assert "teacher_cache" not in plain.outputs
    cached_stage = {**stage, "teacher_cache": {"dtype": "float32"}}
    first = run(make_ctx(store, tmp_path / "run", cached_stage, teacher_dir=teacher_dir))
    stats = first.outputs["teacher_cache"]
    n_rows = sum(len(store.encoded(t, "train", tokenizer, 32, train=True).features) for t in ("ner", "sst"))
    assert stats["built"] == n_rows and stats["misses"] == 0 and stats["hits"] > 0
    assert stats["path"].startswith(str(tmp_path / "run" / "teacher-cache"))
    rerun = make_ctx(store, tmp_path / "rerun", cached_stage, teacher_dir=teacher_dir)
    rerun.run_dir = tmp_path / "run"  # the same run directory, a fresh stage directory
    again = run(rerun)
    assert again.outputs["teacher_cache"]["built"] == 0 and again.outputs["teacher_cache"]["loaded"] == n_rows
    for key in ("loss_first", "loss_last"):
        for part, value in plain.outputs[key].items():
            assert again.outputs[key][part] == pytest.approx(value, rel=1e-3, abs=1e-5), (key, part)
    assert set(again.outputs["single_task_students"]) == {"ner", "sst"}
    assert any("teacher cache" in n for n in again.notes)
