"""kpro's ops inside a Hugging Face `transformers` LLaMA-family model, for training with the HF Trainer, TRL,
accelerate or a loop of your own.

    import kpro.integrations.hf as kpro_hf        # imports transformers; registers attn_implementation="kpro"
    summary = kpro_hf.apply(model)                 # RMSNorm -> kpro.ops.rms_norm, MLP -> kpro.ops.swiglu,
                                                   # attention -> kpro.ops.attention
    plan = kpro_hf.train_only(model, [4, 9])       # only those blocks train; frozen-block gradient skipping

Supported: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` and the other models of those types
(config.model_type llama, mistral, qwen2) with a SiLU MLP; anything else is refused by name, nothing
changed. What is swapped:

- every `*RMSNorm` module's forward: `kpro.ops.rms_norm` (one fp32 accumulation, x and rstd saved, no weight
  gradient reduction for a frozen weight); the output dtype is the stock one (x's, promoted with the
  weight's);
- every MLP's forward: `down_proj(kpro.ops.swiglu(gate_proj(x), up_proj(x)))` (gate and up saved, silu
  recomputed in the backward); the projections stay the model's own `nn.Linear`s (LoRA adapters on them
  keep working);
- the attention core, through transformers' registries: "kpro" in `AttentionInterface` (the function) and
  in `AttentionMaskInterface` (which mask it is given), so `from_pretrained(..., attn_implementation="kpro")`
  works once this module is imported, and `apply` switches a loaded model with `set_attn_implementation`.
  The projections and RoPE stay transformers' own.

Masks: transformers builds, for "kpro", the 2-D key-padding mask (1 = real token), which kpro's attention
takes as it is (left or right padding, GQA, cached decoding with queries at the end of the keys). A 4-D mask
passed by the caller is converted when it is causal (or full) attention over a key-padding pattern: boolean
(True = attend) or additive float (0 = attend, <= -1e4 = hidden); one holding biases (ALiBi, say),
per-head patterns or any other pattern is refused, as are dropout, logit soft-capping, sliding windows
shorter than the keys, static caches, packed sequences (position_ids restarting inside a row, or
flash-attention's cu_seq_lens), and models of another model_type given attn_implementation="kpro", each with
an error naming it. Queries that see no key (padding) give zeros (as stock sdpa; eager attends uniformly,
so the label a left-padded row's last padding query predicts must be -100 for eager's loss).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from typing import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import transformers
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function

from .. import ops
from ..config import SILU_NAMES
from ..expansion.freezing import (TrainPlan, _check_block_ids, _check_recompute_flag, _checkpointed, _ForwardContext,
                                  freeze_all_but, frozen_parameter_name)
from ..ops.attention import visibility_mask
from ..ops.backend import values_readable

ATTENTION = "kpro"
MODEL_TYPES = ("llama", "mistral", "qwen2")
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}


class UnsupportedModelError(ValueError):
    """The model is not one `apply` knows to be computed by kpro's ops exactly (nothing was changed)."""


@dataclasses.dataclass(frozen=True)
class Applied:
    """What `apply` replaced."""

    model: str
    rms_norms: int  # modules whose forward is kpro.ops.rms_norm
    mlps: int  # MLPs computing down_proj(kpro.ops.swiglu(gate_proj(x), up_proj(x)))
    attention_layers: int  # layers whose attention core is kpro.ops.attention (0: attention left as it was)
    attention_before: str  # the attn_implementation the model had

    def __str__(self) -> str:
        attention = (f"attention of {self.attention_layers} layers {self.attention_before!r} -> {ATTENTION!r} "
                     "(kpro.ops.attention)" if self.attention_layers else f"attention left {self.attention_before!r}")
        return (f"{self.model}: {self.rms_norms} RMSNorm -> kpro.ops.rms_norm, {self.mlps} MLP -> kpro.ops.swiglu, "
                f"{attention}")


