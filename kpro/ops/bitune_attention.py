"""The Bitune dual-attention pass: both prompt streams and the answer's attention over the mixed cache.

Per layer Bitune has three token streams of each example (right-padded, positions from 0):
- stream 0, causal: `prompt[:P-1]` with the causal adapter, attending causally to its own keys;
- stream 1, bidirectional: the same tokens with the bidir adapter, attending to all of its own keys;
- the answer stream `[prompt[P-1], answer...]`, attending to every valid key of the *mixed* prompt
  cache K = (1 − α_k)·K_causal + α_k·K_bidir, V = (1 − α_v)·V_causal + α_v·V_bidir, then causally
  to its own keys.
`prompt_lens[b]` is the number of valid tokens in the prompt streams (P_b − 1, may be 0) and
`answer_lens[b]` in the answer stream. Padded query rows get zeros and no gradient. Gradients reach
every q/k/v of the three streams (the prompt keys and values also through the mix) and α_k, α_v.
"""
from __future__ import annotations

import torch

from .attention import attention_reference, finite_on_cpu, softmax_scale
from .backend import (autocast_inputs, autocast_note, check_tensors, eager_fast_path, kernels, needs_graph,
                      once_differentiable, refuse_function_transforms, select, values_readable)


def bitune_attention(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens,
                     scale: float | None = None, *, check_values: bool = True):
    """q_p [2, B, Tp, H, D], k_p/v_p [2, B, Tp, Hkv, D] (index 0 causal, 1 bidirectional, post-RoPE);
    q_a [B, Ta, H, D], k_a/v_a [B, Ta, Hkv, D]; alpha_k, alpha_v 0-dim in [0, 1]; prompt_lens [B] in
    [0, Tp], answer_lens [B] in [1, Ta]. Returns (o_prompt [2, B, Tp, H, D], o_answer [B, Ta, H, D]).
    `check_values=False` skips `check_bitune_values` (one device sync on a GPU) for a caller that made
    it already, as kpro.Bitune does once per forward rather than once per layer. Under autocast the six
    query, key and value tensors are cast to its dtype first, as `attention` and SDPA take theirs."""
    check_tensors("bitune_attention", q_p=q_p, k_p=k_p, v_p=v_p, q_a=q_a, k_a=k_a, v_a=v_a, alpha_k=alpha_k,
                  alpha_v=alpha_v, prompt_lens=prompt_lens, answer_lens=answer_lens)
    q_p, k_p, v_p, q_a, k_a, v_a = autocast_inputs(q_p, k_p, v_p, q_a, k_a, v_a)
    check_bitune_args(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens)
    if check_values:
        check_bitune_values(alpha_k, alpha_v, prompt_lens, answer_lens, q_p.shape[2], q_a.shape[1])
    scale = softmax_scale(scale, q_p.shape[-1], "bitune_attention")
    backend = select("bitune_attention", q_a)
    if backend == "torch":
        return bitune_attention_reference(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens,
                                          answer_lens, scale)
    refuse_function_transforms("bitune_attention", q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v)
    if eager_fast_path(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens):
        # the same kernels without the custom op's dispatch (backend.eager_fast_path)
        if not needs_graph(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v):
            return tuple(_run_forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale,
                                      backend)[:2])
        return BituneAttentionFunction.apply(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens,
                                             answer_lens, scale, backend)
    o_p, o_a, _, _ = torch.ops.kpro.bitune_attention_forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v,
                                                             prompt_lens, answer_lens, scale, backend)
    return o_p, o_a


