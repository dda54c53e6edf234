"""Reader of relation-extraction data: the CoNLL04 JSON array (entities and relations as token spans)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.data.readers import Location, read_conll04
from compressor.errors import DataError

FORMATS = ("conll04",)

Entity = tuple[int, int, str]  # (start word, end word exclusive, entity type)
Relation = tuple[int, int, int, int, str]  # (head start, head end, tail start, tail end, relation type)


@dataclass
class ReExample:
    """One sentence with its entities (sorted by start) and the relations between them."""

    tokens: list[str]
    entities: list[Entity]
    relations: list[Relation]
    source: Location
    _index: dict[tuple[int, int], int] = field(default_factory=dict, repr=False, compare=False)

    def entity_index(self, start: int, end: int) -> int:
        """Index in ``entities`` of the entity spanning words ``[start, end)``."""
        if not self._index:
            self._index.update({(s, e): i for i, (s, e, _) in enumerate(self.entities)})
        return self._index[(start, end)]

    def entity_type(self, start: int, end: int) -> str:
        return self.entities[self.entity_index(start, end)][2]


def read_relations(path: Path, format: str | None = None, encoding: str | None = None) -> list[ReExample]:
    """Read a CoNLL04 file (``format`` ``conll04``, or ``None`` for a ``.json`` file) in ``encoding`` (``None``:
    the split's, set by ``DataStore``; UTF-8 by default).

    Errors (``DataError`` naming the file and the record index): what ``read_conll04`` rejects (malformed
    records, spans outside the sentence, overlapping entities, a relation argument that is not an entity of its
    sentence), plus a relation from an entity to itself and a relation listed twice.
    """
    path = Path(path)
    fmt = format or ("conll04" if path.suffix.lower() == ".json" else None)
    if fmt not in FORMATS:
        raise DataError(path, f"unknown relation-extraction format '{format or path.suffix}'; expected one of "
                              f"{', '.join(FORMATS)} (a .json file is read as conll04)")
    examples = []
    for rec in read_conll04(path, encoding):
        loc = Location(str(path), record=rec["index"])
        seen: set[tuple] = set()
        for j, rel in enumerate(rec["relations"]):
            if rel[0:2] == rel[2:4]:
                raise loc.error(f"relations[{j}] {list(rel)}: head and tail are the same entity")
            if rel in seen:
                raise loc.error(f"relations[{j}] {list(rel)} is listed twice")
            seen.add(rel)
        examples.append(ReExample(list(rec["tokens"]), list(rec["entities"]), list(rec["relations"]), loc))
    return examples
