"""Published config.json files (tests/data/configs/, sources in its README) load, or are refused for a named,
real reason; and the field rules: metadata and neutral values accepted, math kpro lacks refused by name,
unknown fields one warning (an error under strict=True)."""
import json
import warnings
from pathlib import Path

import pytest

from kpro import ConfigError, LlamaConfig
from kpro.config import ConfigWarning

CONFIGS = Path(__file__).parent / "data" / "configs"

# file -> (hidden_size, layers, heads, kv heads, head_dim, rope type, tied) for those that load
LOADS = {
    "llama-2-7b-hf.json": (4096, 32, 32, 32, 128, None, False),
    "llama-3.1-8b.json": (4096, 32, 32, 8, 128, "llama3", False),
    "llama-3.1-8b-instruct.json": (4096, 32, 32, 8, 128, "llama3", False),
    "llama-3.2-1b.json": (2048, 16, 32, 8, 64, "llama3", True),
    "llama-3.2-3b.json": (3072, 28, 24, 8, 128, "llama3", True),
    "tinyllama-1.1b-chat-v1.0.json": (2048, 22, 32, 4, 64, None, False),
    "smollm2-135m.json": (576, 30, 9, 3, 64, None, True),
    "smollm2-1.7b-instruct.json": (2048, 24, 32, 32, 64, None, True),
    "mistral-7b-instruct-v0.3.json": (4096, 32, 32, 8, 128, None, False),
    "falcon3-7b-instruct.json": (3072, 28, 12, 4, 256, None, False),
}
REFUSED = {
    "mistral-7b-v0.1.json": r"unsupported sliding_window=4096",
    "dictalm2.0-instruct.json": r"unsupported sliding_window=4096",
    "qwen2.5-7b-instruct.json": r"unsupported model_type='qwen2'",
}


def test_every_fixture_is_covered_and_has_a_source():
    files = sorted(p.name for p in CONFIGS.glob("*.json"))
    assert len(files) >= 10 and sorted({**LOADS, **REFUSED}) == files
    readme = (CONFIGS / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in files)


@pytest.mark.parametrize("name", sorted(LOADS))
def test_published_config_loads_without_warnings_even_strict(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = LlamaConfig.from_hf(CONFIGS / name, strict=True)
    hidden, layers, heads, kv, head_dim, rope, tied = LOADS[name]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (hidden, layers, heads, kv, head_dim)
    assert (cfg.rope_scaling or {}).get("rope_type") == rope and cfg.tie_word_embeddings is tied
    raw = json.loads((CONFIGS / name).read_text())
    assert cfg.rope_theta == raw.get("rope_theta", 10000.0) and cfg.vocab_size == raw["vocab_size"]
    assert cfg.eos_token_ids == (raw["eos_token_id"] if isinstance(raw["eos_token_id"], list) else [raw["eos_token_id"]])
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_published_config_refused_by_name(name):
    with pytest.raises(ConfigError, match=REFUSED[name]) as err:
        LlamaConfig.from_hf(CONFIGS / name)
    assert name in str(err.value)  # the file is named too


SMOLLM2 = json.loads((CONFIGS / "smollm2-135m.json").read_text())


@pytest.mark.parametrize("field, value", [
    ("rope_interleaved", False), ("pretraining_tp", 1), ("pretraining_tp", 4), ("sliding_window", None),
    ("sliding_window", 8192), ("use_sliding_window", False), ("partial_rotary_factor", 1.0),
    ("layer_types", ["full_attention"] * 30), ("_name_or_path", "x/y"), ("transformers_version", "4.48.0"),
    ("torch_dtype", "float32"), ("dtype", "bfloat16"), ("use_cache", False), ("is_llama_config", True),
    ("attention_chunk_size", None), ("attention_chunk_size", 8192),
])
def test_metadata_and_neutral_values_are_accepted(field, value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LlamaConfig.from_hf({**SMOLLM2, field: value}, strict=True).hidden_size == 576


@pytest.mark.parametrize("field, value", [
    ("rope_interleaved", True), ("sliding_window", 4096), ("use_sliding_window", True),
    ("partial_rotary_factor", 0.5), ("layer_types", ["sliding_attention"] * 30), ("mlp_bias", True),
    ("quantization_config", {"quant_method": "gptq"}), ("pretraining_tp", 0),
    ("attention_chunk_size", 4096),  # transformers' generate would keep only the last 4,096 keys
    ("layer_types", ["full_attention"] * 29),  # not one per block: transformers refuses the config
])
def test_math_kpro_lacks_is_refused_by_name_even_when_not_strict(field, value):
    with pytest.raises(ConfigError, match=f"unsupported {field}="):
        LlamaConfig.from_hf({**SMOLLM2, field: value}, strict=False)


def test_unknown_field_warns_once_and_strict_refuses():
    raw = {**SMOLLM2, "some_future_field": 3, "another_one": "x"}
    with pytest.warns(ConfigWarning) as record:
        cfg = LlamaConfig.from_hf(raw)
    assert cfg.hidden_size == 576
    assert len(record) == 1 and "another_one, some_future_field" in str(record[0].message)
    with pytest.raises(ConfigError, match="unknown config field.*another_one, some_future_field"):
        LlamaConfig.from_hf(raw, strict=True)
