"""Reading a recipe file: YAML -> ``Recipe``, every error naming the file, the line and the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from compressor.errors import RecipeError
from compressor.recipe.schema import Recipe, Stage

DATA_ROOT_ENV = "COMPRESSOR_DATA_ROOT"


def load_recipe(path: Path | str) -> Recipe:
    """Parse and validate a YAML recipe; every error names the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else (text[: exc.position].count("\n") + 1 if hasattr(exc, "position") else None)
        where = f"{path}:{line}" if line else str(path)
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise RecipeError(f"{where}: malformed YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: expected a mapping at the top of the recipe, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a split given as {path, ...}: report what is wrong in the mapping, not that it is not a plain string
        err = next((e for e in errors if "SplitFile" in e["loc"]), errors[0]) if errors[0]["loc"][-1:] == ("str",) \
            else errors[0]
        raw_loc = list(err["loc"])
        loc = [p for k, p in enumerate(raw_loc) if not (
            p == "SplitFile" or (isinstance(p, str) and p in _UNION_TAGS and raw_loc[k - 2 : k - 1] == ["stages"]))]
        line = _line_of(node, loc)
        dotted = _dotted(loc) or "<recipe>"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; expected one of {err['ctx']['expected_tags']}"
            got = ""
        raise RecipeError(f"{path}:{line}: {dotted}: {msg}{got}") from exc


#: discriminator values pydantic inserts into error locations: every stage config's ``kind``
_UNION_TAGS = {get_args(cls.model_fields["kind"].annotation)[0] for cls in get_args(get_args(Stage)[0])}


def _dotted(loc: list[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _line_of(node: Any, loc: list[Any]) -> int:
    """1-based line of the deepest YAML node along ``loc``."""
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def resolve_data_root(recipe_root: str | None, cli_root: str | Path | None = None) -> Path:
    """CLI option > recipe field > $COMPRESSOR_DATA_ROOT > ../shared/data (from the cwd or the checkout)."""
    for candidate in (cli_root, recipe_root, os.environ.get(DATA_ROOT_ENV)):
        if candidate:
            return Path(candidate).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        default = base.parent / "shared" / "data"
        if default.is_dir():
            return default
    raise RecipeError(
        f"no data root: set data_root in the recipe, pass --data-root, or set ${DATA_ROOT_ENV} "
        "(default ../shared/data was not found)"
    )
