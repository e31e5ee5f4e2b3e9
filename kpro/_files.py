"""Files and directories written atomically: a reader sees the old one or the new one, never half of either."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path

from ._run_lock import LOCK_FILE, holding
from .errors import DirectoryInUse


class WriteFailed(OSError):
    """Writing a file failed; the message names it (torch, safetensors and numpy report a full disk without)."""

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"


@contextlib.contextmanager
def naming_write_failures(path: str | os.PathLike):
    """Re-raise what a write of `path` raises (torch.save's "basic_ios::clear: iostream error", safetensors'
    "No space left on device", numpy's "30000 requested and 2048 written") as a WriteFailed naming `path`, with
    errno ENOSPC where the disk is full. Errors of the data written (an unpicklable object) pass unchanged."""
    try:
        yield
    except Exception as err:
        if isinstance(err, OSError) and err.filename is not None:  # named already (PermissionError, say)
            raise
        if not isinstance(err, (OSError, RuntimeError)) and type(err).__name__ != "SafetensorError":
            raise
        code = getattr(err, "errno", None)
        if code is None and ("No space left" in str(err) or _disk_full(Path(path).parent)):
            code = errno.ENOSPC
        reason = os.strerror(code).lower() if code else str(err)
        raise WriteFailed(code or errno.EIO, reason, str(path)) from err


def _disk_full(directory: Path) -> bool:
    existing = next((d for d in [directory, *directory.parents] if d.exists()), directory)  # a temporary may be gone
    try:
        return shutil.disk_usage(existing).free < 2**20
    except OSError:
        return False


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """A binary file open under a temporary name beside `path`; fsynced and renamed into place when the block
    ends without an error, removed when it raises. A failed write is named by `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_write_failures(path), open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data) -> None:
    """Write `data` (str, bytes, or an iterable of bytes chunks) under a temporary name beside `path`, fsync
    it, and rename it into place."""
    chunks = [data] if isinstance(data, (str, bytes)) else data
    with atomic_file(path) as f:
        for chunk in chunks:
            f.write(chunk.encode() if isinstance(chunk, str) else chunk)


def umask() -> int:
    """The process's file-creation mask (read from /proc where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict) -> None:
    """safetensors' save_file, leaving the file readable as the umask allows, as every other file kpro writes:
    safetensors 0.8 creates it with mode 0600 whatever the umask, so others could not read a checkpoint's
    weights beside its readable config."""
    from safetensors.torch import save_file  # torch-free import of this module
    with naming_write_failures(path):
        save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


# -------------------------------------------------------------------------------------------- directories

@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, drop=lambda name: False):
    """Yield an empty temporary directory beside `directory`; when the block succeeds, it replaces
    `directory` in one step, keeping the old directory's other entries (except those `drop(name)`
    names, like stale weight shards). If the block fails, nothing changes and the temporary goes."""
    given = Path(directory)
    # absolute: the temporary's name and place derive from it (Path(".").name is ""); a symbolic link resolves
    # to the directory it points to, which is replaced (swapping the link itself would break it)
    directory = given.resolve()
    if _holds_working_directory(directory):  # the swap would fail ("." is busy), or strand us in the old copy
        shown = given if str(given) == str(directory) else f"{given} ({directory})"
        raise ValueError(f"cannot replace {shown}: it is the current working directory (or holds it), and the "
                         "directory is replaced whole; save from outside it or to another path")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    with contextlib.ExitStack() as runs:  # the runs inside it, held until the swap
        _hold_runs_inside(directory, given, runs)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_temporaries(directory)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except PermissionError:  # it named the temporary, which the user never named
            raise PermissionError(
                f"cannot save {given}: the folder holding it, {directory.parent}, is not writable, and the save writes "
                "a new directory beside it and swaps it into place (so that a save cut short leaves the old one as "
                "it was); make the folder writable, or save elsewhere") from None
        IN_PROGRESS.add(tmp.name)
        try:
            yield tmp
            if directory.exists():
                _carry_over_other_files(directory, tmp, drop)
                _keep_permissions(directory, tmp)
            for entry in tmp.iterdir():
                if entry.is_file():
                    _fsync_file(entry)
            _fsync_dir(tmp)
            _replace_dir(tmp, directory)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            inside = _inside(getattr(err, "filename", None), tmp) if isinstance(err, OSError) else None
            if inside is not None:  # named by the temporary, which is gone now: by the path the save was to write
                reason = os.strerror(err.errno).lower() if err.errno else str(err.strerror or err)
                raise WriteFailed(err.errno or errno.EIO, reason, str(given / inside)) from err
            raise
        finally:
            IN_PROGRESS.discard(tmp.name)


def _inside(filename, directory: Path) -> Path | None:
    """`filename` (an OSError's) relative to `directory` where it is inside it, else None."""
    if not isinstance(filename, (str, os.PathLike)):
        return None
    try:
        return Path(filename).relative_to(directory)
    except ValueError:
        return None


def _hold_runs_inside(directory: Path, given: Path, runs: contextlib.ExitStack) -> None:
    """Hold, in `runs`, each directory below `directory` with a run lock file (a run's, or one a killed run left):
    `directory` is replaced whole, its other entries copied into the new one first, and what a run writes there
    between the copy and the swap would be lost. One another run holds is refused (DirectoryInUse), named as
    below `given`. A folder linked to is not replaced (it stays a link): not looked into."""
    if not directory.is_dir():
        return
    for root, _, files in os.walk(directory):
        if LOCK_FILE not in files or root == str(directory):  # directory itself: its caller's to hold
            continue
        try:
            runs.enter_context(holding(root))
        except DirectoryInUse as err:
            raise DirectoryInUse(
                f"cannot replace {given}: {given / os.path.relpath(root, directory)} inside it is in use by another "
                f"kpro run (process {err.holder}), and what that run writes there would be lost (the directory is "
                "replaced whole, its other files copied over first); wait for it to end, or choose another "
                "directory") from None


def _carry_over_other_files(old: Path, new: Path, drop) -> None:
    """Keep what else lived in the old directory (tokenizer files, notes) by hard link, or copy; a symbolic
    link stays a link (to a folder too, which would otherwise be copied whole)."""
    for entry in old.iterdir():
        if drop(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, new / entry.name)


def _keep_permissions(old: Path, new: Path) -> None:
    """Give `new` the mode bits (setgid included) and group of `old`, which it replaces: a shared folder's 0o2750
    became what the umask gives. Set once its files are written, which a mode without write permission refuses.
    The group is kept where the user may set it (a member of it), else it is the one new files get here."""
    old_stat = old.stat()
    if new.stat().st_gid != old_stat.st_gid:
        with contextlib.suppress(PermissionError):
            os.chown(new, -1, old_stat.st_gid)
    os.chmod(new, stat.S_IMODE(old_stat.st_mode))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; where an old directory exists, swap atomically when the OS can."""
    if not target.exists():
        os.rename(new, target)
    elif _rename_exchange(new, target):
        shutil.rmtree(new)  # now holds the old checkpoint
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    _fsync_dir(target.parent)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths in one step. False where unavailable."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _holds_working_directory(directory: Path) -> bool:
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # deleted: no directory holds it any more
        return False
    return directory == cwd or directory in cwd.parents


def _remove_abandoned_temporaries(directory: Path) -> None:
    """Delete temp dirs left by saves whose process died (their pid is in the name) or that failed."""
    for entry in directory.parent.glob(f".{directory.name}.tmp-*"):
        try:
            pid = int(entry.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if abandoned(entry.name, pid):
            shutil.rmtree(entry, ignore_errors=True)


# Names of the temporaries this process is writing now. One with this process's pid that is not among them was
# left by a dead process: a container restarted in a fresh PID namespace gets the same small pid every time.
IN_PROGRESS: set[str] = set()


def abandoned(name: str, pid: int) -> bool:
    """Whether the temporary `name`, made by process `pid`, belongs to no save in progress."""
    return name not in IN_PROGRESS if pid == os.getpid() else not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
