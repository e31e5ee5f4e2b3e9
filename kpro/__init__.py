"""kpro: fused kernels and training methods for post-pretraining LLaMA models."""
from . import bitune, expansion, internalize, lora, ops, train
from .bitune import Bitune
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import ConfigError, LlamaConfig
from .convert import from_gguf
from .expansion import expand, train_only
from .generation import generate
from .internalize import fit_internalization
from .model import KVCache, Llama
from .tokenizer import CharTokenizer, JsonTokenizer, SymbolTokenizer, Tokenizer, load_tokenizer, pad_left

# `kpro.instruct` was Bitune's instruction-tuning module before Bitune became one package; every name it
# had is in kpro.bitune, so the old name stays an alias of it.
instruct = bitune

__version__ = "0.1.0"

__all__ = [
    "Bitune", "CharTokenizer", "CheckpointError", "ConfigError", "JsonTokenizer", "KVCache", "Llama", "LlamaConfig",
    "SymbolTokenizer", "Tokenizer", "bitune", "expand", "expansion", "fit_internalization", "from_gguf", "generate",
    "instruct", "internalize",
    "load_pretrained", "load_tokenizer", "lora", "ops", "pad_left", "save_pretrained", "train", "train_only",
]
