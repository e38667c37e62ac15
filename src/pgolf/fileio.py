"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pgolf.errors import PgolfError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for binary writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file is what users expect
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def missing_ancestors(path: str | os.PathLike) -> list[Path]:
    """The ancestors of `path` that do not exist yet, deepest first."""
    missing = []
    parent = Path(path).absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove `dirs` in order (deepest first), each only if empty."""
    for path in dirs:
        with contextlib.suppress(OSError):
            path.rmdir()


def writable_dir(path: str | os.PathLike, setting: str) -> list[Path]:
    """Create directory `path` (with parents) and prove it writable before any work is done.

    Returns the directories this call created, deepest first, so that a failure later on can
    remove them. A read-only place or a file in the way is bad input, named with `setting`.
    """
    path = Path(path)
    created = ([] if path.exists() else [path]) + missing_ancestors(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        remove_empty_dirs(created)
        reason = exc.strerror or str(exc)
        raise PgolfError(
            f"{path}: cannot write a directory here ({reason}); choose another {setting}"
        ) from None
    return created
