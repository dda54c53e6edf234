"""Errors that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class CompressorError(Exception):
    """Base class of every error caused by user input (recipes, data, model directories)."""


class DataError(CompressorError):
    """A data file is missing, malformed or inconsistent.

    The message always names the file and, where there is one, the line or record.
    """

    def __init__(self, path: object, message: str, line: int | None = None, record: object = None):
        where = str(path)
        if line is not None:
            where += f":{line}"
        elif record is not None:
            where += f" [record {record}]"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.record = record


class RecipeError(CompressorError):
    """A recipe is malformed or asks for something that does not exist."""


class ModelDirError(CompressorError):
    """A model directory is missing files or its manifest disagrees with its weights."""


class RegistryError(CompressorError):
    """A plugin is invalid, registered twice, or unknown."""
