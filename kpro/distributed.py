"""Process-group helpers that checkpoints and the trainer both need, below both of them: the process
environment, whether a model is sharded (FSDP2), its full state gathered to rank 0, and work done by rank 0
whose outcome every rank learns.

`kpro.train.distributed` builds the rest of torchrun support (DDP/FSDP2 wrapping, batch splitting,
optimizer states) on these.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_env() -> DistEnv:
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_sharded(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing can have been sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def on_main(work, env: DistEnv, what: str):
    """Run `work()` on rank 0 only and return its result there (None elsewhere). Its failure reaches every
    rank: rank 0 re-raises it, the others raise a CheckpointError saying `what` failed, so none waits
    forever in a later collective. A collective: every rank calls it."""
    result, failure = None, None
    if env.is_main:
        try:
            result = work()
        except BaseException as err:
            failure = err
    error = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}", env)
    if failure is not None:
        raise failure
    if error is not None:
        raise CheckpointError(f"rank 0 could not {what}: {error}")
    return result


def main_decides(work, what: str, env: DistEnv | None = None):
    """`work()` run on rank 0 alone and its result given to every rank: what a run finds on disk (the
    checkpoint to resume, its recorded settings) is rank 0's, since nodes need no shared file system. Its
    failure reaches every rank, as with `on_main`. A collective: every rank calls it."""
    env = current_env() if env is None else env
    return broadcast_object(on_main(work, env, what), env)


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------ full (unsharded) states

def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (CPU) for a sharded model, or None: the model's own state is full.

    A collective for sharded models: every rank must call it.
    """
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
