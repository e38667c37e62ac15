"""A per-run lock file for benchmark sweeps that several invocations may share.

Several processes (or `--jobs` workers) can walk the same list of runs: the one that creates
`NAME.lock` (holding its pid) trains the run; the others skip it. A lock whose pid is dead is
stale (the run was killed) and is taken over.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claim(lock: Path):
    """Yield True if this process now owns `lock` (stale locks of dead pids are taken over)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                yield False
                return
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        return
    yield False
