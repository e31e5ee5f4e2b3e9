"""LlamaConfig: both config.json forms, defaults that follow Hugging Face, and errors that name the field."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import kpro
from kpro import ConfigError, LlamaConfig

# Llama 3.1 8B's config.json, classic form (values as published).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def test_classic_llama31_config():
    cfg = LlamaConfig.from_hf(LLAMA31_8B)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.kv_groups) == (128, 8, 4)
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg.eos_token_ids == [128001, 128008, 128009]
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


def test_rope_parameters_form_equals_classic_form():
    newer = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    newer["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert LlamaConfig.from_hf(newer) == LlamaConfig.from_hf(LLAMA31_8B)
    plain = dict(newer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = LlamaConfig.from_hf(plain)
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0


def test_hf_defaults_for_absent_fields(tmp_path):
    minimal = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32}
    (tmp_path / "config.json").write_text(json.dumps(minimal))
    cfg = LlamaConfig.from_hf(tmp_path)  # a directory works as well as the file
    assert cfg == LlamaConfig.from_hf(tmp_path / "config.json")
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps) == (32, 128, 10000.0, 1e-6)
    assert (cfg.tie_word_embeddings, cfg.bos_token_id, cfg.eos_token_id) == (False, 1, 2)


def test_legacy_linear_type_key():
    cfg = LlamaConfig.from_hf(dict(LLAMA31_8B, rope_scaling={"type": "linear", "factor": 4.0}))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_swish_is_silus_other_name():
    """transformers' ACT2FN maps hidden_act "swish" to nn.SiLU, as kpro.integrations.hf does; from_hf refused it."""
    assert LlamaConfig.from_hf(dict(LLAMA31_8B, hidden_act="swish"), strict=True) == LlamaConfig.from_hf(LLAMA31_8B)


def test_mistral_without_sliding_window_is_llama():
    cfg = LlamaConfig.from_hf(dict(LLAMA31_8B, model_type="mistral", architectures=["MistralForCausalLM"],
                                   sliding_window=None))
    assert cfg.hidden_size == 4096


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "misses"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta": 1}}, "unsupported field.*beta"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "factor must be a positive"),
    # json reads Infinity: every inverse frequency 0, a model without positions
    ({"rope_scaling": {"rope_type": "linear", "factor": math.inf}}, "factor must be a positive finite number, got inf"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192.5}}, "must be a whole number of positions, got 8192.5"),
    # transformers 5 writes partial_rotary_factor into rope_parameters
    ({"rope_scaling": None, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "unsupported rope_parameters.partial_rotary_factor=0.5"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope"}}, "rope_type='longrope'"),
    ({"rope_parameters": {"rope_type": "default"}}, "both rope_parameters and rope_scaling"),
    ({"partial_rotary_factor": 0.5}, "unsupported partial_rotary_factor=0.5"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"hidden_size": 4097}, "not divisible"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be a positive integer"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive"),
    ({"eos_token_id": [128001, 999999]}, "eos_token_id=999999"),
])
def test_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf(dict(LLAMA31_8B, **change))


def test_a_neutral_partial_rotary_factor_inside_rope_parameters_is_accepted():
    """transformers 5.25 writes LlamaConfig(partial_rotary_factor=1.0) as rope_parameters = {rope_theta,
    partial_rotary_factor, rope_type}: it was refused as a parameter rope_type 'default' does not take."""
    newer = {key: value for key, value in LLAMA31_8B.items() if key not in ("rope_scaling", "rope_theta")}
    cfg = LlamaConfig.from_hf(dict(newer, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                                           "rope_type": "default"}))
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None


def test_unknown_fields_can_be_ignored_on_request():
    cfg = LlamaConfig.from_hf(dict(LLAMA31_8B, some_future_field=3), strict=False)
    assert cfg.hidden_size == 4096


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


