"""Attention over [B, T, H, D] tensors with causal, prefix-bidirectional and key-padding masks.

Conventions shared by every backend:
- queries are aligned to the end of the keys (query i sits at key position i + Tk - Tq), so a
  cached decoding step passes its new queries with the whole key cache;
- `prefix_lens[b] = P`: keys and queries at positions < P see each other both ways, the rest is causal;
- `attention_mask[b, j] = 0` hides key j of row b (padding): a bool or 0/1 integer tensor, 1 = real token
  (`check_attention_mask`; a float mask is refused, an additive one converts with `additive == 0`);
- a query that can see no key at all (a padding row) gets an output of zeros and no gradient;
- NaN: a NaN in a row's query, or in a key or value the row sees, makes that row NaN; keys and values
  the row does not see (padding, positions past the causal limit) never reach it, infinite ones included.
  The torch backend counts an infinity in a query, key or value as a NaN (the Triton kernels let a seen
  one give what the arithmetic gives).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import (autocast_inputs, autocast_note, check_tensors, eager_fast_path, kernels, needs_graph, no_autocast,
                      once_differentiable, refuse_function_transforms, select, values_readable)


MASK_RULE = "bool or 0/1 integers, 1 = real token, 0 = padding"


def check_attention_mask(mask, shape: tuple, where: str = "attention", *, report_all_real: bool = False):
    """Refuse an attention mask that is not a `shape` tensor of bool or 0/1 integers (1 = real token).

    A float mask is refused by its dtype alone: an additive mask (0 = attend, -inf or -1e9 = hidden, as
    Hugging Face builds them) read as 1 = real would show exactly the keys it hides. A bool mask needs no
    look at its values. An integer mask's values are checked: on the CPU for free, on a GPU with one
    device sync (pass a bool mask to avoid it; `Llama.forward` checks once and passes bool masks to its
    layers), and under torch.compile or for fake and meta tensors with `torch._assert_async` (no sync, no
    graph break; the error comes at the next sync). With `report_all_real`, returns whether every entry is
    1, read in the same sync (False where values are not read)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{where}: attention_mask must be a tensor [B, T] ({MASK_RULE}), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        names = {"model": "[B, past+T]", "generate": "[B, T]"}.get(where, "[B, Tk]")
        raise ValueError(f"{where}: attention_mask must be {names} = {list(shape)}, got {list(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{where}: attention_mask is {mask.dtype}; it must be {MASK_RULE}. An additive float mask "
                         "(0 = attend, -inf or -1e9 = hidden) converts with `mask = (additive == 0)`, a 0/1 float "
                         "mask with `mask.bool()`")
    values_ok = None if mask.dtype == torch.bool else ((mask == 0) | (mask == 1)).all()
    bad_values = f"{where}: attention_mask must hold 1 (real token) and 0 (padding) only ({MASK_RULE})"
    if not values_readable(mask):  # compiling (a read would break the graph), or fake or meta tensors
        if values_ok is not None:
            torch._assert_async(values_ok, bad_values)
        return False if report_all_real else None
    if report_all_real:
        flags = torch.stack((values_ok if values_ok is not None else mask.new_ones((), dtype=torch.bool),
                             mask.bool().all()))
        values_ok, all_real = flags.tolist()
    elif values_ok is not None:
        values_ok, all_real = bool(values_ok), None
    else:
        return None
    if not values_ok:
        raise ValueError(bad_values)
    return all_real


