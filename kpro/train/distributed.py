"""Running `fit` under torchrun: process group set-up, DDP and FSDP2 wrapping, batch splitting, and the
full (unsharded) model and optimizer states that make checkpoints independent of the process count.

Each global batch is split into `world_size` row blocks, one per process, and each block into
`grad_accum` micro-batches, so a run sees the same examples per optimizer step whatever the number of
processes. Only rank 0 touches the file system; what it reads is broadcast to the others, so
checkpoints need no shared file system.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import lora
from .._torchrun import world_size
# The helpers checkpoints share live one layer down; they are part of this module's interface too.
from ..distributed import (DistEnv, broadcast_object, current_env, full_model_state, is_sharded, main_decides,  # noqa: F401
                           on_main)
from ..errors import listed

# torch.distributed.fsdp and .checkpoint are imported where used: with DTensor they take most of a second.

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group that torchrun describes in the environment; nothing to do when run alone.

    Picks NCCL and `cuda:LOCAL_RANK` where CUDA is available, gloo and the CPU otherwise.
    """
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return current_env()


def leave_process_group() -> None:
    """Leave the process group init_distributed joined (nothing to do when none): at the end of a program run
    under torchrun, before Python shuts down. A gloo rank exiting in its group, or left after collecting none of
    DDP's pending work, was seen to abort at teardown ("terminate called without an active exception"; docs/
    training.md gives the counts), turning a finished run into a failed one: the garbage is collected first,
    so that the reducer and its work are freed while the interpreter still runs."""
    if dist.is_available() and dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()


