"""Two models of one finished run, task by task on the dev split, with the paired-bootstrap interval of the drop
(``compressor.significance``): is B's difference from A more than the dev examples can resolve?

    python scripts/compare_stages.py RUN_DIR STAGE_A STAGE_B [--samples 1000] [--out FILE.json]

Reads the run's own recipe (``RUN_DIR/recipe.yaml``) and data root (the recipe's, $COMPRESSOR_DATA_ROOT, then
../shared/data), loads ``stages/NN-<stage>/model`` of both stages and scores every task they share. Prints one
JSON object: per task, A's and B's metric and B's relative drop below A with its 95% interval (a negative drop
is a gain; an interval that contains 0 is a difference the data cannot tell from none).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from compressor.data.store import DataStore
from compressor.model.forward import dev_metrics
from compressor.model.io import load_model
from compressor.recipe import load_recipe, resolve_data_root
from compressor.significance import task_intervals


def stage_model(run: Path, stage: str) -> Path:
    found = [p / "model" for p in sorted((run / "stages").glob(f"[0-9][0-9]-{stage}")) if (p / "model").is_dir()]
    if not found:
        raise SystemExit(f"error: {run}/stages: no finished stage '{stage}' with a model")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    recipe = load_recipe(args.run / "recipe.yaml")
    data = DataStore(recipe.data_options(), resolve_data_root(recipe.data_root, required=False))
    data.fit_labels()
    scored, predictions, plugins = {}, {}, {}
    for stage in (args.a, args.b):
        model, tokenizer, _ = load_model(stage_model(args.run, stage))
        predictions[stage] = {}
        scored[stage] = dev_metrics(model, tokenizer, data, list(model.tasks), recipe.model.max_length,
                                    predictions=predictions[stage])
        plugins.update(model.tasks)
    tasks = [t for t in predictions[args.a] if t in predictions[args.b]]
    examples = {t: data.examples(t, "dev") for t in tasks}
    intervals = task_intervals({t: plugins[t] for t in tasks}, examples,
                               {t: predictions[args.a][t] for t in tasks}, {t: predictions[args.b][t] for t in tasks},
                               samples=args.samples, seed=recipe.seed)
    result = {"run": args.run.name, "split": "dev", "a": args.a, "b": args.b, "tasks": {
        t: {"metric": plugins[t].metric.name, "a": scored[args.a][t], "b": scored[args.b][t],
            "examples": len(examples[t]), **intervals[t].to_json()} for t in tasks}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