def apply(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, attention: bool = True) -> Applied:
    """Run a transformers LLaMA, Mistral or Qwen2 model on kpro's ops, in place; returns what was replaced.

    Call it after loading (and before wrapping in DDP/FSDP or torch.compile); calling it again changes
    nothing more. The weights, their names and the checkpoint format are untouched.
    """
    layers = decoder_layers(model)
    config = model.config
    act = getattr(config, "hidden_act", None)
    if mlp and act not in SILU_NAMES:
        raise UnsupportedModelError(f"{type(model).__name__}'s MLP uses {act!r}; kpro's SwiGLU computes silu(gate) * up "
                                    "(pass mlp=False to keep the MLP)")
    if attention and not getattr(config, "is_causal", True):
        raise UnsupportedModelError(f"{type(model).__name__} is configured bidirectional (is_causal=False); kpro's "
                                    "attention here is causal (pass attention=False to keep the model's attention)")
    norms = [m for m in model.modules() if type(m).__name__ in NORMS] if rms_norm else []
    mlps = [layer.mlp for layer in layers] if mlp else []
    for layer in layers:  # check everything before changing anything
        missing = [name for name, needed in (("mlp.gate_proj", mlp), ("mlp.up_proj", mlp), ("mlp.down_proj", mlp),
                                             ("self_attn", attention)) if needed and not _has(layer, name)]
        if mlp and type(layer.mlp).__name__ not in MLPS:
            missing.append(f"mlp of a known class (got {type(layer.mlp).__name__})")
        if missing:
            raise UnsupportedModelError(f"{type(model).__name__}'s decoder layers lack {', '.join(missing)}")
    for module in norms:
        if not hasattr(module, "weight") or not hasattr(module, "variance_epsilon"):
            raise UnsupportedModelError(f"{type(module).__name__} has no weight or variance_epsilon")
    _check_no_accelerate_hooks(model, [*norms, *mlps], "apply")
    for module in norms:
        module.forward = bound(rms_norm_forward, module)
    for module in mlps:
        module.forward = bound(mlp_forward, module)
    before = config._attn_implementation
    if attention:
        register()
        for module in {model, model.base_model}:  # the base model may be called on its own
            if not getattr(module, "_kpro_checks_inputs", False):
                module.register_forward_pre_hook(check_model_inputs, with_kwargs=True)
                module._kpro_checks_inputs = True
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION)
        else:  # older transformers
            config._attn_implementation = ATTENTION
    return Applied(type(model).__name__, len(norms), len(mlps), len(layers) if attention else 0, before)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model; anything else is refused, naming what it is."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule forwards .config to the model
    if isinstance(inner, transformers.PreTrainedModel) and not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"got torch.compile's {type(model).__name__} around {type(inner).__name__}: call "
                                    "kpro_hf.apply (and train_only) on the model before torch.compile, then compile it "
                                    "(or pass the compiled module's ._orig_mod and compile again)")
    if not isinstance(model, transformers.PreTrainedModel) and model_type in MODEL_TYPES:
        # the message below would read "supports llama ...; got X (model_type 'llama')"
        raise UnsupportedModelError(f"got {type(model).__name__}, not a transformers PreTrainedModel, with the config "
                                    f"of a {model_type} model: a wrapper around one? pass the transformers model "
                                    "itself (what the wrapper holds), then wrap it again")
    if not isinstance(model, transformers.PreTrainedModel) or model_type not in MODEL_TYPES:
        what = f"model_type {model_type!r}" if model_type else "not a transformers PreTrainedModel"
        raise UnsupportedModelError(f"kpro.integrations.hf supports LLaMA-family transformers models (model_type "
                                    f"{', '.join(MODEL_TYPES)}: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                    f"...); got {type(model).__name__} ({what})")
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers at .base_model.layers")
    return layers


def bound(function, module: nn.Module) -> functools.partial:
    """`function` as `module`'s forward. A partial rather than a bound method: pickle (torch.save of the whole
    model) stores a bound method as a look-up of its name on the module, which a LlamaMLP does not have, so the
    model saved but did not load; a partial stores the function itself (accelerate's hooks do the same)."""
    return functools.update_wrapper(functools.partial(function, module), function)


