"""A LLaMA written from scratch: pre-norm blocks of RoPE/GQA attention and a SwiGLU MLP.

Module and parameter names follow the Hugging Face layout (`layers.{i}.self_attn.q_proj`, ...), so a
checkpoint maps onto the model by adding the `model.` prefix. All math goes through `kpro.ops`.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from torch.serialization import add_safe_globals

from . import ops
from ._numbers import is_integer
from .config import LlamaConfig, _ReadOnlyDict, _ReadOnlyList
from .ops.backend import values_readable
from .rope import RotaryEmbedding, apply_rope


# A saved state holding a config's rope_scaling or eos ids loads under torch.load(weights_only=True). Registered
# here, not in kpro.config, which `python -m kpro info` reads without importing torch.
add_safe_globals([_ReadOnlyDict, _ReadOnlyList])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attention_mask=None, kv: "LayerKV | None" = None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.append(k, v)
        out = ops.attention(q, k, v, causal=True, attention_mask=attention_mask)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attention_mask=None, kv: "LayerKV | None" = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


def _naming_mixed_matrices(method):
    """`method` of a Llama, whose failure on matrices of several dtypes (a bfloat16 model given a float32 head:
    torch's "expected m1 and m2 to have the same dtype", naming no module) is raised as one naming them. Looked at
    only on the failure path: a forward pays nothing for it."""
    @functools.wraps(method)
    def checked(model, *args, **kwargs):
        try:
            return method(model, *args, **kwargs)
        except RuntimeError as err:
            mixed = mixed_matrix_dtypes(model) if "dtype" in str(err) or "scalar type" in str(err) else None
            if mixed is None:
                raise
            raise ValueError(mixed) from err
    return checked


def mixed_matrix_dtypes(model: "Llama") -> str | None:
    """What is wrong where `model`'s own matrices (the embedding, the blocks' projections, the head; not LoRA
    adapters, kept in float32 beside any base) are of several dtypes outside autocast, which would run the forward
    in one; None where they share one, or autocast is on (it casts them)."""
    matrices = [("embed_tokens", getattr(model, "embed_tokens", None))]  # generate takes a Llama's parts alone
    matrices += [(f"layers.{i}.{name}", module) for i, layer in enumerate(getattr(model, "layers", ()))
                 for name, module in layer.named_modules() if name.endswith("_proj")]  # a LoRALinear: its base
    first: dict[torch.dtype, str] = {}
    devices = set()
    for name, module in [*matrices, ("lm_head", getattr(model, "lm_head", None))]:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            first.setdefault(weight.dtype, f"{name}.weight")
            devices.add(weight.device.type)
    if len(first) < 2 or any(torch.is_autocast_enabled(device) for device in devices):
        return None
    held = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for dtype, name in first.items())
    return (f"the model's matrices are of several dtypes ({held}), and its forward computes in one: convert them "
            "to one (model.to(dtype); norms may stay float32), or run it under torch.autocast")


class Llama(nn.Module):
    """`model(input_ids, attention_mask=None) -> logits [B, T, vocab]`; attention_mask: 1 = real token.
    `model(input_ids, attention_mask, head=False)`: the normed hidden states the logits are made from."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if not isinstance(cfg, LlamaConfig):
            raise TypeError(f"Llama takes a kpro.LlamaConfig, got {type(cfg).__name__}: read a config.json or its "
                            "dict with kpro.LlamaConfig.from_hf, or load a checkpoint with kpro.load_pretrained")
        self._config = cfg
        # Built on the meta device, the model is to be filled from a checkpoint: no values to draw. (And on
        # meta, nn.init.normal_ runs a Python decomposition whose first call imports seconds of torch.)
        filled_later = torch.get_default_device().type == "meta"
        # padding_idx as in Hugging Face's LLaMA: the pad token's row gets no gradient from the lookup (it
        # matters where the pad id is a real token too, eos for SmolLM2-1.7B-Instruct) and starts at zero.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size) if filled_later else None)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)
        if not filled_later:
            self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # How each block runs: None (plain calls), or one function per block, `run(block, x, cos, sin,
        # attention_mask, kv) -> x`; kpro.train_only sets them to skip gradient work in frozen blocks.
        self.block_runners: tuple | None = None

    @property
    def config(self) -> LlamaConfig:
        return self._config

    @config.setter
    def config(self, cfg: LlamaConfig) -> None:
        """A new config for the built model: its shapes must be the model's, and its RoPE and norm settings
        are applied (a replaced rope_theta was saved with the model and not run by it)."""
        if not isinstance(cfg, LlamaConfig):
            raise TypeError(f"model.config must be a kpro.LlamaConfig, got {type(cfg).__name__}")
        differences = shape_differences(self, cfg)
        if differences:
            raise ValueError("the new config does not fit the model's modules: " + "; ".join(differences))
        self._config = cfg
        self.embed_tokens.padding_idx = cfg.pad_token_id  # as a model built with it: the pad row gets no gradient
        self.rope.cfg = cfg
        self.rope.reset(device=self.rope.inv_freq.device)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.eps = cfg.rms_norm_eps

    def __setstate__(self, state):
        if "config" in state and "_config" not in state:  # a whole-model pickle of an older kpro
            old = state.pop("config")  # rebuilt: it changed in place, and its rope_scaling was a plain dict
            state["_config"] = LlamaConfig(**{field.name: getattr(old, field.name)
                                              for field in dataclasses.fields(LlamaConfig)})
            state["_modules"]["rope"].cfg = state["_config"]
        super().__setstate__(state)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    @_naming_mixed_matrices
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cache: "KVCache | None" = None,
                head: bool = True) -> torch.Tensor:
        """Logits [B, T, vocab]; with `head=False`, the final norm's output [B, T, hidden] instead, which
        `lm_head` would turn into the logits (losses take it with `lm_head.weight` to
        `kpro.ops.linear_cross_entropy`, so that the logits never exist).

        attention_mask [B, past + T] marks real tokens (left padding for batches of different lengths);
        with a `cache`, it covers the cached tokens too. Positions count real tokens only, so a padded
        row gives the same logits as the same row unpadded.
        """
        out = self.norm(self.hidden_states(input_ids, attention_mask, position_ids=position_ids, cache=cache))
        return self.lm_head(out) if head else out

    @_naming_mixed_matrices
    def hidden_states(self, input_ids, attention_mask=None, *, position_ids=None, cache=None) -> torch.Tensor:
        """The final block's output [B, T, hidden], before the final norm."""
        past = 0 if cache is None else cache.length
        attention_mask = self._check_inputs(input_ids, attention_mask, past, cache)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, input_ids.shape[1], input_ids.device)
        else:
            position_ids = _check_position_ids(position_ids, input_ids.shape)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        runners = self.block_runners or (run_block,) * len(self.layers)
        if len(runners) != len(self.layers):  # blocks added or removed by hand since train_only planned them
            raise ValueError(f"the model has {len(self.layers)} blocks, but its train_only plan (block_runners) covers "
                             f"{len(runners)}: call kpro.train_only again after changing the blocks")
        for i, (layer, run) in enumerate(zip(self.layers, runners)):
            x = run(layer, x, cos, sin, attention_mask, None if cache is None else cache.layer(i))
        if cache is not None:  # once the call has run: a refused one leaves the cache as it was
            cache.length += input_ids.shape[1]
            cache.padded = cache.padded or attention_mask is not None  # the checked mask: None where all real
        return x

    def _check_inputs(self, input_ids, attention_mask, past, cache):
        is_tensor = isinstance(input_ids, torch.Tensor)  # a list or an array has no .dim(): named, not an AttributeError
        if not is_tensor or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if is_tensor else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {got}")
        batch, length = input_ids.shape
        if length == 0 or batch == 0:
            raise ValueError(f"input_ids is empty ([B={batch}, T={length}])")
        if cache is not None:
            cfg, held = self.config, cache.keys[0].shape
            if len(self.layers) != cfg.num_hidden_layers:  # the cache is sized from the config
                raise ValueError(f"the model has {len(self.layers)} blocks and its config {cfg.num_hidden_layers}: after "
                                 "changing the blocks, set model.config = model.config.replace(num_hidden_layers="
                                 f"{len(self.layers)})")
            if (len(cache.keys), held[2], held[3]) != (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim):
                raise ValueError(f"cache was made for {len(cache.keys)} layers of {held[2]} key/value heads of dim "
                                 f"{held[3]}; this model has {cfg.num_hidden_layers} of {cfg.num_key_value_heads} of dim "
                                 f"{cfg.head_dim}: make it with KVCache(model.config, ...)")
            if cache.batch_size != batch:
                raise ValueError(f"cache was made for batch {cache.batch_size}, input has batch {batch}")
            if past + length > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions; {past} used, {length} more asked")
            wanted, weight = activation_dtype(self), self.embed_tokens.weight
            if (cache.keys[0].dtype, cache.keys[0].device) != (wanted, weight.device):  # before any layer writes it
                raise ValueError(f"cache holds {cache.keys[0].dtype} keys on {cache.keys[0].device}, and this forward "
                                 f"computes {wanted} ones on {weight.device} (autocast sets it where it is on): make it "
                                 "with KVCache(model.config, ..., dtype=kpro.model.activation_dtype(model))")
        if attention_mask is None:
            all_real = None
            if cache is not None and cache.padded:  # without it the new tokens would see the cached padding
                raise ValueError(f"the cache holds padding (its tokens came with an attention mask holding zeros): "
                                 f"pass the attention_mask [B, {past + length}] covering the cached tokens and these")
        else:  # the op's check (bool or 0/1 integers), with whether every token is real in the same device read
            all_real = ops.check_attention_mask(attention_mask, (batch, past + length), "model", report_all_real=True)
        check_token_ids(input_ids, self.config.vocab_size)
        # A mask of all ones is no mask: take the faster unmasked attention path. A checked mask goes to the
        # layers as bool, whose values need no further look.
        return None if attention_mask is None or all_real else attention_mask.bool()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def head_is_its_weight(head: nn.Module) -> bool:
    """Whether `head(x)` is `x @ head.weight.T` and nothing else, so that a loss may take `head.weight` in its
    place and never make the logits (`kpro.ops.linear_cross_entropy`): a plain bias-free nn.Linear (no
    subclass, no forward of its own) that no hook watches, neither its own nor one of torch's global module
    hooks. A hook may change the logits (soft-capping, a temperature) or their gradient, and the fused loss,
    which never calls the head, would leave it out silently."""
    from torch.nn.modules import module as hooks  # torch's global module hooks live there
    watched = (hooks._global_forward_pre_hooks, hooks._global_forward_hooks, hooks._global_backward_pre_hooks,
               hooks._global_backward_hooks)
    return (type(head) is nn.Linear and head.bias is None and "forward" not in vars(head) and not any(watched)
            and not any(module_hooks(head)))


