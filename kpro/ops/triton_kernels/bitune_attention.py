"""The Bitune dual-attention pass in Triton (see kpro/ops/bitune_attention.py for the semantics).

The mixed prompt cache is materialised once (bitune_mix.mixed_cache, an elementwise kernel); the three
streams then run through the tile loops of attention_tiles (those of plain attention: unmasked tiles
where every row sees every key, a masked boundary, TMA where load_path allows) in one launch a kernel:
- forward: one program per query tile of each stream, the answer's first (heaviest: it sees the whole
  valid mixed cache, then its own keys causally), then both prompt streams, last tiles first;
- backward: the row deltas; the mix again (cheaper than keeping it); dK/dV in two launches; dQ of
  every stream in one (answer first). The first dK/dV launch holds every key the answer reads: the
  mixed cache's tiles, whose epilogue is the mix's backward (dK_mix, dV_mix in fp32 for the second
  launch, and a partial sum of dα_k, dα_v per tile), and the answer's own keys. The second holds both
  prompt caches' own keys; its prologue routes the mix's gradient, starting the accumulators from
  (1 − α)·dK_mix (causal stream) or α·dK_mix (bidirectional stream). So both caches' gradients leave the
  kernels final, and dα is the ordered sum of the partials (no atomics, no torch passes).
  One dK/dV launch would need dK_mix twice in one program: both fp32 tiles in registers at once (four
  accumulators) or a round trip through memory inside the kernel; at head dim 128 either spills (the
  compiler, sm_90a), so the kernel boundary carries it instead. A single launch whose prompt tiles wait
  (ticket-ordered work items, a release/acquire flag per mixed tile) for their mixed tile's dK_mix passes
  the float64 tests in the interpreter, but spills 56-160 B at head dim 128 bf16 on sm_90a in every
  arrangement tried: the fp32 dK_mix tile, loaded by pointers beside the accumulators, is one tile too
  many (benchmarks/RESULTS.md). A TMA load of it would not be, but needs a generic-to-async proxy fence
  across programs that no test here can check; so the two launches stay until a GPU can time both.
"""
import torch
import triton
import triton.language as tl

from .._layout import device_guard
from ._launch import FMA, cdiv, launch, launch_errors, within_32bit_rows
from .attention import row_deltas
from .attention_tiles import (LOG2E, NO_END, attend, attend_grad, batch_and_heads, block_sizes, device_arch,
                              dkdv_heads, finish_rows, key_tile_plan, load_head, load_path, padded_head_dim,
                              prepare_launch, rows_view, store_head)
from .bitune_mix import mixed_cache, ordered_sum


