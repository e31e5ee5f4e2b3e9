"""The Bitune dual-attention pass in Triton (see kpro/ops/bitune_attention.py for the semantics).

Forward: one launch. The second grid axis picks the stream: 0 = causal prompt, 1 = bidirectional prompt,
2 = answer. The answer's programs read the two prompt caches and mix them in registers while loading
(the mixed cache is never written), then continue over the answer's own keys with one online softmax.
Backward: one launch for the row deltas, one for dK/dV (four roles: each prompt stream's own keys, the
mixed keys seen by the answer, the answer's keys), one for dQ (three streams), then a few elementwise
ops that route the mixed-key gradient into both prompt caches and reduce it into dα_k, dα_v.
"""
import torch
import triton
import triton.language as tl

from .._layout import device_guard
from ._launch import check_32bit_rows, launch_errors
from .attention import row_deltas
from .attention_tiles import (LOG2E, NO_END, batch_and_heads, block_sizes, dkdv_tiles, dq_tiles, finish_rows,
                              forward_tiles, padded_head_dim, tile_and_head, tile_plan)


@triton.jit
def _forward_kernel(QP, KP, VP, QA, KA, VA, OP, OA, LSEP, LSEA, ALPHA_K, ALPHA_V, PLEN, ALEN,
                    sqp_s, sqp_b, sqp_t, sqp_h, skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h,
                    sqa_b, sqa_t, sqa_h, ska_b, ska_t, ska_h, sva_b, sva_t, sva_h,
                    sop_s, sop_b, sop_t, sop_h, soa_b, soa_t, soa_h,
                    B, Tp, Ta, H, GROUP, scale2,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0, bh = tile_and_head(tl.maximum(Tp, Ta), BLOCK_M)
    stream = tl.program_id(1)
    b, h, kv_h = batch_and_heads(bh, H, GROUP)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    la = tl.minimum(tl.load(ALEN + b).to(tl.int32), Ta)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if stream < 2:
        if m0 < Tp:
            qmask = (rows < Tp)[:, None] & dim_ok[None, :]
            q = tl.load(QP + stream * sqp_s + b * sqp_b + h * sqp_h + rows[:, None] * sqp_t + dims[None, :],
                        mask=qmask, other=0.0)
            K = KP + stream * skp_s + b * skp_b + kv_h * skp_h
            V = VP + stream * svp_s + b * svp_b + kv_h * svp_h
            ends = tl.where(stream == 0, rows + 1, NO_END)  # causal stream, bidirectional stream
            full, last = tile_plan(rows, ends, lp, lp, BLOCK_N)
            acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, K, V, 0.0, 0.0, skp_t, svp_t, rows, ends, lp, lp,
                                          PLEN, 0, 1, 0, full, scale2, dims, dim_ok, BLOCK_N, False, False, False)
            acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, K, V, 0.0, 0.0, skp_t, svp_t, rows, ends, lp, lp,
                                          PLEN, 0, 1, full, last, scale2, dims, dim_ok, BLOCK_N, True, False, False)
            out, lse2 = finish_rows(acc, m_i, l_i, rows, lp)
            tl.store(OP + stream * sop_s + b * sop_b + h * sop_h + rows[:, None] * sop_t + dims[None, :],
                     out.to(OP.dtype.element_ty), mask=qmask)
            tl.store(LSEP + ((stream * B + b) * H + h) * Tp + rows, lse2, mask=rows < Tp)
    else:
        if m0 < Ta:
            qmask = (rows < Ta)[:, None] & dim_ok[None, :]
            q = tl.load(QA + b * sqa_b + h * sqa_h + rows[:, None] * sqa_t + dims[None, :], mask=qmask, other=0.0)
            alpha_k = tl.load(ALPHA_K).to(tl.float32)
            alpha_v = tl.load(ALPHA_V).to(tl.float32)
            # Every answer query sees every valid key of the mixed prompt cache.
            K = KP + b * skp_b + kv_h * skp_h
            V = VP + b * svp_b + kv_h * svp_h
            ends = tl.zeros_like(rows) + NO_END
            full = (lp // BLOCK_N) * BLOCK_N
            acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, K + skp_s, V + svp_s, alpha_k, alpha_v, skp_t, svp_t,
                                          rows, ends, lp, la, PLEN, 0, 1, 0, full, scale2, dims, dim_ok, BLOCK_N,
                                          False, False, True)
            acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, K + skp_s, V + svp_s, alpha_k, alpha_v, skp_t, svp_t,
                                          rows, ends, lp, la, PLEN, 0, 1, full, lp, scale2, dims, dim_ok, BLOCK_N,
                                          True, False, True)
            # Then causally over the answer's own keys.
            K = KA + b * ska_b + kv_h * ska_h
            V = VA + b * sva_b + kv_h * sva_h
            ends = rows + 1
            full, last = tile_plan(rows, ends, la, la, BLOCK_N)
            acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, K, V, 0.0, 0.0, ska_t, sva_t, rows, ends, la, la,
                                          ALEN, 0, 1, 0, full, scale2, dims, dim_ok, BLOCK_N, False, False, False)
            acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, K, V, 0.0, 0.0, ska_t, sva_t, rows, ends, la, la,
                                          ALEN, 0, 1, full, last, scale2, dims, dim_ok, BLOCK_N, True, False, False)
            out, lse2 = finish_rows(acc, m_i, l_i, rows, la)
            tl.store(OA + b * soa_b + h * soa_h + rows[:, None] * soa_t + dims[None, :], out.to(OA.dtype.element_ty),
                     mask=qmask)
            tl.store(LSEA + (b * H + h) * Ta + rows, lse2, mask=rows < Ta)