def module_hooks(module: nn.Module) -> list:
    """The forward, forward-pre, backward and backward-pre hooks that watch `module` itself."""
    return [hook for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                               module._backward_hooks) for hook in hooks.values()]


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary; checked on CPU tensors with readable values only (a value
    read would sync a GPU and break a compiled graph, and fake or meta tensors hold none)."""
    if ids.device.type == "cpu" and ids.numel() and values_readable(ids) and (
            ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"input_ids hold token ids outside [0, vocab_size={vocab_size})")


def _check_position_ids(position_ids, shape: tuple) -> torch.Tensor:
    """Integer positions [B, T] or [1, T] (a [T] tensor is read as [1, T], as Hugging Face does)."""
    batch, length = shape
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
        got = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be an integer tensor (int64 or int32), got {got}")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [B={batch}, T={length}] or [1, {length}], got {tuple(position_ids.shape)}")
    return position_ids


def run_block(block: Block, x, cos, sin, attention_mask, kv) -> torch.Tensor:
    """A plain call of the block: the default way each block runs."""
    return block(x, cos, sin, attention_mask, kv)


def positions_from_mask(attention_mask, past: int, length: int, device) -> torch.Tensor:
    """Position of each new token: the number of real tokens before it (padding does not count)."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device)[None, :]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]


