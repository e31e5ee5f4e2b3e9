"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A run directory holds `step-00000100/`, `step-00000200/`, ... Each is a complete checkpoint:

    config.json, model.safetensors   the model in the Hugging Face layout (`kpro.load_pretrained` reads it);
                                     another kind of module is saved as `module.safetensors` (its own names),
                                     and so is a model saved without its frozen weights (`save_frozen=False`)
    optimizer.pt                     optimizer state keyed by parameter name (full, never sharded)
    trainer_state.pt                 step, data position, RNG states of every process, callback states,
                                     and the model's tensor shapes (to refuse a checkpoint of another model)
    trainer_state.json               the step and last metrics, for people

A checkpoint is written under a temporary name and renamed into place (the helpers of
`kpro.checkpoint`), so a directory named `step-*` is always complete: an interrupted save leaves a
temporary directory, which is ignored and removed by the next save.
"""
from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._digests import value_digests
from .._files import IN_PROGRESS, abandoned, atomic_directory, naming_write_failures, save_safetensors
from .._numbers import is_integer
from ..checkpoint import (CONFIG_NAME, CheckpointError, _open_all, _write_checkpoint, _write_file, checkpoint_tensors,
                          parse_size, tensor_locations)
from ..config import LlamaConfig
from ..errors import EndsInWarmup, OtherParameters, PastSteps, listed
from ..lora import lora_layers
from ..model import Llama
from . import distributed
from .distributed import DistEnv

STEP_DIR = re.compile(r"step-(\d{8})")
MODULE_WEIGHTS = "module.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
# trainer_state.pt's {name: digest} of the frozen weights a checkpoint saved with save_frozen=False leaves out
FROZEN_DIGESTS = "frozen_digests"
# trainer_state.pt's {name: digest} of the frozen weights as the run started (fit's frozen_at_start), kept for resumes
FROZEN_AT_START = "frozen_at_start"
# trainer_state.pt's config of the Llama the model is or wraps (HF form): compared on resume where no config.json is
LLAMA_CONFIG = "llama_config"
SUMMARY_FILE = "trainer_state.json"
RUN_FILES = (MODULE_WEIGHTS, OPTIMIZER_FILE, STATE_FILE, SUMMARY_FILE)  # a checkpoint's files besides the model's
FORMAT = 1
# Param-group keys that choose how an optimizer computes its step, not what it computes (fused kernels may round
# otherwise): a loaded optimizer keeps its own, where torch's loader would copy the checkpoint's over them, so a
# run moves between devices (kt.adamw is fused on a GPU) and a new factory's choice holds.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    # steps outside 0 ... 10^8 - 1 would name directories that list_checkpoints never finds (nor prunes)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < 10**8:
        raise ValueError(f"a checkpoint's step must be an integer from 0 to 99,999,999 (an optimizer step count), "
                         f"got {step!r}")
    return Path(run_dir) / f"step-{int(step):08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in a run directory, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The step a checkpoint directory (`step-XXXXXXXX`) was saved at."""
    match = STEP_DIR.fullmatch(Path(checkpoint).name)
    if match is None:
        raise CheckpointError(f"{checkpoint} is not a training checkpoint directory (named step-XXXXXXXX)")
    return int(match.group(1))


def refuse_past_steps(checkpoint: str | os.PathLike, steps: int) -> None:
    """PastSteps where `checkpoint` is past a run of `steps`: nothing would train, and the model of another step
    than asked would come back."""
    done = checkpoint_step(checkpoint)
    if done > steps:
        raise PastSteps(f"{checkpoint} is at step {done}, past steps={steps}: pass steps={done} or more to continue "
                        f"that run (steps={done}: it is done), or resume an earlier checkpoint (resume=PATH) into "
                        "another directory", step=done, steps=steps)


# ----------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """This process's random number generators: torch (CPU and CUDA), Python, NumPy."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- save

_PLAIN = (type(None), bool, int, float, complex, str, bytes)


_SAVE_PLAIN = ("save tensors, Python numbers and strings, and lists, tuples and dicts of them (float(x), x.item(), "
               "x.tolist(), torch.from_numpy(x))")