@triton.jit
def _dkdv_kernel(QP, KP, VP, QA, KA, VA, DOP, DOA, LSEP, LSEA, DELTAP, DELTAA, ALPHA_K, ALPHA_V, PLEN, ALEN,
                 DKP, DVP, DKM, DVM, DKA, DVA,
                 sqp_s, sqp_b, sqp_t, sqp_h, skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h,
                 sqa_b, sqa_t, sqa_h, ska_b, ska_t, ska_h, sva_b, sva_t, sva_h,
                 sdop_s, sdop_b, sdop_t, sdop_h, sdoa_b, sdoa_t, sdoa_h,
                 sdkp_s, sdkp_b, sdkp_t, sdkp_h, sdkm_b, sdkm_t, sdkm_h, sdka_b, sdka_t, sdka_h,
                 B, Tp, Ta, H, HKV, GROUP, scale, scale2,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Roles (second grid axis): 0, 1 = a prompt stream's own keys; 2 = the mixed prompt keys as the
    answer sees them (dK, dV of the mix, fp32); 3 = the answer's own keys. dK/dV/dKm/dVm share strides."""
    n0, bh = tile_and_head(tl.maximum(Tp, Ta), BLOCK_N)
    role = tl.program_id(1)
    b, kv_h, _ = batch_and_heads(bh, HKV, 1)
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    la = tl.minimum(tl.load(ALEN + b).to(tl.int32), Ta)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if role < 3:
        if n0 < Tp:
            col_ok = cols < lp
            mask = col_ok[:, None] & dim_ok[None, :]
            stream = tl.where(role == 2, 0, role)  # whose cache: own stream, or stream 0 where the mix starts
            k = tl.load(KP + stream * skp_s + b * skp_b + kv_h * skp_h + cols[:, None] * skp_t + dims[None, :],
                        mask=mask, other=0.0)
            v = tl.load(VP + stream * svp_s + b * svp_b + kv_h * svp_h + cols[:, None] * svp_t + dims[None, :],
                        mask=mask, other=0.0)
            if role == 2:
                alpha_k = tl.load(ALPHA_K).to(tl.float32)
                alpha_v = tl.load(ALPHA_V).to(tl.float32)
                k2 = tl.load(KP + skp_s + b * skp_b + kv_h * skp_h + cols[:, None] * skp_t + dims[None, :],
                             mask=mask, other=0.0).to(tl.float32)
                v2 = tl.load(VP + svp_s + b * svp_b + kv_h * svp_h + cols[:, None] * svp_t + dims[None, :],
                             mask=mask, other=0.0).to(tl.float32)
                k = (k.to(tl.float32) + alpha_k * (k2 - k.to(tl.float32))).to(k.dtype)
                v = (v.to(tl.float32) + alpha_v * (v2 - v.to(tl.float32))).to(v.dtype)
                for h in range(kv_h * GROUP, kv_h * GROUP + GROUP):
                    row_base = (b * H + h) * Ta
                    dk, dv = dkdv_tiles(dk, dv, k, v, QA + b * sqa_b + h * sqa_h, DOA + b * sdoa_b + h * sdoa_h,
                                        LSEA + row_base, DELTAA + row_base, sqa_t, sdoa_t, cols, col_ok, 0, 0,
                                        lp, la, PLEN, 0, 1, 0, Ta, scale2, dims, dim_ok, BLOCK_M, False, False, True)
                out_mask = (cols < Tp)[:, None] & dim_ok[None, :]
                tl.store(DKM + b * sdkm_b + kv_h * sdkm_h + cols[:, None] * sdkm_t + dims[None, :], dk * scale, mask=out_mask)
                tl.store(DVM + b * sdkm_b + kv_h * sdkm_h + cols[:, None] * sdkm_t + dims[None, :], dv, mask=out_mask)
            else:
                for h in range(kv_h * GROUP, kv_h * GROUP + GROUP):
                    row_base = ((stream * B + b) * H + h) * Tp
                    Q = QP + stream * sqp_s + b * sqp_b + h * sqp_h
                    DO = DOP + stream * sdop_s + b * sdop_b + h * sdop_h
                    if role == 0:  # causal: only queries at or after the tile's first key
                        dk, dv = dkdv_tiles(dk, dv, k, v, Q, DO, LSEP + row_base, DELTAP + row_base, sqp_t, sdop_t,
                                            cols, col_ok, 0, 0, lp, lp, PLEN, 0, 1, (n0 // BLOCK_M) * BLOCK_M, Tp, scale2,
                                            dims, dim_ok, BLOCK_M, True, False, True)
                    else:
                        dk, dv = dkdv_tiles(dk, dv, k, v, Q, DO, LSEP + row_base, DELTAP + row_base, sqp_t, sdop_t,
                                            cols, col_ok, 0, 0, lp, lp, PLEN, 0, 1, 0, Tp, scale2, dims, dim_ok,
                                            BLOCK_M, False, False, True)
                out_mask = (cols < Tp)[:, None] & dim_ok[None, :]
                base = stream * sdkp_s + b * sdkp_b + kv_h * sdkp_h + cols[:, None] * sdkp_t + dims[None, :]
                tl.store(DKP + base, (dk * scale).to(DKP.dtype.element_ty), mask=out_mask)
                tl.store(DVP + base, dv.to(DVP.dtype.element_ty), mask=out_mask)
    else:
        if n0 < Ta:
            col_ok = cols < la
            mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(KA + b * ska_b + kv_h * ska_h + cols[:, None] * ska_t + dims[None, :], mask=mask, other=0.0)
            v = tl.load(VA + b * sva_b + kv_h * sva_h + cols[:, None] * sva_t + dims[None, :], mask=mask, other=0.0)
            for h in range(kv_h * GROUP, kv_h * GROUP + GROUP):
                row_base = (b * H + h) * Ta
                dk, dv = dkdv_tiles(dk, dv, k, v, QA + b * sqa_b + h * sqa_h, DOA + b * sdoa_b + h * sdoa_h,
                                    LSEA + row_base, DELTAA + row_base, sqa_t, sdoa_t, cols, col_ok, 0, 0, la, la,
                                    ALEN, 0, 1, (n0 // BLOCK_M) * BLOCK_M, Ta, scale2, dims, dim_ok, BLOCK_M, True, False, True)
            out_mask = (cols < Ta)[:, None] & dim_ok[None, :]
            base = b * sdka_b + kv_h * sdka_h + cols[:, None] * sdka_t + dims[None, :]
            tl.store(DKA + base, (dk * scale).to(DKA.dtype.element_ty), mask=out_mask)
            tl.store(DVA + base, dv.to(DVA.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_kernel(QP, KP, VP, QA, KA, VA, DOP, DOA, LSEP, LSEA, DELTAP, DELTAA, ALPHA_K, ALPHA_V, PLEN, ALEN, DQP, DQA,
               sqp_s, sqp_b, sqp_t, sqp_h, skp_s, skp_b, skp_t, skp_h, svp_s, svp_b, svp_t, svp_h,
               sqa_b, sqa_t, sqa_h, ska_b, ska_t, ska_h, sva_b, sva_t, sva_h,
               sdop_s, sdop_b, sdop_t, sdop_h, sdoa_b, sdoa_t, sdoa_h,
               B, Tp, Ta, H, GROUP, scale, scale2,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of stream 0, 1 (prompt) and 2 (answer); DQP shares the strides of QP and DQA those of QA."""
    m0, bh = tile_and_head(tl.maximum(Tp, Ta), BLOCK_M)
    stream = tl.program_id(1)
    b, h, kv_h = batch_and_heads(bh, H, GROUP)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lp = tl.minimum(tl.load(PLEN + b).to(tl.int32), Tp)
    la = tl.minimum(tl.load(ALEN + b).to(tl.int32), Ta)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if stream < 2:
        if m0 < Tp:
            mask = (rows < Tp)[:, None] & dim_ok[None, :]
            q = tl.load(QP + stream * sqp_s + b * sqp_b + h * sqp_h + rows[:, None] * sqp_t + dims[None, :], mask=mask, other=0.0)
            do = tl.load(DOP + stream * sdop_s + b * sdop_b + h * sdop_h + rows[:, None] * sdop_t + dims[None, :],
                         mask=mask, other=0.0)
            row_base = ((stream * B + b) * H + h) * Tp
            lse2 = tl.load(LSEP + row_base + rows, mask=rows < Tp, other=0.0)
            delta = tl.load(DELTAP + row_base + rows, mask=rows < Tp, other=0.0)
            K = KP + stream * skp_s + b * skp_b + kv_h * skp_h
            V = VP + stream * svp_s + b * svp_b + kv_h * svp_h
            ends = tl.where(stream == 0, rows + 1, NO_END)
            _, last = tile_plan(rows, ends, lp, lp, BLOCK_N)
            dq = dq_tiles(dq, q, do, lse2, delta, K, V, K, V, 0.0, 0.0, skp_t, svp_t, rows, ends, lp, lp, PLEN, 0, 1,
                          0, last, scale2, dims, dim_ok, BLOCK_N, False, False, True)
            tl.store(DQP + stream * sqp_s + b * sqp_b + h * sqp_h + rows[:, None] * sqp_t + dims[None, :],
                     (dq * scale).to(DQP.dtype.element_ty), mask=mask)
    else:
        if m0 < Ta:
            mask = (rows < Ta)[:, None] & dim_ok[None, :]
            q = tl.load(QA + b * sqa_b + h * sqa_h + rows[:, None] * sqa_t + dims[None, :], mask=mask, other=0.0)
            do = tl.load(DOA + b * sdoa_b + h * sdoa_h + rows[:, None] * sdoa_t + dims[None, :], mask=mask, other=0.0)
            row_base = (b * H + h) * Ta
            lse2 = tl.load(LSEA + row_base + rows, mask=rows < Ta, other=0.0)
            delta = tl.load(DELTAA + row_base + rows, mask=rows < Ta, other=0.0)
            alpha_k = tl.load(ALPHA_K).to(tl.float32)
            alpha_v = tl.load(ALPHA_V).to(tl.float32)
            K = KP + b * skp_b + kv_h * skp_h
            V = VP + b * svp_b + kv_h * svp_h
            ends = tl.zeros_like(rows) + NO_END
            dq = dq_tiles(dq, q, do, lse2, delta, K, V, K + skp_s, V + svp_s, alpha_k, alpha_v, skp_t, svp_t, rows,
                          ends, lp, la, PLEN, 0, 1, 0, lp, scale2, dims, dim_ok, BLOCK_N, False, True, True)
            K = KA + b * ska_b + kv_h * ska_h
            V = VA + b * sva_b + kv_h * sva_h
            ends = rows + 1
            _, last = tile_plan(rows, ends, la, la, BLOCK_N)
            dq = dq_tiles(dq, q, do, lse2, delta, K, V, K, V, 0.0, 0.0, ska_t, sva_t, rows, ends, la, la, ALEN, 0, 1,
                          0, last, scale2, dims, dim_ok, BLOCK_N, False, False, True)
            tl.store(DQA + b * sqa_b + h * sqa_h + rows[:, None] * sqa_t + dims[None, :], (dq * scale).to(DQA.dtype.element_ty),
                     mask=mask)


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


def forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, scale):
    tp_given = q_p.shape[2]
    q_p, k_p, v_p = _nonempty_prompt(q_p.contiguous(), k_p.contiguous(), v_p.contiguous())
    q_a, k_a, v_a = q_a.contiguous(), k_a.contiguous(), v_a.contiguous()
    _, batch, tp, heads, dim = q_p.shape
    ta, kv_heads = q_a.shape[1], k_a.shape[2]
    o_p, o_a = torch.empty_like(q_p), torch.empty_like(q_a)
    lse_p = torch.empty((2, batch, heads, tp), dtype=torch.float32, device=q_a.device)
    lse_a = torch.empty((batch, heads, ta), dtype=torch.float32, device=q_a.device)
    check_32bit_rows("bitune_attention", q_p[0], k_p[0], q_a, k_a)
    block_m, block_n, warps, stages = block_sizes("forward", q_a.device, dim, q_a.dtype)
    grid = (triton.cdiv(max(tp, ta), block_m) * batch * heads, 3)
    with device_guard(q_a), launch_errors("bitune_attention"):
        _forward_kernel[grid](q_p, k_p, v_p, q_a, k_a, v_a, o_p, o_a, lse_p, lse_a, alpha_k.detach().float(),
                              alpha_v.detach().float(), _lens(prompt_lens, q_a), _lens(answer_lens, q_a),
                              *_strides(q_p), *_strides(k_p), *_strides(v_p), *_strides(q_a), *_strides(k_a),
                              *_strides(v_a), *_strides(o_p), *_strides(o_a), batch, tp, ta, heads,
                              heads // kv_heads, scale * LOG2E, HEAD_DIM=dim, BLOCK_D=padded_head_dim(dim),
                              BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return o_p[:, :, :tp_given], o_a, lse_p[..., :tp_given], lse_a


def backward(do_p, do_a, q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, o_p, o_a,
             lse_p, lse_a, scale):
    tp_given = q_p.shape[2]
    q_p, k_p, v_p, do_p, o_p = _nonempty_prompt(*(t.contiguous() for t in (q_p, k_p, v_p, do_p, o_p)))
    if tp_given == 0:
        lse_p = lse_p.new_full((*lse_p.shape[:3], 1), float("-inf"))
    q_a, k_a, v_a, do_a, o_a = (t.contiguous() for t in (q_a, k_a, v_a, do_a, o_a))
    _, batch, tp, heads, dim = q_p.shape
    ta, kv_heads = q_a.shape[1], k_a.shape[2]
    delta_p = row_deltas(o_p.view(2 * batch, tp, heads, dim), do_p.view(2 * batch, tp, heads, dim))
    delta_a = row_deltas(o_a, do_a)
    dq_p, dk_p, dv_p = torch.empty_like(q_p), torch.empty_like(k_p), torch.empty_like(v_p)
    dq_a, dk_a, dv_a = torch.empty_like(q_a), torch.empty_like(k_a), torch.empty_like(v_a)
    dk_mix = torch.empty(k_p.shape[1:], dtype=torch.float32, device=k_p.device)
    dv_mix = torch.empty_like(dk_mix)
    a_k, a_v = alpha_k.detach().float(), alpha_v.detach().float()
    def tiles(kind):
        block_m, block_n, warps, stages = block_sizes(kind, q_a.device, dim, q_a.dtype)
        return block_m, block_n, dict(HEAD_DIM=dim, BLOCK_D=padded_head_dim(dim), BLOCK_M=block_m, BLOCK_N=block_n,
                                      num_warps=warps, num_stages=stages)

    common = (q_p, k_p, v_p, q_a, k_a, v_a, do_p, do_a, lse_p, lse_a, delta_p, delta_a, a_k, a_v,
              _lens(prompt_lens, q_a), _lens(answer_lens, q_a))
    strides = (*_strides(q_p), *_strides(k_p), *_strides(v_p), *_strides(q_a), *_strides(k_a), *_strides(v_a),
               *_strides(do_p), *_strides(do_a))
    # Contiguous inputs: dQ shares the strides of Q, dV those of dK, and dV_mix those of dK_mix.
    with device_guard(q_a), launch_errors("bitune_attention backward"):
        _, block_n, flags = tiles("dkdv")
        _dkdv_kernel[(triton.cdiv(max(tp, ta), block_n) * batch * kv_heads, 4)](
            *common, dk_p, dv_p, dk_mix, dv_mix, dk_a, dv_a, *strides, *_strides(dk_p), *_strides(dk_mix),
            *_strides(dk_a), batch, tp, ta, heads, kv_heads, heads // kv_heads, scale, scale * LOG2E, **flags)
        block_m, _, flags = tiles("dq")
        _dq_kernel[(triton.cdiv(max(tp, ta), block_m) * batch * heads, 3)](
            *common, dq_p, dq_a, *strides, batch, tp, ta, heads, heads // kv_heads, scale, scale * LOG2E, **flags)
    # The answer saw K_mix = K0 + α(K1 − K0): dK0 += (1 − α)·dK_mix, dK1 += α·dK_mix, dα = Σ dK_mix·(K1 − K0).
    dalpha_k = (dk_mix * (k_p[1].float() - k_p[0].float())).sum()
    dalpha_v = (dv_mix * (v_p[1].float() - v_p[0].float())).sum()
    dk_p = (dk_p.float() + torch.stack(((1 - a_k) * dk_mix, a_k * dk_mix))).to(k_p.dtype)
    dv_p = (dv_p.float() + torch.stack(((1 - a_v) * dv_mix, a_v * dv_mix))).to(v_p.dtype)
    cut = slice(0, tp_given)
    return (dq_p[:, :, cut], dk_p[:, :, cut], dv_p[:, :, cut], dq_a, dk_a, dv_a,
            dalpha_k.to(alpha_k.dtype), dalpha_v.to(alpha_v.dtype))
