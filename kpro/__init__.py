"""kpro: fused kernels and training methods for post-pretraining LLaMA models.

Names are imported on first use (PEP 562): `import kpro` costs nothing, and `python -m kpro --help` and
`info` start without torch. `kpro.Llama`, `from kpro import generate` and `kpro.ops` work as plain imports do.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each public name and the module that defines it.
_NAMES = {
    "Bitune": "bitune", "CheckpointError": "checkpoint", "load_pretrained": "checkpoint", "save_pretrained": "checkpoint",
    "ConfigError": "config", "LlamaConfig": "config", "from_gguf": "convert", "ResumeRefused": "errors",
    "expand": "expansion", "train_only": "expansion", "generate": "generation", "fit_internalization": "internalize",
    "KVCache": "model", "Llama": "model", "CharTokenizer": "tokenizer", "JsonTokenizer": "tokenizer",
    "SymbolTokenizer": "tokenizer", "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "pad_left": "tokenizer",
}

__version__ = "0.1.0"

__all__ = [
    "Bitune", "CharTokenizer", "CheckpointError", "ConfigError", "JsonTokenizer", "KVCache", "Llama", "LlamaConfig",
    "ResumeRefused", "SymbolTokenizer", "Tokenizer", "bitune", "expand", "expansion", "fit_internalization",
    "from_gguf", "generate", "instruct", "internalize", "load_pretrained", "load_tokenizer", "lora", "ops", "pad_left",
    "save_pretrained", "train", "train_only",
]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif not name.startswith("_"):  # a submodule: kpro.ops, kpro.train, kpro.generation, ...
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # a dependency of that module is missing: say so
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from . import bitune, expansion, internalize, lora, ops, train
    from .bitune import Bitune
    from .checkpoint import CheckpointError, load_pretrained, save_pretrained
    from .config import ConfigError, LlamaConfig
    from .errors import ResumeRefused
    from .convert import from_gguf
    from .expansion import expand, train_only
    from .generation import generate
    from .internalize import fit_internalization
    from .model import KVCache, Llama
    from .tokenizer import CharTokenizer, JsonTokenizer, SymbolTokenizer, Tokenizer, load_tokenizer, pad_left
