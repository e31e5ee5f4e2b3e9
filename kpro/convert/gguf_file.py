"""Reading a GGUF file (llama.cpp's format): its metadata, and its tensors as float32 torch tensors (float64 for an
F64 tensor, whose values float32 would round).

The file is parsed by the `gguf` package (llama.cpp's own reader on PyPI, an optional extra) and memory-mapped:
a tensor is read and dequantised only when asked for, one at a time. kpro dequantises the common types with
its own torch code (F32, F16, BF16, F64, Q8_0, Q4_0, Q4_1; checked against `gguf` in tests/test_gguf.py) and asks
`gguf` for any other type it can dequantise (Q5_0, Q5_1, the K-quants, ...); a type neither can read is
refused by name.

Block layouts (32 weights per block, little-endian):
    Q8_0  d: f16, q: 32 x int8                      w = d * q
    Q4_0  d: f16, q: 16 bytes (low nibbles 0-15,    w = d * (q - 8)
                     high nibbles 16-31)
    Q4_1  d: f16, m: f16, q: 16 bytes (as Q4_0)     w = d * q + m
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class GGUFError(ValueError):
    """A GGUF file kpro cannot convert faithfully (the message names what and why)."""


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'kpro[gguf]' "
                          "(or pip install gguf tokenizers)") from None
    return gguf


def _float_block(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return raw.view(dtype).to(torch.float32)


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 34)
    scale = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
    quants = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (scale * quants).flatten()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values: the low nibbles are weights 0-15, the high nibbles 16-31."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1).to(torch.float32)


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)
    scale = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
    return (scale * (_nibbles(blocks[:, 2:]) - 8.0)).flatten()


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 20)
    scale = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    return (scale * _nibbles(blocks[:, 4:]) + minimum).flatten()


# Tensor types kpro dequantises itself: name -> raw little-endian bytes (uint8) -> float32 values (F64's kept in
# float64: the caller's dtype conversion rounds them once, and float64 keeps them exactly).
DEQUANTIZERS = {
    "F32": lambda raw: _float_block(raw, torch.float32),
    "F16": lambda raw: _float_block(raw, torch.float16),
    "BF16": lambda raw: _float_block(raw, torch.bfloat16),
    "F64": lambda raw: raw.view(torch.float64),
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
}
# Integer tensor types: never model weights.
_NOT_WEIGHTS = {"I8", "I16", "I32", "I64"}


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `names` (tensor names in file order), `shape(name)`
    (torch order), `type_name(name)` and `tensor(name)` (float32, dequantised; float64 for F64)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        gguf = import_gguf()
        self._gguf = gguf
        try:
            reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, KeyError, IndexError, UnicodeDecodeError) as err:
            # the reader's own words are numpy's ("cannot reshape array of size 30750"): say what they mean
            raise GGUFError(f"{self.path} is not a readable GGUF file (truncated or corrupt? an incomplete "
                            f"download? {self.path.stat().st_size:,} bytes): {err}") from None
        if getattr(reader, "byte_order", "I") != "I":
            raise GGUFError(f"{self.path} is a big-endian GGUF file; kpro reads little-endian files only")
        self._reader = reader
        self.metadata = {}
        for name, field in reader.fields.items():
            if not name.startswith("GGUF."):
                try:
                    self.metadata[name] = _field_value(field, gguf)
                except UnicodeDecodeError as err:
                    raise GGUFError(f"{self.path}: metadata {name} holds a string that is not UTF-8 ({err})") from None
        self._tensors = {tensor.name: tensor for tensor in reader.tensors}
        self.names = list(self._tensors)
        self._check_tensor_layout(reader)

    def _check_tensor_layout(self, reader) -> None:
        """Each tensor's bytes aligned and its own: the gguf package's reader checks neither, and a tensor pointing
        into another's bytes (a corrupt or hand-made file) would read them silently. llama.cpp refuses such files."""
        previous = None
        for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
            if (tensor.data_offset - reader.data_offset) % reader.alignment:
                raise GGUFError(f"{self.path}: tensor {tensor.name} starts at byte {tensor.data_offset:,}, not on the "
                                f"file's {reader.alignment}-byte alignment; the file is corrupt")
            if previous is not None and tensor.data_offset < previous.data_offset + previous.n_bytes:
                raise GGUFError(f"{self.path}: the bytes of tensor {tensor.name} (from {tensor.data_offset:,}) overlap "
                                f"those of {previous.name} ({previous.data_offset:,} to "
                                f"{previous.data_offset + previous.n_bytes:,}); the file is corrupt")
            previous = tensor  # (one past the file's end: the reader itself fails, above)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in torch order (GGUF lists dimensions fastest-first)."""
        return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def type_names(self) -> set[str]:
        return {self.type_name(name) for name in self.names}

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantised to float32 (an F64 tensor as its float64 values), in torch order."""
        info = self._tensors[name]
        kind = info.tensor_type.name
        shape = self.shape(name)
        if kind in _NOT_WEIGHTS:
            raise GGUFError(f"{self.path}: tensor {name} has integer type {kind}, not a floating-point or quantised "
                            "weight")
        if kind in DEQUANTIZERS:
            raw = torch.from_numpy(np.ascontiguousarray(info.data).view(np.uint8).reshape(-1).copy())
            return DEQUANTIZERS[kind](raw).view(shape)
        values = self._dequantize_with_gguf(name, info.data)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(shape)

    def check_readable(self, names) -> None:
        """Refuse, before any work, a tensor of `names` whose type cannot be read: for each type the `gguf`
        package dequantises, one row of one such tensor is tried."""
        tried = set()
        for name in names:
            info = self._tensors[name]
            kind = info.tensor_type.name
            if kind in _NOT_WEIGHTS:
                raise GGUFError(f"{self.path}: tensor {name} has integer type {kind}, not a floating-point or "
                                "quantised weight")
            if kind not in DEQUANTIZERS and kind not in tried:
                self._dequantize_with_gguf(name, info.data[:1])
                tried.add(kind)

    def _dequantize_with_gguf(self, name: str, data):
        info = self._tensors[name]
        try:
            return self._gguf.quants.dequantize(data, info.tensor_type)
        except (NotImplementedError, KeyError, AttributeError):
            raise GGUFError(f"{self.path}: tensor {name} has quantisation type {info.tensor_type.name}, which neither "
                            f"kpro nor the installed gguf package can dequantise; kpro reads {', '.join(DEQUANTIZERS)} "
                            "and the types `gguf` supports") from None


def _field_value(field, gguf):
    """A metadata value as plain Python (str, int, float, bool, or a list of them). float32 values are
    written the shortest way that reads back as the same float32 (1e-05, not 9.999999747378752e-06)."""
    value = field.contents()
    kinds = field.types
    if kinds and kinds[-1] == gguf.GGUFValueType.FLOAT32:
        shortest = lambda v: float(str(np.float32(v)))  # noqa: E731
        value = [shortest(v) for v in value] if isinstance(value, list) else shortest(value)
    return value
