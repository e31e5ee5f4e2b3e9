"""Adapter files: the trained LoRA weights (and any method's extra tensors) without the base model.

A directory holds `adapters.safetensors` (tensor names as in the model's checkpoint,
`model.layers.{i}.self_attn.q_proj.<adapter>.lora_A.weight`, ...) and `adapter_config.json` (the set-up
needed to rebuild the adapters: method, rank, alpha, ...). Writes are atomic; every mismatch on load is
named.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import lora
from ._digests import tensor_digests
from ._files import atomic_directory, save_safetensors
from .checkpoint import CheckpointError

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA parameters of a kpro model by checkpoint-style name (`model.` prefix)."""
    return {f"model.{name}": p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def save_adapters(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write adapter tensors and their config, atomically replacing older adapter files there."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_directory(directory, drop=lambda name: name in (ADAPTERS_FILE, CONFIG_FILE)) as tmp:
        save_safetensors(cpu, tmp / ADAPTERS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def read_config(directory: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """The adapters' config, a JSON object holding the `required` keys (each missing one named)."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale's encoding
    except FileNotFoundError:
        raise CheckpointError(f"{directory} holds no adapters ({CONFIG_FILE} missing)") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text, as JSON must be ({err}): save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(map(repr, missing))}: it was not written by kpro's "
                              "save_adapters, or was edited")
    return config


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if not lora.is_lora_key(name)}  # merge marks too


# A fingerprint names its method: "sha256:" and 16 hex digits. One without a prefix is the digest kpro recorded
# before (16 sampled values a tensor; a base differing elsewhere passed): still read, compared by its own method.
_SHA256 = "sha256:"


def base_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """A digest of the base model's weights (adapters left out): the SHA-256 of every tensor's name, shape and
    bytes, cast to `dtype` (default: each tensor's own), so that adapters tuned on one base, or a run resumed
    onto another, are refused by a base of the same shape that differs in any value. Streamed a slice at a time
    (from the GPU too) and hashed on up to 8 threads (hashlib releases the GIL)."""
    return base_fingerprints(model, [dtype])[dtype]


def base_fingerprints(model: nn.Module, dtypes) -> dict:
    """{dtype: base_fingerprint(model, dtype)} for each of `dtypes` (None: each tensor's own), in one pass over
    the weights: each slice is read (from the GPU) once and cast to every dtype."""
    dtypes = list(dict.fromkeys(dtypes))
    per_tensor = tensor_digests(sorted(_base_tensors(model).items()), dtypes)
    return {dtype: _SHA256 + hashlib.sha256(b"".join(d[i] for d in per_tensor)).hexdigest()[:16]
            for i, dtype in enumerate(dtypes)}


@torch.no_grad()
def _sampled_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """The digest kpro recorded before `base_fingerprint` hashed every value: names, shapes and 16 evenly spaced
    values of each tensor. Kept to check adapter files and tune checkpoints that hold it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_base_tensors(model).items()):
        flat = tensor.detach().reshape(-1)
        index = torch.linspace(0, max(flat.numel() - 1, 0), min(16, flat.numel()), device=flat.device).long()
        # float32's linspace rounded the last index past the end of tensors of over 2**24 values (SmolLM2's
        # embedding): an IndexError then, so no file records such a digest, and clamped here only not to fail
        index.clamp_(max=max(flat.numel() - 1, 0))
        values = flat[index].to(dtype or flat.dtype).to(torch.float64).cpu()
        digest.update(f"{name}{list(tensor.shape)}".encode() + values.numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_method(fingerprint) -> str:
    """"sha256" for a fingerprint `base_fingerprint` takes now, "sampled" for one recorded before."""
    return "sha256" if isinstance(fingerprint, str) and fingerprint.startswith(_SHA256) else "sampled"


def fingerprint_like(model: nn.Module, recorded, dtype: torch.dtype | None = None) -> str:
    """`model`'s base fingerprint taken by the method of `recorded` (a fingerprint read from a file), so that the
    two compare: `base_fingerprint`'s, or the sampled digest of files written before it."""
    if fingerprint_method(recorded) == "sampled":
        return _sampled_fingerprint(model, dtype)
    return base_fingerprint(model, dtype)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding most of the base model's tensors."""
    dtypes = [t.dtype for t in _base_tensors(model).values() if t.is_floating_point()]
    return max(set(dtypes), key=dtypes.count)


_NARROWER = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes a tuned base is commonly loaded in


def base_record(model: nn.Module) -> dict:
    """What an adapter config records of the base model it was tuned on (checked by `check_base`): its
    fingerprint in its dtype and, so that a narrower copy of it is checked too, in each other float dtype no
    wider (bf16 and fp16 are as wide as each other: a bf16 base's fp16 copy is checked against its own)."""
    _refuse_merged(model)
    dtype = base_dtype(model)
    others = [d for d in _NARROWER if d != dtype and d.itemsize <= dtype.itemsize]
    fingerprints = base_fingerprints(model, [dtype, *others])  # one pass over the weights for all of them
    narrower = {_dtype_name(d): fingerprints[d] for d in others}
    return {"base_model": fingerprints[dtype], "base_dtype": _dtype_name(dtype),
            **({"base_model_narrower": narrower} if narrower else {})}


def _refuse_merged(model: nn.Module) -> None:
    """The base fingerprint reads the weights: where an adapter is merged into one, it would fingerprint the
    merged weight, and adapters saved so would be refused by the base they were tuned on."""
    layers = [(path, module.merged) for path, module in model.named_modules() if isinstance(module, lora.LoRALinear)]
    merged = [(path, name) for path, name in layers if name is not None]
    if merged:
        path, name = merged[0]
        raise ValueError(f"cannot save adapters while one is merged into the base weights ({len(merged)} of "
                         f"{len(layers)} LoRA layers; first: {path}, adapter {name!r}): they would record the merged "
                         "weights as their base, and the base they were tuned on would refuse them. Save them before "
                         "merging; unmerge() alone does not do: it gives back the base to rounding only (fp32 too), "
                         "and the base check, which hashes every value, refuses a file saved then. After `for layer "
                         "in kpro.lora.lora_layers(model): layer.unmerge()`, load the base weights again "
                         "(`model.load_state_dict(base_state_dict, strict=False)`, the base checkpoint's tensors) "
                         "and save")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_base(directory: str | os.PathLike, model: nn.Module) -> None:
    """Refuse adapters tuned on another base model than `model`. A base in the tuned dtype or a wider one is
    compared cast to the tuned dtype; a narrower one, or one as wide (fp16 for bf16), against the fingerprint
    recorded in its own dtype (one as wide is also taken where, cast to the tuned dtype, it is the tuned base:
    the release that base was cast from). Adapters saved before the base was recorded, or before those fingerprints
    were, are not checked where the record lacks the model's dtype."""
    saved = read_config(directory)
    if "base_model" not in saved:
        return
    tuned = getattr(torch, str(saved.get("base_dtype")), None)
    mine = base_dtype(model)
    if not isinstance(tuned, torch.dtype):
        return
    if mine == tuned or mine.itemsize > tuned.itemsize:
        dtype, expected = tuned, saved["base_model"]
    else:  # narrower or as wide: the tuned values cast to this dtype were recorded, where the config is recent enough
        narrower = saved.get("base_model_narrower")
        expected = narrower.get(_dtype_name(mine)) if isinstance(narrower, dict) else None
        if expected is None:
            return
        dtype = mine
        # As wide (bf16, fp16): the release the tuned base was cast from (Llama 2's fp16 files, tuned in bf16),
        # cast the same way, is the tuned base itself
        recorded = saved["base_model"]
        if mine.itemsize == tuned.itemsize and fingerprint_like(model, recorded, tuned) == recorded:
            return
    fingerprint = fingerprint_like(model, expected, dtype)
    if fingerprint != expected:
        cast = "" if dtype == tuned else (
            f", or a {_dtype_name(mine)} copy of it made by another route, which rounds otherwise: cast the tuned "
            f"base ({_dtype_name(tuned)}) to {_dtype_name(mine)}")
        raise CheckpointError(f"{directory} holds adapters tuned on another base model{cast} (fingerprint "
                              f"{expected} in {_dtype_name(dtype)}, this model's {fingerprint}): load the checkpoint "
                              "they were tuned on")


@torch.no_grad()
def load_adapters(directory: str | os.PathLike, targets: dict[str, torch.Tensor], config: dict) -> None:
    """Copy saved adapters into `targets` (name -> parameter), after checking that the saved set-up equals
    `config` and that names and shapes match; every difference is named."""
    directory = Path(directory)
    saved = read_config(directory)
    differs = [f"{key} saved {saved.get(key)!r} here {value!r}" for key, value in config.items() if saved.get(key) != value]
    if differs:
        raise CheckpointError(f"{directory} holds adapters for another set-up: {', '.join(differs)}")
    try:
        tensors = load_file(str(directory / ADAPTERS_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} holds no adapters ({ADAPTERS_FILE} missing)") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{directory / ADAPTERS_FILE} is not a readable safetensors file: {err}") from None
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    misshaped = [f"{n} {list(tensors[n].shape)} (expected {list(targets[n].shape)})"
                 for n in sorted(set(targets) & set(tensors)) if tensors[n].shape != targets[n].shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{directory / ADAPTERS_FILE} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, mis-shaped {misshaped[:5]}")
    for name, target in targets.items():
        target.copy_(tensors[name])
