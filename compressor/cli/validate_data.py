"""``compressor validate --data``: every split of every task read whole (see :mod:`compressor.data.validate`)."""

from __future__ import annotations

from pathlib import Path

import typer


def validate_recipes_data(recipes: list[Path], data_root: Path | None) -> int:
    """Check each recipe (fields, plugins, stage chain) and read its data whole; print one ``error: ...`` line per
    problem on stderr and an ``ok`` line per clean recipe. The exit code: 0, or 2 when anything was wrong."""
    from compressor.checks import check_recipe, default_data_root
    from compressor.data.validate import validate_data
    from compressor.errors import RecipeError
    from compressor.recipe import load_recipe

    failed = False
    for path in recipes:
        recipe = load_recipe(path)
        root = default_data_root(recipe, data_root)
        if root is None:
            raise RecipeError(f"{path}: --data needs a data root: set data_root in the recipe, pass --data-root, "
                              "or set $COMPRESSOR_DATA_ROOT")
        summary = check_recipe(recipe, path, None)
        check = validate_data(recipe.data_options(), path, root)
        for message in check.errors:
            typer.echo(f"error: {message}", err=True)
        if check.errors:
            failed = True
            continue
        n_splits = sum(len(s) for s in check.examples.values())
        n_examples = sum(n for s in check.examples.values() for n in s.values())
        counts = ", ".join(f"{task} {len(labels)}" for task, labels in check.labels.items())
        typer.echo(f"{path}: ok ({summary['tasks']} task(s), stages: {', '.join(summary['stages'])}, data: "
                   f"{n_splits} split(s) read whole, {n_examples} example(s), labels checked; label count: "
                   f"{counts or '-'})")
    return 2 if failed else 0