def check_attention_args(q, k, v, causal, prefix_lens, attention_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    batch, tq, hq, dim = q.shape
    _, tk, hkv, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if dim == 0 or hq == 0 or hkv == 0:
        raise ValueError(f"attention: head dim and head counts must be positive, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}{autocast_note(q)}")
    if not isinstance(causal, bool):  # None from a config would silently mean bidirectional
        raise ValueError(f"attention: causal must be True or False, got {causal!r}")
    if causal and tq > tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk, got Tq={tq}, Tk={tk}")
    if prefix_lens is not None:
        if not causal:
            raise ValueError("attention: prefix_lens only makes sense with causal=True (the rest is causal)")
        if prefix_lens.shape != (batch,) or prefix_lens.dtype.is_floating_point or prefix_lens.dtype.is_complex \
                or prefix_lens.dtype == torch.bool:
            raise ValueError(f"attention: prefix_lens must be an integer tensor [B={batch}], got "
                             f"{tuple(prefix_lens.shape)} {prefix_lens.dtype}")
        # Free on the CPU only; elsewhere a negative length counts as 0 (`attention` clamps), no device sync.
        if prefix_lens.device.type == "cpu" and values_readable(prefix_lens):
            negative = (prefix_lens < 0).nonzero()
            if negative.numel():
                row = int(negative[0])
                raise ValueError(f"attention: prefix_lens must be >= 0, got {int(prefix_lens[row])} in row {row}")
    if attention_mask is not None:
        check_attention_mask(attention_mask, (batch, tk))


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
    """Plain PyTorch (scaled_dot_product_attention with an explicit mask where one is needed).

    SDPA's kernels do not keep the NaN rule: a NaN or infinite key or value that a row does not see
    reaches it through 0 · NaN, 0 · inf or a NaN score plus -inf, and some of them turn a NaN query row
    into zeros. So where an input holds a NaN or an infinity, SDPA runs on the inputs with those rows
    zeroed, and the rows that see one are set to NaN after (`rows_seeing_nan`); zeroing cuts the NaN's way
    into the gradients too, so `with_nan_gradients` puts it back where the rule says it goes. On the CPU
    in eager mode, inputs whose sums are finite (no NaN or infinity anywhere; one fast reduction each) take
    SDPA alone; elsewhere the zeroing always runs, which needs no device sync.

    Runs with autocast off: the tensors are taken in their own dtypes (the entry points apply autocast to
    their inputs first), and CUDA autocast would run the sanitising's sums in fp32 and so return fp32."""
    with no_autocast(q):
        return _sanitised_sdpa(q, k, v, causal, prefix_lens, attention_mask, scale)


def _sanitised_sdpa(q, k, v, causal, prefix_lens, attention_mask, scale):
    if finite_on_cpu(q, k, v):
        return _sdpa(q, k, v, causal, prefix_lens, attention_mask, scale)
    nan_q = ~q.isfinite().all(-1)  # [B, Tq, Hq]
    nan_kv = ~(k.isfinite().all(-1) & v.isfinite().all(-1))  # [B, Tk, Hkv]
    clean = (x.masked_fill(nan[..., None], 0) for x, nan in ((q, nan_q), (k, nan_kv), (v, nan_kv)))
    out = _sdpa(*clean, causal, prefix_lens, attention_mask, scale)
    bad = rows_seeing_nan(nan_q, nan_kv, causal, prefix_lens, attention_mask)
    return with_nan_gradients(out, bad, q, k, v, causal, prefix_lens, attention_mask)


def with_nan_gradients(out, bad, q, k, v, causal: bool, prefix_lens=None, attention_mask=None) -> torch.Tensor:
    """`out` with the rows `bad` [B, Tq, Hq] set to NaN, whose backward gives NaN to the queries of those rows
    and to the keys and values they see (the NaN rule), and what `out` gives everywhere else. A NaN row
    set with masked_fill has no gradient at all: a NaN loss came with finite gradients. Here each NaN row is
    a sum over its query and the keys and values its group sees, each multiplied by NaN where selected
    (torch.where selects, so 0 · NaN never reaches the others). Cheap: one sum over the head dimension each."""
    batch, tq, hq = bad.shape
    tk, hkv = k.shape[1], k.shape[2]
    bad_kv = bad.view(batch, tq, hkv, hq // hkv).any(-1)  # [B, Tq, Hkv]
    if causal:  # a row sees the keys before its end; the group's NaN rows together, those before the last end
        ends = torch.arange(tq, device=q.device) + (tk - tq + 1)
        if prefix_lens is not None:
            ends = torch.maximum(ends[None, :], prefix_lens.to(q.device)[:, None])
        ends = torch.where(bad_kv, ends.expand(batch, tq)[:, :, None], 0)
        reach = torch.cat((ends, ends.new_zeros(batch, 1, hkv)), 1).amax(1)  # [B, Hkv]; 0 without NaN rows
        seen = torch.arange(tk, device=q.device)[None, :, None] < reach[:, None, :]
    else:
        seen = bad_kv.any(1, keepdim=True).expand(batch, tk, hkv)
    if attention_mask is not None:
        seen = seen & attention_mask.to(device=q.device, dtype=torch.bool)[:, :, None]

    def poisoned(x, rows):  # [B, T, H]: NaN where `rows`, 0 elsewhere; the gradient NaN where `rows`, 0 elsewhere
        nan = torch.zeros(rows.shape, dtype=x.dtype, device=x.device).masked_fill(rows, float("nan"))
        return torch.where(rows, x.sum(-1) * nan, 0)

    kv = (poisoned(k, seen) + poisoned(v, seen)).sum(1).repeat_interleave(hq // hkv, dim=1)  # [B, Hq]
    return torch.where(bad[..., None], (poisoned(q, bad) + kv[:, None, :])[..., None], out)


def finite_on_cpu(*tensors) -> bool:
    """True when the tensors are on the CPU, in eager mode, and hold no NaN or infinity (one fast sum each,
    nothing saved for autograd): there the reference paths can skip their sanitising. False elsewhere, where
    asking would sync the device."""
    return tensors[0].device.type == "cpu" and values_readable(*tensors) and bool(
        torch.stack([t.detach().sum() for t in tensors]).isfinite().all())


def rows_seeing_nan(nan_q, nan_kv, causal: bool, prefix_lens=None, attention_mask=None) -> torch.Tensor:
    """[B, Tq, Hq] bool: the query rows that see a key or value flagged in `nan_kv` [B, Tk, Hkv], or have
    a NaN query (`nan_q` [B, Tq, Hq]) and see any key at all. Row i sees the keys j < end(i) (causal:
    end(i) = max(i + Tk - Tq + 1, prefix), else Tk) that the mask keeps, so prefix sums over the keys
    answer it without a [Tq, Tk] mask."""
    batch, tq, hq = nan_q.shape
    tk, hkv = nan_kv.shape[1], nan_kv.shape[2]
    if tk == 0:
        return torch.zeros_like(nan_q)
    real = None if attention_mask is None else attention_mask.to(device=nan_kv.device, dtype=torch.bool)
    bad = nan_kv if real is None else nan_kv & real[:, :, None]
    if causal:
        ends = torch.arange(tq, device=nan_kv.device) + (tk - tq + 1)
        if prefix_lens is not None:
            ends = torch.maximum(ends[None, :], prefix_lens.to(nan_kv.device)[:, None])
        last = (ends.expand(batch, tq).clamp(1, tk) - 1)[:, :, None]  # [B, Tq, 1]: the last key row i sees
        rows_bad = (bad.int().cumsum(1) > 0).gather(1, last.expand(batch, tq, hkv))
        sees_any = True if real is None else real.int().cumsum(1).gather(1, last[:, :, 0]) > 0
    else:
        rows_bad = bad.any(1, keepdim=True).expand(batch, tq, hkv)
        sees_any = True if real is None else real.any(1, keepdim=True)
    rows_bad = rows_bad.repeat_interleave(hq // hkv, dim=2)
    if real is None:
        return rows_bad | nan_q
    return (rows_bad | nan_q) & sees_any[:, :, None]


def _sdpa(q, k, v, causal, prefix_lens, attention_mask, scale):
    batch, tq, _, _ = q.shape
    tk = k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = True if q.shape[2] != k.shape[2] else False  # a bool, not a SymBool under dynamic shapes (below)
    if prefix_lens is None and attention_mask is None and (not causal or tq == tk or tq == 1):
        # One query aligned to the end of the keys sees them all: a decoding step needs no mask.
        # Under torch.compile with dynamic shapes `tq > 1` is symbolic and SDPA takes only a bool: an `if`
        # makes the compiler guard on the length instead.
        is_causal = True if causal and tq > 1 else False
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()  # [B, T, H, D] in memory, as the kernels give it (a no-op if so)
    mask = visibility_mask(batch, tq, tk, causal=causal, prefix_lens=prefix_lens,
                           attention_mask=attention_mask, device=q.device)[:, None]
    # Rows that see nothing would be NaN in some SDPA backends: let them see everything, then zero them.
    sees_any = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | ~sees_any, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~sees_any, 0).transpose(1, 2).contiguous()


def attention(q, k, v, causal: bool = True, prefix_lens=None, attention_mask=None, scale: float | None = None):
    """Softmax attention. q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] (Hq a multiple of Hkv) -> [B, Tq, Hq, D]."""
    check_tensors("attention", q=q, k=k, v=v)
    if prefix_lens is not None and not isinstance(prefix_lens, torch.Tensor):
        prefix_lens = _lengths_tensor(prefix_lens, "prefix_lens")  # on the CPU, where its check is free
    q, k, v = autocast_inputs(q, k, v)  # as SDPA takes them: every backend in the torch one's precision
    check_attention_args(q, k, v, causal, prefix_lens, attention_mask)
    if prefix_lens is not None:
        # A prefix past the keys covers them all; clamped, it also fits the kernels' int32 copy.
        prefix_lens = prefix_lens.long().clamp(0, k.shape[1]).to(q.device)
    scale = softmax_scale(scale, q.shape[-1], "attention")
    backend = select("attention", q)
    if backend == "torch":  # plain PyTorch autograd: SDPA saves what it needs, torch.compile traces it
        return attention_reference(q, k, v, causal, prefix_lens, attention_mask, scale)
    refuse_function_transforms("attention", q, k, v)
    if eager_fast_path(q, k, v, prefix_lens, attention_mask):  # the same kernels without the custom op's dispatch
        if not needs_graph(q, k, v):
            return _run_forward(q, k, v, causal, prefix_lens, attention_mask, scale, backend)[0]
        return AttentionFunction.apply(q, k, v, causal, prefix_lens, attention_mask, scale, backend)
    return torch.ops.kpro.attention_forward(q, k, v, causal, prefix_lens, attention_mask, scale, backend)[0]


def _lengths_tensor(lengths, name: str) -> torch.Tensor:
    """A list or tuple of ints as an integer CPU tensor; anything else is a one-line error."""
    if isinstance(lengths, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        return torch.tensor(lengths, dtype=torch.int64)
    raise ValueError(f"attention: {name} must be an integer tensor [B] (or a list of ints), got {lengths!r}")


def softmax_scale(scale, head_dim: int, where: str) -> float:
    """`scale` as a float, `head_dim ** -0.5` when None. Anything but a finite number > 0 is refused: the
    kernels would return NaN (a zero or negative scale turns the running maximum into a minimum). A tensor
    must be 0-dim without grad: the kernels take a float, so a gradient would be dropped silently."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad:
            raise ValueError(f"{where}: scale requires grad, but it is used as a number: no gradient would reach it")
        if scale.dim() != 0 or scale.dtype == torch.bool or scale.dtype.is_complex:
            raise ValueError(f"{where}: scale must be a number or a 0-dim tensor, got {tuple(scale.shape)} "
                             f"{scale.dtype}")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{where}: scale must be a finite number > 0, got {scale!r}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: scale must be a finite number > 0, got {value}")
    return value


# ------------------------------------------------------------------------------ custom op registration

def _run_forward(q, k, v, causal, prefix_lens, attention_mask, scale, backend):
    """The forward of both paths, the custom op and AttentionFunction: (out, lse2)."""
    return kernels("attention", backend, None).forward(q, k, v, causal, prefix_lens, attention_mask, scale)


def _run_backward(dout, q, k, v, out, lse2, causal, prefix_lens, attention_mask, scale, backend):
    """The backward of both paths: (dq, dk, dv)."""
    return kernels("attention", backend, None).backward(dout, q, k, v, out, lse2, causal, prefix_lens,
                                                        attention_mask, scale)


@torch.library.custom_op("kpro::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      prefix_lens: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], scale: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse2): lse2 [B, Hq, Tq] fp32 is the base-2 log-sum-exp of each row's scaled scores."""
    return _run_forward(q, k, v, causal, prefix_lens, attention_mask, scale, backend)


@attention_forward.register_fake
def _(q, k, v, causal, prefix_lens, attention_mask, scale, backend):  # the kernels return contiguous tensors
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("kpro::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse2: torch.Tensor, causal: bool, prefix_lens: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor], scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_backward(dout, q, k, v, out, lse2, causal, prefix_lens, attention_mask, scale, backend)


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


class AttentionFunction(torch.autograd.Function):
    """The eager path of the kernel backends: the custom ops' kernels and saved tensors (q, k, v, out, lse2,
    prefix_lens, attention_mask) without their dispatch (backend.eager_fast_path). It returns out alone, as
    `attention` does; lse2 is saved, not returned. Its backward computes dq, dk and dv whatever needs them,
    as the custom op's does, and is once differentiable as that one (no autograd formula for its backward op)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, prefix_lens, attention_mask, scale, backend):
        out, lse2 = _run_forward(q, k, v, causal, prefix_lens, attention_mask, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse2, prefix_lens, attention_mask)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse2, prefix_lens, attention_mask = ctx.saved_tensors
        dq, dk, dv = _run_backward(dout, q, k, v, out, lse2, ctx.causal, prefix_lens, attention_mask, ctx.scale,
                                   ctx.backend)
        return dq, dk, dv, None, None, None, None, None
