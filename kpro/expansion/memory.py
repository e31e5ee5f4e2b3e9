"""Measure the activation memory a forward pass keeps for its backward."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def saved_activation_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """(bytes, forward's result): the total size of the distinct storages autograd saves for the backward
    while `forward()` runs, leaving out the storages of `exclude` (pass the model's parameters: weights
    are not activations).

    Counted once per storage, however many views of it are saved, so a tensor saved by two ops, or the
    fused qkv output that three views keep alive, counts at its real size. Copies of weights do count
    (bf16 casts under autocast are memory the step holds). Call backward on the result afterwards as usual.
    """
    if isinstance(exclude, torch.nn.Module):  # what it was asked for anyway
        exclude = exclude.parameters()
    exclude = list(exclude)
    if not all(isinstance(t, torch.Tensor) for t in exclude):
        raise TypeError("exclude takes tensors (model.parameters()), got "
                        f"{type(next(t for t in exclude if not isinstance(t, torch.Tensor))).__name__} items")
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, torch.UntypedStorage] = {}  # held until the end, so no address is reused meanwhile

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept.setdefault(storage.data_ptr(), storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return sum(storage.nbytes() for storage in kept.values()), result