@triton.jit
def _query_program(Ta, Tp, heads, BLOCK_M: tl.constexpr):
    """(is_answer, stream, first row, batch·head) of this program: the answer's query tiles first, last
    tiles first, then the prompt streams' tiles, last first, both streams of a tile together."""
    pid = tl.program_id(0)
    answer_tiles = tl.cdiv(Ta, BLOCK_M)
    answer_programs = answer_tiles * heads
    is_answer = pid < answer_programs
    p = tl.where(is_answer, pid, pid - answer_programs)
    per_tile = tl.where(is_answer, heads, 2 * heads)
    tiles = tl.where(is_answer, answer_tiles, tl.cdiv(Tp, BLOCK_M))
    stream = tl.where(is_answer, 2, (p // heads) % 2)
    return is_answer, stream, (tiles - 1 - p // per_tile) * BLOCK_M, p % heads


@triton.jit
def _forward_kernel(QP, KP, VP, KM, VM, QA, KA, VA, OP, OA, LSEP, LSEA, PLEN, ALEN,
                    sqp_s, sqp_b, sqp_t, sqp_h, skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h,
                    skm_b, skm_t, skm_h, sqa_b, sqa_t, sqa_h, ska_b, ska_t, ska_h, sva_b, sva_t, sva_h,
                    sop_s, sop_b, sop_t, sop_h, soa_b, soa_t, soa_h,
                    B, Tp, Ta, H, GROUP, scale2,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_TMA: tl.constexpr):
    """KM, VM: the mixed prompt cache [B, Tp, Hkv, D] (V_mix shares K_mix's strides)."""
    is_answer, stream, m0, bh = _query_program(Ta, Tp, B * H, BLOCK_M)
    b, h, kv_h = batch_and_heads(bh, H, GROUP)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    la = tl.minimum(tl.load(ALEN + b).to(tl.int32), Ta)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if is_answer:
        q = load_head(QA + b * sqa_b + h * sqa_h, m0, sqa_t, la, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
        # Every answer query sees every valid key of the mixed prompt cache, then its own keys causally.
        KMh, VMh = KM + b * skm_b + kv_h * skm_h, VM + b * skm_b + kv_h * skm_h
        k_rows = rows_view(KMh, skm_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        v_rows = rows_view(VMh, skm_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_rows, v_rows, skm_t, skm_t, rows, tl.zeros_like(rows) + NO_END, lp,
                               la, PLEN, 0, 1, scale2, dims, dim_ok, BLOCK_N, False, False, USE_TMA)
        KAh, VAh = KA + b * ska_b + kv_h * ska_h, VA + b * sva_b + kv_h * sva_h
        k_rows = rows_view(KAh, ska_t, la, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        v_rows = rows_view(VAh, sva_t, la, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_rows, v_rows, ska_t, sva_t, rows, rows + 1, la, la, ALEN, 0, 1,
                               scale2, dims, dim_ok, BLOCK_N, False, False, USE_TMA)
        out, lse2 = finish_rows(acc, m_i, l_i, rows, la)
        store_head(OA + b * soa_b + h * soa_h, m0, soa_t, Ta, out.to(OA.dtype.element_ty), dims, dim_ok, HEAD_DIM,
                   BLOCK_M, USE_TMA)
        tl.store(LSEA + (b * H + h) * Ta + rows, lse2, mask=rows < Ta)
    else:
        q = load_head(QP + stream * sqp_s + b * sqp_b + h * sqp_h, m0, sqp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_M,
                      USE_TMA)
        KPh, VPh = KP + stream * skp_s + b * skp_b + kv_h * skp_h, VP + stream * svp_s + b * svp_b + kv_h * svp_h
        k_rows = rows_view(KPh, skp_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        v_rows = rows_view(VPh, svp_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        ends = tl.where(stream == 0, rows + 1, NO_END)  # causal stream, bidirectional stream
        acc, m_i, l_i = attend(acc, m_i, l_i, q, k_rows, v_rows, skp_t, svp_t, rows, ends, lp, lp, PLEN, 0, 1, scale2,
                               dims, dim_ok, BLOCK_N, False, False, USE_TMA)
        out, lse2 = finish_rows(acc, m_i, l_i, rows, lp)
        store_head(OP + stream * sop_s + b * sop_b + h * sop_h, m0, sop_t, Tp, out.to(OP.dtype.element_ty), dims,
                   dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
        tl.store(LSEP + ((stream * B + b) * H + h) * Tp + rows, lse2, mask=rows < Tp)


@triton.jit
def _dkdv_answer_kernel(KP, VP, KM, VM, QA, KA, VA, DOA, LSEA, DELTAA, PLEN, ALEN, DKM, DVM, DKA, DVA, DALPHA,
                        skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h, skm_b, skm_t, skm_h,
                        sqa_b, sqa_t, sqa_h, ska_b, ska_t, ska_h, sva_b, sva_t, sva_h, sdoa_b, sdoa_t, sdoa_h,
                        sdka_b, sdka_t, sdka_h, sdkm_b, sdkm_t, sdkm_h,
                        B, Tp, Ta, H, HKV, GROUP, scale, scale2,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        USE_TMA: tl.constexpr):
    """dK/dV of every key the answer's queries read. First one program per key tile of the mixed prompt
    cache (every valid answer row sees every valid key: unmasked but for the last tile); its epilogue is
    the mix's backward: dK_mix, dV_mix (fp32, unscaled) for _dkdv_kernel to route into both caches, and
    this tile's partial sums of dα_k = Σ dK_mix ∘ (K_bidir − K_causal) and dα_v. Then one program per key
    tile of the answer's own keys (causal). DKA/DVA share strides (sdka), DKM/DVM too (sdkm), KM/VM too."""
    pid = tl.program_id(0)
    kv = B * HKV
    mixed_programs = tl.cdiv(Tp, BLOCK_N) * kv
    is_mixed = pid < mixed_programs
    p = tl.where(is_mixed, pid, pid - mixed_programs)
    n0 = (p // kv) * BLOCK_N
    b, kv_h, _ = batch_and_heads(p % kv, HKV, 1)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    la = tl.minimum(tl.load(ALEN + b).to(tl.int32), Ta)
    QAb, DOAb, lse_a = QA + b * sqa_b, DOA + b * sdoa_b, b * H * Ta
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if is_mixed:
        k = load_head(KM + b * skm_b + kv_h * skm_h, n0, skm_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
        v = load_head(VM + b * skm_b + kv_h * skm_h, n0, skm_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
        m_lo, m_full = key_tile_plan(n0, 0, 0, n0 < lp, n0 + BLOCK_N <= lp, la, BLOCK_M, BLOCK_N, False)
        dk, dv = dkdv_heads(dk, dv, k, v, QAb, DOAb, LSEA + lse_a, DELTAA + lse_a, sqa_h, sqa_t, sdoa_h, sdoa_t, Ta,
                            kv_h * GROUP, GROUP, cols, 0, 0, lp, la, PLEN, 0, 1, m_lo, m_full, scale2, dims, dim_ok,
                            HEAD_DIM, BLOCK_M, False, False, USE_TMA)
        mixed = b * sdkm_b + kv_h * sdkm_h
        store_head(DKM + mixed, n0, sdkm_t, Tp, dk, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
        store_head(DVM + mixed, n0, sdkm_t, Tp, dv, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
        K0, V0 = KP + b * skp_b + kv_h * skp_h, VP + b * svp_b + kv_h * svp_h
        # A TMA view holds at least one row: with prompt_lens[b] = 0 it reads the real row 0 (pointer loads give
        # zeros), whose NaN or infinity would reach dα through 0 · NaN. Such a tile has no valid key: its partials
        # are 0. (With prompt_lens[b] > 0 the view ends at the valid keys; the pointer path compiles unchanged.)
        k_diff = load_head(K0 + skp_s, n0, skp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA).to(tl.float32) - \
            load_head(K0, n0, skp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA).to(tl.float32)
        partial = tl.sum(tl.sum(dk * k_diff, 1), 0) * scale
        if USE_TMA:
            partial = tl.where(n0 < lp, partial, 0.0)
        tl.store(DALPHA + 2 * pid, partial)
        v_diff = load_head(V0 + svp_s, n0, svp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA).to(tl.float32) - \
            load_head(V0, n0, svp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA).to(tl.float32)
        partial = tl.sum(tl.sum(dv * v_diff, 1), 0)
        if USE_TMA:
            partial = tl.where(n0 < lp, partial, 0.0)
        tl.store(DALPHA + 2 * pid + 1, partial)
    else:
        k = load_head(KA + b * ska_b + kv_h * ska_h, n0, ska_t, la, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
        v = load_head(VA + b * sva_b + kv_h * sva_h, n0, sva_t, la, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
        m_lo, m_full = key_tile_plan(n0, 0, 0, n0 < la, n0 + BLOCK_N <= la, la, BLOCK_M, BLOCK_N, True)
        dk, dv = dkdv_heads(dk, dv, k, v, QAb, DOAb, LSEA + lse_a, DELTAA + lse_a, sqa_h, sqa_t, sdoa_h, sdoa_t, Ta,
                            kv_h * GROUP, GROUP, cols, 0, 0, la, la, ALEN, 0, 1, m_lo, m_full, scale2, dims, dim_ok,
                            HEAD_DIM, BLOCK_M, True, False, USE_TMA)
        own = b * sdka_b + kv_h * sdka_h
        store_head(DKA + own, n0, sdka_t, Ta, (dk * scale).to(DKA.dtype.element_ty), dims, dim_ok, HEAD_DIM, BLOCK_N,
                   USE_TMA)
        store_head(DVA + own, n0, sdka_t, Ta, dv.to(DVA.dtype.element_ty), dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)


@triton.jit
def _dkdv_kernel(QP, KP, VP, DOP, LSEP, DELTAP, ALPHA_K, ALPHA_V, PLEN, DKM, DVM, DKP, DVP,
                 sqp_s, sqp_b, sqp_t, sqp_h, skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h,
                 sdop_s, sdop_b, sdop_t, sdop_h, sdkp_s, sdkp_b, sdkp_t, sdkp_h, sdkm_b, sdkm_t, sdkm_h,
                 B, Tp, H, HKV, GROUP, scale, scale2,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """dK/dV of both prompt caches: one program per key tile of each stream, both streams of a tile
    together, first tiles first (the causal stream's heaviest). The mix's gradient routing is this
    kernel's prologue: the accumulators start from (1 − α)·dK_mix (causal stream) or α·dK_mix
    (bidirectional stream), which _dkdv_answer_kernel wrote, and add the stream's own queries. DKP/DVP
    share strides (sdkp), DKM/DVM too (sdkm)."""
    pid = tl.program_id(0)
    kv = B * HKV
    stream = (pid // kv) % 2
    n0 = (pid // (2 * kv)) * BLOCK_N
    b, kv_h, _ = batch_and_heads(pid % kv, HKV, 1)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    alpha_k = tl.load(ALPHA_K).to(tl.float32)
    alpha_v = tl.load(ALPHA_V).to(tl.float32)
    mixed = b * sdkm_b + kv_h * sdkm_h
    dk = load_head(DKM + mixed, n0, sdkm_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
    dv = load_head(DVM + mixed, n0, sdkm_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)
    dk *= tl.where(stream == 0, 1.0 - alpha_k, alpha_k)
    dv *= tl.where(stream == 0, 1.0 - alpha_v, alpha_v)
    k = load_head(KP + stream * skp_s + b * skp_b + kv_h * skp_h, n0, skp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N,
                  USE_TMA)
    v = load_head(VP + stream * svp_s + b * svp_b + kv_h * svp_h, n0, svp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_N,
                  USE_TMA)
    live, whole = n0 < lp, n0 + BLOCK_N <= lp
    Qb, DOb, lse_p = QP + stream * sqp_s + b * sqp_b, DOP + stream * sdop_s + b * sdop_b, (stream * B + b) * H * Tp
    if stream == 0:  # causal: the queries at or after the tile's first key
        m_lo, m_full = key_tile_plan(n0, 0, 0, live, whole, lp, BLOCK_M, BLOCK_N, True)
        dk, dv = dkdv_heads(dk, dv, k, v, Qb, DOb, LSEP + lse_p, DELTAP + lse_p, sqp_h, sqp_t, sdop_h, sdop_t, Tp,
                            kv_h * GROUP, GROUP, cols, 0, 0, lp, lp, PLEN, 0, 1, m_lo, m_full, scale2, dims, dim_ok,
                            HEAD_DIM, BLOCK_M, True, False, USE_TMA)
    else:
        m_lo, m_full = key_tile_plan(n0, 0, 0, live, whole, lp, BLOCK_M, BLOCK_N, False)
        dk, dv = dkdv_heads(dk, dv, k, v, Qb, DOb, LSEP + lse_p, DELTAP + lse_p, sqp_h, sqp_t, sdop_h, sdop_t, Tp,
                            kv_h * GROUP, GROUP, cols, 0, 0, lp, lp, PLEN, 0, 1, m_lo, m_full, scale2, dims, dim_ok,
                            HEAD_DIM, BLOCK_M, False, False, USE_TMA)
    own = stream * sdkp_s + b * sdkp_b + kv_h * sdkp_h
    store_head(DKP + own, n0, sdkp_t, Tp, (dk * scale).to(DKP.dtype.element_ty), dims, dim_ok, HEAD_DIM, BLOCK_N,
               USE_TMA)
    store_head(DVP + own, n0, sdkp_t, Tp, dv.to(DVP.dtype.element_ty), dims, dim_ok, HEAD_DIM, BLOCK_N, USE_TMA)


@triton.jit
def _dq_kernel(QP, KP, VP, KM, VM, QA, KA, VA, DOP, DOA, LSEP, LSEA, DELTAP, DELTAA, PLEN, ALEN, DQP, DQA,
               sqp_s, sqp_b, sqp_t, sqp_h, skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h,
               skm_b, skm_t, skm_h, sqa_b, sqa_t, sqa_h, ska_b, ska_t, ska_h, sva_b, sva_t, sva_h,
               sdop_s, sdop_b, sdop_t, sdop_h, sdoa_b, sdoa_t, sdoa_h,
               B, Tp, Ta, H, GROUP, scale, scale2,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               USE_TMA: tl.constexpr):
    """dQ of the answer (first) and both prompt streams; DQP shares the strides of QP and DQA those of QA."""
    is_answer, stream, m0, bh = _query_program(Ta, Tp, B * H, BLOCK_M)
    b, h, kv_h = batch_and_heads(bh, H, GROUP)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    la = tl.minimum(tl.load(ALEN + b).to(tl.int32), Ta)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if is_answer:
        q = load_head(QA + b * sqa_b + h * sqa_h, m0, sqa_t, la, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
        do = load_head(DOA + b * sdoa_b + h * sdoa_h, m0, sdoa_t, la, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
        row_base = (b * H + h) * Ta
        neg_lse2 = -tl.load(LSEA + row_base + rows, mask=rows < la, other=0.0)
        delta = tl.load(DELTAA + row_base + rows, mask=rows < la, other=0.0)
        KMh, VMh = KM + b * skm_b + kv_h * skm_h, VM + b * skm_b + kv_h * skm_h
        k_rows = rows_view(KMh, skm_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        v_rows = rows_view(VMh, skm_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        dq = attend_grad(dq, q, do, neg_lse2, delta, k_rows, v_rows, skm_t, skm_t, rows, tl.zeros_like(rows) + NO_END,
                         lp, la, PLEN, 0, 1, scale2, dims, dim_ok, BLOCK_N, False, False, USE_TMA)
        KAh, VAh = KA + b * ska_b + kv_h * ska_h, VA + b * sva_b + kv_h * sva_h
        k_rows = rows_view(KAh, ska_t, la, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        v_rows = rows_view(VAh, sva_t, la, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        dq = attend_grad(dq, q, do, neg_lse2, delta, k_rows, v_rows, ska_t, sva_t, rows, rows + 1, la, la, ALEN, 0, 1,
                         scale2, dims, dim_ok, BLOCK_N, False, False, USE_TMA)
        store_head(DQA + b * sqa_b + h * sqa_h, m0, sqa_t, Ta, (dq * scale).to(DQA.dtype.element_ty), dims, dim_ok,
                   HEAD_DIM, BLOCK_M, USE_TMA)
    else:
        own = stream * sqp_s + b * sqp_b + h * sqp_h  # dQ shares Q's strides
        q = load_head(QP + own, m0, sqp_t, lp, dims, dim_ok, HEAD_DIM, BLOCK_M, USE_TMA)
        do = load_head(DOP + stream * sdop_s + b * sdop_b + h * sdop_h, m0, sdop_t, lp, dims, dim_ok, HEAD_DIM,
                       BLOCK_M, USE_TMA)
        row_base = ((stream * B + b) * H + h) * Tp
        neg_lse2 = -tl.load(LSEP + row_base + rows, mask=rows < lp, other=0.0)
        delta = tl.load(DELTAP + row_base + rows, mask=rows < lp, other=0.0)
        KPh, VPh = KP + stream * skp_s + b * skp_b + kv_h * skp_h, VP + stream * svp_s + b * svp_b + kv_h * svp_h
        k_rows = rows_view(KPh, skp_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        v_rows = rows_view(VPh, svp_t, lp, HEAD_DIM, HEAD_DIM, BLOCK_N, USE_TMA)
        ends = tl.where(stream == 0, rows + 1, NO_END)
        dq = attend_grad(dq, q, do, neg_lse2, delta, k_rows, v_rows, skp_t, svp_t, rows, ends, lp, lp, PLEN, 0, 1,
                         scale2, dims, dim_ok, BLOCK_N, False, False, USE_TMA)
        store_head(DQP + own, m0, sqp_t, Tp, (dq * scale).to(DQP.dtype.element_ty), dims, dim_ok, HEAD_DIM,
                   BLOCK_M, USE_TMA)


def _strides(t):
    return tuple(t.stride(i) for i in range(t.dim() - 1))


def _lens(lens, like):
    return lens.to(device=like.device, dtype=torch.int32).contiguous()


def _nonempty_prompt(*tensors):
    """Prompt-stream tensors with at least one position: when every prompt has length 1 the streams are
    empty, and a zero-length dummy position (masked out by prompt_lens = 0) keeps the kernels simple."""
    if tensors[0].shape[2] > 0:
        return tensors
    return tuple(t.new_zeros((*t.shape[:2], 1, *t.shape[3:])) for t in tensors)


def _alphas(alpha_k, alpha_v):
    return alpha_k.detach().float().contiguous(), alpha_v.detach().float().contiguous()


def prompt_cache_mix(k_p, v_p, alpha_k, alpha_v):
    """(K_mix, V_mix) as `forward` mixes them, for a decoding cache (kpro.ops.bitune_attention.mixed_prompt_cache)."""
    a_k, a_v = _alphas(alpha_k, alpha_v)
    with device_guard(k_p):
        return mixed_cache(k_p.contiguous(), v_p.contiguous(), a_k, a_v)


def forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale):
    tp_given = q_p.shape[2]
    q_p, k_p, v_p = _nonempty_prompt(q_p.contiguous(), k_p.contiguous(), v_p.contiguous())
    q_a, k_a, v_a = q_a.contiguous(), k_a.contiguous(), v_a.contiguous()
    _, batch, tp, heads, dim = q_p.shape
    ta, kv_heads = q_a.shape[1], k_a.shape[2]
    o_p, o_a = torch.empty_like(q_p), torch.empty_like(q_a)
    lse_p = torch.empty((2, batch, heads, tp), dtype=torch.float32, device=q_a.device)
    lse_a = torch.empty((batch, heads, ta), dtype=torch.float32, device=q_a.device)
    within_32bit_rows("bitune_attention", q_p[0], k_p[0], q_a, k_a)  # contiguous already: refuses, never copies
    a_k, a_v = _alphas(alpha_k, alpha_v)
    with device_guard(q_a), launch_errors("bitune_attention"):
        k_mix, v_mix = mixed_cache(k_p, v_p, a_k, a_v)
        arch = device_arch(q_a.device)
        path = load_path(arch, dim, q_a.dtype, (q_p, k_p, v_p, k_mix, v_mix, q_a, k_a, v_a, o_p, o_a))
        # the defaults (tuned=False: see tile_config)
        block_m, block_n, warps, stages = block_sizes("forward", arch, dim, q_a.dtype, tuned=False, path=path)
        prepare_launch(path, q_a)
        grid = ((cdiv(ta, block_m) + 2 * cdiv(tp, block_m)) * batch * heads,)
        launch(_forward_kernel, grid, q_p, k_p, v_p, k_mix, v_mix, q_a, k_a, v_a, o_p, o_a, lse_p, lse_a,
               _lens(prompt_lens, q_a), _lens(answer_lens, q_a), *_strides(q_p), *_strides(k_p), *_strides(v_p),
               *_strides(k_mix), *_strides(q_a), *_strides(k_a), *_strides(v_a), *_strides(o_p), *_strides(o_a),
               batch, tp, ta, heads, heads // kv_heads, scale * LOG2E, HEAD_DIM=dim, BLOCK_D=padded_head_dim(dim),
               BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=path == "tma", num_warps=warps, num_stages=stages, **FMA)
    return o_p[:, :, :tp_given], o_a, lse_p[..., :tp_given], lse_a


def backward(do_p, do_a, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, o_p, o_a,
             lse_p, lse_a, scale):
    tp_given = q_p.shape[2]
    q_p, k_p, v_p, do_p, o_p = _nonempty_prompt(*(t.contiguous() for t in (q_p, k_p, v_p, do_p, o_p)))
    if tp_given == 0:
        lse_p = lse_p.new_full((*lse_p.shape[:3], 1), float("-inf"))
    q_a, k_a, v_a, do_a, o_a = (t.contiguous() for t in (q_a, k_a, v_a, do_a, o_a))
    lse_p, lse_a = lse_p.contiguous(), lse_a.contiguous()
    _, batch, tp, heads, dim = q_p.shape
    ta, kv_heads = q_a.shape[1], k_a.shape[2]
    delta_p = row_deltas(o_p.view(2 * batch, tp, heads, dim), do_p.view(2 * batch, tp, heads, dim))
    delta_a = row_deltas(o_a, do_a)
    dq_p, dk_p, dv_p = torch.empty_like(q_p), torch.empty_like(k_p), torch.empty_like(v_p)
    dq_a, dk_a, dv_a = torch.empty_like(q_a), torch.empty_like(k_a), torch.empty_like(v_a)
    dk_mix = torch.empty(k_p.shape[1:], dtype=torch.float32, device=k_p.device)  # the answer's, unscaled
    dv_mix = torch.empty_like(dk_mix)
    a_k, a_v = _alphas(alpha_k, alpha_v)
    lens = (_lens(prompt_lens, q_a), _lens(answer_lens, q_a))
    with device_guard(q_a), launch_errors("bitune_attention backward"):
        k_mix, v_mix = mixed_cache(k_p, v_p, a_k, a_v)  # recomputed: cheaper than keeping it for the backward
        arch = device_arch(q_a.device)
        path = load_path(arch, dim, q_a.dtype, (q_p, k_p, v_p, k_mix, v_mix, q_a, k_a, v_a, do_p, do_a, dq_p, dk_p,
                                                dv_p, dq_a, dk_a, dv_a, dk_mix, dv_mix))
        dkdv_tiles, dq_tiles = (block_sizes(kind, arch, dim, q_a.dtype, tuned=False, path=path)
                                for kind in ("dkdv", "dq"))
        mixed_tiles = cdiv(tp, dkdv_tiles[1]) * batch * kv_heads
        partials = torch.empty((mixed_tiles, 2), dtype=torch.float32, device=q_a.device)  # dα_k, dα_v per key tile
        prepare_launch(path, q_a)
        flags = dict(HEAD_DIM=dim, BLOCK_D=padded_head_dim(dim), USE_TMA=path == "tma")
        block_m, block_n, warps, stages = dkdv_tiles
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags)
        grid = ((cdiv(tp, block_n) + cdiv(ta, block_n)) * batch * kv_heads,)
        launch(_dkdv_answer_kernel, grid, k_p, v_p, k_mix, v_mix, q_a, k_a, v_a, do_a, lse_a, delta_a, *lens, dk_mix,
               dv_mix, dk_a, dv_a, partials, *_strides(k_p), *_strides(v_p), *_strides(k_mix), *_strides(q_a),
               *_strides(k_a), *_strides(v_a), *_strides(do_a), *_strides(dk_a), *_strides(dk_mix), batch, tp, ta,
               heads, kv_heads, heads // kv_heads, scale, scale * LOG2E, **tiles, **FMA)
        launch(_dkdv_kernel, (2 * cdiv(tp, block_n) * batch * kv_heads,), q_p, k_p, v_p, do_p, lse_p, delta_p, a_k,
               a_v, lens[0], dk_mix, dv_mix, dk_p, dv_p, *_strides(q_p), *_strides(k_p), *_strides(v_p),
               *_strides(do_p), *_strides(dk_p), *_strides(dk_mix), batch, tp, heads, kv_heads, heads // kv_heads,
               scale, scale * LOG2E, **tiles, **FMA)
        block_m, block_n, warps, stages = dq_tiles
        grid = ((cdiv(ta, block_m) + 2 * cdiv(tp, block_m)) * batch * heads,)
        launch(_dq_kernel, grid, q_p, k_p, v_p, k_mix, v_mix, q_a, k_a, v_a, do_p, do_a, lse_p, lse_a, delta_p,
               delta_a, *lens, dq_p, dq_a, *_strides(q_p), *_strides(k_p), *_strides(v_p), *_strides(k_mix),
               *_strides(q_a), *_strides(k_a), *_strides(v_a), *_strides(do_p), *_strides(do_a), batch, tp, ta, heads,
               heads // kv_heads, scale, scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
               num_stages=stages, **flags, **FMA)
        dalpha = ordered_sum(partials)
    cut = slice(0, tp_given)
    return (dq_p[:, :, cut], dk_p[:, :, cut], dv_p[:, :, cut], dq_a, dk_a, dv_a,
            dalpha[0].to(alpha_k.dtype, copy=True), dalpha[1].to(alpha_v.dtype, copy=True))  # not views of one buffer
