"""SHA-256 digests of tensors' values, streamed a slice at a time and hashed on up to 8 threads (hashlib releases
the GIL): adapter files' base fingerprints and the frozen weights that a checkpoint leaves out are checked with them.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

PIECE = 1 << 24  # elements cast and copied at a time: a slice of a tensor, never a copy of the model


def tensor_digests(tensors: list[tuple[str, torch.Tensor]], dtypes: list) -> list[list[bytes]]:
    """For each (name, tensor), one SHA-256 digest per dtype of `dtypes` (None: the tensor's own) of its name, shape
    and bytes cast to that dtype; each slice is read (from the GPU too) once and cast to every dtype."""
    def digests_of(item) -> list[bytes]:  # detach(): grad mode is per thread, and no_grad is not set in these
        name, tensor = item
        digests = [hashlib.sha256(f"{name}{list(tensor.shape)}".encode()) for _ in dtypes]
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), PIECE):
            piece = flat[start:start + PIECE].cpu()
            for digest, dtype in zip(digests, dtypes):
                digest.update(piece.to(dtype or flat.dtype).view(torch.uint8).numpy())
        return [digest.digest() for digest in digests]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(digests_of, tensors))


def value_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: "sha256:" and 16 hex digits of the digest of its name, shape, dtype and bytes}."""
    names = sorted(tensors)
    digests = tensor_digests([(f"{name}:{tensors[name].dtype}", tensors[name]) for name in names], [None])
    return {name: "sha256:" + digest[0].hex()[:16] for name, digest in zip(names, digests)}