def shard_blocks(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2: one sharding unit per transformer block (`kpro.model.Block`), the rest in the root unit.

    Every process starts from rank 0's weights, as under DDP: `fully_shard` keeps each process's own slice of
    its own tensors, so models initialised differently (another seed per rank, a checkpoint loaded on rank 0
    only) would otherwise be stitched together from all of them. Processes holding different models (another
    size, another layer count) or training different parameters are refused on every process, naming the first
    tensor that differs.
    """
    from torch.distributed.fsdp import fully_shard

    from ..model import Block

    refuse_merged_lora(model)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(current_env().device.type, (dist.get_world_size(),))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"FSDP: found no kpro Block inside {type(model).__name__} to shard; shard the model "
                         "yourself with torch.distributed.fsdp.fully_shard and pass it to fit")
    if dist.get_world_size() > 1:
        _check_same_tensors(model, "FSDP")
        _check_same_trainable(model, current_env())
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type != "meta":  # a model built on the meta device gets its weights loaded later
                dist.broadcast(tensor.detach(), src=0)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _check_same_tensors(model: nn.Module, mode: str) -> None:
    """Refuse, on every process, models whose parameters and buffers differ in names, shapes or dtypes between the
    processes: rank 0's broadcast of them one by one into tensors of other sizes aborted a process in the backend
    ("Received data size doesn't match expected size"), the others losing their connection; DDP's own check
    failed in torch on one process, the others losing their connection too. A collective."""
    def described(tensor):
        meta = " on the meta device" if tensor.device.type == "meta" else ""
        return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}{meta}"

    mine = {name: described(t) for name, t in (*model.named_parameters(), *model.named_buffers())}
    everyone = gather_objects(mine, current_env())
    apart = [rank for rank, theirs in enumerate(everyone) if list(theirs.items()) != list(everyone[0].items())]
    if not apart:
        return
    rank, first = apart[0], everyone[0]
    theirs = everyone[rank]
    names = list(dict.fromkeys([*first, *theirs]))
    name = next((n for n in names if first.get(n) != theirs.get(n)), None)
    differs = (f"the first that differs: {name}, {first.get(name, 'none')} on process 0, {theirs.get(name, 'none')} "
               f"on process {rank}" if name is not None else "the same tensors in another order")
    others = f"; process(es) {', '.join(map(str, apart[1:]))} differ too" if len(apart) > 1 else ""
    raise ValueError(f"{mode} needs the same model on every process, and process {rank}'s differs from process 0's "
                     f"({len(first)} parameters and buffers on process 0, {len(theirs)} on process {rank}; {differs}"
                     f"{others}): build the same model on every process (every process starts from rank 0's "
                     "weights, which are copied into its own tensors)")


def _check_same_trainable(model: nn.Module, env: DistEnv) -> None:
    """Refuse, on every process, processes training different parameters: DDP and FSDP reduce the gradients of the
    parameters each process trains, matched by position, so rank 0's gradient of one block was averaged with
    another process's of another block of the same shapes, and the run ended without a word, its model wrong.
    A collective."""
    everyone = gather_objects([name for name, p in model.named_parameters() if p.requires_grad], env)
    apart = [rank for rank, names in enumerate(everyone) if names != everyone[0]]
    if not apart:
        return
    rank = apart[0]

    def only(a: list[str], b: list[str]) -> str:
        names = [name for name in a if name not in set(b)]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "none"
    others = f"; process(es) {', '.join(map(str, apart[1:]))} differ too" if len(apart) > 1 else ""
    raise ValueError(f"the processes train different parameters (trainable on process 0 only: "
                     f"{only(everyone[0], everyone[rank])}; on process {rank} only: {only(everyone[rank], everyone[0])}"
                     f"{others}): the processes average their gradients parameter by parameter; set requires_grad "
                     "alike on every process before fit")


def prepare(model: nn.Module, parallel: str, env: DistEnv) -> tuple[nn.Module, str]:
    """The module to call in training (a DDP wrapper, or the model sharded in place) and the mode used."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if isinstance(model, DistributedDataParallel):
        raise ValueError("pass the model itself to fit, not a DistributedDataParallel wrapper: fit wraps it (parallel='ddp')")
    if is_sharded(model):
        refuse_merged_lora(model)
        if env.world_size > 1:
            _check_same_trainable(model, env)
        return model, "fsdp"  # sharded by the caller
    if parallel == "auto":
        parallel = "ddp" if env.world_size > 1 else "none"
    if parallel == "none" and env.world_size > 1:
        raise ValueError(f"parallel='none' with {env.world_size} processes would train {env.world_size} different "
                         "models on different rows; use 'ddp' or 'fsdp'")
    if env.world_size == 1:
        parallel = "none"  # one process: nothing to replicate or shard
    if parallel == "ddp":
        return wrap_ddp(model, env), "ddp"
    if parallel == "fsdp":
        return shard_blocks(model), "fsdp"
    return model, "none"


def wrap_ddp(model: nn.Module, env: DistEnv, idle: set[str] = frozenset()) -> DistributedDataParallel:
    """DDP over the model's trainable parameters but those named in `idle`, which get no gradient: DDP would
    wait for theirs, its reduction never finishing (it manages the parameters that require grad when it wraps).
    Processes holding different models, or training different parameters, are refused on every process, naming
    the first tensor that differs."""
    left_out = [p for name, p in model.named_parameters() if name in idle]
    for p in left_out:
        p.requires_grad_(False)
    try:
        with merges_as_on_rank0(model, env):  # which names LoRA merges that differ, first
            if env.world_size > 1:
                _check_same_tensors(model, "DDP")
                _check_same_trainable(model, env)
            return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    finally:
        for p in left_out:
            p.requires_grad_(True)


def _lora_layers(model: nn.Module) -> list[tuple[str, lora.LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, lora.LoRALinear)]


@contextlib.contextmanager
def merges_as_on_rank0(model: nn.Module, env: DistEnv):
    """Around DDP's wrapping, whose start-up broadcast copies rank 0's parameters and buffers into every process's
    in place. A LoRA layer with an adapter merged reads that copy as its weight changed since the merge (its forward
    refused); but every process now holds rank 0's merged weight and adapter together, so each takes over rank 0's
    record of the merge: unchanged where rank 0's was, refused where rank 0's was (changed in place before fit).
    The processes must have the same adapters merged. A collective: every process calls it."""
    def merged_as(name):
        return "no adapter merged" if name is None else f"adapter {name!r} merged"

    layers = _lora_layers(model)
    everyone = gather_objects([layer.merge_state() for _, layer in layers], env)
    merged = [[None if state is None else state.adapter for state in states] for states in everyone]
    for rank, names in enumerate(merged):
        if len(names) != len(merged[0]):
            raise ValueError(f"the processes' models have different numbers of LoRA layers ({len(merged[0])} on "
                             f"process 0, {len(names)} on process {rank}): build the same model on every process")
        differ = [(path, a, b) for (path, _), a, b in zip(layers, merged[0], names) if a != b]
        if differ:
            path, a, b = differ[0]
            raise ValueError(f"LoRA layer {path} has {merged_as(a)} on process 0 and {merged_as(b)} on process {rank} "
                             f"({len(differ)} layer(s) differ): merge the same adapters on every process before fit")
    yield
    for (_, layer), state in zip(layers, everyone[0]):
        if state is None:
            continue
        factors = None
        if not all(state.unchanged):  # rank 0's merge is stale: its recorded factors, which its adapter no longer holds
            factors = tuple(f.clone() for f in layer.merged_factors())
            for f in factors:
                dist.broadcast(f, src=0)
        layer.take_merge_state(state, factors)


def refuse_merged_lora(model: nn.Module) -> None:
    """Refuse FSDP for a model with a LoRA adapter merged. FSDP replaces the parameters by shards and runs the
    forward on gathered copies: a merged layer's record of its merge (the version counters of its weight and
    adapter) cannot follow them, so its forward took the copies for a changed weight and refused, and a record
    following the copies would miss a load or step of the shards."""
    merged = [(path, layer.merged) for path, layer in _lora_layers(model) if layer.merged is not None]
    if merged:
        (path, name), more = merged[0], len(merged) - 1
        raise ValueError(f"FSDP cannot train a model with a LoRA adapter merged (layer {path}, adapter {name!r}"
                         f"{f', and {more} more layer(s)' if more else ''}): sharding replaces its weight, and the "
                         "record of the merge cannot follow it. unmerge() it first (`for layer in "
                         "kpro.lora.lora_layers(model): layer.unmerge()`), or save the merged model with "
                         "kpro.save_pretrained and load it as a plain model (kpro.load_pretrained), or use "
                         "parallel='ddp'")


def idle_parameters(model: nn.Module) -> set[str]:
    """The trainable parameters left without a gradient by the backward just run."""
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}


