"""``compressor validate --data``: every split of every task read whole (see :mod:`compressor.data.validate`)."""

from __future__ import annotations

from pathlib import Path

import typer


def validate_recipes_data(recipes: list[Path], data_root: Path | None, json_out: bool = False) -> int:
    """Check each recipe (fields, plugins, stage chain) and read its data whole; print one ``error: ...`` line per
    problem on stderr and an ``ok`` line per clean recipe (``json_out``: one JSON list on stdout instead of the ok
    lines, each recipe with its ``errors``). The exit code: 0, or 2 when anything was wrong."""
    from compressor.checks import check_recipe, default_data_root
    from compressor.data.validate import validate_data
    from compressor.recipe import load_recipe

    failed = False
    results = []
    for path in recipes:
        recipe = load_recipe(path)
        root = default_data_root(recipe, data_root)  # None: every path must be absolute (the store says which is not)
        summary = check_recipe(recipe, path, None)
        check = validate_data(recipe.data_options(), path, root)
        for message in check.errors:
            typer.echo(f"error: {message}", err=True)
        n_splits = sum(len(s) for s in check.examples.values())
        n_examples = sum(n for s in check.examples.values() for n in s.values())
        results.append({"recipe": str(path), "ok": not check.errors, "errors": list(check.errors),
                        "tasks": summary["tasks"], "stages": summary["stages"], "splits": n_splits,
                        "examples": n_examples})
        if check.errors:
            failed = True
            continue
        counts = ", ".join(f"{task} {len(labels)}" for task, labels in check.labels.items())
        results[-1]["label_counts"] = {task: len(labels) for task, labels in check.labels.items()}
        if not json_out:
            typer.echo(f"{path}: ok ({summary['tasks']} task(s), stages: {', '.join(summary['stages'])}, data: "
                       f"{n_splits} split(s) read whole, {n_examples} example(s), labels checked; label count: "
                       f"{counts or '-'})")
    if json_out:
        from compressor.cli.output import emit_json

        emit_json(results)
    return 2 if failed else 0
