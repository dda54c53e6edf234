"""Distillation examples/s: the distillation loop before the teacher cache and the engine (its own Distiller,
commit 72fafa9) against the training engine with the distillation objective and the teacher cache
(reports/distill-speed.*).

    PYTHONPATH=<code> python scripts/distill_speed.py before|after STEPS OUT.json [no|bf16]

Both runs use recipes/quickstart.yaml's tasks (CoNLL04 NER, 400 training sentences; SST-2, 800; max_length 128)
and its distill stage (student = every other layer of the teacher, alpha 0.5, T 2, logits + hidden-state KD,
batch 16, lr 1e-4) on the CPU in fp32, with the same seed and teacher (the offline encoder with fresh heads: the
speed does not depend on trained weights). ``before`` runs the Distiller of the code on PYTHONPATH (72fafa9: no
cache, its own batches and temperature task sampling); ``after`` runs this checkout's engine
(``build_engine`` + ``Distillation``: length-grouped batches, the stage's default task sampling) after filling
the teacher cache in a scratch directory (timed apart). examples/s counts the training examples of the timed
steps (after 2 warm-up steps) per second of wall clock and per second of this process's CPU time.
"""
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor.data.store import DataStore
from compressor.distill.losses import KDConfig
from compressor.model.multitask import build_model
from compressor.model.student import default_layer_map, select_layers, student_from_teacher
from compressor.recipe import load_recipe, resolve_data_root
from compressor.tasks import build_task

mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
precision = sys.argv[4] if len(sys.argv) > 4 else "no"  # after only: bf16 where the CPU has it natively
recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
data = DataStore(recipe.data_options(), resolve_data_root(recipe.data_root))
data.fit_labels()
cfg = next(s for s in recipe.stages if s.kind == "distill")
torch.manual_seed(recipe.seed)
tasks = {t.name: build_task(t.plugin, t.name, data.tasks[t.name].labels, t.options) for t in recipe.tasks}
teacher, tokenizer = build_model(recipe.model.encoder, tasks)
teacher.eval()
n_t = len(teacher.encoder.encoder.layer)
kept = select_layers(cfg.student.from_teacher.layers, n_t)
student = student_from_teacher(teacher, kept)
layer_map = default_layer_map(len(kept), n_t, kept)
kd = KDConfig(alpha=cfg.alpha, temperature=cfg.temperature, logits=cfg.weights.logits, hidden=cfg.weights.hidden,
              attention=cfg.weights.attention)
build_s = build_cpu_s = 0.0
if mode == "before":
    from compressor.distill.trainer import Distiller, TaskBatches

    batches = TaskBatches.from_store(data, list(tasks), tokenizer, recipe.model.max_length, cfg.batch_size,
                                     cfg.sampling.strategy, cfg.sampling.tau, recipe.seed)
    counted = [0]
    for t, collate in list(batches.collate.items()):
        def counting(feats, collate=collate):
            counted[0] += len(feats)
            return collate(feats)
        batches.collate[t] = counting
    train_features = {t: len(f) for t, f in batches.features.items()}
    distiller = Distiller(student, teacher, batches, kd, total_steps=steps + 2, layer_map=layer_map, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                          device="cpu", mixed_precision="no")
    distiller.run(2)  # warm-up
    load_before = os.getloadavg()
    counted[0] = 0
    tic, cpu_tic = time.perf_counter(), time.process_time()
    for _ in range(steps):
        distiller.step()
    wall, cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
    examples = counted[0]
else:
    from compressor.distill.cache import TeacherCache
    from compressor.distill.objective import Distillation, train_options
    from compressor.train.loop import build_engine

    tic, cpu_tic = time.perf_counter(), time.process_time()
    cache = TeacherCache.open(Path(tempfile.mkdtemp(prefix="distill-speed-")) / "teacher-cache", teacher)
    objective = Distillation(student, teacher, kd, layer_map=layer_map, teacher_cache=cache)
    options = train_options(cfg, max_steps=steps + 2, mixed_precision=precision)
    engine = build_engine(student, tokenizer, data, options, seed=recipe.seed, label="after", objective=objective)
    build_s, build_cpu_s = time.perf_counter() - tic, time.process_time() - cpu_tic
    train_features = {t: len(f) for t, f in engine.features.items()}
    engine.run(2)  # warm-up
    load_before = os.getloadavg()
    tic, cpu_tic = time.perf_counter(), time.process_time()
    examples = engine.run(steps).examples
    wall, cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
load_after = os.getloadavg()
result = {
    "mode": mode, "precision": precision if mode == "after" else "no", "steps": steps, "batch_size": cfg.batch_size, "examples": examples, "wall_s": round(wall, 2),
    "examples_per_s": round(examples / wall, 2), "cpu_s": round(cpu, 2),
    "examples_per_cpu_s": round(examples / cpu, 2), "cache_build_s": round(build_s, 2),
    "cache_build_cpu_s": round(build_cpu_s, 2),
    "examples_per_s_with_build": round(examples / (wall + build_s), 2),
    "train_features": train_features,
    "torch_threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": load_after,
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
}
if mode == "after":
    result["cache"] = dict(cache.stats)
out.write_text(json.dumps(result, indent=2))
print(json.dumps(result))
