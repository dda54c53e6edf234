"""What every pydantic model of user input shares (recipes, training options, task-plugin options): unknown keys
are refused, and so is a boolean where a number is expected; names (recipes, tasks, stages) are safe path
components.

Pydantic's lax mode turns ``true`` into ``1`` for an ``int`` field and YAML reads ``yes``/``on`` as ``true``, so
``seed: true`` or ``epochs: yes`` would silently become 1. Strict mode is not the answer (it refuses ``lr: 1e-4``,
which YAML reads as a string), so :class:`InputModel` checks booleans only, against each field's annotation,
inside dicts and lists too (``tolerances: {sst: true}``). :func:`misplaced_bool` finds the same for a model that
does not derive from :class:`InputModel` (a third-party plugin's ``Options``).
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator

#: most characters of a name (recipe, task, stage): names become file and directory names
NAME_MAX = 64
#: recipe, task and stage names: safe path components (no '/', no '..', no spaces), at most ``NAME_MAX`` characters
NAME = rf"^[A-Za-z_][A-Za-z0-9_\-]{{0,{NAME_MAX - 1}}}$"
#: what an error says of a name that does not match ``NAME``
NAME_RULE = (f"expected a name: a letter or '_', then letters, digits, '_' or '-', at most {NAME_MAX} characters "
             "(names become file and directory names)")


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of an annotation, ``Annotated`` and ``Optional`` unwrapped."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(m for a in get_args(annotation) for m in _members(a))
    return (annotation,)


def _admits_bool(member: Any) -> bool:
    if member in (bool, Any, object):
        return True
    if get_origin(member) is Literal:
        return any(isinstance(a, bool) for a in get_args(member))
    return False


def _is_number(member: Any) -> bool:
    return isinstance(member, type) and issubclass(member, (int, float)) and member is not bool


class BoolNotNumber:
    """A boolean found where a number is expected; no number validator accepts it, and an error shows it as
    what it was."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return f"the boolean {str(self.value).lower()}; YAML reads true/false/yes/no/on/off as booleans"


def _walk(annotation: Any, value: Any, where: str) -> tuple[Any, str | None]:
    """``value`` with every boolean that ``annotation`` expects to be a number replaced by a ``BoolNotNumber``,
    and the path of the first one (``""``: the value itself; ``"sst"``, ``"[2]"``, ``"a.b"``: inside it)."""
    members = _members(annotation)
    if isinstance(value, bool):
        if not any(_admits_bool(m) for m in members) and any(_is_number(m) for m in members):
            return BoolNotNumber(value), where
        return value, None
    for m in members:
        origin, args = get_origin(m), get_args(m)
        if isinstance(value, Mapping) and (origin in (dict, Mapping) or m is dict):
            inner = args[1] if len(args) == 2 else Any
            pairs = [(k, _walk(inner, v, f"{where}.{k}" if where else str(k))) for k, v in value.items()]
        elif isinstance(value, list) and origin in (list, tuple, set, frozenset, Sequence):
            fixed = origin is tuple and args and args[-1] is not Ellipsis
            pairs = [(i, _walk(args[i] if fixed and i < len(args) else (args[0] if args else Any), v, f"{where}[{i}]"))
                     for i, v in enumerate(value)]
        elif isinstance(value, Mapping) and isinstance(m, type) and issubclass(m, BaseModel) \
                and not issubclass(m, InputModel):  # an InputModel checks its own fields
            fields = m.model_fields
            pairs = [(k, _walk(fields[k].annotation, v, f"{where}.{k}" if where else str(k)) if k in fields
                      else (v, None)) for k, v in value.items()]
        else:
            continue
        first = next((hit for _, (_, hit) in pairs if hit is not None), None)
        if first is None:
            return value, None
        out = [v for _, (v, _) in pairs]
        return (dict(zip([k for k, _ in pairs], out)) if isinstance(value, Mapping) else out), first
    return value, None


def misplaced_bool(model: type[BaseModel], data: Mapping[str, Any]) -> str | None:
    """The dotted field of ``data`` that holds a boolean where ``model`` expects a number, or ``None``."""
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is not None:
            _, hit = _walk(field.annotation, value, str(key))
            if hit is not None:
                return hit
    return None


class InputModel(BaseModel):
    """Base of every model of user input: ``extra="forbid"``, and no boolean where a number is expected (the
    field's error says ``got the boolean true``)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        out = dict(data)
        for key, value in data.items():
            if isinstance(key, str) and key in fields:
                out[key], _ = _walk(fields[key].annotation, value, key)
        return out
