"""Attention over [B, T, H, D] tensors with causal, prefix-bidirectional and key-padding masks.

Conventions shared by every backend:
- queries are aligned to the end of the keys (query i sits at key position i + Tk - Tq), so a
  cached decoding step passes its new queries with the whole key cache;
- `prefix_lens[b] = P`: keys and queries at positions < P see each other both ways, the rest is causal;
- `attention_mask[b, j] = 0` hides key j of row b (padding);
- a query that can see no key at all (a padding row) gets an output of zeros and no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .backend import kernels, select


def check_attention_args(q, k, v, causal, prefix_lens, attention_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    batch, tq, hq, dim = q.shape
    _, tk, hkv, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")
    if causal and tq > tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk, got Tq={tq}, Tk={tk}")
    if prefix_lens is not None:
        if not causal:
            raise ValueError("attention: prefix_lens only makes sense with causal=True (the rest is causal)")
        if prefix_lens.shape != (batch,) or prefix_lens.dtype.is_floating_point:
            raise ValueError(f"attention: prefix_lens must be an integer tensor [B={batch}], got "
                             f"{tuple(prefix_lens.shape)} {prefix_lens.dtype}")
    if attention_mask is not None and attention_mask.shape != (batch, tk):
        raise ValueError(f"attention: attention_mask must be [B={batch}, Tk={tk}], got {tuple(attention_mask.shape)}")


def visibility_mask(batch: int, tq: int, tk: int, *, causal: bool, prefix_lens=None, attention_mask=None,
                    device=None) -> torch.Tensor | None:
    """Boolean [B, Tq, Tk] (True = query may see key), or None when every query sees every key."""
    if not causal and attention_mask is None:
        return None
    mask = torch.ones(batch, tq, tk, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
        k_pos = torch.arange(tk, device=device)[None, :]
        mask = mask & (k_pos <= q_pos)
        if prefix_lens is not None:
            prefix = prefix_lens.to(device)[:, None, None]
            mask = mask | ((q_pos < prefix) & (k_pos < prefix))
    if attention_mask is not None:
        mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return mask


def attention_reference(q, k, v, causal=True, prefix_lens=None, attention_mask=None, scale=None):
    """Plain PyTorch (scaled_dot_product_attention with an explicit mask where one is needed)."""
    batch, tq, _, _ = q.shape
    tk = k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if prefix_lens is None and attention_mask is None and (not causal or tq == tk or tq == 1):
        # One query aligned to the end of the keys sees them all: a decoding step needs no mask.
        # Under torch.compile with dynamic shapes `tq > 1` is symbolic and SDPA takes only a bool: an `if`
        # makes the compiler guard on the length instead.
        is_causal = True if causal and tq > 1 else False
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    mask = visibility_mask(batch, tq, tk, causal=causal, prefix_lens=prefix_lens,
                           attention_mask=attention_mask, device=q.device)[:, None]
    # Rows that see nothing would be NaN in some SDPA backends: let them see everything, then zero them.
    sees_any = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | ~sees_any, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~sees_any, 0).transpose(1, 2)


def attention(q, k, v, causal: bool = True, prefix_lens=None, attention_mask=None, scale: float | None = None):
    """Softmax attention. q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (Hq a multiple of Hkv) -> [B, Tq, Hq, D]."""
    check_attention_args(q, k, v, causal, prefix_lens, attention_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = select("attention", q)
    if backend == "torch":  # plain PyTorch autograd: SDPA saves what it needs, torch.compile traces it
        return attention_reference(q, k, v, causal, prefix_lens, attention_mask, scale)
    return torch.ops.kpro.attention_forward(q, k, v, causal, prefix_lens, attention_mask, scale, backend)[0]


# ------------------------------------------------------------------------------ custom op registration

@torch.library.custom_op("kpro::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      prefix_lens: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse2): lse2 [B, Hq, Tq] fp32 is the base-2 log-sum-exp of each row's scaled scores."""
    return kernels("attention", backend, None).forward(q, k, v, causal, prefix_lens, attention_mask, scale)


@attention_forward.register_fake
def _(q, k, v, causal, prefix_lens, attention_mask, scale, backend):  # the kernels return contiguous tensors
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("kpro::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse2: torch.Tensor, causal: bool, prefix_lens: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor], scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels("attention", backend, None).backward(dout, q, k, v, out, lse2, causal, prefix_lens,
                                                        attention_mask, scale)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse2, causal, prefix_lens, attention_mask, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, causal, prefix_lens, attention_mask, scale, backend = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, prefix_lens, attention_mask)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, dout, _dlse2):
    q, k, v, out, lse2, prefix_lens, attention_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.kpro.attention_backward(dout, q, k, v, out, lse2, ctx.causal, prefix_lens,
                                                   attention_mask, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup)