def check_loadable(value, what: str, advice: str = _SAVE_PLAIN) -> None:
    """Refuse, naming the entry, what `torch.save` writes into trainer_state.pt but `torch.load(weights_only=True)`
    cannot read back (a NumPy scalar or array, a Fraction, a Path, an object of your own): every checkpoint of
    the run would be found unresumable only when it is needed. `advice` ends the message: what to do."""
    if type(value) in _PLAIN or isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return
    if type(value) in (list, tuple, set, dict):
        for key, item in (value.items() if type(value) is dict else enumerate(value)):
            if type(value) is dict:
                check_loadable(key, f"a key of {what}", advice)
            check_loadable(item, f"{what}[{key!r}]" if type(value) is not set else f"an item of {what}", advice)
        return
    buffer = io.BytesIO()  # anything else: as the loader takes it (torch.serialization.add_safe_globals included)
    try:
        torch.save(value, buffer)
    except Exception as err:
        problem = f"it cannot be saved: {str(err).splitlines()[0][:200]}"
    else:
        try:
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
            return
        except Exception:
            problem = "checkpoints are read back with torch.load(weights_only=True), which refuses it"
    raise TypeError(f"{what} is a {type_name(value)}, which a checkpoint cannot hold ({problem}); {advice}")


def check_param_groups_loadable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, naming the group and key, an optimizer whose param groups hold a value that optimizer.pt would keep
    but no resume could read back: a NumPy eps or lr of a torch optimizer built by hand, say (`kt.adamw` takes
    NumPy numbers as Python ones)."""
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key != "params":
                check_loadable(value, f"the optimizer's param group {i} {key!r}",
                               "build the optimizer with Python numbers (float(x)) or tensors")


def type_name(value) -> str:
    """`float`, `numpy.float64`: a value's type as an error message names it."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def trained_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (as optimizer.pt keys them) of the trainable parameters the optimizer holds. A checkpoint records
    them even where the optimizer holds no state (plain SGD), whose optimizer.pt then holds nothing."""
    names = distributed.state_dict_names(model)
    return [names.get(id(p), "?") for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def tensor_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every state-dict tensor's full shape (a sharded parameter reports its unsharded shape), by the names of the
    model inside a DDP or torch.compile wrapper."""
    return {name: list(t.shape) for name, t in distributed.unwrapped(model).state_dict().items()}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict | None = None, env: DistEnv | None = None, *, summary: dict | None = None,
                    keep_last: int | None = None, write_extra=None, save_frozen: bool = True,
                    frozen_at_start: dict[str, str] | None = None) -> Path:
    """Write checkpoint `step` of a run atomically; keep the newest `keep_last` (a positive integer; None: all).
    Returns its directory.

    `state` holds what else the run needs to continue (data position, callback states); the RNG states
    of every process are added here. `write_extra(directory)` may add files (a tokenizer) before the
    checkpoint is put in place. A collective: every process calls it; rank 0 writes. A model in a DDP or
    torch.compile wrapper is saved as the model inside it (HF layout for a Llama), whose names optimizer.pt uses.

    `save_frozen=False` leaves out the parameters that require no gradient (a LoRA or Bitune base: the checkpoint
    holds the adapters) and records a digest of each (`FROZEN_DIGESTS`): a resume keeps the model's own, after
    checking they are the run's. The weights are then saved as `module.safetensors`, a Llama's too.
    `frozen_at_start` ({name: digest}, `frozen_digests` of the model as the run started; fit passes it) leaves out
    only the frozen weights still equal to it: one trained and then frozen, or changed by a merge, is saved.
    """
    # Before anything is written, as a bad value would fail only after the write; bool is an int subclass (True
    # would prune to 1)
    if keep_last is not None and (not is_integer(keep_last) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None (keep all), got {keep_last!r}")
    env, model = env or distributed.current_env(), distributed.unwrapped(model)
    if not isinstance(save_frozen, bool):
        raise TypeError(f"save_frozen must be True or False, got {save_frozen!r}")
    if frozen_at_start is not None and (save_frozen or not isinstance(frozen_at_start, dict)):
        raise TypeError(f"frozen_at_start must be a dict of digests (frozen_digests), and goes with save_frozen=False; "
                        f"got {type(frozen_at_start).__name__} with save_frozen={save_frozen}")
    check_param_groups_loadable(optimizer)
    check_loadable(state or {}, "the state given to save_checkpoint")
    target = checkpoint_dir(run_dir, step)
    step = int(step)  # a NumPy step (np.arange's) as a Python int: trainer_state.pt and the summary take no other
    full_model = distributed.full_model_state(model)
    full_optim = distributed.full_optimizer_state(model, optimizer, env)
    frozen, llama = set() if save_frozen else distributed.frozen_parameter_names(model), _llama(model)
    state = {**(state or {}), "format": FORMAT, "step": step, "world_size": env.world_size,
             "rng": distributed.gather_objects(rng_state(), env), "model_shapes": tensor_shapes(model),
             "has_optimizer_state": full_optim is not None, "trained_params": trained_parameters(model, optimizer),
             LLAMA_CONFIG: None if llama is None else llama.config.to_hf()}

    def write():
        newer = [c.name for c in list_checkpoints(target.parent) if checkpoint_step(c) > step]
        if newer:  # keep_last would prune the one written now, and a resume would take the newer branch
            raise CheckpointError(f"{target.parent} holds {', '.join(newer[:3])}, past step {step}: a rewound run "
                                  "writes into another directory")
        for key in (FROZEN_DIGESTS, FROZEN_AT_START):  # keys of this module's, as "step" is
            state.pop(key, None)
        weights, digests = _without_frozen(model, full_model, frozen, frozen_at_start)
        if digests:
            state[FROZEN_DIGESTS] = digests
        if frozen_at_start is not None:  # for the sessions that resume the run
            state[FROZEN_AT_START] = frozen_at_start
        _write_checkpoint_dir(target, model, weights, full_optim, state, summary, env, write_extra,
                              whole=not digests)
        if keep_last is not None:
            prune(target.parent, int(keep_last))

    distributed.on_main(write, env, f"save checkpoint {target}")
    return target


def _whole_state(model: nn.Module, full_state: dict | None) -> dict[str, torch.Tensor]:
    """The model's state dict: `full_state` where the model is sharded (gathered on rank 0), else its own."""
    return model.state_dict() if full_state is None else full_state


def _without_frozen(model: nn.Module, full_state: dict | None, frozen: set[str],
                    at_start: dict | None) -> tuple[dict | None, dict]:
    """(the state dict to save, {name: digest} of the tensors left out): the `frozen` ones, those still equal to
    their digest `at_start` where given. (`full_state`, {}) where none is left out."""
    if not frozen:
        return full_state, {}
    state = _whole_state(model, full_state)
    digests = value_digests({name: t for name, t in state.items() if name in frozen})
    if at_start is not None:
        digests = {name: digest for name, digest in digests.items() if at_start.get(name) == digest}
    if not digests:
        return full_state, {}
    return {name: t for name, t in state.items() if name not in digests}, digests


def frozen_digests(model: nn.Module, env: DistEnv | None = None) -> dict[str, str] | None:
    """{name: digest} of the model's frozen weights now (fit takes them as a run starts: `frozen_at_start`), on
    rank 0; None elsewhere. A collective where the model is sharded."""
    env, model = env or distributed.current_env(), distributed.unwrapped(model)
    full, names = distributed.full_model_state(model), distributed.frozen_parameter_names(model)

    def digests():
        return value_digests({name: t for name, t in _whole_state(model, full).items() if name in names})
    return distributed.on_main(digests, env, "digest the frozen weights")


def _write_checkpoint_dir(target: Path, model, weights, full_optim, state, summary, env, write_extra,
                          whole: bool = True) -> None:
    """`weights`: the state dict to save, or None for the model's own; not `whole` (frozen weights left out):
    as module.safetensors whatever the model."""
    remove_abandoned_temporaries(target.parent)
    with atomic_directory(target, drop=lambda name: True) as tmp:  # a step's checkpoint is replaced whole
        _write_model(model, weights, tmp, whole)
        for name, content in [(OPTIMIZER_FILE, full_optim), (STATE_FILE, state)]:
            with naming_write_failures(tmp / name):  # atomic_directory names it by where it was to go
                torch.save(content, tmp / name)
        summary = {"step": state["step"], "world_size": env.world_size, **(summary or {})}
        _write_file(tmp / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if write_extra is not None:
            # What it draws (a sampled generation written beside the weights) must not move the random streams:
            # the checkpoint holds them as they were, and the other processes, which do not run it, go on from there.
            drawn_from = rng_state()
            try:
                write_extra(tmp)
            finally:
                set_rng_state(drawn_from)


def saves_hf_layout(model: nn.Module) -> bool:
    """Whether a training checkpoint holds `model` as a LLaMA checkpoint (HF layout) or as its state dict
    (module.safetensors): a Llama with LoRA layers keeps them, which an HF checkpoint cannot."""
    return isinstance(model, Llama) and not lora_layers(model)


def check_savable(model: nn.Module) -> None:
    """Refuse, before any training, a model whose checkpoint could not be written (CheckpointError)."""
    model = distributed.unwrapped(model)
    if saves_hf_layout(model):
        checkpoint_tensors(model)


def _write_model(model: nn.Module, full_state: dict | None, out: Path, whole: bool = True) -> None:
    if whole and saves_hf_layout(model):  # the HF-layout files, straight into the temporary directory
        _write_checkpoint(model, out, parse_size("5GB"), full_state)
        return
    state = _whole_state(model, full_state)
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:  # a tied weight: safetensors stores shared memory once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.to("cpu").contiguous()
    save_safetensors(tensors, out / MODULE_WEIGHTS, metadata={"format": "pt", "aliases": json.dumps(aliases)})


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (renamed away first, so none is ever half there)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        trash = old.parent / f".{old.name}.deleting-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(old, trash)
        except FileNotFoundError:  # pruned by another process since it was listed
            continue
        IN_PROGRESS.add(trash.name)
        try:
            shutil.rmtree(trash)
        finally:
            IN_PROGRESS.discard(trash.name)


def remove_abandoned_temporaries(run_dir: Path) -> None:
    """Delete what saves and prunes of dead processes left behind (their pid is in the name), and of this one's pid
    but no save in progress (a restarted container's process, which gets the same pid)."""
    for entry in run_dir.glob(".step-*"):
        match = re.fullmatch(r"\.step-\d{8}\.(?:tmp|deleting)-(\d+)-[0-9a-f]+", entry.name)
        if match and abandoned(entry.name, int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load

def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv | None = None) -> dict:
    """Restore model weights, optimizer state and this process's RNG states from a checkpoint; return the
    rest of the saved state (step, data position, callback states). A collective: every process calls it.

    A checkpoint of a model with other tensor names or shapes (or, for a LLaMA, another config), or of an
    optimizer that trained other parameters, is refused with a CheckpointError naming the differences, before
    anything is loaded; so is an optimizer state that torch's loader refuses (another kind of optimizer): it is
    loaded first, the weights and RNG states after it, and a refusal puts the optimizer back as it was. The
    optimizer keeps its own implementation flags (`IMPLEMENTATION_FLAGS`: fused, foreach, ...), where torch's
    loader takes every saved param-group key. Gradients left on the parameters (a check's backward) are cleared:
    a checkpoint is taken between steps, where there are none. A model in a DDP or torch.compile wrapper loads
    as the model inside.
    """
    return restore_checkpoint(directory, model, optimizer, env)


def restore_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                       env: DistEnv | None = None, *, check=None, take=None) -> dict:
    """`load_checkpoint` with the caller's own steps (fit's), so that whatever refuses the checkpoint does so
    before anything is loaded: `check(state)` may refuse the saved state (step, settings) before more is read;
    `take(state)` loads the caller's other states (data position, callback states) after the optimizer state,
    before the weights and RNG states: what it raises refuses the checkpoint, the optimizer put back as it was
    (`take` puts back its own). Every process calls both, with rank 0's state."""
    directory, env, model = Path(directory), env or distributed.current_env(), distributed.unwrapped(model)
    state, problem, parameters = None, None, None
    if env.is_main:
        try:
            state = _read_state(directory)
            problem = _mismatch(directory, model, state)
            if problem is None and "trained_params" in state:  # else (an older kpro's) from optimizer.pt, below
                recorded, now = state["trained_params"], trained_parameters(model, optimizer)
                problem = _optimizer_mismatch(directory, now, recorded, recorded)
                parameters = (recorded, now) if problem else None
        except Exception as err:  # reported on every rank below: none may be left waiting
            problem = f"{directory} is not a readable training checkpoint: {err}"
    state, problem, parameters = distributed.broadcast_object((state, problem, parameters), env)
    if problem:
        raise OtherParameters(problem, *parameters) if parameters else CheckpointError(problem)
    if check is not None:
        check(state)
    digests = state.pop(FROZEN_DIGESTS, None) or {}
    mine = distributed.full_model_state(model) if digests else None  # a collective where the model is sharded
    full_model = distributed.on_main(lambda: _read_weights(directory, model, set(state["model_shapes"]), digests, mine),
                                     env, f"read the model of {directory}")
    has_optimizer_state, checked = state.pop("has_optimizer_state"), state.get("trained_params") is not None
    if has_optimizer_state:
        optim_state = distributed.on_main(lambda: read_optimizer(directory), env,
                                          f"read the optimizer state of {directory}") or {}
        stateless = distributed.main_decides(
            lambda: _stateless_parameters(directory, model, optimizer, optim_state, checked),
            f"check the optimizer state of {directory}", env)
    with _put_back_on_failure(model, optimizer):
        for param in model.parameters():  # torch's loader prepares a fresh optimizer's state only without them
            param.grad = None
        if has_optimizer_state:
            _load_optimizer(directory, model, optimizer, optim_state, stateless, env)
        if take is not None:
            take(state)
    distributed.load_full_model_state(model, full_model if env.is_main else {}, env, strict=not digests)
    rngs = state.pop("rng")
    set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    return state


def _load_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict,
                    stateless: list, env: DistEnv) -> None:
    for group in optimizer.param_groups:  # torch's loader wants every saved group key present here
        group.setdefault("peak_lr", group["lr"])
    for saved, group in zip(optim_state.get("param_groups", ()), optimizer.param_groups):
        for flag in IMPLEMENTATION_FLAGS:  # this optimizer's own (see IMPLEMENTATION_FLAGS)
            if flag in group:
                saved[flag] = group[flag]
            else:
                saved.pop(flag, None)
    try:
        distributed.load_full_optimizer_state(model, optimizer, optim_state, env, strict=not stateless)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{directory}: the optimizer state does not fit this optimizer ({err}); was the set "
                              "of trainable parameters or the optimizer changed?") from None
    if stateless:  # torch's loader gave them the state of a zero-gradient step: they had none, and start fresh
        names, fresh = distributed.state_dict_names(model), set(stateless)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if names.get(id(param)) in fresh:
                    optimizer.state.pop(param, None)