def check_bitune_args(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens) -> None:
    if q_p.dim() != 5 or q_p.shape[0] != 2 or k_p.shape != v_p.shape or k_p.dim() != 5 or k_p.shape[0] != 2:
        raise ValueError(f"bitune_attention: q_p must be [2, B, Tp, H, D] and k_p, v_p [2, B, Tp, Hkv, D], got "
                         f"{tuple(q_p.shape)}, {tuple(k_p.shape)}, {tuple(v_p.shape)}")
    if q_a.dim() != 4 or k_a.shape != v_a.shape or k_a.dim() != 4:
        raise ValueError(f"bitune_attention: q_a must be [B, Ta, H, D] and k_a, v_a [B, Ta, Hkv, D], got "
                         f"{tuple(q_a.shape)}, {tuple(k_a.shape)}, {tuple(v_a.shape)}")
    _, batch, tp, heads, dim = q_p.shape
    kv_heads = k_p.shape[3]
    if k_p.shape[1:3] != (batch, tp) or k_p.shape[4] != dim:
        raise ValueError(f"bitune_attention: k_p {tuple(k_p.shape)} does not match q_p {tuple(q_p.shape)}")
    if q_a.shape[0] != batch or q_a.shape[2:] != (heads, dim) or k_a.shape[0] != batch or \
            k_a.shape[1] != q_a.shape[1] or k_a.shape[2:] != (kv_heads, dim):
        raise ValueError(f"bitune_attention: answer stream q_a {tuple(q_a.shape)}, k_a {tuple(k_a.shape)} does not "
                         f"match the prompt streams (B={batch}, H={heads}, Hkv={kv_heads}, D={dim})")
    if q_a.shape[1] == 0:
        raise ValueError("bitune_attention: the answer stream needs at least one position (the prompt's last token)")
    if dim == 0 or heads == 0 or kv_heads == 0:  # refused as attention refuses them (a modulo by zero before)
        raise ValueError(f"bitune_attention: head dim and head counts must be positive, got q_p {tuple(q_p.shape)}, "
                         f"k_p {tuple(k_p.shape)}")
    if heads % kv_heads:
        raise ValueError(f"bitune_attention: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    streams = {"q_p": q_p, "k_p": k_p, "v_p": v_p, "q_a": q_a, "k_a": k_a, "v_a": v_a}
    differ = [name for name, t in streams.items() if (t.dtype, t.device) != (q_p.dtype, q_p.device)]
    if differ:
        raise ValueError(f"bitune_attention: {', '.join(streams)} must share dtype and device; q_p is {q_p.dtype} "
                         f"on {q_p.device}, " + ", ".join(f"{name} {streams[name].dtype} on {streams[name].device}"
                                                          for name in differ) + autocast_note(q_p))
    for name, alpha in (("alpha_k", alpha_k), ("alpha_v", alpha_v)):
        if alpha.dim() != 0 or not alpha.is_floating_point():
            raise ValueError(f"bitune_attention: {name} must be a 0-dim floating tensor")
        if alpha.device != q_a.device:
            raise ValueError(f"bitune_attention: {name} is on {alpha.device}, the streams on {q_a.device}")
    for name, lens in (("prompt_lens", prompt_lens), ("answer_lens", answer_lens)):
        if lens.shape != (batch,) or lens.dtype.is_floating_point or lens.dtype.is_complex \
                or lens.dtype == torch.bool:  # a bool mask would read as lengths 0 and 1
            raise ValueError(f"bitune_attention: {name} must be an integer tensor [B={batch}] of lengths, got "
                             f"{lens.dtype} {list(lens.shape)}")


def check_bitune_values(alpha_k, alpha_v, prompt_lens, answer_lens, tp: int, ta: int) -> None:
    """Refuse lengths and mixing weights outside their ranges: prompt_lens in [0, Tp], answer_lens in
    [1, Ta] (the answer stream starts with the prompt's last token), α_k and α_v in [0, 1] (any shape:
    kpro.Bitune checks all layers' at once). Free on the CPU; on a GPU one device read for all four
    (the kernels would otherwise clamp or mix out of range silently); under torch.compile and for fake or
    meta tensors `torch._assert_async` (no sync, no graph break)."""
    checks = {
        f"prompt_lens must lie in [0, Tp={tp}]": ((prompt_lens >= 0) & (prompt_lens <= tp)).all(),
        f"answer_lens must lie in [1, Ta={ta}] (the answer stream holds the prompt's last token)":
            ((answer_lens >= 1) & (answer_lens <= ta)).all(),
        "alpha_k must lie in [0, 1]": ((alpha_k >= 0) & (alpha_k <= 1)).all(),
        "alpha_v must lie in [0, 1]": ((alpha_v >= 0) & (alpha_v <= 1)).all(),
    }
    if not values_readable(alpha_k, alpha_v, prompt_lens, answer_lens):  # compiling, or fake or meta tensors
        for message, ok in checks.items():
            torch._assert_async(ok, f"bitune_attention: {message}")
        return
    device = alpha_k.device
    flags = torch.stack([ok.to(device) for ok in checks.values()]).tolist()
    failed = [message for message, ok in zip(checks, flags) if not ok]
    if failed:
        values = {"prompt_lens": prompt_lens, "answer_lens": answer_lens, "alpha_k": alpha_k, "alpha_v": alpha_v}
        detail = "; ".join(f"{message}, got {values[message.split()[0]].tolist()}" for message in failed)
        raise ValueError(f"bitune_attention: {detail}")


def mix_kv(x_causal: torch.Tensor, x_bidir: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 − α)·x_causal + α·x_bidir computed in fp32 (float64 stays float64) and cast back to the inputs'
    dtype: the reference path's mix. Left to type promotion, a 0-dim fp32 α would not promote bf16 inputs,
    and the mix would round in bf16 at every step."""
    dtype = torch.promote_types(x_causal.dtype, torch.float32)
    a = alpha.to(dtype)
    return ((1 - a) * x_causal.to(dtype) + a * x_bidir.to(dtype)).to(x_causal.dtype)


def mixed_prompt_cache(k_p: torch.Tensor, v_p: torch.Tensor, alpha_k: torch.Tensor, alpha_v: torch.Tensor,
                       q_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed prompt keys and values [B, Tp, Hkv, D] exactly as `bitune_attention` mixes them for a call with
    these inputs (the backend it selects for q_a), for a decoding cache: the answer's first tokens read that
    mix and the later ones decode from the cache, so they read the same bits. The Triton kernel mixes as one
    fused multiply-add, x0 + α·(x1 − x0), which rounds otherwise than mix_kv in some entries."""
    backend = select("bitune_attention", q_a)
    if backend == "torch":
        return mix_kv(k_p[0], k_p[1], alpha_k), mix_kv(v_p[0], v_p[1], alpha_v)
    with torch.no_grad():  # a cache holds values; the op's backward recomputes its own mix
        return kernels("bitune_attention", backend, None).prompt_cache_mix(k_p, v_p, alpha_k, alpha_v)


def bitune_attention_reference(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens,
                               scale: float | None = None):
    """Plain PyTorch: two masked attention calls for the prompt streams, an explicit mix, one call for
    the answer over [mixed prompt cache, answer keys]."""
    tp, ta = q_p.shape[2], q_a.shape[1]
    prompt_valid = torch.arange(tp, device=q_p.device) < prompt_lens.to(q_p.device)[:, None]
    answer_valid = torch.arange(ta, device=q_a.device) < answer_lens.to(q_a.device)[:, None]
    # No stream sees the keys and values past prompt_lens, but dα sums dK_mix · (K_bidir − K_causal) over
    # every position: a NaN or infinity there would reach it as 0 · NaN. Zero those entries (finite ones keep
    # their bits, so the mix still equals the decoding cache's). The same for the padded query rows: their
    # outputs are zeroed, but their scores' softmax backward would carry 0 · NaN into dK and dV.
    k_in, v_in = k_p, v_p
    if not finite_on_cpu(q_p, k_p, v_p):
        hidden = ~prompt_valid[None, :, :, None, None]
        q_p, k_in, v_in = (x.masked_fill(hidden & ~x.isfinite(), 0) for x in (q_p, k_p, v_p))
    if not finite_on_cpu(q_a):
        q_a = q_a.masked_fill(~answer_valid[:, :, None, None] & ~q_a.isfinite(), 0)
    k_mix, v_mix = mix_kv(k_in[0], k_in[1], alpha_k), mix_kv(v_in[0], v_in[1], alpha_v)
    # Queries aligned to the end of [prompt | answer] keys: causal over the answer, all of the prompt.
    o_a = attention_reference(q_a, torch.cat((k_mix, k_a), 1), torch.cat((v_mix, v_a), 1), causal=True,
                              attention_mask=torch.cat((prompt_valid, answer_valid), 1), scale=scale)
    o_a = o_a.masked_fill(~answer_valid[:, :, None, None], 0)
    if tp == 0:  # every prompt has length 1: the prompt streams are empty (clone keeps the graph)
        return q_p.clone(), o_a
    o_causal = attention_reference(q_p[0], k_p[0], v_p[0], causal=True, attention_mask=prompt_valid, scale=scale)
    o_bidir = attention_reference(q_p[1], k_p[1], v_p[1], causal=False, attention_mask=prompt_valid, scale=scale)
    o_p = torch.stack((o_causal, o_bidir)).masked_fill(~prompt_valid[None, :, :, None, None], 0)
    return o_p, o_a


# ------------------------------------------------------------------------------ custom op registration

def _run_forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale, backend):
    """The forward of both paths, the custom op and BituneAttentionFunction: (o_p, o_a, lse_p, lse_a)."""
    return kernels("bitune_attention", backend, None).forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v,
                                                              prompt_lens, answer_lens, scale)


