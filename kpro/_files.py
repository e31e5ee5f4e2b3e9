"""Small files written atomically: a reader sees the old file or the new one, never half of either."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


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
