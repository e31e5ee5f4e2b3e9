"""Attention forward and forward+backward in TFLOP/s (only the work the mask allows counts), kpro's
backends against SDPA (dense mask where needed), FlexAttention (compiled, block masks) and flash-attn
when installed; and the Bitune dual pass against three FlexAttention calls plus an explicit mix.

    pytest --benchmark -k attention
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from kpro import ops
from conftest import describe_device, record_tflops, synchronize

GPU_SEQS = [1024, 4096, 16384]
TOKENS_PER_BATCH = 16384  # batch = tokens / sequence
HIDDEN = 2048  # heads = hidden / head_dim


def shape_for(device, seq, dim):
    if device.type != "cuda":
        return 1, 256, 4, dim  # a CPU smoke size: the code paths run, the timings mean little
    return max(1, TOKENS_PER_BATCH // seq), seq, HIDDEN // dim, dim


def visible_pairs(seq, prefix):
    """Query-key pairs a causal mask with a bidirectional prefix of `prefix` tokens lets through."""
    return prefix * prefix + sum(i + 1 for i in range(prefix, seq))


@functools.lru_cache(maxsize=None)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_call(mask_mod, batch, seq_q, seq_k, device):
    """FlexAttention in kpro's [B, T, H, D] layout with the block mask of `mask_mod`."""
    from torch.nn.attention.flex_attention import create_block_mask
    block_mask = create_block_mask(mask_mod, batch, None, seq_q, seq_k, device=device)
    return lambda q, k, v: compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           block_mask=block_mask, enable_gqa=True).transpose(1, 2)


def implementations(mask, q, prefix_lens):
    """name -> f(q, k, v) in kpro's [B, T, H, D] layout, all computing the same masked attention."""
    batch, seq = q.shape[:2]
    impls = {}
    backends = ["triton", "torch"] if q.device.type == "cuda" else ["torch"]
    for name in backends:
        impls[f"kpro-{name}"] = (lambda n: lambda q, k, v: _kpro(n, q, k, v, mask, prefix_lens))(name)
    if mask == "causal":
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
        impls["flex"] = flex_call(lambda b, h, i, j: j <= i, batch, seq, seq, q.device)
        try:
            from flash_attn import flash_attn_func
            impls["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
        except ImportError:
            pass
    else:
        positions = torch.arange(seq, device=q.device)
        dense = (positions[None, :, None] >= positions[None, None, :]) | \
                (positions[None, None, :] < prefix_lens[:, None, None]) & (positions[None, :, None] < prefix_lens[:, None, None])
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense[:, None],
            enable_gqa=True).transpose(1, 2)
        impls["flex"] = flex_call(lambda b, h, i, j: (j <= i) | ((j < prefix_lens[b]) & (i < prefix_lens[b])),
                                  batch, seq, seq, q.device)
    return impls


def _kpro(name, q, k, v, mask, prefix_lens):
    with ops.backend(name):
        return ops.attention(q, k, v, causal=True, prefix_lens=prefix_lens if mask == "prefix" else None)


IMPLS = ["kpro-triton", "kpro-torch", "sdpa", "flex", "flash-attn"]