def activation_dtype(model: "Llama") -> torch.dtype:
    """The dtype of the keys and values a forward computes: autocast's where autocast is on for the model's
    device (it casts fp32, fp16 and bf16 weights' matmuls), else the weights'."""
    weight = next(model.parameters())
    if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


class KVCache:
    """Preallocated keys and values of every layer, [B, max_len, Hkv, D] each, for cached decoding."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        # torch.zeros named neither (a negative size) or took a wrong one (0 rows, int64 keys) until the forward
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"KVCache: dtype must be a floating-point torch.dtype (the activations'), got {dtype!r}")
        shape = (batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.padded = False  # a mask with zeros came with its tokens: later calls must pass a mask too

    def layer(self, index: int) -> "LayerKV":
        return LayerKV(self, index)


class LayerKV:
    """One layer's view of a KVCache: writes new keys/values after the cached ones."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.cache.length, self.cache.length + k.shape[1]
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or keys.requires_grad):
            # Out of place where autograd records it: a later call's in-place write would change what an
            # earlier graph saved, and its backward would fail ("modified by an inplace operation").
            keys = self.cache.keys[self.index] = torch.slice_scatter(keys, k, 1, start, end)
            values = self.cache.values[self.index] = torch.slice_scatter(values, v, 1, start, end)
        else:
            keys[:, start:end] = k
            values[:, start:end] = v
        return keys[:, :end], values[:, :end]


def shape_differences(model: Llama, cfg: LlamaConfig) -> list[str]:
    """How the built modules of `model` differ in shape from those `cfg` describes (empty: none)."""
    out = []
    if len(model.layers) != cfg.num_hidden_layers:
        out.append(f"num_hidden_layers {cfg.num_hidden_layers}, the model has {len(model.layers)} blocks")
    if tuple(model.embed_tokens.weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        out.append(f"vocab_size x hidden_size {cfg.vocab_size} x {cfg.hidden_size}, the embedding is "
                   f"{list(model.embed_tokens.weight.shape)}")
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        if heads != (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim):
            out.append(f"block {i}: {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} key/value heads of "
                       f"dim {cfg.head_dim}, the block has {heads[0]}, {heads[1]} of dim {heads[2]}")
        if block.mlp.gate_proj.weight.shape[0] != cfg.intermediate_size:
            out.append(f"block {i}: intermediate_size {cfg.intermediate_size}, the block's MLP has "
                       f"{block.mlp.gate_proj.weight.shape[0]}")
    return out[:4]
