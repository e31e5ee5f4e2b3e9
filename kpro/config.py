"""LlamaConfig: the shape of a LLaMA model, read from and written to a Hugging Face `config.json`.

Every field of a published config.json falls under one rule:
- a field kpro reads (hidden_size, rope_scaling, ...) is understood;
- book-keeping (`_METADATA_KEYS`: transformers_version, torch_dtype, use_cache, is_llama_config, ...) is
  accepted: it does not change the forward math;
- a field that changes the math (`_MATH_FIELDS`) is accepted at its neutral value (rope_interleaved false,
  sliding_window null or no shorter than the context, attention_bias false, ...) and refused by name at any
  other: kpro never runs a silently different model;
- any other field is unknown: one warning by default, an error with strict=True.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from ._files import write_atomic


class ConfigError(ValueError):
    """A config.json that kpro cannot represent faithfully."""


class ConfigWarning(UserWarning):
    """A config.json field kpro does not know (ignored; strict=True refuses it)."""


ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
MODEL_TYPES = {"llama", "mistral"}
ROPE_TYPES = {"default", "linear", "llama3"}

# Book-keeping keys that Hugging Face writes into config.json; none of them changes the forward math.
_METADATA_KEYS = {
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "id2label", "label2id", "problem_type", "finetuning_task",
    "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "quantization_config_unused",
    # written by other tools: nanotron's marker, transformers.js's runtime options, hub book-keeping,
    # the attention backend transformers should pick
    "is_llama_config", "transformers.js_config", "_commit_hash", "_from_model_config", "attn_implementation",
    "_attn_implementation", "_attn_implementation_autoset",
}


# Hugging Face's MistralConfig defaults where they differ from LlamaConfig's: a Mistral config.json that leaves
# these out means a 4,096-token sliding window, 8 key/value heads and 131,072 positions (an explicit null
# sliding_window or num_key_value_heads means none, or as many as the query heads, as for LLaMA).
_MODEL_TYPE_DEFAULTS = {
    "mistral": {"sliding_window": 4096, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32},
}


def _model_type(raw: dict) -> str:
    """The config's model type; without one, the architecture's (Hugging Face's MistralForCausalLM reads Mistral's
    defaults), else LLaMA."""
    if "model_type" in raw:
        return raw["model_type"]
    return "mistral" if "MistralForCausalLM" in (raw.get("architectures") or []) else "llama"


def _not_binding_window(window, raw: dict) -> bool:
    """A sliding window changes nothing if there is none, or it is no shorter than the context."""
    if window is None:
        return True
    context = raw.get("max_position_embeddings", 2048)
    if not _is_int(context) or context <= 0:  # checked here, before validate(): compared, it raised a bare TypeError
        raise ConfigError(f"max_position_embeddings must be a positive integer, got {context!r}")
    return isinstance(window, int) and window >= context


def _positive_int(value, raw: dict) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# transformers' names of the MLP's activation x * sigmoid(x): its ACT2FN maps both to nn.SiLU
SILU_NAMES = ("silu", "swish")

# Fields that change the math: (is the value neutral?, what kpro implements). Any other value is refused.
_MATH_FIELDS = {
    "hidden_act": (lambda v, raw: v in SILU_NAMES, "'silu' (or its other name 'swish') only"),
    "attention_bias": (lambda v, raw: v is False, "no attention biases"),
    "mlp_bias": (lambda v, raw: v is False, "no MLP biases"),
    "attention_dropout": (lambda v, raw: v == 0, "no attention dropout"),
    "sliding_window": (_not_binding_window, "full attention (a window no shorter than max_position_embeddings, or null)"),
    "use_sliding_window": (lambda v, raw: v is False, "full attention"),
    # LLaMA's forward ignores it, but transformers' generate keeps only that many keys in its cache.
    "attention_chunk_size": (_not_binding_window,
                             "full attention (a chunk no shorter than max_position_embeddings, or null)"),
    "rope_interleaved": (lambda v, raw: v is False, "RoPE in the rotate-half layout (rope_interleaved false)"),
    "partial_rotary_factor": (lambda v, raw: v == 1, "RoPE on the whole head (partial_rotary_factor 1)"),
    # Hugging Face splits the projections into this many slices and adds the partial products: the same sums.
    "pretraining_tp": (_positive_int, "a positive integer"),
    # One entry per block, as transformers requires (an expansion that left it short was refused there only).
    "layer_types": (lambda v, raw: isinstance(v, list) and all(t == "full_attention" for t in v)
                    and len(v) == raw.get("num_hidden_layers"), "full attention in every layer, one entry per block"),
    "quantization_config": (lambda v, raw: v is None, "unquantised checkpoints"),
    "qk_layer_norms": (lambda v, raw: v is False, "no query/key norms"),
    "use_qk_norm": (lambda v, raw: v is False, "no query/key norms"),
    "final_logit_softcapping": (lambda v, raw: v is None, "no logit soft-capping"),
    "attn_logit_softcapping": (lambda v, raw: v is None, "no logit soft-capping"),
}


class _ReadOnlyDict(dict):
    """A config's rope_scaling: changed in place, it would be saved and not run (the model's RoPE table is built
    from it once). Copies and pickles stay read-only; `dict(...)` of it is a plain dict to change."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a LlamaConfig's rope_scaling does not change in place: make a new config with "
                        "config.replace(rope_scaling={...})")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __init__(self, *args, **kwargs):
        if getattr(self, "_made", False):  # dict.__init__ called again updates it in place
            self._refuse()
        super().__init__(*args, **kwargs)
        self._made = True

    def __reduce__(self):
        return _ReadOnlyDict, (dict(self),)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self  # its values are numbers and strings


