"""Reading a recipe file: YAML -> ``Recipe``, every error naming the file, the line and the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from compressor.data.store import NO_DATA_ROOT
from compressor.errors import RecipeError
from compressor.inputs import BoolNotNumber
from compressor.recipe._base import NAME, NAME_RULE
from compressor.recipe.schema import Recipe, Stage

DATA_ROOT_ENV = "COMPRESSOR_DATA_ROOT"


#: values a recipe may repeat through YAML aliases (``*name``) beyond the ones it writes out: ample for sharing a
#: block of settings, and a "billion laughs" document fails at once instead of filling the memory
ALIAS_BUDGET = 10_000
#: characters of a bad value an error line shows
SHOWN = 60

_YAML_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _RecipeYaml(_YAML_BASE):  # type: ignore[misc, valid-type]
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{_short(key_node.value)}' (first at line {seen[key]}); a key may "
                    "appear once per mapping", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


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
    loader = _RecipeYaml(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_aliases(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else (text[: exc.position].count("\n") + 1 if hasattr(exc, "position") else None)
        where = f"{path}:{line}" if line else str(path)
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise RecipeError(f"{where}: malformed YAML: {problem}") from exc
    except RecursionError:
        raise RecipeError(f"{path}: malformed YAML: nested too deeply") from None
    finally:
        loader.dispose()
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
        line = line_of(node, loc)
        dotted = _dotted(loc) or "<recipe>"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {_shown(err.get('input'))})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; expected one of {err['ctx']['expected_tags']}"
            got = ""
        elif err["type"] == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == NAME:
            msg = NAME_RULE
        raise RecipeError(f"{path}:{line}: {dotted}: {msg}{got}") from exc


def _short(text: str) -> str:
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def _shown(value: Any) -> str:
    """A bad value as an error line shows it: its repr, cut (never a whole 50 MB string or list)."""
    if isinstance(value, BoolNotNumber):
        return repr(value)
    if isinstance(value, (list, dict)) and len(value) > 20:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def _check_aliases(path: Path, root: yaml.Node) -> None:
    """Refuse a recursive alias, and aliases that repeat more than ``ALIAS_BUDGET`` values: the YAML is never
    expanded, only its node graph walked once."""
    size: dict[int, int] = {}
    uses: dict[int, yaml.Node] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            open_nodes.discard(key)
            continue
        if key in open_nodes:
            raise RecipeError(f"{path}:{node.start_mark.line + 1}: malformed YAML: an alias refers to a value that "
                              "contains it (a recursive alias)")
        if key in size:
            uses[key] = node
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise RecipeError(f"{path}:{child.start_mark.line + 1}: malformed YAML: an alias refers to a value "
                                  "that contains it (a recursive alias)")
            stack.append((child, False))
    written = len(size)
    if size[id(root)] - written > ALIAS_BUDGET:
        biggest = max(uses.values(), key=lambda n: size[id(n)])
        raise RecipeError(f"{path}:{biggest.start_mark.line + 1}: malformed YAML: aliases (*name) repeat more than "
                          f"{ALIAS_BUDGET} values ({size[id(root)]} in all); write the values out or share fewer")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


#: discriminator values pydantic inserts into error locations: every stage config's ``kind``
_UNION_TAGS = {get_args(cls.model_fields["kind"].annotation)[0] for cls in get_args(get_args(Stage)[0])}


def _dotted(loc: list[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def line_of(node: Any, loc: list[Any]) -> int:
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


def resolve_data_root(recipe_root: str | None, cli_root: str | Path | None = None,
                      required: bool = True) -> Path | None:
    """CLI option > recipe field > $COMPRESSOR_DATA_ROOT > ../shared/data (from the cwd or the checkout).

    With none of them: an error, or ``None`` when not ``required`` (a recipe whose data paths are all absolute
    needs no root; ``DataStore`` then fails on the first relative path, naming it)."""
    for candidate in (cli_root, recipe_root, os.environ.get(DATA_ROOT_ENV)):
        if candidate:
            return Path(candidate).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        default = base.parent / "shared" / "data"
        if default.is_dir():
            return default
    if not required:
        return None
    raise RecipeError(f"no data root: {NO_DATA_ROOT}")