def test_config_json_is_read_as_utf8_and_other_bytes_are_named(tmp_path):
    """config.json was read in the locale's encoding, and a file that did not decode raised a bare
    UnicodeDecodeError naming no file."""
    raw = json.dumps(dict(LLAMA31_8B, _name_or_path="Caf\u00e9"), ensure_ascii=False)
    (tmp_path / "config.json").write_bytes(raw.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config.json is not UTF-8 text, as JSON must be \('utf-8' codec"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_bytes(raw.encode("utf-8"))
    # Under an ASCII locale (no UTF-8 mode, no coercion): the locale's encoding refused the é before
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = f"import kpro; print(kpro.LlamaConfig.from_hf({str(tmp_path)!r}).hidden_size)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "4096", done.stderr[-500:]


def test_to_hf_is_a_loadable_llama_config():
    out = LlamaConfig.from_hf(LLAMA31_8B).to_hf()
    assert out["architectures"] == ["LlamaForCausalLM"] and out["model_type"] == "llama"
    assert out["rope_scaling"]["rope_type"] == "llama3" and out["rope_theta"] == 500000.0
    assert "pad_token_id" not in out
    assert kpro.LlamaConfig.from_hf(out) == LlamaConfig.from_hf(LLAMA31_8B)


def test_a_missing_required_field_and_conflicting_rope_theta_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in LLAMA31_8B.items() if k != "vocab_size"}))
    with pytest.raises(ConfigError, match=r"config.json: missing required field\(s\) vocab_size"):
        LlamaConfig.from_hf(tmp_path)
    both = dict(LLAMA31_8B, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    del both["rope_scaling"]
    with pytest.raises(ConfigError, match="rope_theta=500000.0 and rope_parameters.rope_theta=10000.0 disagree"):
        LlamaConfig.from_hf(both)
    same = dict(both, rope_theta=10000.0)
    assert LlamaConfig.from_hf(same).rope_theta == 10000.0


def test_save_writes_config_json_atomically(tmp_path):
    cfg = LlamaConfig.from_hf(LLAMA31_8B)
    cfg.save(tmp_path)
    cfg.replace(num_hidden_layers=2).save(tmp_path / "config.json")
    assert LlamaConfig.from_hf(tmp_path).num_hidden_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind
    # "newdir/" was written as a file named newdir, read back as nothing's config.json
    cfg.save(f"{tmp_path}/new/dir/")
    assert LlamaConfig.from_hf(tmp_path / "new" / "dir") == cfg
    cfg.save(tmp_path / "other.json")
    assert LlamaConfig.from_hf(tmp_path / "other.json") == cfg
    with pytest.raises(ValueError, match=r"cannot save the config to .*model: it does not exist and is no \.json file "
                                         r"name; pass a directory that exists"):
        cfg.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_save_into_a_missing_folder_names_that_folder_not_the_temporary(tmp_path):
    # the FileNotFoundError named '.c.json.tmp-<pid>', a file the user never named
    cfg = LlamaConfig.from_hf(LLAMA31_8B)
    with pytest.raises(FileNotFoundError, match=rf"cannot save the config to .*c\.json: its folder "
                                                rf"{re.escape(str(tmp_path / 'missing'))} does not exist") as caught:
        cfg.save(tmp_path / "missing" / "c.json")
    assert ".tmp-" not in str(caught.value)
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match=rf"its folder {re.escape(str(tmp_path / 'afile'))} is not a directory"):
        cfg.save(tmp_path / "afile" / "c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_replace_derives_head_dim_and_kv_heads_again_unless_they_were_set_apart():
    mha = LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    wider = mha.replace(hidden_size=64)
    assert (wider.head_dim, wider.num_key_value_heads) == (16, 4)
    assert mha.replace(num_attention_heads=8).num_key_value_heads == 8 and mha.replace(num_attention_heads=8).head_dim == 4
    assert mha.replace(hidden_size=64, head_dim=8).head_dim == 8  # given: kept
    gqa = LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)  # head_dim set apart from hidden_size / heads
    assert (gqa.replace(hidden_size=64).head_dim, gqa.replace(num_attention_heads=8).num_key_value_heads) == (16, 2)


