"""Built-in relation-extraction task plugin (registered as ``relation``)."""

from compressor_plugins.relation.reader import ReExample, read_relations
from compressor_plugins.relation.task import RelationTask

__all__ = ["ReExample", "RelationTask", "read_relations"]
