"""A llama.cpp LLaMA (GGUF, architecture `llama`) as a kpro model or an HF-layout checkpoint directory.

    model = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)   # in memory
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")                 # config.json, safetensors,
                                                                                # tokenizer files, chat template
What changes on the way:
- names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, ... (`_BLOCK_NAMES`);
- q/k rows: llama.cpp's converter permutes the rows of q_proj and k_proj within each head from the Hugging
  Face rotate-half order (first half of the rotary pairs, then the second) to interleaved pairs, for its
  RoPE; `unpermute` puts them back, so kpro's rotate-half RoPE applies unchanged;
- the config comes from the `llama.*` metadata, eos from the tokenizer ids (end-of-turn ids included);
- Llama 3.1-style RoPE factors (a `rope_freqs` tensor) become `rope_scaling` of type llama3 when they equal
  that formula for the file's parameters, and are refused otherwise.
Anything else kpro does not implement (another architecture, mixture of experts, biases, partial rotary
dimensions, a tensor it has no place for) is refused by name before anything is written.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from .._files import atomic_directory, naming_write_failures
from ..checkpoint import (CONFIG_NAME, GGUF_RECORD, INDEX_NAME, WEIGHTS_NAME, _plan_shards, _write_file,
                          check_finite_after_cast, checked_dtype, hf_tensors, is_weight_file, parse_size)
from ..config import ConfigError, LlamaConfig
from ..errors import listed
from ..model import Llama
from ..rope import rope_frequencies
from ..tokenizer import CHAT_TEMPLATE_FILES
from .gguf_file import GGUFError, GGUFFile
from .gguf_tokenizer import tokenizer_files

ARCHITECTURES = ("llama",)
RECORD_NAME = GGUF_RECORD  # what a directory was converted from (lets a later run reuse it); save_pretrained drops it

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")
# Tokens llama.cpp takes as an end of generation by their text alone (an end of turn the file names nowhere else:
# a ChatML model whose eos is <|endoftext|> stops at <|im_end|>): the converted model stops at them too.
END_TOKEN_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                             "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>"})
_ROPE_FREQS = "rope_freqs.weight"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ------------------------------------------------------------------------------------------ config

def gguf_config(source: str | os.PathLike | GGUFFile) -> LlamaConfig:
    """The LlamaConfig a GGUF file's metadata describes (refusing what kpro does not implement)."""
    file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    parts = _integer(file, "split.count", 1)
    if parts > 1:  # its tensors are spread over the other parts
        raise GGUFError(f"{file.path}: part {_integer(file, 'split.no', 0, minimum=0) + 1} of {parts} of a split GGUF model; merge the "
                        "parts into one file first (llama.cpp's `llama-gguf-split --merge FIRST_PART OUT.gguf`)")
    arch = file.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file.path}: architecture {arch!r} is not supported; kpro converts {', '.join(ARCHITECTURES)}")

    def get(key, default=None):
        return file.get(f"{arch}.{key}", default)

    def integer(key, default=None, minimum=1):
        return _integer(file, f"{arch}.{key}", default, minimum)

    def need(key, read=get):
        value = read(key)
        if value is None:
            raise GGUFError(f"{file.path}: metadata {arch}.{key} is missing")
        return value

    if get("expert_count", 0):
        raise GGUFError(f"{file.path}: a mixture of experts ({arch}.expert_count={get('expert_count')}) is not supported")
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if isinstance(get(key), list):
            raise GGUFError(f"{file.path}: per-layer {arch}.{key} values are not supported (kpro's blocks are all alike)")
    heads = need("attention.head_count", integer)
    hidden = need("embedding_length", integer)
    head_dim = integer("attention.key_length", hidden // heads)
    value_dim, rope_dims = integer("attention.value_length", head_dim), integer("rope.dimension_count", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{file.path}: key and value head sizes differ ({head_dim} and {value_dim})")
    if rope_dims != head_dim:
        taken = "" if get("attention.key_length") is not None else (
            f", taken as embedding_length / head_count since {arch}.attention.key_length is missing")
        raise GGUFError(f"{file.path}: RoPE on {rope_dims} of {head_dim} head dimensions{taken} "
                        "(partial rotary) is not supported")
    window = integer("attention.sliding_window", minimum=0)
    context = need("context_length", integer)  # llama.cpp requires it too: no default to invent a model's context
    if window and window < context:
        raise GGUFError(f"{file.path}: sliding-window attention ({arch}.attention.sliding_window={window}) is not supported")
    tokens = file.get("tokenizer.ggml.tokens")
    if tokens:
        vocab, counted = len(tokens), f"the vocabulary (tokenizer.ggml.tokens) has {len(tokens)} tokens"
    elif "token_embd.weight" in file.names:
        vocab = file.shape("token_embd.weight")[0]
        counted = f"token_embd.weight has {vocab} rows"
    else:
        vocab, counted = need("vocab_size", integer), ""
    if integer("vocab_size", vocab) != vocab:  # which one the model has cannot be told (llama.cpp takes the key)
        raise GGUFError(f"{file.path}: {arch}.vocab_size is {get('vocab_size')}, but {counted}; the metadata "
                        "contradicts itself")
    bos = file.get("tokenizer.ggml.bos_token_id")
    eos_ids = [file.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    # and, as llama.cpp ends generation there too, the tokens it knows as ends by their text
    eos_ids += [i for i, token in enumerate(tokens or ()) if token in END_TOKEN_TEXTS]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=need("feed_forward_length", integer),
        num_hidden_layers=need("block_count", integer), num_attention_heads=heads,
        num_key_value_heads=integer("attention.head_count_kv", heads), head_dim=head_dim,
        rms_norm_eps=need("attention.layer_norm_rms_epsilon"), rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(file, arch), max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in file.names, bos_token_id=bos,
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids or None),
        pad_token_id=file.get("tokenizer.ggml.padding_token_id"))
    try:
        cfg = LlamaConfig(**fields)
    except ConfigError as err:
        raise GGUFError(f"{file.path}: the metadata describes no valid LLaMA: {err}") from None
    if _ROPE_FREQS in file.names:
        if cfg.rope_scaling is not None:  # the factors would replace it silently
            raise GGUFError(f"{file.path}: both RoPE scaling metadata ({cfg.rope_scaling}) and per-frequency factors "
                            f"({_ROPE_FREQS}); kpro cannot apply both")
        cfg = cfg.replace(rope_scaling=_llama3_scaling_from_factors(file, cfg))
    return cfg


def _integer(file: GGUFFile, key: str, default=None, minimum: int = 1) -> int | None:
    """An integer metadata key (`default` where it is missing); another type, or a value below `minimum`, is
    refused by the key's name (a string "32" failed later as a bare TypeError)."""
    value = file.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise GGUFError(f"{file.path}: metadata {key} must be a {kind} integer, got {value!r}")
    return value


def _rope_scaling(file: GGUFFile, arch: str) -> dict | None:
    kind = file.get(f"{arch}.rope.scaling.type")
    factor = file.get(f"{arch}.rope.scaling.factor", file.get(f"{arch}.rope.scale_linear"))
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind == "none":
        raise GGUFError(f"{file.path}: RoPE scaling type 'none' with a factor of {factor}: which one holds is ambiguous")
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": factor}
    raise GGUFError(f"{file.path}: RoPE scaling type {kind!r} is not supported; kpro implements linear and llama3")


def _llama3_scaling_from_factors(file: GGUFFile, cfg: LlamaConfig) -> dict:
    """llama.cpp stores Llama 3.1's RoPE scaling as per-frequency factors (the tensor rope_freqs): the
    unscaled inverse frequency divided by the scaled one. kpro keeps the llama3 rope_scaling of the Hugging
    Face config, so the factors must be those of that formula; the parameters Meta published for Llama 3.1
    and 3.2 (low 1, high 4; the file's factor and original context) are checked against the file."""
    factors = file.tensor(_ROPE_FREQS).to(torch.float64)
    arch = file.get("general.architecture")
    original = file.get(f"{arch}.rope.scaling.original_context_length", 8192)
    plain = rope_frequencies(cfg.replace(rope_scaling=None))
    for low, high in ((1.0, 4.0),):
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": original}
        expected = plain / rope_frequencies(cfg.replace(rope_scaling=scaling))
        if factors.shape == expected.shape and torch.allclose(factors, expected, rtol=1e-5, atol=0):
            return scaling
    raise GGUFError(f"{file.path}: its per-frequency RoPE factors ({_ROPE_FREQS}) are not Llama 3's llama3 scaling "
                    "with any parameters kpro tried; they are not supported")


# ------------------------------------------------------------------------------------------ tensors

def unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, interleaved rotary pairs -> rotate-half halves."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def tensor_plan(file: GGUFFile, cfg: LlamaConfig) -> dict[str, str]:
    """Checkpoint tensor name -> GGUF tensor name, for every tensor the model needs; anything missing,
    unknown or mis-shaped is named in one error."""
    plan, unknown = {}, []
    for name in file.names:
        if name == _ROPE_FREQS:
            continue  # folded into the config's rope_scaling
        match = _BLOCK_RE.fullmatch(name)
        if match and match.group(2) in _BLOCK_NAMES:
            plan[f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"] = name
        elif name in _TOP_NAMES:
            plan[_TOP_NAMES[name]] = name
        else:
            unknown.append(name)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in hf_tensors(Llama(cfg)).items()}
    problems = []
    if unknown:
        problems.append(f"tensor(s) kpro's LLaMA has no place for (biases, experts, ...?): "
                        f"{listed(unknown, 8, ' ...')}")
    missing = sorted(set(expected) - set(plan))
    if missing:
        problems.append(f"missing tensor(s) {', '.join(missing[:8])}")
    extra = sorted(set(plan) - set(expected))
    if extra:
        problems.append(f"tensor(s) beyond the config's {cfg.num_hidden_layers} blocks: {', '.join(extra[:8])}")
    shapes = [f"{plan[n]} {list(file.shape(plan[n]))} (expected {list(expected[n])})" for n in sorted(set(plan) & set(expected))
              if file.shape(plan[n]) != expected[n]]
    if shapes:
        problems.append(f"mis-shaped tensor(s) {', '.join(shapes[:8])}")
    if problems:
        raise GGUFError(f"{file.path} does not hold the LLaMA its metadata describes:\n  " + "\n  ".join(problems))
    return {name: plan[name] for name in expected}


def load_tensor(file: GGUFFile, cfg: LlamaConfig, hf_name: str, gguf_name: str) -> torch.Tensor:
    """One checkpoint tensor in float32, dequantised, q/k rows in the Hugging Face order."""
    tensor = file.tensor(gguf_name)
    if hf_name.endswith("self_attn.q_proj.weight"):
        tensor = unpermute(tensor, cfg.num_attention_heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        tensor = unpermute(tensor, cfg.num_key_value_heads)
    return tensor


# ------------------------------------------------------------------------------------------ model

def _checked_dtype(dtype) -> torch.dtype:
    """float32, bfloat16, float16 or float64, or its name; anything else (integers, float8) is refused."""
    checked = checked_dtype(dtype)
    if checked is None:  # "auto" is load_pretrained's: a GGUF's quantised types have no torch dtype to keep
        raise ValueError("dtype 'auto' is not taken here: pass a floating dtype (from_gguf), or None for "
                         "convert_gguf's own choice (the file's float dtype)")
    return checked


def from_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A kpro.Llama with the weights of a GGUF file, dequantised to `dtype` on `device`, one tensor at a time.
    (Its tokenizer: convert_gguf writes one beside the weights.)"""
    dtype = _checked_dtype(dtype)
    file = GGUFFile(path)
    cfg = gguf_config(file)
    plan = tensor_plan(file, cfg)
    file.check_readable(plan.values())
    with torch.device("meta"):
        model = Llama(cfg)
    state = {}
    for hf_name, gguf_name in plan.items():
        key = hf_name.removeprefix("model.")
        stored = load_tensor(file, cfg, hf_name, gguf_name)
        state[key] = stored.to(device=device, dtype=dtype)
        check_finite_after_cast(stored, state[key], f"{path}: tensor {gguf_name}", GGUFError)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.reset(device=torch.device(device))
    return model


# ------------------------------------------------------------------------------------------ directory

def default_dtype(file: GGUFFile) -> torch.dtype:
    """bfloat16 or float16 when every weight matrix is stored so; otherwise float32, which holds the
    dequantised values of every quantised type exactly."""
    matrices = {file.type_name(n) for n in file.names if len(file.shape(n)) == 2}
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(matrices.pop() if len(matrices) == 1 else None, torch.float32)


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 max_shard_size: int | str = "5GB", progress=None) -> Path:
    """Write the GGUF file at `path` as an HF-layout directory `out`: config.json, safetensors (streamed, one
    tensor in memory at a time), the tokenizer (tokenizer.json, or tokenizer.model for a SentencePiece
    vocabulary) with tokenizer_config.json and the chat template, and kpro_gguf.json naming the source.

    The directory appears complete or not at all (a temporary directory swapped into place). An existing
    `out` is replaced only if an earlier conversion wrote it; files there that no conversion writes (notes,
    the GGUF file itself) are kept. `progress(done, total)` is called after each tensor is written."""
    dtype = None if dtype is None else _checked_dtype(dtype)
    file = GGUFFile(path)
    cfg = gguf_config(file)
    plan = tensor_plan(file, cfg)
    file.check_readable(plan.values())  # before anything is written
    dtype = default_dtype(file) if dtype is None else dtype
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(str(d) for d in _SAFETENSORS_DTYPES)}")
    tokenizer = tokenizer_files(file, cfg)  # refuses an unsupported vocabulary before anything is written
    out = Path(out)
    _check_replaceable(out)
    with atomic_directory(out, drop=_written_by_a_conversion) as tmp:
        hf_config = cfg.to_hf()
        hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        _write_file(tmp / CONFIG_NAME, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        _write_weights(file, cfg, plan, dtype, tmp, parse_size(max_shard_size), progress)
        for name, content in tokenizer.items():
            _write_file(tmp / name, content if isinstance(content, bytes) else content.encode())  # UTF-8, any locale
        _write_file(tmp / RECORD_NAME, json.dumps(conversion_record(file, dtype), indent=2) + "\n")
    return out


def conversion_record(file: GGUFFile, dtype: torch.dtype) -> dict:
    types = {}
    for name in file.names:
        types[file.type_name(name)] = types.get(file.type_name(name), 0) + 1
    return {"source": file.path.name, "source_bytes": file.path.stat().st_size, "name": file.get("general.name"),
            "architecture": file.get("general.architecture"), "tensor_types": types,
            "dtype": str(dtype).removeprefix("torch.")}


def _written_by_a_conversion(name: str) -> bool:
    """Files an earlier conversion may have left that this one replaces (a tokenizer.model where this one
    writes tokenizer.json, shards of another count)."""
    # transformers' save_pretrained of a converted folder writes the last five: kept, an old template or stop ids
    # would override the new model's (template files are read before tokenizer_config.json's templates)
    return is_weight_file(name) or name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", RECORD_NAME,
                                            *CHAT_TEMPLATE_FILES, "generation_config.json",
                                            "special_tokens_map.json", "added_tokens.json")


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD_NAME).is_file())):
        raise FileExistsError(f"{out} exists and was not written by convert-gguf; choose a new directory")


def _write_weights(file: GGUFFile, cfg: LlamaConfig, plan: dict, dtype: torch.dtype, out: Path, max_bytes: int,
                   progress=None) -> None:
    shapes = {name: file.shape(gguf_name) for name, gguf_name in plan.items()}
    with torch.device("meta"):
        sizes = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    shards = _plan_shards(sizes, max_bytes)

    written = 0

    def load(name):
        stored = load_tensor(file, cfg, name, plan[name])
        converted = stored.to(dtype)
        check_finite_after_cast(stored, converted, f"{file.path}: tensor {plan[name]}", GGUFError)
        return converted

    def tensor_written():
        nonlocal written
        written += 1
        if progress is not None:
            progress(written, len(plan))

    if len(shards) == 1:
        _write_safetensors(out / WEIGHTS_NAME, [(n, shapes[n]) for n in shards[0]], dtype, load, tensor_written)
        return
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / shard, [(n, shapes[n]) for n in names], dtype, load, tensor_written)
        for name in names:
            weight_map[name] = shard
            total += sizes[name].numel() * sizes[name].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_file(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_safetensors(path: Path, entries: list[tuple[str, tuple]], dtype: torch.dtype, load,
                       written=lambda: None) -> None:
    """A safetensors file written as it is produced: the header (every size is known from the shapes),
    then each tensor's bytes in turn, so only one tensor is ever in memory."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with naming_write_failures(path), open(path, "wb") as f:  # a full disk's OSError names no file
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            tensor = load(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise GGUFError(f"{name}: produced shape {list(tensor.shape)}, expected {list(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            written()