def test_a_mistral_config_silent_on_window_and_kv_heads_means_transformers_mistral_defaults():
    # transformers' MistralConfig reads an absent sliding_window as 4,096 (a window the logits depend on past
    # 4,096 tokens), absent num_key_value_heads as 8 and absent max_position_embeddings as 131,072.
    left_out = ("rope_scaling", "num_key_value_heads", "max_position_embeddings")
    mistral = {k: v for k, v in LLAMA31_8B.items() if k not in left_out}
    mistral.update(model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ConfigError, match=r"sliding_window=4096 \(transformers' default for model_type 'mistral': "
                                          r"config.json has no sliding_window\)"):
        LlamaConfig.from_hf(mistral)
    with pytest.raises(ConfigError, match=r"sliding_window=4096 \(transformers' default"):  # the architecture says it
        LlamaConfig.from_hf({k: v for k, v in mistral.items() if k != "model_type"})
    with pytest.raises(ConfigError, match=r"unsupported sliding_window=4096:"):  # no shorter than 131,072 positions
        LlamaConfig.from_hf(dict(mistral, sliding_window=4096))
    cfg = LlamaConfig.from_hf(dict(mistral, sliding_window=None))
    assert (cfg.num_key_value_heads, cfg.max_position_embeddings) == (8, 131072)
    assert LlamaConfig.from_hf(dict(mistral, sliding_window=None, num_key_value_heads=None)).num_key_value_heads == 32
    llama = {k: v for k, v in mistral.items() if k not in ("model_type", "architectures")}
    assert LlamaConfig.from_hf(llama).num_key_value_heads == 32  # LLaMA's defaults stay LLaMA's


def test_a_window_next_to_a_bad_max_position_embeddings_names_that_field_and_the_file(tmp_path):
    # the window is compared with max_position_embeddings before the fields are checked: a null one raised a bare
    # TypeError (also for any Mistral config, where a window of 4,096 is implied), not naming the field or the file
    message = r"max_position_embeddings must be a positive integer, got None"
    for extra in ({"sliding_window": 4096}, {"attention_chunk_size": 8192}, {"sliding_window": None},
                  {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}):
        with pytest.raises(ConfigError, match=message):
            LlamaConfig.from_hf(dict(LLAMA31_8B, max_position_embeddings=None, **extra))
    with pytest.raises(ConfigError, match=r"max_position_embeddings must be a positive integer, got '4096'"):
        LlamaConfig.from_hf(dict(LLAMA31_8B, max_position_embeddings="4096", sliding_window=4096))
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA31_8B, model_type="mistral",
                                                          max_position_embeddings=None)))
    with pytest.raises(ConfigError, match=r"config.json: " + message):
        LlamaConfig.from_hf(tmp_path)


def test_a_top_level_original_max_position_embeddings_is_the_one_transformers_gives_llama3():
    # transformers lets it override rope_scaling's for llama3 RoPE (and fill it in where that has none):
    # read as such, and refused where the two disagree; other rope types do not read it.
    scaling = {k: v for k, v in LLAMA31_8B["rope_scaling"].items() if k != "original_max_position_embeddings"}
    cfg = LlamaConfig.from_hf(dict(LLAMA31_8B, rope_scaling=scaling, original_max_position_embeddings=8192), strict=True)
    assert cfg == LlamaConfig.from_hf(LLAMA31_8B)
    assert LlamaConfig.from_hf(dict(LLAMA31_8B, original_max_position_embeddings=8192), strict=True) == cfg
    with pytest.raises(ConfigError, match=r"original_max_position_embeddings=4096 and "
                                          r"rope_scaling.original_max_position_embeddings=8192 disagree"):
        LlamaConfig.from_hf(dict(LLAMA31_8B, original_max_position_embeddings=4096))
    linear = dict(LLAMA31_8B, rope_scaling={"rope_type": "linear", "factor": 2.0}, original_max_position_embeddings=4096)
    assert LlamaConfig.from_hf(linear, strict=True).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_generation_config_eos_ids_are_all_read(tmp_path):
    """The tests wrote one-id lists: reading only the first eos id of generation_config.json (Qwen2.5 Instruct
    lists two) passed them."""
    from kpro.config import generation_eos_ids
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    assert generation_eos_ids(tmp_path, 152064) == [151645, 151643]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 151643}')
    assert generation_eos_ids(tmp_path, 152064) == [151643]


