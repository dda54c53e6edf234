"""Training throughput of the train loop on a recipe's data: ``python -m compressor.train.throughput RECIPE``.

Encodes every task's training split first (not timed), then trains the recipe's first train stage for
``--steps`` optimizer steps (the recipe has no dev splits, so nothing is evaluated) and prints one JSON line: examples/s of the loop, the
machine's threads, the mixed precision used. Used for the throughput figures of the teacher reports.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import torch

    from compressor.data.store import DataStore
    from compressor.model.multitask import MultiTaskModel, load_pretrained
    from compressor.recipe import load_recipe
    from compressor.tasks import build_task
    from compressor.train.loop import train_model

    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--mixed-precision", default=None)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    if any(getattr(t.data, "dev", None) for t in recipe.tasks):
        raise SystemExit("give a recipe without dev splits: the loop is timed without evaluation")
    stage = next(s for s in recipe.stages if s.kind == "train")
    update = {"epochs": 1, "steps_per_epoch": args.steps, "baselines": False}
    if args.mixed_precision:
        update["mixed_precision"] = args.mixed_precision
    stage = stage.model_copy(update=update)
    data = DataStore(recipe.data_options(), Path(args.data_root))
    data.fit_labels()
    encoder, tokenizer = load_pretrained(recipe.model.encoder)
    torch.manual_seed(recipe.seed)
    tasks = {t.name: build_task(t.plugin, t.name, data.tasks[t.name].labels, data.tasks[t.name].options.model_dump())
             for t in recipe.tasks}
    model = MultiTaskModel(encoder, tasks)
    for name in tasks:
        data.encoded(name, "train", tokenizer, recipe.model.max_length, train=True)
    tic = time.perf_counter()
    result = train_model(model, tokenizer, data, stage, seed=recipe.seed, label="throughput")
    wall = time.perf_counter() - tic
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "batch_size": stage.batch_size,
                      "examples_per_s": round(args.steps * stage.batch_size / wall, 2), "wall_s": round(wall, 1),
                      "threads": torch.get_num_threads(), "mixed_precision": result.mixed_precision,
                      "train_loss": result.history[-1]["train_loss"] if result.history else None}))


if __name__ == "__main__":
    main()
