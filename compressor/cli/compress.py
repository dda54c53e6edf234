"""``compressor compress TEACHER_DIR --retention 0.97 --objective latency``: write and run a search recipe.

The recipe loads the teacher (``load``), searches the smallest / fastest student whose every task keeps the
floor (``search``), then ``export`` -> ``quantize`` -> ``bundle``. Tasks and data come from the recipe of the run
that wrote the teacher (``<run>/recipe.yaml`` above TEACHER_DIR) or from ``--tasks-from RECIPE``. Every option
is checked, and the search space against the teacher's architecture, before anything is written; the recipe as
run is ``<out>/recipe.yaml``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def compress(
    teacher_dir: Annotated[Path, typer.Argument(help="The teacher's model directory (e.g. runs/x/stages/00-teacher/model).")],
    retention: Annotated[float, typer.Option("--retention", help="Floor of every task's dev metric / the teacher's, in (0, 1].")] = 0.97,
    objective: Annotated[str, typer.Option("--objective", help="latency or size.")] = "latency",
    budget: Annotated[Optional[int], typer.Option("--budget", help="Trials to train (default 20 unless --budget-seconds).")] = None,
    budget_seconds: Annotated[Optional[float], typer.Option("--budget-seconds", help="Wall time of the search (s).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/compress-<teacher run>).")] = None,
    tasks_from: Annotated[Optional[Path], typer.Option("--tasks-from", help="Recipe whose tasks and data to use "
                                                       "(default: the recipe of the run that wrote the teacher).")] = None,
    int8: Annotated[str, typer.Option("--int8", help="INT8 mode of the trials: dynamic or static (the quantize stage takes the mode the search chose; "
                                                "--set space.int8=[dynamic,static] tries both).")] = "dynamic",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Another search-stage field, KEY=YAML "
                                                      "(e.g. recovery_steps=80, space.layers=[3,4]); repeatable.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Data root (default: the tasks' recipe's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run's result (paths, report) as JSON on "
                                           "stdout; progress goes to stderr.")] = False,
) -> None:
    """Search the smallest / fastest student that keeps RETENTION of the teacher on every task, then export,
    quantize and bundle it (exit code 1 when no candidate holds the floor)."""
    recipe_dict, source = build_recipe(teacher_dir, retention, objective, budget, budget_seconds, tasks_from, int8,
                                       set_ or [])
    import yaml

    from compressor.cli.output import emit_json, run_result, stdout_to_stderr
    from compressor.pipeline import run_recipe

    run_dir = Path(out) if out else Path("runs") / recipe_dict["name"]
    with tempfile.TemporaryDirectory(prefix="compress-") as tmp:
        path = Path(tmp) / "recipe.yaml"
        header = (f"# written by `compressor compress {teacher_dir}`; tasks and data from {source}\n")
        path.write_text(header + yaml.safe_dump(recipe_dict, sort_keys=False))
        with stdout_to_stderr(json_out):
            run_dir = run_recipe(path, out=run_dir, resume=resume, data_root=data_root)
    if json_out:
        emit_json({"recipe": str(Path(run_dir) / "recipe.yaml"), **run_result(Path(run_dir))})
        return
    typer.echo(f"recipe: {Path(run_dir) / 'recipe.yaml'}")
    typer.echo(f"report: {Path(run_dir) / 'report.md'} (and report.json)")


def build_recipe(teacher_dir: Path, retention: float, objective: str, budget: int | None, budget_seconds: float | None,
                 tasks_from: Path | None, int8: str, sets: list[str]) -> tuple[dict[str, Any], Path]:
    """The recipe dict (validated, the space checked against the teacher) and the recipe its tasks came from."""
    from pydantic import ValidationError

    from compressor.errors import RecipeError
    from compressor.model.io import read_manifest
    from compressor.recipe import Recipe, load_recipe

    if not 0 < retention <= 1:
        raise RecipeError(f"--retention: the floor must be in (0, 1] (got {retention:g})")
    if objective not in ("latency", "size"):
        raise RecipeError(f"--objective: expected 'latency' or 'size' (got '{objective}')")
    if budget is not None and budget <= 0:
        raise RecipeError(f"--budget: the number of trials must be > 0 (got {budget})")
    if budget_seconds is not None and budget_seconds <= 0:
        raise RecipeError(f"--budget-seconds: must be > 0 (got {budget_seconds:g})")
    if int8 not in ("dynamic", "static"):
        raise RecipeError(f"--int8: expected 'dynamic' or 'static' (got '{int8}')")
    teacher_dir = Path(teacher_dir).expanduser().resolve()
    manifest = read_manifest(teacher_dir)
    source = Path(tasks_from) if tasks_from else _run_recipe_of(teacher_dir)
    base = load_recipe(source)
    names = [t["name"] for t in manifest["tasks"]]
    tasks = [t.model_dump(exclude_defaults=True) for t in base.tasks if t.name in names]
    if not tasks:
        raise RecipeError(f"{source}: none of its tasks is a task of the teacher ({', '.join(names)})")
    run_name = _run_name(teacher_dir)
    search: dict[str, Any] = {"kind": "search", "name": "search", "retention": retention, "objective": objective,
                              "budget": {k: v for k, v in (("trials", budget if budget or budget_seconds else 20),
                                                           ("seconds", budget_seconds)) if v is not None},
                              "space": {"int8": [int8]}}
    for item in sets:
        _apply_set(search, item)
    recipe = {
        "name": f"compress-{run_name}", "seed": base.seed,
        **({"data_root": base.data_root} if base.data_root else {}),
        "model": base.model.model_dump(), "tasks": tasks,
        "stages": [{"kind": "load", "name": "teacher", "path": str(teacher_dir)}, search,
                   {"kind": "export", "name": "export"},
                   {"kind": "quantize", "name": "quantize", "mode": "search"},
                   {"kind": "bundle", "name": "bundle"}],
        "report": base.report.model_dump(exclude_defaults=True),
    }
    try:
        validated = Recipe.model_validate(recipe)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if p != "search")
        raise RecipeError(f"compress: {loc or 'recipe'}: {err['msg']}") from None
    from compressor.stages.search import preflight

    preflight(validated, 1)
    return recipe, source


def _apply_set(search: dict[str, Any], item: str) -> None:
    import yaml

    from compressor.errors import RecipeError

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set: expected KEY=VALUE (got '{item}')")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: value is not YAML ({exc})") from None
    node = search
    parts = key.strip().split(".")
    if parts[0] in ("kind", "name"):
        raise RecipeError(f"--set: '{parts[0]}' of the search stage cannot be changed")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: '{p}' is not a mapping")
    node[parts[-1]] = parsed


def _run_recipe_of(teacher_dir: Path) -> Path:
    from compressor.errors import RecipeError
    from compressor.rundir import RunDir

    run = RunDir.enclosing(teacher_dir)
    if run is not None and run.recipe_path.is_file():
        return run.recipe_path
    raise RecipeError(f"{teacher_dir}: not inside a run directory (no recipe.yaml + state.json above it); "
                      "pass --tasks-from RECIPE to name the tasks and data")


def _run_name(teacher_dir: Path) -> str:
    from compressor.rundir import RunDir

    run = RunDir.enclosing(teacher_dir)
    name = run.path.name if run is not None else teacher_dir.name
    name = re.sub(r"[^A-Za-z0-9_\-]", "-", name).lstrip("-0123456789") or "teacher"
    return name