def _check_no_accelerate_hooks(model: nn.Module, modules: list, what: str) -> None:
    """Refuse modules whose forward accelerate wraps (a device_map over several devices, or offloading): replacing
    their forward drops the hook that moves inputs to the module's device and loads offloaded weights, and the op
    then failed on a weight left on the meta device or on another GPU, naming neither."""
    names = {id(m): name for name, m in model.named_modules()}
    hooked = [names.get(id(m), type(m).__name__) for m in modules if hasattr(m, "_hf_hook")]
    if hooked:
        raise UnsupportedModelError(f"{hooked[0]} is dispatched by accelerate (a device_map spreading the model over "
                                    f"devices, or offloading it to the CPU or disk; {len(hooked)} such modules): "
                                    f"kpro_hf.{what} replaces the forward its hook wraps; load the model onto one "
                                    "device (device_map='cuda', say)")


def _has(module: nn.Module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


# ------------------------------------------------------------------------------------------- forwards

def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A transformers RMSNorm on kpro.ops.rms_norm, with the stock output dtype (weight * x.to(input dtype))."""
    out = ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return out if out.dtype == dtype else out.to(dtype)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A transformers LLaMA MLP on kpro.ops.swiglu."""
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


# ------------------------------------------------------------------------------------------ attention

def register() -> None:
    """Make attn_implementation="kpro" known to transformers (done when this module is imported)."""
    transformers.AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, attention_mask)