@contextlib.contextmanager
def _put_back_on_failure(model: nn.Module, optimizer: torch.optim.Optimizer):
    """On an exception, the optimizer's groups and state and the parameters' gradients as they were: torch's
    loader replaces the groups and the state (a fresh optimizer's it first fills with a zero-lr step, which
    leaves the weights alone), and the gradients are cleared for it."""
    groups, contents = optimizer.param_groups, [dict(group) for group in optimizer.param_groups]
    state, entries = optimizer.state, dict(optimizer.state)
    grads = [(param, param.grad) for param in model.parameters()]
    try:
        yield
    except BaseException:
        for group, kept in zip(groups, contents):
            group.clear()
            group.update(kept)
        state.clear()
        state.update(entries)
        optimizer.param_groups, optimizer.state = groups, state
        for param, grad in grads:
            param.grad = grad
        raise


def saved_schedule(run_dir: str | os.PathLike, steps: int | None = None) -> dict | None:
    """The learning-rate schedule (a `Schedule`'s fields) of the newest checkpoint in `run_dir`, or None (no
    checkpoint, or none recorded). A command whose default warmup follows the total steps (5% of them) takes
    the warmup from here when it resumes: more `--steps` then extend the run instead of changing its schedule.
    With the `steps` the resume asks for, a run they cannot continue is refused first, before a schedule of the
    saved warmup and fewer steps is refused in its own terms (total_steps > warmup_steps, of a warmup the user
    never set): a checkpoint past them (PastSteps, as fit refuses it), or steps that end within the saved warmup.
    Under torchrun, rank 0's (a collective)."""
    return distributed.main_decides(lambda: _saved_schedule(run_dir, steps), f"read the schedule saved in {run_dir}")


