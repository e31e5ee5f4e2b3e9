"""Small files written atomically: a reader sees the old file or the new one, never half of either."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data) -> None:
    """Write `data` (str, bytes, or an iterable of bytes chunks) under a temporary name beside `path`, fsync
    it, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    chunks = [data] if isinstance(data, (str, bytes)) else data
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk.encode() if isinstance(chunk, str) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())