def test_a_list_of_eos_ids_is_the_configs_own_and_does_not_change_in_place(tmp_path):
    """The config kept the caller's list: the caller's later change, an append to config.eos_token_id, or one to a
    config made by replace() or from_hf(dict) changed the config (and its twin) without validate(), and save()
    wrote ids past the vocabulary that no load took back."""
    import copy
    import pickle

    import torch
    eos = [2, 3]
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, eos_token_id=eos)
    eos.append(999)
    assert config.eos_token_id == [2, 3] and config.eos_token_ids == [2, 3]
    with pytest.raises(TypeError, match=r"a LlamaConfig's eos_token_id does not change in place: make a new config "
                                        r"with config.replace\(eos_token_id=\[...\]\)"):
        config.eos_token_id.append(-7)
    for change in (lambda ids: ids.__setitem__(0, 5), lambda ids: ids.extend([4]), lambda ids: ids.pop(),
                   lambda ids: ids.__iadd__([4]), lambda ids: ids.sort(), lambda ids: ids.__init__([7])):
        with pytest.raises(TypeError, match="does not change in place"):
            change(config.eos_token_id)
    assert config.eos_token_id == [2, 3]
    twin = config.replace(rope_theta=500000.0)
    assert twin.eos_token_id == [2, 3]
    raw = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "eos_token_id": [2, 3]}
    read = LlamaConfig.from_hf(raw)
    raw["eos_token_id"].append(7)
    assert read.eos_token_id == [2, 3]
    for again in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config), copy.copy(config)):
        assert again == config
        with pytest.raises(TypeError, match="does not change in place"):
            again.eos_token_id.append(4)
    config.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [2, 3]
    assert LlamaConfig.from_hf(tmp_path / "config.json") == config
    torch.save({"eos": config.eos_token_id}, tmp_path / "state.pt")  # a callback's state holding it
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"eos": [2, 3]}
    assert list(config.eos_token_id) + [4] == [2, 3, 4]  # a plain list to change


# Mutation round 12
def test_a_legacy_type_llama3_takes_the_top_level_original_context():
    """transformers reads rope_scaling's legacy "type" as rope_type: a top-level
    original_max_position_embeddings fills in a {"type": "llama3"} scaling too."""
    from kpro.config import LlamaConfig
    scaling = {("type" if k == "rope_type" else k): v for k, v in LLAMA31_8B["rope_scaling"].items()
               if k != "original_max_position_embeddings"}
    cfg = LlamaConfig.from_hf(dict(LLAMA31_8B, rope_scaling=scaling, original_max_position_embeddings=8192))
    assert cfg == LlamaConfig.from_hf(LLAMA31_8B)


# Mutation round 12
def test_llama3_high_freq_factor_equal_to_low_is_refused():
    """llama3 RoPE smooths by (context / wavelength - low) / (high - low): equal factors divide by zero."""
    from kpro.config import ConfigError, LlamaConfig
    scaling = dict(LLAMA31_8B["rope_scaling"], low_freq_factor=4.0, high_freq_factor=4.0)
    with pytest.raises(ConfigError, match="high_freq_factor must be greater than low_freq_factor"):
        LlamaConfig.from_hf(dict(LLAMA31_8B, rope_scaling=scaling))