def check_model_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """What transformers would take silently and kpro's attention cannot honour, checked before the forward
    (a pre-hook that `apply` installs): transformers turns a 2-D mask into booleans before kpro sees it, so an
    additive 2-D mask would hide the real tokens and show the padding; and kpro computes no attention weights."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    # An additive float mask, or an integer one of segment ids (packing), would be read as 0/1: one device read,
    # as kpro's own model checks its masks. A bool mask holds nothing else.
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype != torch.bool:
        check_zeros_and_ones(mask)
    asked = kwargs.get("output_attentions")
    if getattr(module.config, "_attn_implementation", ATTENTION) != ATTENTION:  # switched away after apply
        return
    if asked or (asked is None and getattr(module.config, "output_attentions", False)):
        raise NotImplementedError("kpro attention computes no attention weights (output_attentions=True); use "
                                  "another attn_implementation to inspect them")


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """The mask transformers builds once per forward for "kpro": the 2-D key-padding mask [B, kv_length]
    (True = real token), or None when there is none; kpro's attention applies causality itself."""
    global _unpacked
    _unpacked = _NOTHING_CHECKED  # a new forward: its position_ids are checked again (check_not_packed)
    if mask_function is bidirectional_mask_function:
        raise NotImplementedError("kpro attention in transformers is causal; this model asks for bidirectional masks")
    # A mask wider than the tokens (cached and new): transformers reads its first columns, for no stated reason.
    if attention_mask is not None and not isinstance(q_offset, torch.Tensor) \
            and attention_mask.shape[-1] > q_offset + q_length:
        raise ValueError(f"the attention mask has {attention_mask.shape[-1]} columns for {q_offset + q_length} "
                         "tokens (cached and new): pass one column per token")
    # kpro aligns the queries with the last keys. A static cache gives a tensor offset when decoding and, when
    # prefilling, keys for all its slots (most of them empty) after the queries.
    if isinstance(q_offset, torch.Tensor) or q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError("kpro attention needs the new queries at the end of the keys (a DynamicCache); "
                                  "a static cache puts them elsewhere: generate with cache_implementation='dynamic'")
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] < kv_offset + kv_length:
        raise NotImplementedError(f"the attention mask covers {attention_mask.shape[-1]} keys of "
                                  f"{kv_offset + kv_length}")
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)  # as transformers reads it


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface on kpro.ops.attention: query [B, Hq, Tq, D], key and value
    [B, Hkv, Tk, D] (GQA as they are) -> ([B, Tq, Hq, D], None)."""
    config = getattr(module, "config", None)
    if getattr(config, "model_type", MODEL_TYPES[0]) not in MODEL_TYPES:
        # attn_implementation="kpro" is open to any model: one whose masks are chunked, prefix-LM or image masks
        # would be computed with a plain padding mask
        raise UnsupportedModelError(f"attn_implementation=\"kpro\" supports model_type {', '.join(MODEL_TYPES)}; "
                                    f"got {type(module).__name__} of model_type {config.model_type!r}")
    if kwargs.get("output_attentions"):  # without apply's pre-hook, the attentions would come back empty
        raise NotImplementedError("kpro attention computes no attention weights (output_attentions=True); use "
                                  "another attn_implementation to inspect them")
    if dropout:
        raise NotImplementedError(f"kpro attention has no dropout (attention_dropout={dropout}); set it to 0")
    if softcap is not None:
        raise NotImplementedError("kpro attention has no logit soft-capping (softcap)")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("kpro attention has no attention sinks (s_aux)")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise NotImplementedError("packed sequences (cu_seq_lens) need document masking, which kpro attention does "
                                  "not have; pad the batch instead")
    batch, _, tq, _ = query.shape
    tk = key.shape[2]
    if sliding_window is not None and tk > sliding_window:
        raise NotImplementedError(f"kpro attention has no sliding window: {tk} keys exceed this layer's window of "
                                  f"{sliding_window}; use sequences of at most {sliding_window} tokens")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    if not causal:  # stock transformers makes such a layer bidirectional only where no mask is given (sdpa): no guess
        raise NotImplementedError(f"this attention layer asks for bidirectional attention (is_causal=False"
                                  f"{', set on the layer' if is_causal is None else ''}); kpro attention in "
                                  "transformers follows the causal mask transformers builds: set is_causal back to "
                                  "True, or use another attn_implementation for a bidirectional model")
    mask = key_padding_mask(attention_mask, batch, tq, tk, causal)
    if mask is None and tq > 1:
        positions = kwargs.get("position_ids")
        if positions is not None:
            check_not_packed(positions)
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                        attention_mask=mask, scale=scaling)
    return out, None


ZEROS_AND_ONES = ("a 2-D attention mask must hold 1 (real token) and 0 (padding); this one holds other values (an "
                  "additive float mask, or segment ids?): pass the 0/1 mask")


def check_zeros_and_ones(mask: torch.Tensor) -> None:
    """Refuse a 2-D mask holding anything but 0 and 1: one device read, or under torch.compile an assertion
    that fails at the next device sync (no value read, no graph break); the same for fake or meta tensors,
    which hold no values."""
    if not values_readable(mask):
        torch._assert_async(((mask == 0) | (mask == 1)).all(), ZEROS_AND_ONES)
    elif bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(ZEROS_AND_ONES)


PACKED = ("packed sequences (position_ids restarting inside a row) need document masking, which kpro attention does "
          "not have: pad each document into a row of its own (an attention_mask of ones does not separate them)")
_NOTHING_CHECKED = (lambda: None, None)
_unpacked = _NOTHING_CHECKED  # the position tensor checked last in this forward, and its version


def check_not_packed(positions: torch.Tensor) -> None:
    """Refuse position_ids that restart inside a row. Read once per forward, not in every layer (a device sync
    each): every layer gets the same tensor, and `attention_mask`, which transformers calls once per forward,
    forgets the last one checked. Under torch.compile an assertion, as transformers masks the documents there
    too. (Inference tensors keep no version: within a forward nothing writes to them.)"""
    global _unpacked
    if not values_readable(positions):  # compiling, or fake or meta tensors (no values)
        torch._assert_async((positions.diff(dim=-1) == 1).all(), PACKED)
        return
    version = None if positions.is_inference() else positions._version
    if _unpacked[0]() is not positions or _unpacked[1] != version:
        if bool((positions.diff(dim=-1) != 1).any()):
            raise NotImplementedError(PACKED)
        _unpacked = (weakref.ref(positions), version)


def key_padding_mask(mask: torch.Tensor | None, batch: int, tq: int, tk: int, causal: bool) -> torch.Tensor | None:
    """What kpro.ops.attention takes (bool [B, Tk], True = real key) for a mask transformers or a caller
    passes: a 2-D padding mask (bool, or 0/1 numbers), or a 4-D one [B, 1 or H, Tq, Tk] that is causal (or
    full) attention over some key padding, boolean (True = attend) or additive (0 / large negative).
    Anything else raises, naming it."""
    if mask is None:
        return None
    checking = values_readable(mask)
    if mask.dim() == 2:
        return _padding_mask_2d(mask, batch, tk)
    return _real_keys(_allowed_keys_4d(mask, batch, tq, tk, checking), batch, tq, tk, causal)


def _padding_mask_2d(mask: torch.Tensor, batch: int, tk: int) -> torch.Tensor:
    """A 2-D padding mask [B, Tk] (bool, or 0/1 numbers) as bool, checked."""
    if tuple(mask.shape) != (batch, tk):
        raise ValueError(f"the attention mask is {tuple(mask.shape)}; kpro attention takes [B={batch}, Tk={tk}]")
    if mask.dtype != torch.bool:
        check_zeros_and_ones(mask)
    return mask.to(torch.bool)


def _allowed_keys_4d(mask: torch.Tensor, batch: int, tq: int, tk: int, checking: bool) -> torch.Tensor:
    """The keys each query may see (bool [B, Tq, Tk]) of a mask that is not 2-D: a 4-D one [B or 1, 1 or H, Tq, Tk],
    boolean or additive (anything else raises); `checking`: whether its values may be read."""
    if mask.dim() == 4 and mask.shape[0] == 1:  # one mask for the whole batch, as transformers' own attention takes
        mask = mask.expand(batch, *mask.shape[1:])
    if mask.dim() != 4 or mask.shape[0] != batch or tuple(mask.shape[2:]) != (tq, tk):
        raise ValueError(f"the attention mask is {tuple(mask.shape)}; kpro attention takes a 2-D padding mask "
                         f"[{batch}, {tk}] or a 4-D one [{batch}, 1, {tq}, {tk}]")
    if not checking:
        raise NotImplementedError("a 4-D attention mask is checked against what kpro attention can express, which "
                                  "needs its values (torch.compile cannot trace that, and fake or meta tensors have "
                                  "none): pass the 2-D padding mask (1 = real token)")
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        raise NotImplementedError("kpro attention takes one mask for all heads; this 4-D mask differs by head")
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        # -inf, transformers' dtype minimum, and the -1e4 or -1e9 of older code: each gives a key a softmax
        # weight of exactly 0 in fp32 (exp underflows below about -104), as hiding it does
        hidden = mask <= -1e4
        if not bool(((mask == 0) | hidden).all()):
            raise NotImplementedError("this additive attention mask holds values other than 0 and a large negative "
                                      "(biases such as ALiBi); kpro attention can only show or hide keys")
        allowed = mask == 0
    else:
        raise ValueError(f"a 4-D attention mask must be boolean or floating point (additive), got {mask.dtype}")
    return allowed


def _real_keys(allowed: torch.Tensor, batch: int, tq: int, tk: int, causal: bool) -> torch.Tensor:
    """The real keys (bool [B, Tk]) of `allowed`, refused unless it is causal (or full) attention over them."""
    # Queries that see no key are padding, masked any way: on a GPU transformers lets them see every key
    # (`_unmask_unattended`), which causality would hide from all but the last query. Such a query is padding
    # only where its own key is one the other queries do not see (a padding token's); where they see it, the
    # mask is asking for more than causality (bidirectional, as an encoder's all-True mask), refused below.
    # The real keys are those the other queries see, and those must see exactly causal (or full) attention.
    unattended = ~allowed.any(dim=-1)
    own = torch.arange(tq, device=allowed.device) + (tk - tq)  # each query's own key
    if causal:
        sees_all = allowed.all(dim=-1) & (own < tk - 1)  # seeing a key causality hides from it
        seen = (allowed & ~(unattended | sees_all)[..., None]).any(dim=1)  # [B, tk] by the other queries
        unattended |= sees_all & ~seen[:, own]
    real = (allowed & ~unattended[..., None]).any(dim=1)
    # A query that sees nothing while the others see its key is no padding: kpro would give it the real keys
    # (causally), and its wrong output would reach the queries that read its key in the next layer.
    blind = unattended & real[:, own]
    if bool(blind.any()):
        row, query = (int(i) for i in blind.nonzero()[0])
        raise NotImplementedError(f"in this 4-D attention mask query {query} of row {row} sees no key while "
                                  "other queries see its own key (it is not padding); kpro attention "
                                  "cannot express it: use another attn_implementation for it, or the 2-D padding "
                                  "mask")
    expected = visibility_mask(batch, tq, tk, causal=causal, attention_mask=real, device=allowed.device)
    if expected is None:
        expected = torch.ones_like(allowed)
    if not torch.equal(allowed[~unattended], expected[~unattended]):
        raise NotImplementedError(f"this 4-D attention mask is not {'causal' if causal else 'full'} attention over a "
                                  "key-padding pattern (a document, prefix or custom mask? a row whose every query "
                                  "sees every key, an encoder's, or a row of padding alone as transformers unmasks "
                                  "it, which cannot be told apart); kpro attention cannot express it: use another "
                                  "attn_implementation for it, or the 2-D padding mask")
    return real


register()


# ------------------------------------------------------------------------------------------ train_only

def train_only(model: nn.Module, block_ids: Iterable[int] | None, recompute_frozen: bool = False) -> TrainPlan:
    """Train only decoder layers `block_ids` of a supported transformers model; skip the gradient work the
    frozen ones do not need, as `kpro.train_only` does for a kpro model, and return the same `TrainPlan`.

    Everything else (embeddings, final norm, head, other layers) gets requires_grad=False. Frozen layers
    below the lowest trainable one run under torch.no_grad (no graph, nothing saved); frozen layers above
    it compute only their input gradient (with `apply`'s ops: RMSNorm skips its weight-gradient reduction),
    or, with recompute_frozen=True, save only their inputs and run again in the backward (training without
    a cache, use_cache=False; with a cache they run plainly). `None`, or every layer, restores full training,
    as kpro.train_only does: every parameter trains (embeddings, final norm and head too).
    Call it before building the optimizer; the parameters it freezes lose any gradient they held.
    """
    _check_recompute_flag(recompute_frozen)
    layers = decoder_layers(model)
    ids = _check_block_ids(block_ids, len(layers))
    _check_no_accelerate_hooks(model, layers, "train_only")
    for layer in layers:
        _set_runner(layer, None)
    if ids is None or len(ids) == len(layers):
        model.requires_grad_(True)
        return TrainPlan(tuple(range(len(layers))), (), (), False)
    freeze_all_but(model, [layers[i] for i in ids])
    lowest = ids[0]
    paths = {id(module): path for path, module in model.named_modules()}
    for i, layer in enumerate(layers):
        layer._train_only_path = paths.get(id(layer))  # for _check_frozen's message: "model.layers.3.mlp..."
        if i not in ids:
            below = run_without_graph_or_recomputed if recompute_frozen else run_without_graph
            _set_runner(layer, below if i < lowest else run_recomputed if recompute_frozen else run_input_grad_only)
    frozen = [i for i in range(len(layers)) if i not in ids]
    return TrainPlan(ids, tuple(i for i in frozen if i < lowest), tuple(i for i in frozen if i > lowest),
                     bool(recompute_frozen))


def _set_runner(layer: nn.Module, runner) -> None:
    if getattr(layer, "_kpro_runner", None) is not None:
        del layer.forward  # our instance forward: the class's applies again
        layer._kpro_runner = None
    if runner is not None:
        layer.forward = bound(runner, layer)
        layer._kpro_runner = runner.__name__


def _check_frozen(layer: nn.Module) -> None:
    for name, p in layer.named_parameters():
        if p.requires_grad:
            raise RuntimeError(f"a layer that train_only froze has a trainable parameter again "
                               f"({frozen_parameter_name(layer, name)}); call kpro.integrations.hf.train_only "
                               "again after changing which parameters train")


def run_without_graph(self, *args, **kwargs):
    """A frozen layer below every trainable one: nothing below needs a gradient, so no graph at all. Unless
    its input needs one (a parameter below was unfrozen after train_only): then a plain call."""
    _check_frozen(self)
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if torch.is_tensor(hidden_states) and hidden_states.requires_grad and torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    with torch.no_grad():
        return type(self).forward(self, *args, **kwargs)


def run_without_graph_or_recomputed(self, *args, **kwargs):
    """run_without_graph under recompute_frozen=True: where its input needs a gradient after all (the embeddings
    unfrozen), the layer is recomputed as those above the lowest trainable one are, rather than keeping its
    activations."""
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if torch.is_tensor(hidden_states) and hidden_states.requires_grad and torch.is_grad_enabled():
        return run_recomputed(self, *args, **kwargs)
    return run_without_graph(self, *args, **kwargs)


def run_input_grad_only(self, *args, **kwargs):
    """A frozen layer above a trainable one: a plain call (autograd gives its frozen weights no gradient)."""
    _check_frozen(self)
    return type(self).forward(self, *args, **kwargs)


@functools.cache
def _warn_cache_in_training() -> None:
    warnings.warn("train_only(..., recompute_frozen=True) recomputes nothing while the model builds a KV cache in "
                  "training (a layer run again would write it twice): pass use_cache=False, or set "
                  "model.config.use_cache = False; the gradients are right either way", stacklevel=3)


def run_recomputed(self, hidden_states, *args, **kwargs):
    """A frozen layer above a trainable one: keep its input only, run it again in the backward."""
    _check_frozen(self)
    if (not torch.is_grad_enabled() or not hidden_states.requires_grad or kwargs.get("use_cache")
            or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None):
        if torch.is_grad_enabled() and hidden_states.requires_grad and self.training:
            _warn_cache_in_training()
        return type(self).forward(self, hidden_states, *args, **kwargs)  # evaluation or decoding: nothing to save
    if getattr(self, "gradient_checkpointing", False) and self.training:
        # transformers' gradient checkpointing (the class's forward) already keeps only the input and runs the layer
        # again in the backward. Inside our backward it would run a third time, or, with use_reentrant=True, fail
        # in torch.autograd.grad: let it do the recomputing alone.
        return type(self).forward(self, hidden_states, *args, **kwargs)
    if torch.compiler.is_compiling():
        return _checkpointed(type(self).forward, self, hidden_states, *args, **kwargs)
    # In training the layer may draw dropout masks (attention_dropout with the stock attention): the recomputation
    # must draw the same ones, or the gradients are those of another forward.
    context = _ForwardContext.capture(hidden_states.device, rng=self.training)
    return _RecomputedLayer.apply(hidden_states, self, args, kwargs, context)


class _RecomputedLayer(torch.autograd.Function):
    """y = layer(x, *args, **kwargs) saving x and the tensors among the other arguments (RoPE's cos and sin,
    the mask: shared by every layer); the backward runs the frozen layer again and returns dL/dx only."""

    @staticmethod
    def forward(ctx, x, layer, args, kwargs, context):
        leaves, spec = tree_flatten((args, kwargs))
        ctx.tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        ctx.leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        ctx.spec, ctx.layer, ctx.context = spec, layer, context
        ctx.save_for_backward(x, *(leaves[i] for i in ctx.tensor_at))
        out = type(layer).forward(layer, x, *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"recompute_frozen needs decoder layers that return a tensor; {type(layer).__name__} "
                            f"returns {type(out).__name__}")
        return out

    @staticmethod
    def backward(ctx, dy):
        x, *tensors = ctx.saved_tensors
        leaves = list(ctx.leaves)
        for i, tensor in zip(ctx.tensor_at, tensors):
            leaves[i] = tensor
        args, kwargs = tree_unflatten(leaves, ctx.spec)
        x = x.detach().requires_grad_(True)
        with ctx.context.replayed():
            y = type(ctx.layer).forward(ctx.layer, x, *args, **kwargs)
        (dx,) = torch.autograd.grad(y, x, dy)
        return dx, None, None, None, None