def finish_first_ddp_step(train_model: DistributedDataParallel,
                          env: DistEnv) -> tuple[DistributedDataParallel, set[str]]:
    """Average the gradients of fit's first step under DDP, run without DDP's reduction (`no_sync`); returns the
    DDP wrapper for the steps after it, made anew without the trainable parameters that got no gradient (on every
    process: a LoRA adapter not active, those a Bitune mode leaves out), and their names. DDP would leave such a
    parameter's bucket unreduced (a step on each process's own gradients, then an error), and its
    find_unused_parameters=True takes a parameter used outside the module's forward, as `lm_loss`'s head is, for
    an unused one."""
    model = train_model.module
    idle = idle_parameters(model)
    everyone = gather_objects(sorted(idle), env)
    if any(set(names) != idle for names in everyone):
        some = sorted(set().union(*everyone) - set.intersection(*map(set, everyone)))
        raise ValueError(f"{len(some)} trainable parameter(s) got a gradient on some processes and not on others at "
                         f"the first step ({listed(some)}): DDP averages a "
                         "set of parameters fixed at the first step; use parallel='fsdp', or make the loss use them "
                         "on every process")
    for p in model.parameters():  # the same parameters, in the same order, on every process
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)
    return (wrap_ddp(model, env, idle) if idle else train_model), idle


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, enabled: bool):
    """Reduce gradients across processes only when `enabled` (the last micro-batch of a step)."""
    if isinstance(train_model, DistributedDataParallel) and not enabled:
        with train_model.no_sync():
            yield
    elif is_sharded(train_model):
        train_model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def split_batch(batch, env: DistEnv, grad_accum: int, per_process: bool = False) -> list:
    """This process's micro-batches: row block `rank` of `world_size`, cut into `grad_accum` pieces. A
    `per_process` batch is this process's block already (`TokenShards`): it is cut into micro-batches only."""
    processes = 1 if per_process else env.world_size
    parts = processes * grad_accum
    if parts == 1:
        return [batch]
    if not isinstance(batch, dict):
        raise TypeError(f"to split a batch across processes or accumulation steps, fit needs a dict of tensors "
                        f"[B, ...]; got {type(batch).__name__}")
    sizes = {key: value.shape[0] for key, value in batch.items() if isinstance(value, torch.Tensor) and value.dim() > 0}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors must share their first (batch) dimension to be split; got {sizes}")
    rows = next(iter(sizes.values()))
    for key, value in batch.items():  # one item per row, or one value for all rows? Only tensors are split
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) == rows:
            raise TypeError(f"batch[{key!r}] is a {type(value).__name__} of {rows} items, as many as the batch has "
                            f"rows, and fit splits only tensors across processes and accumulation steps: every "
                            f"micro-batch would get all {rows} items; make it a tensor [B, ...] to split it with the "
                            "rows, or keep it out of the batch")
        if isinstance(value, (Mapping, list, tuple)) and _holds_a_tensor(value):
            raise TypeError(f"batch[{key!r}] is a {type(value).__name__} holding tensors, and fit splits only the "
                            "batch's own tensors across processes and accumulation steps: every micro-batch would "
                            f"get all of it; put its tensors [B, ...] in the batch itself (batch['{key}_...'])")
    if rows % parts:
        if per_process:
            raise ValueError(f"this process's {rows} rows of the global batch (a per-process batch source, such as "
                             f"TokenShards, gives each of the {env.world_size} process(es) its own rows) cannot be "
                             f"split into {grad_accum} accumulation steps: make the global batch a multiple of "
                             f"{env.world_size * grad_accum} (processes x grad_accum)")
        raise ValueError(f"a global batch of {rows} rows cannot be split into {env.world_size} process(es) x "
                         f"{grad_accum} accumulation step(s): {rows} is not a multiple of {parts}")
    per = rows // parts
    first = 0 if per_process else env.rank * grad_accum
    return [{key: value[(first + i) * per:(first + i + 1) * per] if key in sizes else value
             for key, value in batch.items()} for i in range(grad_accum)]


