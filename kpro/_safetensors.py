"""A safetensors file's header, read without torch (`python -m kpro info` imports none): where each tensor's
bytes lie, with the structure checked, so that `info` and the streamed `expand` refuse a corrupt or truncated
file alike, naming it."""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from .errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class TensorBytes:
    """Where a tensor's bytes are: a byte range of a safetensors file."""

    file: Path
    start: int  # absolute offset in the file
    nbytes: int
    dtype: str  # safetensors dtype code ("BF16", "F32", ...)
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, TensorBytes]:
    """{tensor name: TensorBytes} of `file`; a header that is unreadable, has an entry without a "dtype" string,
    a "shape" list of sizes or two "data_offsets", or places data past the file's end is a CheckpointError."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or length > size - 8:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file} has an unreadable safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has an unreadable safetensors header (a JSON {type(header).__name__}, not an "
                              "object); the file is corrupt")
    data_start, entries = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(entry.get("dtype"), str)):
            raise CheckpointError(f"{file}: the header entry of {name} is malformed (needs a \"dtype\" string and a "
                                  f"\"shape\" list of sizes, got {json.dumps(entry)[:80]}); the file is corrupt")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{file}: the header entry of {name} has no valid \"data_offsets\" (two byte "
                                  f"offsets, got {json.dumps(offsets)[:80]}); the file is corrupt")
        entries[name] = TensorBytes(file, data_start + offsets[0], offsets[1] - offsets[0], entry["dtype"],
                                    tuple(shape))
    # A file cut short (a download, a full disk) ends before the last tensor's bytes
    end = max((entry.start + entry.nbytes for entry in entries.values()), default=data_start)
    if end > size:
        raise CheckpointError(f"{file} is truncated: its header places tensor data up to byte {end:,}, the file has "
                              f"{size:,} bytes; write or download it again")
    return entries