def _saved_schedule(run_dir, steps: int | None) -> dict | None:
    last = latest_checkpoint(run_dir)
    if last is None:
        return None
    if steps is not None:
        refuse_past_steps(last, steps)
    try:
        schedule = _read_state(last).get("settings", {}).get("schedule")
    except (CheckpointError, OSError, RuntimeError):
        return None  # the resume itself reports an unreadable checkpoint
    if not isinstance(schedule, dict):
        return None
    warmup = schedule.get("warmup_steps")
    if steps is not None and isinstance(warmup, int) and steps <= warmup:
        raise EndsInWarmup(f"{run_dir} holds a run at step {checkpoint_step(last)} whose learning rate warms up over "
                           f"its first {warmup} steps (the warmup it started with, which a resume keeps), which "
                           f"steps={steps} would end within: pass more than {warmup} steps to continue it, or start a "
                           "new run in another directory", step=checkpoint_step(last), steps=steps, warmup=warmup)
    return schedule


def _stateless_parameters(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict,
                          checked: bool) -> list:
    """The names of the trainable parameters the saved optimizer held without state: AdamW keeps none for a
    parameter that has had no gradient yet (Bitune's `only_causal` leaves one adapter without), and such a run
    must resume. `checked`: the parameters were compared with those the checkpoint records; else (a checkpoint
    of an older kpro) here, with those its optimizer state holds state for and lists."""
    stored = saved.get("state", {})
    if not checked:
        listed = [name for group in saved.get("param_groups", ()) for name in group.get("params", ())]
        now, trained = trained_parameters(model, optimizer), [name for name in listed if name in stored]
        problem = _optimizer_mismatch(directory, now, trained, listed)
        if problem:
            raise OtherParameters(problem, trained, now)
    names = distributed.state_dict_names(model)
    return [names.get(id(p), "?") for group in optimizer.param_groups for p in group["params"]
            if p.requires_grad and names.get(id(p)) not in stored]