class _ReadOnlyList(list):
    """A config's list of eos ids (Llama 3's): held as a copy of the caller's list, and refusing changes in place,
    which would be saved unchecked (validate() runs when a config is made). Equal to the list; copies and pickles
    stay read-only; `list(...)` of it is a plain list to change."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a LlamaConfig's eos_token_id does not change in place: make a new config with "
                        "config.replace(eos_token_id=[...])")

    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse

    def __init__(self, items=()):
        if getattr(self, "_made", False):  # list.__init__ called again refills it in place
            self._refuse()
        super().__init__(items)
        self._made = True

    def __reduce__(self):
        return _ReadOnlyList, (list(self),)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self  # its items are integers


@dataclasses.dataclass
class LlamaConfig:
    """Model shape. Field names and defaults follow Hugging Face's `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if not _is_int(self.hidden_size) or not _is_int(self.num_attention_heads) or self.num_attention_heads <= 0:
                raise ConfigError("hidden_size and num_attention_heads must be positive integers")
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        scaling = _normalise_rope_scaling(self.rope_scaling)
        object.__setattr__(self, "rope_scaling", None if scaling is None else _ReadOnlyDict(scaling))
        if isinstance(self.eos_token_id, list):  # a copy: the caller's list stays the caller's
            object.__setattr__(self, "eos_token_id", _ReadOnlyList(self.eos_token_id))
        self.validate()
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name, value):
        # A model builds its RoPE tables and norms from its config once: a field changed in place would be
        # saved with the model and not run by it. A new config, given to the model whole, is applied.
        if getattr(self, "_built", False):
            raise AttributeError(f"a LlamaConfig does not change in place ({name}): make a new one with "
                                 f"config.replace({name}=...), and give it to a model with model.config = ...")
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "pad_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size)
        for token in self.eos_token_ids:
            _check_token_id("eos_token_id", token, self.vocab_size)

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (Llama 3 checkpoints list several)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict, *, strict: bool = False) -> "LlamaConfig":
        """Read a Hugging Face LLaMA config: a dict, a `config.json` path, or a directory holding one.

        Both the classic form (`rope_theta` + `rope_scaling`) and the newer `rope_parameters` form are
        understood. A field kpro does not know gives one ConfigWarning (naming all of them) and is ignored;
        with `strict=True` it is refused. Fields that change the math are refused at any value kpro does not
        implement, strict or not.
        """
        where = "" if isinstance(source, dict) else f"{_config_path(source)}: "
        raw = _read_source(source)  # its errors name the file already
        try:
            cfg, unknown = cls._from_raw(raw, strict)
        except ConfigError as err:
            if isinstance(source, dict):
                raise
            raise ConfigError(f"{where}{err}") from None
        if unknown:
            warnings.warn(f"{where}unknown config field(s) {', '.join(unknown)} ignored: kpro does not know what they "
                          "change (strict=True refuses them)", ConfigWarning, stacklevel=2)
        return cfg

    @classmethod
    def _from_raw(cls, raw: dict, strict: bool) -> tuple["LlamaConfig", list[str]]:
        fields = {f.name for f in dataclasses.fields(cls)}
        _check_architecture(raw)
        defaults = _MODEL_TYPE_DEFAULTS.get(_model_type(raw), {})
        implied = {key: value for key, value in defaults.items() if key not in raw}
        raw = {**raw, **implied}  # what transformers reads where the file is silent
        for key, (neutral, implemented) in _MATH_FIELDS.items():
            if key in raw and not neutral(raw[key], raw):
                why = f" (transformers' default for model_type {_model_type(raw)!r}: config.json has no {key})" \
                    if key in implied else ""
                raise ConfigError(f"unsupported {key}={raw[key]!r}{why}: kpro implements {implemented}")
        unknown = sorted(set(raw) - fields - _METADATA_KEYS - set(_MATH_FIELDS)
                         - {"rope_parameters", "original_max_position_embeddings"})
        if unknown and strict:
            raise ConfigError(
                f"unknown config field(s) {', '.join(unknown)}: kpro does not know what they change "
                "(strict=False ignores them, with a warning)")
        kwargs = {key: value for key, value in raw.items() if key in fields}
        if "rope_parameters" in raw:
            if "rope_scaling" in raw and raw["rope_scaling"] is not None:
                raise ConfigError("config has both rope_parameters and rope_scaling; expected one of them")
            theta, scaling = _split_rope_parameters(raw["rope_parameters"])
            if theta is not None:
                if "rope_theta" in raw and raw["rope_theta"] != theta:
                    raise ConfigError(f"rope_theta={raw['rope_theta']!r} and rope_parameters.rope_theta={theta!r} "
                                      "disagree; keep one of them")
                kwargs["rope_theta"] = theta
            kwargs["rope_scaling"] = scaling
        if "original_max_position_embeddings" in raw:
            kwargs["rope_scaling"] = _top_level_original_context(raw["original_max_position_embeddings"],
                                                                 kwargs.get("rope_scaling"))
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in kwargs]
        if missing:
            raise ConfigError(f"missing required field(s) {', '.join(missing)}")
        return cls(**kwargs), unknown

    def to_hf(self) -> dict[str, Any]:
        """The config as a Hugging Face `config.json` dict (classic rope_theta + rope_scaling form)."""
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
               "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
        out.update(dataclasses.asdict(self))
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        if out["pad_token_id"] is None:
            del out["pad_token_id"]
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json atomically (temporary file, rename): into a directory (`config.json` inside it; a
        path ending in a separator is one, made if missing), or to a file (that exists, or a new `.json` name)."""
        as_directory = os.fspath(path).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
        path = Path(path)
        if as_directory:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists() and path.suffix != ".json":  # "out/model" meant as a directory became a file
            raise ValueError(f"cannot save the config to {path}: it does not exist and is no .json file name; pass a "
                             f"directory that exists (config.json goes inside), one ending in {os.sep!r} (made), or "
                             "a .json file")
        target = path / "config.json" if path.is_dir() else path
        folder = target.parent
        if not folder.is_dir():  # else the error names the temporary file written beside the target
            if folder.exists():
                raise NotADirectoryError(f"cannot save the config to {target}: its folder {folder} is not a directory")
            raise FileNotFoundError(f"cannot save the config to {target}: its folder {folder} does not exist; make it "
                                    f"first (a path ending in {os.sep!r} is a directory, made if missing)")
        write_atomic(target, json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with `changes`. The fields derived when left out follow the fields they derive from: a
        head_dim of hidden_size // num_attention_heads, or num_key_value_heads equal to num_attention_heads
        (multi-head attention), is derived again from the new values unless given."""
        if {"hidden_size", "num_attention_heads"} & set(changes) and "head_dim" not in changes \
                and self.head_dim == self.hidden_size // self.num_attention_heads:
            changes["head_dim"] = None
        if "num_attention_heads" in changes and "num_key_value_heads" not in changes \
                and self.num_key_value_heads == self.num_attention_heads:
            changes["num_key_value_heads"] = None
        return dataclasses.replace(self, **changes)


