"""Bitune's mixed prompt cache, materialised once: K_mix = (1 − α_k)·K_causal + α_k·K_bidir (and V with α_v),
an elementwise kernel, so that the answer stream then reads one cache through the attention kernels'
fast paths. Its backward is folded into the Bitune dK/dV kernels (bitune_attention.py) rather than run
as a kernel of its own: the epilogue of the program that computes dK_mix for a key tile writes it (fp32)
and its partial sums of dα = Σ dK_mix ∘ (K_bidir − K_causal); the prologue of the programs of both
prompt caches routes it (dK_causal starts from (1 − α)·dK_mix, dK_bidir from α·dK_mix); `ordered_sum`
adds the partials up in a fixed order (no atomics: the same bits on every run).
"""
import torch
import triton
import triton.language as tl

from .._layout import device_guard
from ._launch import FMA, cdiv, launch

BLOCK = 2048  # elements a program: 16 bf16 (32 bytes) a thread at 4 warps
SUM_BLOCK = 1024


@triton.jit
def mix(x0, x1, alpha):
    """(1 − α)·x0 + α·x1 in fp32, as one fused multiply-add x0 + α·(x1 − x0)."""
    x0 = x0.to(tl.float32)
    return tl.fma(alpha, x1.to(tl.float32) - x0, x0)


@triton.jit
def _mix_kernel(K, V, KM, VM, ALPHA_K, ALPHA_V, n, BLOCK: tl.constexpr):
    """K, V: [2, n] (causal stream first); KM, VM: [n], in K's dtype."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    alpha_k = tl.load(ALPHA_K).to(tl.float32)
    alpha_v = tl.load(ALPHA_V).to(tl.float32)
    k0 = tl.load(K + offsets, mask=ok, other=0.0)
    k1 = tl.load(K + n + offsets, mask=ok, other=0.0)
    tl.store(KM + offsets, mix(k0, k1, alpha_k).to(KM.dtype.element_ty), mask=ok)
    v0 = tl.load(V + offsets, mask=ok, other=0.0)
    v1 = tl.load(V + n + offsets, mask=ok, other=0.0)
    tl.store(VM + offsets, mix(v0, v1, alpha_v).to(VM.dtype.element_ty), mask=ok)


@triton.jit
def _ordered_sum_kernel(PARTIALS, OUT, count, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[c] = Σ_i PARTIALS[i, c] for a [count, COLUMNS] fp32 table, one program, blocks in order."""
    rows = tl.arange(0, BLOCK)
    columns = tl.arange(0, COLUMNS)
    acc = tl.zeros([BLOCK, COLUMNS], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        ok = (start + rows) < count
        acc += tl.load(PARTIALS + (start + rows)[:, None] * COLUMNS + columns[None, :], mask=ok[:, None], other=0.0)
    tl.store(OUT + columns, tl.sum(acc, 0))


def mixed_cache(k_p: torch.Tensor, v_p: torch.Tensor, alpha_k: torch.Tensor, alpha_v: torch.Tensor):
    """(K_mix, V_mix) [B, Tp, Hkv, D] from contiguous k_p, v_p [2, B, Tp, Hkv, D] and 0-dim fp32 alphas."""
    k_mix, v_mix = torch.empty_like(k_p[0]), torch.empty_like(v_p[0])
    n = k_mix.numel()
    if n:
        with device_guard(k_p):
            launch(_mix_kernel, (cdiv(n, BLOCK),), k_p, v_p, k_mix, v_mix, alpha_k, alpha_v, n, BLOCK=BLOCK,
                   num_warps=4, **FMA)
    return k_mix, v_mix


def ordered_sum(partials: torch.Tensor) -> torch.Tensor:
    """Column sums of a contiguous [count, C] fp32 table (C a power of two), added in a fixed order."""
    count, columns = partials.shape
    out = torch.empty(columns, dtype=torch.float32, device=partials.device)
    with device_guard(partials):
        launch(_ordered_sum_kernel, (1,), partials, out, count, COLUMNS=columns, BLOCK=SUM_BLOCK, num_warps=4, **FMA)
    return out
