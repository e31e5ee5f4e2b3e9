"""One run at a time in an output directory.

Two runs given the same directory (a job submitted twice, a demo started again in another terminal) both resume
from its checkpoints and append to the same metrics and results, so each reports a mixture of both. A run holds
an exclusive lock on the directory's LOCK_FILE (`flock`, which the system releases when the process ends, however
it ends: no stale lock after a SIGKILL; a run that ends removes the file); a second run is refused at once, naming
the holder. Within one thread the lock is re-entrant (the demo holds --out while each act holds its own directory
below it, and `fit` its run directory below that); another thread of the same process is refused as another
process is, and so is a child forked by the holder (its copy of the holder's memory does not make it the holder).
Where the system has no such locks (Windows, some network file systems), runs go unguarded, with a warning: the
run's numbers are the same either way. A forked child (a DataLoader worker) closes its copy of the locked
descriptor at once: the lock would otherwise last until the last such child ended, a SIGKILLed holder's included.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from pathlib import Path

from .errors import DirectoryInUse

LOCK_FILE = ".kpro-run.lock"

# resolved directory -> [holding process's id, its thread's id, how many times it holds it, its locked descriptor].
# The process's id too: a forked child copies this, and its forking thread keeps the thread id the holder had.
_held: dict[Path, list] = {}
_held_guard = threading.Lock()


def _close_in_child() -> None:
    """In a forked child, close the copies of the held lock descriptors: an flock is released only once every
    descriptor of it is closed, so the children of a SIGKILLed holder (DataLoader workers) kept its directory
    locked until they ended. (Python opens them non-inheritable, so an exec'd child has none.) Runs in the only
    thread of the child, so without _held_guard, which another thread of the parent may have held at the fork."""
    for held in _held.values():
        if held[3] is not None:
            os.close(held[3])
            held[3] = None


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def holding(directory: str | os.PathLike):
    """Hold `directory` for the block, creating it if missing (and removing what it created again if the block
    left it empty); DirectoryInUse where another process or thread holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a directory: the run writes there")
    created = []  # the directory and the parents it lacked, innermost first
    for path in (directory, *directory.parents):
        if path.exists():
            break
        created.append(path)
    directory.mkdir(parents=True, exist_ok=True)
    key, me = directory.resolve(), [os.getpid(), threading.get_ident()]
    with _held_guard:
        held = _held.get(key)
        if held is not None and held[0] != me[0]:
            held = None  # the parent's, copied when it forked this process: its lock file refuses this one
        if held is not None and held[1] != me[1]:
            raise _in_use(directory, f"another thread of this process, {os.getpid()}")
        if held is not None:
            held[2] += 1
    if held is not None:
        try:
            yield
        finally:
            with _held_guard:
                held[2] -= 1
        return
    path, fd, registered = directory / LOCK_FILE, None, False
    try:
        fd = _lock(path, directory)
        with _held_guard:
            _held[key], registered = [*me, 1, fd], True
        yield
    finally:
        if os.getpid() != me[0]:  # a child forked in the block, unwinding the holder's frame: the lock stays his
            return  # (its copy of the descriptor was closed at the fork, by _close_in_child)
        if registered:
            with _held_guard:
                del _held[key]
        if fd is not None:
            try:
                path.unlink(missing_ok=True)  # while still locked: the next run creates a file of its own
            except OSError:  # a directory made read-only meanwhile: the next run takes the file over (it is unlocked)
                pass
            finally:
                os.close(fd)  # releases the lock
        for made in created:  # refused before writing anything: leave no empty directory of this run's
            try:
                made.rmdir()
            except OSError:
                break


def _in_use(directory: Path, holder: str) -> DirectoryInUse:
    """The refusal of `directory`, held by `holder`; the holder is its attribute `holder` too."""
    err = DirectoryInUse(f"{directory} is in use by another kpro run (process {holder}): two runs there would resume "
                         "from and write over each other's checkpoints and results; wait for it to end, or pass "
                         "another output directory")
    err.holder = holder
    return err


def _lock(path: Path, directory: Path) -> int | None:
    """An open, locked descriptor of the file at `path` (None where the system has no locks)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return _unguarded(directory, "this system has no flock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another run that created the directory removed it, empty, on leaving
            directory.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _in_use(directory, holder) from None
        except FileNotFoundError:
            pass  # locked a file its holder removed on release: lock the one now at `path`
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            path.unlink(missing_ok=True)
            return _unguarded(directory, err.strerror)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file its holder removed on release: lock the one now at `path`


def _unguarded(directory: Path, why: str) -> None:
    print(f"warning: {directory} cannot be locked ({why}): nothing stops a second run from using it at the same "
          "time", file=sys.stderr)
    return None
