"""Atomic writes (a file or directory appears complete or not at all, with the permissions the user's umask
gives a plain ``open``/``mkdir``), strict JSON, run-directory locks and paths stored relative to a run directory."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: Path | str, directory: bool = False) -> None:
    """``tempfile`` creates files 0600 and directories 0700 whatever the umask; give the file or directory the
    mode a plain ``open``/``mkdir`` would have, so a shipped bundle is readable by whoever the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _as_created(tmp, directory=True)
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- strict JSON ------------------------------------------------------------------------------------------
def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, so strict JSON parsers accept it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return finite_json(obj.item())
    return obj


def dumps_strict(obj: Any, indent: int | None = 2) -> str:
    """JSON text that is valid for strict parsers: non-finite numbers become ``null``, never a bare ``NaN``."""
    return json.dumps(finite_json(obj), indent=indent, default=str, allow_nan=False)


# ---- paths relative to a run directory --------------------------------------------------------------------
#: top-level folders of a run directory whose paths are stored relative to it
RUN_SUBDIRS = ("stages", "checkpoints")


def relative_paths(obj: Any, base: Path) -> Any:
    """Every string in ``obj`` that is an absolute path inside ``base`` made relative to it, so a file that
    stores them stays valid when ``base`` moves or is read from another working directory."""
    root = Path(os.path.abspath(base))
    if isinstance(obj, str):
        p = Path(obj)
        if not p.is_absolute():
            return obj
        try:
            rel = Path(os.path.abspath(p)).relative_to(root)
        except ValueError:
            return obj
        return rel.as_posix() if rel.parts[:1] and rel.parts[0] in RUN_SUBDIRS else obj
    if isinstance(obj, dict):
        return {k: relative_paths(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [relative_paths(v, base) for v in obj]
    return obj


def absolute_paths(obj: Any, base: Path) -> Any:
    """Inverse of :func:`relative_paths`: strings starting with a run sub-folder (``stages/...``) joined to
    ``base``."""
    if isinstance(obj, str):
        p = Path(obj)
        if not p.is_absolute() and p.parts[:1] and p.parts[0] in RUN_SUBDIRS:
            return str(Path(base) / p)
        return obj
    if isinstance(obj, dict):
        return {k: absolute_paths(v, base) for k, v in obj.items()}
    if isinstance(obj, list):
        return [absolute_paths(v, base) for v in obj]
    return obj


# ---- no build-machine paths in artefacts and reports ---------------------------------------------------------
def run_root(path: Path | str) -> Path | None:
    """The run directory a path lies in (``<run>/stages/...``, ``<run>/report.json``), or None."""
    p = Path(os.path.abspath(path))
    for parent in (p, *p.parents):
        if (parent / "recipe.yaml").is_file() and (parent / "stages").is_dir():
            return parent
    return None


def portable(obj: Any, written_at: Path | str | None = None) -> Any:
    """``obj`` with the build machine's absolute paths taken out of every string, for a file written at
    ``written_at``: a path inside that file's run directory becomes relative to the run (``stages/01-export/...``;
    the run itself ``.``), one inside the working directory (the repository) relative to it, one inside the home
    directory ``~/...``; a string that is a whole absolute path elsewhere on this machine keeps only its last part
    (``.../bert``); absolute-looking names of nothing on disk (ONNX node names) are kept.
    Text around the paths (notes, Markdown) is kept."""
    import re

    rules: list[tuple[str, str, str]] = []  # (prefix, replacement when a path follows, replacement when it ends)
    run = run_root(written_at) if written_at is not None else None
    if run is not None:
        rules.append((str(run), "", "."))
    cwd = os.getcwd()
    if cwd not in ("/", ""):
        rules.append((cwd, "", "."))
    home = os.path.expanduser("~")
    if home not in ("/", "", "~") and os.path.isabs(home):
        rules.append((home, "~/", "~"))
    pattern = re.compile("|".join(f"(?P<r{i}>{re.escape(prefix)})(?:(?P<s{i}>/)|(?![\\w.-]))"
                                  for i, (prefix, _, _) in enumerate(rules)))

    def sub(m: re.Match) -> str:
        i = next(i for i in range(len(rules)) if m.group(f"r{i}") is not None)
        return rules[i][1] if m.group(f"s{i}") else rules[i][2]

    def walk(o: Any) -> Any:
        if isinstance(o, str):
            if "/" not in o:
                return o
            out = pattern.sub(sub, o)
            if os.path.isabs(out) and "\n" not in out and " " not in out and len(Path(out).parts) > 1 \
                    and _on_disk(out):  # a graph's node names ("/encoder/layer.0/MatMul") look like paths too
                return f".../{Path(out).name}"
            return out
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


def _on_disk(path: str) -> bool:
    """Whether ``path`` names something on this machine, or a file in a directory that exists."""
    return os.path.exists(path) or os.path.isdir(os.path.dirname(path))


# ---- run-directory lock -----------------------------------------------------------------------------------
LOCK_NAME = ".lock"


class DirLock:
    """An exclusive lock on a directory: a lock file holding the owner's pid, locked with ``flock``.

    The kernel drops the ``flock`` when its process dies (even on ``kill -9``), so a lock file left by a dead
    run is stale and is taken over. ``acquire`` fails at once (never waits) when a live process holds the lock.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self.previous_pid: int | None = None  # pid found in a stale lock file that was taken over

    def acquire(self) -> DirLock:
        import fcntl

        from compressor.errors import RunLockedError

        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise RunLockedError(f"{self.directory}: run directory is in use by {who} "
                                     f"(lock {self.path}); wait for it to finish or use another --out") from None
            try:  # the file we locked must still be the lock file (a finishing run may have removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_pid(fd)
            if old and old != os.getpid():
                self.previous_pid = old
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise OSError(f"{self.path}: could not take the lock (the lock file keeps changing)")

    def release(self, remove: bool = True) -> None:
        if self._fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError):
        return None
