"""Run by tests/test_train_ddp.py under ``accelerate launch`` (1 or 2 CPU processes, gloo): trains a tiny
multi-task model with the train loop (mode ``train``) or distils a student from it with the distillation objective
and a teacher cache (mode ``distill``) and, on the main process, saves it and writes what the test compares."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(out: Path, model_path: str, data_root: str, mode: str = "train") -> None:
    import torch
    from accelerate import PartialState

    from compressor.data.store import DataStore
    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel, load_pretrained
    from compressor.recipe import Recipe
    from compressor.tasks import build_task
    from compressor.train.loop import train_model

    recipe = Recipe.model_validate({
        "name": "ddp", "seed": 5, "data_root": data_root, "model": {"encoder": model_path, "max_length": 32},
        "tasks": [
            {"name": "ner", "plugin": "ner", "format": "conll",
             "data": {"train": "ner.train.conll", "dev": "ner.dev.conll"}},
            {"name": "sst", "plugin": "classification", "format": "label_text",
             "data": {"train": "sst.train.txt", "dev": "sst.dev.txt"}},
        ],
        "stages": [{"kind": "train", "name": "teacher", "epochs": 2, "batch_size": 4, "lr": 1e-3,
                    "warmup_ratio": 0.2, "sampling": {"strategy": "passes", "passes": {"ner": 2}}}],
    })
    data = DataStore(recipe.data_options(), Path(data_root))
    data.fit_labels()
    encoder, tokenizer = load_pretrained(model_path)
    torch.manual_seed(recipe.seed)
    tasks = {t.name: build_task(t.plugin, t.name, data.tasks[t.name].labels, t.options) for t in recipe.tasks}
    model = MultiTaskModel(encoder, tasks)
    cache = None
    if mode == "distill":
        from compressor.distill.cache import TeacherCache
        from compressor.distill.losses import KDConfig
        from compressor.distill.objective import Distillation
        from compressor.model.student import student_from_teacher

        teacher = model.eval()
        model = student_from_teacher(teacher, [0], heads=1)
        cache = TeacherCache.open(out / "teacher-cache", teacher, dtype="float32")
        objective = Distillation(model, teacher, KDConfig(alpha=0.5, hidden=1.0, attention=1.0), teacher_cache=cache)
        result = train_model(model, tokenizer, data, recipe.stages[0], seed=recipe.seed, label="ddp-kd",
                             objective=objective, checkpoint_dir=out / "checkpoints")
    else:
        result = train_model(model, tokenizer, data, recipe.stages[0], seed=recipe.seed, label="ddp")
    state = PartialState()
    if state.is_main_process:
        save_model(model, tokenizer, out / "model", 32)
        (out / "result.json").write_text(json.dumps({
            "processes": state.num_processes, "optimizer_steps": result.optimizer_steps,
            "final_lr": result.final_lr, "epochs_run": result.epochs_run,
            "steps": [h["steps"] for h in result.history],
            "cache": cache.stats if mode == "distill" else None}))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:])
