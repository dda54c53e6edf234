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


class TrainingError(CompressorError):
    """Training diverged (a non-finite loss or weight) or cannot run as configured."""


class RunLockedError(CompressorError):
    """Another live process holds the run directory's lock."""


#: environment variable that makes the CLI show the traceback of every error (as ``--debug`` does)
DEBUG_ENV = "COMPRESSOR_DEBUG"


#: characters of an error line: a message that quotes a huge value (a 50 MB string) is cut to this
MAX_LINE = 1000


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE} more characters)"


#: how libraries that wrap the OS error (safetensors, torch's zip writer, ONNX Runtime) word a failed write
_WRITE_FAILURES = ("no space left on device", "disk quota exceeded", "os error 28", "storagefull",
                   "read-only file system", "file write failed")


def os_failure(exc: BaseException) -> str | None:
    """The reason when ``exc`` is the environment failing a file operation (disk full, quota, permissions, I/O):
    an ``OSError`` with an errno, or a library's error that wraps a failed write; ``None`` otherwise."""
    if isinstance(exc, OSError) and (exc.errno is not None or exc.strerror):
        return exc.strerror or _first_line(str(exc))
    if isinstance(exc, (CompressorError, KeyboardInterrupt, SystemExit)):
        return None
    text = str(exc).lower()
    for pattern in _WRITE_FAILURES:
        if pattern in text:
            if "space" in text or "28" in text or "storagefull" in text:
                return "No space left on device"
            return _first_line(str(exc))[:200]
    return None


def anticipated(exc: BaseException) -> str | None:
    """The one-line message for a failure caused by the user's input or environment, or ``None`` for a bug.

    Anticipated: every ``CompressorError``; OS errors on paths (missing, not a directory, read-only, disk full);
    text that is not UTF-8; ONNX Runtime's argument errors; refused remote code.
    """
    if isinstance(exc, CompressorError):
        return _first_line(str(exc)) or type(exc).__name__
    if isinstance(exc, OSError) and (exc.filename is not None or exc.strerror):
        where = str(exc.filename) if exc.filename is not None else ""
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        reason = exc.strerror or _first_line(str(exc))
        return f"{where}: {reason}" if where else reason
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 text (byte {exc.start}): {exc.reason}"
    module = type(exc).__module__ or ""
    if module.startswith("onnxruntime") and type(exc).__name__ in {"InvalidArgument", "Fail", "InvalidGraph",
                                                                  "NoSuchFile", "InvalidProtobuf"}:
        return f"ONNX Runtime: {_first_line(str(exc))}"
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return (f"{_first_line(str(exc))} (remote code is refused; set model.trust_remote_code: true in the recipe "
                "only for code you trust)")
    return None