def _run_backward(do_p, do_a, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, o_p, o_a,
                  lse_p, lse_a, scale, backend):
    """The backward of both paths: [dq_p, dk_p, dv_p, dq_a, dk_a, dv_a, dalpha_k, dalpha_v]."""
    return list(kernels("bitune_attention", backend, None).backward(
        do_p, do_a, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, o_p, o_a,
        lse_p, lse_a, scale))


@torch.library.custom_op("kpro::bitune_attention_forward", mutates_args=())
def bitune_attention_forward(q_p: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor, q_a: torch.Tensor,
                             k_a: torch.Tensor, v_a: torch.Tensor, alpha_k: torch.Tensor, alpha_v: torch.Tensor,
                             prompt_lens: torch.Tensor, answer_lens: torch.Tensor, scale: float,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o_prompt, o_answer, lse2_prompt [2, B, H, Tp], lse2_answer [B, H, Ta])."""
    return _run_forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale, backend)


@bitune_attention_forward.register_fake
def _(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale, backend):
    _, batch, tp, heads, _ = q_p.shape
    return (q_p.new_empty(q_p.shape), q_a.new_empty(q_a.shape),  # the kernels return contiguous tensors
            q_p.new_empty((2, batch, heads, tp), dtype=torch.float32),
            q_a.new_empty((batch, heads, q_a.shape[1]), dtype=torch.float32))


@torch.library.custom_op("kpro::bitune_attention_backward", mutates_args=())
def bitune_attention_backward(do_p: torch.Tensor, do_a: torch.Tensor, q_p: torch.Tensor, k_p: torch.Tensor,
                              v_p: torch.Tensor, q_a: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor,
                              alpha_k: torch.Tensor, alpha_v: torch.Tensor, prompt_lens: torch.Tensor,
                              answer_lens: torch.Tensor, o_p: torch.Tensor, o_a: torch.Tensor, lse_p: torch.Tensor,
                              lse_a: torch.Tensor, scale: float, backend: str) -> list[torch.Tensor]:
    """[dq_p, dk_p, dv_p, dq_a, dk_a, dv_a, dalpha_k, dalpha_v]."""
    return _run_backward(do_p, do_a, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens,
                         o_p, o_a, lse_p, lse_a, scale, backend)


@bitune_attention_backward.register_fake
def _(do_p, do_a, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, *rest):
    return [t.new_empty(t.shape) for t in (q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v)]


def _setup(ctx, inputs, output):
    q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale, backend = inputs
    o_p, o_a, lse_p, lse_a = output
    ctx.save_for_backward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens,
                          o_p, o_a, lse_p, lse_a)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, do_p, do_a, _dlse_p, _dlse_a):
    saved = ctx.saved_tensors
    grads = torch.ops.kpro.bitune_attention_backward(do_p, do_a, *saved, ctx.scale, ctx.backend)
    return (*grads, None, None, None, None)


bitune_attention_forward.register_autograd(_backward, setup_context=_setup)


class BituneAttentionFunction(torch.autograd.Function):
    """The eager path of the kernel backends: the custom ops' kernels and saved tensors without their dispatch
    (backend.eager_fast_path). It returns (o_p, o_a), as `bitune_attention` does; lse_p and lse_a are saved,
    not returned. Its backward gives all eight gradients (the six streams', α_k's, α_v's) whatever needs them,
    as the custom op's does, and is once differentiable as that one (no autograd formula for its backward op)."""

    @staticmethod
    def forward(ctx, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale, backend):
        o_p, o_a, lse_p, lse_a = _run_forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens,
                                              answer_lens, scale, backend)
        ctx.save_for_backward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens,
                              o_p, o_a, lse_p, lse_a)
        ctx.scale, ctx.backend = scale, backend
        return o_p, o_a

    @staticmethod
    @once_differentiable
    def backward(ctx, do_p, do_a):
        grads = _run_backward(do_p, do_a, *ctx.saved_tensors, ctx.scale, ctx.backend)
        return (*grads, None, None, None, None)
