"""Adapter files: the trained LoRA weights (and any method's extra tensors) without the base model.

A directory holds `adapters.safetensors` (tensor names as in the model's checkpoint,
`model.layers.{i}.self_attn.q_proj.<adapter>.lora_A.weight`, ...) and `adapter_config.json` (the set-up
needed to rebuild the adapters: method, rank, alpha, ...). Writes are atomic; every mismatch on load is
named.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import CheckpointError, atomic_directory

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA parameters of a kpro model by checkpoint-style name (`model.` prefix)."""
    return {f"model.{name}": p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def save_adapters(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write adapter tensors and their config, atomically replacing older adapter files there."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_directory(directory, drop=lambda name: name in (ADAPTERS_FILE, CONFIG_FILE)) as tmp:
        save_file(cpu, str(tmp / ADAPTERS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} holds no adapters ({CONFIG_FILE} missing)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


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