def setup(device, seq, dim, mask, impl, grad):
    if device.type != "cuda" and seq != GPU_SEQS[0]:
        pytest.skip("one smoke size on the CPU")
    if device.type != "cuda" and impl == "flex" and grad:
        pytest.skip("FlexAttention has no backward on the CPU")
    batch, seq, heads, dim = shape_for(device, seq, dim)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda h: torch.randn(batch, seq, h, dim, device=device, dtype=dtype, generator=gen, requires_grad=grad)
    q, k, v = make(heads), make(heads // 4), make(heads // 4)  # GQA 4:1
    prefix = seq // 2
    prefix_lens = torch.full((batch,), prefix, device=device)
    impls = implementations(mask, q, prefix_lens)
    if impl not in impls:
        pytest.skip(f"{impl} is not available for this case here")
    pairs = visible_pairs(seq, prefix if mask == "prefix" else 0)
    flops = 4 * batch * heads * dim * pairs  # QK^T and PV, 2 flops per multiply-add
    return impls[impl], (q, k, v), flops, dtype


@pytest.mark.parametrize("mask", ["causal", "prefix"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq", GPU_SEQS)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_forward(benchmark, device, impl, seq, dim, mask):
    fn, (q, k, v), flops, dtype = setup(device, seq, dim, mask, impl, grad=False)
    benchmark.group = f"attention forward {mask} T={q.shape[1]} D={dim}"

    def run():
        with torch.no_grad():
            fn(q, k, v)
        synchronize(device)

    run()
    benchmark(run)
    record_tflops(benchmark, flops, device=describe_device(device), shape=list(q.shape), dtype=str(dtype))


@pytest.mark.parametrize("mask", ["causal", "prefix"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq", GPU_SEQS)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_forward_backward(benchmark, device, impl, seq, dim, mask):
    fn, (q, k, v), flops, dtype = setup(device, seq, dim, mask, impl, grad=True)
    benchmark.group = f"attention forward+backward {mask} T={q.shape[1]} D={dim}"
    dout = torch.randn_like(q)

    def run():
        fn(q, k, v).backward(dout)
        q.grad = k.grad = v.grad = None
        synchronize(device)

    run()
    benchmark(run)
    # backward does 2.5x the forward's matrix work (recomputed scores, dV, dP, dQ, dK)
    record_tflops(benchmark, 3.5 * flops, device=describe_device(device), shape=list(q.shape), dtype=str(dtype))


# ----------------------------------------------------------------------------------- Bitune dual pass

def bitune_three_flex_calls(batch, tp, ta, prompt_lens, answer_lens, device):
    """The same computation as kpro.ops.bitune_attention with three FlexAttention calls and an explicit mix.
    The block masks are built here, once, outside the timed calls (they depend on the lengths only)."""
    lp, la = prompt_lens, answer_lens
    causal = flex_call(lambda b, h, i, j: (j <= i) & (j < lp[b]), batch, tp, tp, device)
    bidir = flex_call(lambda b, h, i, j: j < lp[b], batch, tp, tp, device)
    answer = flex_call(lambda b, h, i, j: (j < lp[b]) | ((j >= tp) & (j - tp <= i) & (j - tp < la[b])),
                       batch, ta, tp + ta, device)

    def fn(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens):
        k_mix = (1 - alpha_k) * k_p[0] + alpha_k * k_p[1]
        v_mix = (1 - alpha_v) * v_p[0] + alpha_v * v_p[1]
        o_p = torch.stack((causal(q_p[0], k_p[0], v_p[0]), bidir(q_p[1], k_p[1], v_p[1])))
        return o_p, answer(q_a, torch.cat((k_mix, k_a), 1), torch.cat((v_mix, v_a), 1))
    return fn


def bitune_fused(backend):
    def fn(*args):
        with ops.backend(backend):
            return ops.bitune_attention(*args)
    return fn


@pytest.mark.parametrize("impl", ["kpro-triton", "kpro-torch", "three-flex-calls"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_bitune_dual_pass(benchmark, device, impl, grad):
    if impl == "kpro-triton" and device.type != "cuda":
        pytest.skip("Triton needs a GPU outside the interpreter")
    if impl == "three-flex-calls" and grad and device.type != "cuda":
        pytest.skip("FlexAttention has no backward on the CPU")
    batch, tp, ta, heads, dim = (8, 1024, 1024, 32, 128) if device.type == "cuda" else (1, 64, 64, 4, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen, requires_grad=grad)
    args = [make(2, batch, tp, heads, dim), make(2, batch, tp, heads // 4, dim), make(2, batch, tp, heads // 4, dim),
            make(batch, ta, heads, dim), make(batch, ta, heads // 4, dim), make(batch, ta, heads // 4, dim),
            torch.tensor(0.5, device=device, requires_grad=grad), torch.tensor(0.5, device=device, requires_grad=grad),
            torch.full((batch,), tp, device=device), torch.full((batch,), ta, device=device)]
    if impl == "three-flex-calls":
        fn = bitune_three_flex_calls(batch, tp, ta, args[8], args[9], device)
    else:
        fn = bitune_fused(impl.removeprefix("kpro-"))
    benchmark.group = f"bitune dual pass {'forward+backward' if grad else 'forward'} B={batch} Tp=Ta={tp} D={dim}"

    def run():
        if grad:
            o_p, o_a = fn(*args)
            (o_p.float().sum() + o_a.float().sum()).backward()
            for t in args[:8]:
                t.grad = None
        else:
            with torch.no_grad():
                fn(*args)
        synchronize(device)

    run()
    benchmark(run)
    pairs = batch * heads * (tp * (tp + 1) // 2 + tp * tp + ta * tp + ta * (ta + 1) // 2)
    flops = 4 * dim * pairs * (3.5 if grad else 1.0)
    record_tflops(benchmark, flops, device=describe_device(device), dtype=str(dtype))
