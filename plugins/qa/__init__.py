"""Built-in extractive-QA task plugin (registered as ``qa``)."""

from compressor_plugins.qa.reader import QaExample, read_qa
from compressor_plugins.qa.task import QaTask

__all__ = ["QaExample", "QaTask", "read_qa"]