def _optimizer_mismatch(directory: Path, now: list[str], trained: list[str], held: list[str]) -> str | None:
    """Why this optimizer, training the parameters named `now`, cannot continue the checkpoint's, which trained
    `trained` and held `held`; or None.

    torch's loader silently drops the saved state of a parameter this optimizer lacks (frozen again, or in a
    group added after the load): its moments were lost, or it trained no more. One the saved optimizer never
    held has no state to continue."""
    dropped = [name for name in trained if name not in set(now)]  # small lists: parameters, not elements
    added = [name for name in now if name not in set(held)]
    if not dropped and not added:
        return None
    problems = []
    if dropped:
        problems.append(f"the checkpoint's optimizer trained {_few(dropped)}, which this one does not hold (they "
                        "would lose their optimizer state, or train no more)")
    if added:
        problems.append(f"this one holds {_few(added)}, which the checkpoint's never held")
    return (f"{directory}: the optimizer state does not fit this optimizer: {'; '.join(problems)}. Make the same "
            "parameters trainable and build the optimizer with the same param groups before loading it; under fit, "
            "before fit is called (e.g. when kt.latest_checkpoint(out_dir) is past the step that changed them) or in "
            "the optimizer factory: on_fit_start runs after the resume")


def read_optimizer(directory: Path) -> dict:
    try:
        return torch.load(directory / OPTIMIZER_FILE, weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # named by their file already, and not a damaged one
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{directory / OPTIMIZER_FILE} cannot be read (truncated or corrupt?): {err}") from None


def _read_state(directory: Path) -> dict:
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"no {STATE_FILE} (a model directory, not a training checkpoint?)")
    try:
        state = torch.load(directory / STATE_FILE, weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # named by their file already, and not a damaged one
    except (OSError, RuntimeError, EOFError, ValueError) as err:  # named by its file, as read_optimizer names its
        raise CheckpointError(f"{directory / STATE_FILE} cannot be read (truncated or corrupt?): {err}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{STATE_FILE} has format {state.get('format')!r}; this kpro reads format {FORMAT}")
    return state


def _llama(model: nn.Module) -> Llama | None:
    """The Llama that `model` is or wraps (a LoRA `AdaptedModel`, a `Bitune`), or None."""
    return next((module for module in model.modules() if isinstance(module, Llama)), None)


def _mismatch(directory: Path, model: nn.Module, state: dict) -> str | None:
    """Why the checkpoint cannot load into `model`, or None."""
    problems, llama, config = [], _llama(model), None
    if isinstance(model, Llama) and (directory / CONFIG_NAME).is_file():
        config = LlamaConfig.from_hf(directory / CONFIG_NAME)
    elif llama is not None and state.get(LLAMA_CONFIG) is not None:  # module.safetensors: no config.json beside it
        config = LlamaConfig.from_hf(state[LLAMA_CONFIG])
    if config is not None:
        problems += [f"{field}={getattr(config, field)!r} there, {getattr(llama.config, field)!r} here"
                     for field in vars(config) if field not in ("initializer_range", "_built")
                     and getattr(config, field) != getattr(llama.config, field)]
    saved, mine = state["model_shapes"], tensor_shapes(model)
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing:
        problems.append(f"tensor(s) this model has and the checkpoint lacks: {_few(missing)}")
    if unexpected:
        problems.append(f"tensor(s) the checkpoint has and this model lacks: {_few(unexpected)}")
    problems += [f"{name} is {saved[name]} there, {mine[name]} here"
                 for name in sorted(set(saved) & set(mine)) if saved[name] != mine[name]][:10]
    if not problems:
        return None
    return f"checkpoint {directory} was saved from a different model:\n  " + "\n  ".join(problems)


def _few(names: list[str], limit: int = 8) -> str:
    return listed(names, limit, " and {left} more")


def _read_weights(directory: Path, model: nn.Module, names: set[str], digests: dict,
                  mine: dict | None) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds, after checking that they are those of the model it recorded (`names`: its
    state-dict names), but for the frozen ones it left out (`digests`, theirs), which the model's own must match
    (`mine`: its full state where sharded, else None). torch's loader takes a state lacking a tensor on one process,
    silently keeping the model's own, so the check is here."""
    saved = read_model(directory, model)
    lacking, unexpected = sorted(names - set(saved) - set(digests)), sorted(set(saved) - names)
    if lacking or unexpected:
        raise CheckpointError(f"{directory}: the weights file does not hold its model's weights (edited, or written by "
                              "something else): " + "; ".join(f"{what} {_few(found)}" for what, found in
                                                            (("it lacks", lacking), ("it holds others,", unexpected))
                                                            if found))
    if not digests:
        return saved
    mine = _whole_state(model, mine)
    left_out = {name: mine[name] for name in digests if name in mine}
    differ = [name for name, digest in value_digests(left_out).items() if digest != digests[name]]
    if differ:
        raise CheckpointError(
            f"{directory} leaves out the frozen weights unchanged since its run started (saved with save_frozen=False: "
            f"a LoRA or Bitune run keeps its base out), so a resume keeps the model's own, and this model's differ "
            f"from the run's in {_few(differ)}: "
            "resume onto the model the run started from (the same base weights, in the same dtype)")
    return saved


def read_model(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict stored in a checkpoint, by the model's own names."""
    if (directory / MODULE_WEIGHTS).is_file():
        with _open_all({directory / MODULE_WEIGHTS}) as handles:
            f = handles[directory / MODULE_WEIGHTS]
            state = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        return {**state, **{name: state[original] for name, original in aliases.items()}}
    locations = tensor_locations(directory)
    with _open_all(set(locations.values())) as handles:
        state = {(name[len("model."):] if name.startswith("model.") else name): handles[file].get_tensor(name)
                 for name, file in locations.items()}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state
