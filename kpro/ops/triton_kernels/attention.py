"""Flash attention in Triton: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], GQA, causal / prefix / key-padding
masks, queries aligned to the end of the keys. Forward saves the output and the per-row lse2 only;
backward recomputes the probabilities tile by tile (one kernel for dK/dV, transposed; one for dQ).
Under a causal mask every kernel starts its heaviest tiles first. Tiles are read through TMA tensor
descriptors on sm_90 where the tensors are aligned, else with pointer loads (attention_tiles.load_path).
"""
import torch
import triton
import triton.language as tl

from .._layout import device_guard
from ._launch import FMA, cdiv, launch, launch_errors, within_32bit_rows
from .attention_tiles import (LOG2E, attend, attend_grad, batch_and_heads, block_sizes, device_arch, dkdv_heads,
                              finish_rows, key_tile_plan, key_window, load_head, load_path, padded_head_dim,
                              prepare_launch, row_end, rows_view, store_head, tile_and_head)


@triton.jit
def _forward_kernel(Q, K, V, O, LSE2, PREFIX, KEY_OK, KEY_WINDOW,
                    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sm_b,
                    Tq, Tk, H, GROUP, scale2,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                    USE_TMA: tl.constexpr):
    m0, bh = tile_and_head(Tq, BLOCK_M, CAUSAL, True)
    b, h, kv_h = batch_and_heads(bh, H, GROUP)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = load_head(Q + b * sq_b + h * sq_h, m0, sq_t, Tq, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
    prefix = tl.load(PREFIX + b).to(tl.int32) if HAS_PREFIX else 0
    ends = row_end(rows, Tk - Tq, prefix, CAUSAL)
    if HAS_KEY_MASK:
        key_lo, key_limit, key_dense = key_window(KEY_WINDOW, b, Tk)
    else:
        key_lo, key_limit, key_dense = 0, Tk, 1
    k_rows = rows_view(K + b * sk_b + kv_h * sk_h, sk_t, key_limit, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
    v_rows = rows_view(V + b * sv_b + kv_h * sv_h, sv_t, key_limit, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend(acc, m_i, l_i, q, k_rows, v_rows, sk_t, sv_t, rows, ends, key_limit, Tq, KEY_OK + b * sm_b,
                           key_lo, key_dense, scale2, dims, dim_ok, BLOCK_N, HAS_KEY_MASK, HAS_KEY_MASK, USE_TMA)
    out, lse2 = finish_rows(acc, m_i, l_i, rows, Tq)
    store_head(O + b * so_b + h * so_h, m0, so_t, Tq, out.to(O.dtype.element_ty), dims, dim_ok, HEAD_DIM, BLOCK_M,
               USE_TMA)
    tl.store(LSE2 + (b * H + h) * Tq + rows, lse2, mask=rows < Tq)


@triton.jit
def _delta_kernel(O, DO, DELTA, so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, T, H,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O: the row term of the softmax gradient."""
    m0, bh = tile_and_head(T, BLOCK_M, False, False)
    rows = m0 + tl.arange(0, BLOCK_M)
    b, h, _ = batch_and_heads(bh, H, 1)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_t + dims[None, :], mask=mask, other=0.0)
    tl.store(DELTA + (b * H + h) * T + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, PREFIX, KEY_OK, KEY_WINDOW,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
                 sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h, sm_b,
                 Tq, Tk, H, HKV, GROUP, scale, scale2,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                 USE_TMA: tl.constexpr):
    n0, bh = tile_and_head(Tk, BLOCK_N, CAUSAL, False)  # causal: the first key tiles (most queries) first
    b, kv_h, _ = batch_and_heads(bh, HKV, 1)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    k = load_head(K + b * sk_b + kv_h * sk_h, n0, sk_t, Tk, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
    v = load_head(V + b * sv_b + kv_h * sv_h, n0, sv_t, Tk, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
    prefix = tl.load(PREFIX + b).to(tl.int32) if HAS_PREFIX else 0
    if HAS_KEY_MASK:
        key_lo, key_limit, key_dense = key_window(KEY_WINDOW, b, Tk)
        whole = (key_dense != 0) & (n0 >= key_lo) & (n0 + BLOCK_N <= key_limit)
        live = (n0 + BLOCK_N > key_lo) & (n0 < key_limit)  # else padding only: no query sees these keys
    else:
        key_lo, key_limit, key_dense = 0, Tk, 1
        whole = n0 + BLOCK_N <= Tk
        live = n0 < Tk
    m_lo, m_full = key_tile_plan(n0, Tk - Tq, prefix, live, whole, Tq, BLOCK_M, BLOCK_N, CAUSAL)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = dkdv_heads(dk, dv, k, v, Q + b * sq_b, DO + b * sdo_b, LSE2 + b * H * Tq, DELTA + b * H * Tq, sq_h, sq_t,
                        sdo_h, sdo_t, Tq, kv_h * GROUP, GROUP, cols, Tk - Tq, prefix, key_limit, Tq,
                        KEY_OK + b * sm_b, key_lo, key_dense, m_lo, m_full, scale2, dims, dim_ok, HEAD_DIM, BLOCK_M,
                        CAUSAL, HAS_KEY_MASK, USE_TMA)
    store_head(DK + b * sdk_b + kv_h * sdk_h, n0, sdk_t, Tk, (dk * scale).to(DK.dtype.element_ty), dims, dim_ok,
               HEAD_DIM, BLOCK_N, USE_TMA)
    store_head(DV + b * sdv_b + kv_h * sdv_h, n0, sdv_t, Tk, dv.to(DV.dtype.element_ty), dims, dim_ok, HEAD_DIM,
               BLOCK_N, USE_TMA)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, PREFIX, KEY_OK, KEY_WINDOW,
               sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h, sm_b,
               Tq, Tk, H, GROUP, scale, scale2,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               USE_TMA: tl.constexpr):
    m0, bh = tile_and_head(Tq, BLOCK_M, CAUSAL, True)  # causal: the last query tiles (most keys) first
    b, h, kv_h = batch_and_heads(bh, H, GROUP)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = load_head(Q + b * sq_b + h * sq_h, m0, sq_t, Tq, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
    do = load_head(DO + b * sdo_b + h * sdo_h, m0, sdo_t, Tq, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
    row_base = (b * H + h) * Tq
    neg_lse2 = -tl.load(LSE2 + row_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    prefix = tl.load(PREFIX + b).to(tl.int32) if HAS_PREFIX else 0
    ends = row_end(rows, Tk - Tq, prefix, CAUSAL)
    if HAS_KEY_MASK:
        key_lo, key_limit, key_dense = key_window(KEY_WINDOW, b, Tk)
    else:
        key_lo, key_limit, key_dense = 0, Tk, 1
    k_rows = rows_view(K + b * sk_b + kv_h * sk_h, sk_t, key_limit, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
    v_rows = rows_view(V + b * sv_b + kv_h * sv_h, sv_t, key_limit, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = attend_grad(dq, q, do, neg_lse2, delta, k_rows, v_rows, sk_t, sv_t, rows, ends, key_limit, Tq,
                     KEY_OK + b * sm_b, key_lo, key_dense, scale2, dims, dim_ok, BLOCK_N, HAS_KEY_MASK, HAS_KEY_MASK,
                     USE_TMA)
    store_head(DQ + b * sdq_b + h * sdq_h, m0, sdq_t, Tq, (dq * scale).to(DQ.dtype.element_ty), dims, dim_ok,
               HEAD_DIM, BLOCK_M, USE_TMA)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(prefix_lens, attention_mask, like):
    """(prefix, key_ok, key row stride, key window) kernel arguments; dummies where there is no mask."""
    dummy = torch.empty(1, dtype=torch.int32, device=like.device)
    prefix = prefix_lens.to(device=like.device, dtype=torch.int32).contiguous() if prefix_lens is not None else dummy
    if attention_mask is None:
        return prefix, dummy, 0, dummy
    key_ok = attention_mask.to(device=like.device, dtype=torch.int8).contiguous()
    return prefix, key_ok, key_ok.stride(0), key_windows(key_ok)


def key_windows(key_ok: torch.Tensor) -> torch.Tensor:
    """[B, 3] int32 per row: its first real key, one past its last, and 1 when every key between is real
    (left or right padding: the kernels then never read the mask). A row with no real key gets [0, 0).
    Computed on the device, without a sync."""
    real = key_ok != 0
    tk = real.shape[1]
    if tk == 0:  # no keys at all (argmax has no dimension to reduce): every row an empty window
        return torch.tensor([0, 0, 1], dtype=torch.int32, device=real.device).repeat(real.shape[0], 1)
    any_real = real.any(1)
    first = real.int().argmax(1)
    end = tk - real.flip(1).int().argmax(1)
    first, end = torch.where(any_real, first, 0), torch.where(any_real, end, 0)
    dense = real.sum(1) == end - first
    return torch.stack((first, end, dense.int()), 1).to(torch.int32).contiguous()


def forward(q, k, v, causal, prefix_lens, attention_mask, scale):
    q, k, v = within_32bit_rows("attention", _unit_last(q), _unit_last(k), _unit_last(v))
    batch, tq, heads, dim = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the fake implementation says
    within_32bit_rows("attention", out)  # a query broadcast over heads reaches less far than its output's rows
    lse2 = torch.empty((batch, heads, tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse2
    arch = device_arch(q.device)
    path = load_path(arch, dim, q.dtype, (q, k, v, out))
    block_m, block_n, warps, stages = block_sizes("forward", arch, dim, q.dtype, path=path)
    prefix, key_ok, sm_b, window = _mask_args(prefix_lens, attention_mask, q)
    grid = (cdiv(tq, block_m) * batch * heads,)
    prepare_launch(path, q)
    with device_guard(q), launch_errors("attention"):
        launch(_forward_kernel, grid, q, k, v, out, lse2, prefix, key_ok, window, *_strides(q), *_strides(k),
               *_strides(v), *_strides(out), sm_b, tq, tk, heads, heads // kv_heads, scale * LOG2E, HEAD_DIM=dim,
               BLOCK_D=padded_head_dim(dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
               HAS_PREFIX=prefix_lens is not None, HAS_KEY_MASK=attention_mask is not None, USE_TMA=path == "tma",
               num_warps=warps, num_stages=stages, **FMA)
    return out, lse2


def row_deltas(out, dout):
    """delta [B, H, T] = rowwise dot of dO and O, in fp32."""
    batch, t, heads, dim = out.shape
    delta = torch.empty((batch, heads, t), dtype=torch.float32, device=out.device)
    block_m = 16 if out.device.type != "cuda" else 64
    with device_guard(out):
        launch(_delta_kernel, (cdiv(t, block_m) * batch * heads,), out, dout, delta, *_strides(out), *_strides(dout),
               t, heads, HEAD_DIM=dim, BLOCK_D=padded_head_dim(dim), BLOCK_M=block_m, **FMA)
    return delta


def backward(dout, q, k, v, out, lse2, causal, prefix_lens, attention_mask, scale):
    q, k, v, out, dout = within_32bit_rows("attention backward", *(_unit_last(t) for t in (q, k, v, out, dout)))
    batch, tq, heads, dim = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = row_deltas(out, dout)
    prefix, key_ok, sm_b, window = _mask_args(prefix_lens, attention_mask, q)
    masks = dict(HEAD_DIM=dim, BLOCK_D=padded_head_dim(dim), CAUSAL=causal, HAS_PREFIX=prefix_lens is not None,
                 HAS_KEY_MASK=attention_mask is not None)
    arch = device_arch(q.device)
    path = load_path(arch, dim, q.dtype, (q, k, v, dout, dq, dk, dv))
    dkdv_tiles, dq_tiles = (block_sizes(kind, arch, dim, q.dtype, path=path) for kind in ("dkdv", "dq"))
    prepare_launch(path, q)
    with device_guard(q), launch_errors("attention backward"):
        block_m, block_n, warps, stages = dkdv_tiles
        launch(_dkdv_kernel, (cdiv(tk, block_n) * batch * kv_heads,), q, k, v, dout, lse2, delta, dk, dv, prefix,
               key_ok, window, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
               *_strides(dv), sm_b, tq, tk, heads, kv_heads, heads // kv_heads, scale, scale * LOG2E, BLOCK_M=block_m,
               BLOCK_N=block_n, USE_TMA=path == "tma", num_warps=warps, num_stages=stages, **masks, **FMA)
        block_m, block_n, warps, stages = dq_tiles
        launch(_dq_kernel, (cdiv(tq, block_m) * batch * heads,), q, k, v, dout, lse2, delta, dq, prefix, key_ok,
               window, *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), sm_b, tq, tk, heads,
               heads // kv_heads, scale, scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=path == "tma",
               num_warps=warps, num_stages=stages, **masks, **FMA)
    return dq, dk, dv
