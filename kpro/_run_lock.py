"""One run at a time in an output directory.

Two runs given the same directory (a job submitted twice, a demo started again in another terminal) both resume
from its checkpoints and append to the same metrics and results, so each reports a mixture of both. A run holds
an exclusive lock on the directory's LOCK_FILE (`flock`, which the system releases when the process ends, however
it ends: no stale lock after a SIGKILL; a run that ends removes the file); a second run is refused at once, naming
the holder. Within one process the lock is re-entrant (the demo holds --out while each act holds its own
directory below it, and `fit` its run directory below that).
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from .errors import DirectoryInUse

LOCK_FILE = ".kpro-run.lock"

_held: dict[Path, int] = {}  # resolved directory -> how many times this process holds it


@contextlib.contextmanager
def holding(directory: str | os.PathLike):
    """Hold `directory` (created if missing) for the block; DirectoryInUse where another process holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a directory: the run writes there")
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = directory / LOCK_FILE
    fd = _lock(path, directory)
    try:
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            if fd is not None:
                path.unlink(missing_ok=True)  # while still locked: the next run creates a file of its own
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(path: Path, directory: Path) -> int | None:
    """An open, locked descriptor of the file at `path` (None where the file system has no locks)."""
    import fcntl  # POSIX, as kpro's training is

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryInUse(f"{directory} is in use by another kpro run (process {holder}): two runs there "
                                 "would resume from and write over each other's checkpoints and results; wait for "
                                 "it to end, or pass another output directory") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # a file system without locks (some network mounts): the run is the same, only unguarded
            print(f"warning: {directory} cannot be locked ({err.strerror}): nothing stops a second run from using "
                  "it at the same time", file=sys.stderr)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # locked a file its holder removed on release: lock the one now at `path`