def generation_eos_ids(directory: str | os.PathLike, vocab_size: int) -> list[int] | None:
    """The eos ids of the checkpoint's `generation_config.json` (where transformers' generate takes its stop
    tokens: Qwen2.5 Instruct lists one more than its config.json), or None: no such file, or no eos in it."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if eos is None:
        return None
    ids = list(eos) if isinstance(eos, list) else [eos]
    for token in ids:
        _check_token_id(f"{path}: eos_token_id", token, vocab_size)
    return ids


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token_id(name: str, value, vocab_size: int) -> None:
    if value is not None and (not _is_int(value) or not 0 <= value < vocab_size):
        raise ConfigError(f"{name}={value!r} is not a token id in [0, vocab_size={vocab_size})")


def _config_path(source) -> Path:
    path = Path(source)
    return path / "config.json" if path.is_dir() else path


def _read_source(source) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale's encoding
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text, as JSON must be ({err}): save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return raw


def _check_architecture(raw: dict) -> None:
    model_type = _model_type(raw)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unsupported model_type={model_type!r}: kpro implements {sorted(MODEL_TYPES)}")
    for arch in raw.get("architectures") or []:
        if arch not in ARCHITECTURES:
            raise ConfigError(f"unsupported architectures entry {arch!r}: kpro implements {sorted(ARCHITECTURES)}")


def _split_rope_parameters(params) -> tuple[float | None, dict | None]:
    """Newer configs nest rope_theta and the scaling into `rope_parameters`."""
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if "partial_rotary_factor" in params:  # transformers 5 writes it here, not at the top level
        factor = params.pop("partial_rotary_factor")
        neutral, implemented = _MATH_FIELDS["partial_rotary_factor"]
        if not neutral(factor, {}):
            raise ConfigError(f"unsupported rope_parameters.partial_rotary_factor={factor!r}: kpro implements "
                              f"{implemented}")
    return theta, (params or None)


def _top_level_original_context(value, scaling):
    """transformers gives a top-level original_max_position_embeddings (Phi-3's place for it) precedence over
    the one in a llama3 rope_scaling, and fills it in where that has none; other rope types do not read it."""
    if not isinstance(scaling, dict) or (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return scaling
    nested = scaling.get("original_max_position_embeddings")
    if nested is not None and nested != value:
        raise ConfigError(f"original_max_position_embeddings={value!r} and rope_scaling.original_max_position_embeddings="
                          f"{nested!r} disagree (transformers takes the top-level one); keep one of them")
    return {**scaling, "original_max_position_embeddings": value}


_SCALING_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def _normalise_rope_scaling(scaling) -> dict | None:
    """Validate rope_scaling and return it as {"rope_type": ..., <that type's parameters>} or None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None)
    legacy_type = scaling.pop("type", None)
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise ConfigError(f"rope_scaling has type={legacy_type!r} and rope_type={rope_type!r}")
    rope_type = rope_type or legacy_type or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope_scaling rope_type={rope_type!r}: kpro implements {sorted(ROPE_TYPES)}")
    if rope_type == "default":
        if scaling:
            raise ConfigError(f"rope_type 'default' takes no parameters, got {sorted(scaling)}")
        return None
    expected = _SCALING_KEYS[rope_type]
    missing, extra = expected - set(scaling), set(scaling) - expected
    if missing:
        raise ConfigError(f"rope_scaling of type {rope_type!r} misses {sorted(missing)}")
    if extra:
        raise ConfigError(f"rope_scaling of type {rope_type!r} has unsupported field(s) {sorted(extra)}")
    for key, value in scaling.items():
        # json reads Infinity: a factor of inf made every inverse frequency 0, a model without positions
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"rope_scaling {key} must be a positive finite number, got {value!r}")
    context = scaling.get("original_max_position_embeddings")
    if context is not None and not float(context).is_integer():
        raise ConfigError(f"rope_scaling original_max_position_embeddings must be a whole number of positions, got "
                          f"{context!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling high_freq_factor must be greater than low_freq_factor")
    return {"rope_type": rope_type, **scaling}
