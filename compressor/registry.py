"""A typed registry: raises on duplicates, suggests on typos, loads lazily, discovers entry points."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from compressor.errors import RegistryError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    target: str | T  # "module:attr" until first use, then the object
    source: str  # distribution that provided it, or "<runtime>"


class Registry(Generic[T]):
    """Name -> object, where objects may be given lazily as ``"module:attr"`` strings.

    Args:
        kind: what is registered (used in messages, e.g. ``"task"``).
        validate: called on each object when it is first resolved; raises ``RegistryError`` if invalid.
        group: an entry-point group scanned by :meth:`discover`.
    """

    def __init__(self, kind: str, validate: Callable[[str, T], None] | None = None, group: str | None = None):
        self.kind = kind
        self.group = group
        self._validate = validate
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = False

    def register(self, name: str, target: str | T, source: str = "<runtime>") -> None:
        if name in self._entries:
            prev = self._entries[name]
            raise RegistryError(
                f"{self.kind} '{name}' is registered twice (by {prev.source} and by {source})"
            )
        if not isinstance(target, str) and self._validate is not None:
            self._validate(name, target)
        self._entries[name] = Entry(name, target, source)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def discover(self) -> None:
        """Register everything advertised under the entry-point group (once)."""
        if self._discovered or self.group is None:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            if ep.name in self._entries and self._entries[ep.name].target == ep.value:
                continue  # the same distribution seen twice on sys.path
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            self.register(ep.name, ep.value, source=dist)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def source(self, name: str) -> str:
        return self._entry(name).source

    def get(self, name: str) -> T:
        entry = self._entry(name)
        if isinstance(entry.target, str):
            obj = load_target(entry.target, f"{self.kind} '{name}'")
            if self._validate is not None:
                self._validate(name, obj)
            entry = Entry(name, obj, entry.source)
            self._entries[name] = entry
        return entry.target  # type: ignore[return-value]

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _entry(self, name: str) -> Entry[T]:
        self.discover()
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(self._entries)) or 'none'}"
            raise RegistryError(f"unknown {self.kind} '{name}'{hint}")
        return self._entries[name]


def load_target(spec: str, what: str) -> object:
    module_name, _, attr = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"{what}: cannot load '{spec}': {exc}") from exc
    return obj
