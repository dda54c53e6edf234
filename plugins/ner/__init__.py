"""Built-in NER task plugin (registered as ``ner``)."""

from compressor_plugins.ner.formats import NerExample, read_ner
from compressor_plugins.ner.task import NerTask

__all__ = ["NerExample", "NerTask", "read_ner"]
