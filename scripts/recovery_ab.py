"""A/B of recovery settings on the converged four-task teacher (reports/recovery-dropout.md).

    python scripts/recovery_ab.py VARIANT FFN_RATIO HEAD_RATIO STEPS

Cuts FFN_RATIO of every layer's FFN neurons and HEAD_RATIO of its heads (Taylor importance, as the search does),
recovers for STEPS distillation steps with recipes/auto.yaml's search recovery settings changed by VARIANT
(words joined by '-': drop0 = dropout 0, warm = 10% warmup, lr2 = lr 2e-5, fp32 = no bf16 autocast, alpha = task
loss weight 0.5; without drop0, the model's own dropout),
scores every task on dev with PyTorch and appends one JSON line to runs/exp/recover_ab.jsonl. The teacher's dev
metrics are those of reports/auto.md (trial 0).
"""
import json, sys, time
from pathlib import Path
import torch
from compressor.recipe import load_recipe, resolve_data_root
from compressor.data.store import DataStore
from compressor.model.io import load_model
from compressor.search.candidate import CandidateBuilder
from compressor.search.space import Knobs

variant = sys.argv[1]
ffn = float(sys.argv[2]); heads = float(sys.argv[3]); steps = int(sys.argv[4])
recipe = load_recipe("recipes/auto.yaml")
data = DataStore(recipe.data_options(), resolve_data_root(None)); data.fit_labels()
stage = recipe.stages[1]
rc = stage.recovery
upd = {"dropout": None}
if "drop0" in variant: upd["dropout"] = 0.0
if "warm" in variant: upd["warmup_ratio"] = 0.1
if "lr2" in variant: upd["lr"] = 2e-5
if "fp32" in variant: upd["mixed_precision"] = "no"
if "alpha" in variant: upd["alpha"] = 0.5
stage = stage.model_copy(update={"recovery": rc.model_copy(update=upd)})
teacher, tok, _ = load_model(Path("runs/four-task/stages/00-teacher/model"))
torch.manual_seed(13)
b = CandidateBuilder(stage, teacher, tok, teacher, list(range(6)), data, 256,
                     {"ner": .7958, "re": .5881, "sst2": .8842, "qa": .6413}, 2, 13)
knobs = Knobs(6, (heads,)*6, (ffn,)*6, None, "none")
t0 = time.time()
model, kept = b.build(knobs, 13)
before = None
if steps:
    b.recover(model, kept, steps, 13)
after = b.torch_dev(model, tok)
res = {"variant": variant, "ffn": ffn, "heads": heads, "steps": steps, "before": before, "after": after,
       "retention": b.retention(after), "wall_s": round(time.time() - t0)}
print(json.dumps(res))
Path("runs/exp").mkdir(parents=True, exist_ok=True)
with open("runs/exp/recover_ab.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
