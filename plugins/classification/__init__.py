"""Built-in text-classification task plugin (registered as ``classification``)."""

from compressor_plugins.classification.formats import TextExample, read_classification
from compressor_plugins.classification.task import ClassificationTask, accuracy, macro_f1

__all__ = ["ClassificationTask", "TextExample", "accuracy", "macro_f1", "read_classification"]