# The largest prime below 2^20: squares, and their sums over up to 8192 processes, stay exact in float64.
_FINGERPRINT_MODULUS = 1_048_573


def batch_fingerprint(batch) -> torch.Tensor:
    """A hash of the batch's tensors (their bits and sizes) below 2^20, as an int64 scalar: the same on processes
    given the same global batch, different (but for a chance of about 1 in 2^20) on processes given different
    ones. Exact integer arithmetic, without overflow, so it is the same on any device and summation order. 0 for
    a batch holding no tensor."""
    tensors = [batch[key] for key in sorted(batch, key=str)] if isinstance(batch, Mapping) else [batch]
    fingerprint = torch.zeros((), dtype=torch.int64)
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            continue
        flat = tensor.detach().reshape(-1)
        if flat.is_floating_point():  # its bits
            flat = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        values = flat.to(torch.int64).remainder(_FINGERPRINT_MODULUS)
        weights = torch.arange(1, values.numel() + 1, device=values.device).remainder(4093) + 1  # < 2^12: no overflow
        digest = (values * weights).sum().remainder(_FINGERPRINT_MODULUS) + values.numel()
        fingerprint = (fingerprint.to(digest.device) * 4099 + digest).remainder(_FINGERPRINT_MODULUS)
    return fingerprint


def _holds_a_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return any(_holds_a_tensor(item) for item in items)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum over processes, on the device the backend reduces on (the tensor itself when alone)."""
    if env.world_size > 1:
        tensor = tensor.to(env.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------ full (unsharded) states

def load_full_model_state(model: nn.Module, state: dict, env: DistEnv, *, strict: bool = True) -> None:
    """Load rank 0's full `state` (other ranks pass {}) into the model, sharding it where the model is.
    `strict=False` keeps the tensors `state` lacks as they are (the caller has checked them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict,
                                                                broadcast_from_rank0=env.world_size > 1))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict | None:
    """The optimizer state keyed by parameter name (so it loads under any sharding), on rank 0.

    None for an optimizer that has not stepped yet: torch's state-dict helpers would initialise it
    with a zero-gradient step, and a fresh AdamW must stay fresh. A collective for sharded models.
    """
    if not optimizer.state:
        return None
    if not is_sharded(model) and not env.is_main:
        return {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv, *,
                              strict: bool = True) -> None:
    """Load rank 0's full optimizer `state` (others pass {}). `strict=False` lets parameters without saved state
    through, with the state of a zero-gradient step: only for those the saved optimizer held without state
    (`checkpointing._stateless_parameters`), whose state the caller then drops."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=env.world_size > 1, strict=strict))


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """The state-dict names (as `state_dict_names` gives them) of the parameters that require no gradient, every
    name of a tied one."""
    from torch.distributed.checkpoint.state_dict import _get_fqns
    return {fqn for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad
            for fqn in _get_fqns(model, name)}


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers, which add `module.` and `_orig_mod.` to its names."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def state_dict_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the name torch's state-dict helpers key its optimizer state by: wrappers' parts left out
    (DDP's `module.`, torch.compile's `_orig_mod.`, checkpoint_wrapper's). torch has no public API for it."""
    from torch.distributed.checkpoint.state_dict import _get_fqns
    names = {}
    for name, param in model.named_parameters():
        fqns = _get_fqns(model, name)
        names[id(param)] = next(iter(fqns)) if len(fqns) == 1 else name
    return names
