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
