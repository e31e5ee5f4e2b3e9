"""The tile loops shared by kpro's flash attention kernels (plain attention and the Bitune dual pass).

Visibility model. Every mask kpro supports says, for query row i and key column j of one (batch, head):
    visible(i, j) = j < end(i)  and  key_lo <= j < key_limit  and  i < query_limit  and  key_ok(j)
with end(i) = max(i + offset + 1, prefix) for causal attention (queries aligned to the end of the keys
by `offset = Tk - Tq`; the first `prefix` keys are seen by every query) and end(i) = +inf otherwise,
`key_limit` / `query_limit` the valid lengths of right-padded streams, and, for a key-padding mask, its
window [key_lo, key_limit) from the row's first to its last real key and `key_ok` for any holes inside
(a mask that is left or right padding has none: `key_dense`, and key_ok is never read). So the visible
keys of a row are a range, and a tile of queries visits: key tiles before the window, skipped; the tile
where the window starts, masked; tiles fully visible to every valid row, unmasked (no mask arithmetic,
no select: the row maximum is finite there); boundary tiles, masked; and nothing after the last key any
row sees.

Scores are kept raw (s = q·k) and scaled in base 2 by one fused multiply-add after the row maximum:
p = exp2(s·scale2 − m) with scale2 = scale·log2(e), so softmax uses exp2 and the saved log-sum-exp is
lse2 = log2(sum exp2(s·scale2)). A row that sees no key has lse2 = -inf and an output of zeros.

Loads. Every [rows, head dim] tile of Q, K, V, dO (and the O, dK, dV stores) goes through `rows_view` and
`load_rows` / `store_rows`: with USE_TMA, a TMA tensor descriptor (made in the kernel) of the rows below
the valid length (the hardware fills rows past it with zeros, as the masked pointer loads do); else plain
pointer loads. `load_path` picks, per launch, from the GPU architecture and the tensors' alignment.

The backward's dK/dV loop is transposed: it computes Sᵀ = K·Qᵀ, so Pᵀ and dSᵀ come out [keys, queries],
the layout of the left operand of dV += Pᵀ·dO and dK += dSᵀ·Q; nothing is transposed in registers (Qᵀ
and dOᵀ are read transposed from shared memory by the tensor cores). Its tiles are tall: 128 keys a
program, 16 to 64 queries a step, as the two fp32 accumulators [keys, head dim] hold half the registers.

Scheduling. Under a causal mask the programs run heaviest first: the last query tiles (forward, dQ),
the first key tiles (dK/dV), each tile over every head before the next (`tile_and_head`).

Warp specialisation (`tl.range(..., warp_specialize=True)`) is not used: Triton 3.6 to 3.9 apply it on
Blackwell only (on sm_90a the loop attribute compiles to the same code, no warp partitions).
"""
import contextlib
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from ._launch import next_power_of_2

LOG2E = 1.4426950408889634
NO_END = tl.constexpr(2**30)  # end(i) for non-causal attention: beyond any sequence (constexpr: Triton compiles no plain globals)


@triton.jit
def row_end(rows, offset, prefix, CAUSAL: tl.constexpr):
    """end(i) for a block of query rows: keys j < end(i) are positionally visible."""
    if CAUSAL:
        return tl.maximum(rows + offset + 1, prefix)
    return tl.zeros_like(rows) + NO_END


@triton.jit
def rows_view(BASE, stride_t, limit, width, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """What `load_rows` / `store_rows` address rows [T, width] through (one head: width = HEAD_DIM; the
    heads of a batch row side by side: width = heads · HEAD_DIM): a TMA descriptor of the first `limit` rows
    (TMA fills rows past them with zeros and drops stores there) with [BLOCK, HEAD_DIM] tiles, or the base
    pointer itself. TMA needs HEAD_DIM to be the tile width (a power of two) and, with several heads, the
    heads packed in a row (`load_path` checks both)."""
    if USE_TMA:
        view = tl.make_tensor_descriptor(BASE, shape=[tl.maximum(limit, 1), width], strides=[stride_t, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        view = BASE
    return view


@triton.jit
def load_rows(view, start, col, stride_t, limit, dims, dim_ok, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of a `rows_view` from column `col` on (a head's first element), zeros at
    and past `limit` and past the head dim."""
    if USE_TMA:
        tile = view.load([start, col])
    else:
        rows = start + tl.arange(0, BLOCK)
        tile = tl.load(view + col + rows[:, None] * stride_t + dims[None, :],
                       mask=(rows < limit)[:, None] & dim_ok[None, :], other=0.0)
    return tile


@triton.jit
def store_rows(view, start, stride_t, limit, value, dims, dim_ok, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Store rows [start, start + BLOCK) of a one-head `rows_view` below `limit` (value in its dtype)."""
    if USE_TMA:
        view.store([start, 0], value)
    else:
        rows = start + tl.arange(0, BLOCK)
        tl.store(view + rows[:, None] * stride_t + dims[None, :], value,
                 mask=(rows < limit)[:, None] & dim_ok[None, :])


@triton.jit
def load_head(BASE, start, stride_t, limit, dims, dim_ok, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
              USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of one head's rows at BASE, zeros at and past `limit` (a one-load view)."""
    return load_rows(rows_view(BASE, stride_t, limit, HEAD_DIM, HEAD_DIM, BLOCK, USE_TMA), start, 0, stride_t, limit,
                     dims, dim_ok, BLOCK, USE_TMA)


@triton.jit
def store_head(BASE, start, stride_t, limit, value, dims, dim_ok, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Store rows [start, start + BLOCK) of one head's rows at BASE below `limit`."""
    store_rows(rows_view(BASE, stride_t, limit, HEAD_DIM, HEAD_DIM, BLOCK, USE_TMA), start, stride_t, limit, value,
               dims, dim_ok, BLOCK, USE_TMA)


@triton.jit
def row_limits(rows, ends, query_limit):
    """Per query row, the end of the keys it may see positionally: end(i), or 0 past the valid queries.
    With `visible_keys`, visible(i, j) = j < row_limits(i) and visible_keys(j)."""
    return tl.where(rows < query_limit, ends, 0)


@triton.jit
def visible_keys(cols, key_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK: tl.constexpr):
    """Per key column, whether any query may see it: below the valid length, and, under a key-padding
    mask, inside the window and not a hole (the mask is read only where the window has holes)."""
    ok = cols < key_limit
    if HAS_KEY_MASK:
        ok = ok & (cols >= key_lo)
        if key_dense == 0:  # a branch: windows without holes (left or right padding) never read the mask
            ok = ok & (tl.load(KEY_OK + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def key_window(KEY_WINDOW, b, key_count):
    """(key_lo, key_limit, key_dense) of batch row b from the launcher's [B, 3] int32 table."""
    key_lo = tl.load(KEY_WINDOW + b * 3)
    key_limit = tl.minimum(tl.load(KEY_WINDOW + b * 3 + 1), key_count)
    return key_lo, key_limit, tl.load(KEY_WINDOW + b * 3 + 2)


@triton.jit
def window_tiles(full, last, key_lo, key_dense, BLOCK_N: tl.constexpr):
    """Key-tile ranges of one query tile under a key window: (start, lead, full, last) with [start, lead)
    masked (the tile where the window begins), [lead, full) unmasked and [full, last) masked, from
    tile_plan's (full, last). Tiles before `start` hold only padding and are skipped."""
    start = (key_lo // BLOCK_N) * BLOCK_N
    last = tl.maximum(last, start)
    lead = tl.minimum(tl.cdiv(key_lo, BLOCK_N) * BLOCK_N, last)
    full = tl.where(key_dense != 0, tl.maximum(full, lead), lead)
    return start, lead, full, last


@triton.jit
def tile_plan(rows, ends, key_limit, query_limit, BLOCK_N: tl.constexpr):
    """(full, last): key tiles [0, full) are visible to every valid row of this query tile, tiles
    [full, last) need the mask, and keys from `last` on are hidden from all of them."""
    row_ok = rows < query_limit
    first = tl.minimum(tl.min(tl.where(row_ok, ends, NO_END), 0), key_limit)
    last = tl.minimum(tl.max(tl.where(row_ok, ends, 0), 0), key_limit)
    return tl.minimum((first // BLOCK_N) * BLOCK_N, last), last


@triton.jit
def forward_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo, key_dense, n_lo,
                  n_hi, scale2, dims, dim_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  HAS_KEY_MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key tiles [n_lo, n_hi) for one tile of queries. m_i is the running maximum of
    the scaled scores. Unmasked tiles are fully visible to every row: no mask arithmetic and no select
    (their maximum is finite); masked ones keep a row with nothing visible yet at 0.

    NaN rule (a row is NaN when its query, or a key or value it sees, holds a NaN; what it does not see
    never reaches it): in masked tiles a hidden key's NaN score is replaced by -inf, but a hidden value
    would still reach every row through P·V (0 · NaN = NaN). So there a value row holding a NaN (or an
    infinity) is zeroed, and its NaN is added to the scores of the rows that see it instead."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        k = load_rows(K, n0, 0, stride_kt, key_limit, dims, dim_ok, BLOCK_N, USE_TMA)
        v = load_rows(V, n0, 0, stride_vt, key_limit, dims, dim_ok, BLOCK_N, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if MASKED:
            cols = n0 + tl.arange(0, BLOCK_N)
            keys_ok = visible_keys(cols, key_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK)
            v_nan = tl.sum(v.to(tl.float32) * 0.0, 1)  # per key: 0, or NaN where its value row is not finite
            v = tl.where((v_nan == 0.0)[:, None], v, tl.zeros_like(v))
            s = tl.where((cols[None, :] < limits[:, None]) & keys_ok[None, :], s + v_nan[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
            m_ref = m_new
        p = tl.exp2(tl.fma(s, scale2, -m_ref[:, None]))
        rescale = tl.exp2(m_i - m_ref)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attend(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, rows, ends, key_limit, query_limit, KEY_OK, key_lo,
           key_dense, scale2, dims, dim_ok, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
           HAS_KEY_MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """One query tile over every key tile it sees of one key stream (K, V: `rows_view`s): the tile where a
    key window starts masked, then the unmasked tiles, then the masked boundary tiles."""
    full, last = tile_plan(rows, ends, key_limit, query_limit, BLOCK_N)
    limits = row_limits(rows, ends, query_limit)
    if HAS_WINDOW:
        start, lead, full, last = window_tiles(full, last, key_lo, key_dense, BLOCK_N)
        acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo,
                                      key_dense, start, lead, scale2, dims, dim_ok, BLOCK_N, True, HAS_KEY_MASK,
                                      USE_TMA)
    else:
        lead = 0
    acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo,
                                  key_dense, lead, full, scale2, dims, dim_ok, BLOCK_N, False, HAS_KEY_MASK, USE_TMA)
    acc, m_i, l_i = forward_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo,
                                  key_dense, full, last, scale2, dims, dim_ok, BLOCK_N, True, HAS_KEY_MASK, USE_TMA)
    return acc, m_i, l_i


@triton.jit
def finish_rows(acc, m_i, l_i, rows, query_limit):
    """Normalised output and base-2 log-sum-exp. Rows that saw nothing, and rows past the valid queries
    (which the unmasked tiles did not exclude), give zeros and -inf."""
    empty = (l_i == 0.0) | (rows >= query_limit)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    return out, lse2


@triton.jit
def dq_tiles(dq, q, do, neg_lse2, delta, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo, key_dense,
             n_lo, n_hi, scale2, dims, dim_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             HAS_KEY_MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over key tiles [n_lo, n_hi): P = exp2(S·scale2 − lse2)
    (one fused multiply-add), dS = P ∘ (dO·Vᵀ − delta), dQ += dS·K."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        k = load_rows(K, n0, 0, stride_kt, key_limit, dims, dim_ok, BLOCK_N, USE_TMA)
        v = load_rows(V, n0, 0, stride_vt, key_limit, dims, dim_ok, BLOCK_N, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        p = tl.exp2(tl.fma(s, scale2, neg_lse2[:, None]))
        if MASKED:
            cols = n0 + tl.arange(0, BLOCK_N)
            keys_ok = visible_keys(cols, key_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK)
            p = tl.where((cols[None, :] < limits[:, None]) & keys_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def attend_grad(dq, q, do, neg_lse2, delta, K, V, stride_kt, stride_vt, rows, ends, key_limit, query_limit, KEY_OK,
                key_lo, key_dense, scale2, dims, dim_ok, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_KEY_MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """dQ of one query tile over every key tile it sees of one key stream, tiles as in `attend`."""
    full, last = tile_plan(rows, ends, key_limit, query_limit, BLOCK_N)
    limits = row_limits(rows, ends, query_limit)
    if HAS_WINDOW:
        start, lead, full, last = window_tiles(full, last, key_lo, key_dense, BLOCK_N)
        dq = dq_tiles(dq, q, do, neg_lse2, delta, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo,
                      key_dense, start, lead, scale2, dims, dim_ok, BLOCK_N, True, HAS_KEY_MASK, USE_TMA)
    else:
        lead = 0
    dq = dq_tiles(dq, q, do, neg_lse2, delta, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo, key_dense,
                  lead, full, scale2, dims, dim_ok, BLOCK_N, False, HAS_KEY_MASK, USE_TMA)
    dq = dq_tiles(dq, q, do, neg_lse2, delta, K, V, stride_kt, stride_vt, limits, key_limit, KEY_OK, key_lo, key_dense,
                  full, last, scale2, dims, dim_ok, BLOCK_N, True, HAS_KEY_MASK, USE_TMA)
    return dq


@triton.jit
def dkdv_tiles(dk, dv, k, v, Q, DO, col_q, col_do, LSE2, DELTA, stride_qt, stride_dot, cols, keys_ok, ends_offset,
               prefix, query_limit, m_lo, m_hi, scale2, dims, dim_ok, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [m_lo, m_hi) of one query head, transposed:
    Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale2 − lse2), dSᵀ = Pᵀ ∘ (V·dOᵀ − delta), dV += Pᵀ·dO, dK += dSᵀ·Q (unscaled:
    the caller multiplies by the softmax scale once). Unmasked: every row of these tiles sees every key
    of the tile (rows past the queries load zeros and add nothing). keys_ok: `visible_keys` of the tile."""
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < query_limit
        q = load_rows(Q, m0, col_q, stride_qt, query_limit, dims, dim_ok, BLOCK_M, USE_TMA)
        do = load_rows(DO, m0, col_do, stride_dot, query_limit, dims, dim_ok, BLOCK_M, USE_TMA)
        neg_lse2 = -tl.load(LSE2 + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision="ieee")
        pt = tl.exp2(tl.fma(st, scale2, neg_lse2[None, :]))
        if MASKED:
            limits = row_limits(rows, row_end(rows, ends_offset, prefix, CAUSAL), query_limit)
            pt = tl.where((cols[:, None] < limits[None, :]) & keys_ok[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
    return dk, dv


@triton.jit
def dkdv_heads(dk, dv, k, v, Q, DO, LSE2, DELTA, sq_h, sq_t, sdo_h, sdo_t, lse_h, head_lo, GROUP, cols, offset, prefix,
               key_limit, query_limit, KEY_OK, key_lo, key_dense, m_lo, m_full, scale2, dims, dim_ok,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               USE_TMA: tl.constexpr):
    """dK, dV of one key tile summed over the query heads [head_lo, head_lo + GROUP) that read it, in
    order (no atomics): query tiles [m_lo, m_full) masked, [m_full, query_limit) unmasked. Q, DO point at
    head 0 of the batch row, LSE2 and DELTA at its row 0 of head 0 (lse_h apart per head)."""
    keys_ok = visible_keys(cols, key_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK)
    # One view of the batch row's heads side by side, made once: head h's tiles start at column h · sq_h.
    q_rows = rows_view(Q, sq_t, query_limit, (head_lo + GROUP) * sq_h, HEAD_DIM, BLOCK_M, USE_TMA)
    do_rows = rows_view(DO, sdo_t, query_limit, (head_lo + GROUP) * sdo_h, HEAD_DIM, BLOCK_M, USE_TMA)
    for h in range(head_lo, head_lo + GROUP):
        dk, dv = dkdv_tiles(dk, dv, k, v, q_rows, do_rows, h * sq_h, h * sdo_h, LSE2 + h * lse_h, DELTA + h * lse_h,
                            sq_t, sdo_t, cols, keys_ok, offset, prefix, query_limit, m_lo, m_full, scale2, dims, dim_ok,
                            BLOCK_M, CAUSAL, True, USE_TMA)
        dk, dv = dkdv_tiles(dk, dv, k, v, q_rows, do_rows, h * sq_h, h * sdo_h, LSE2 + h * lse_h, DELTA + h * lse_h,
                            sq_t, sdo_t, cols, keys_ok, offset, prefix, query_limit, m_full, query_limit, scale2, dims,
                            dim_ok, BLOCK_M, CAUSAL, False, USE_TMA)
    return dk, dv


@triton.jit
def key_tile_plan(n0, offset, prefix, live, whole, query_limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """(m_lo, m_full) of the key tile starting at n0, for `dkdv_heads`: the queries that can see it start at
    m_lo (all of them when it starts inside the prefix or without a causal mask, else those at or after
    its first key; none when it is not `live`, holding only keys nobody sees); of those, the rows from
    m_full on see all its keys when the tile is `whole` (no key of it hidden by padding or a length)."""
    if CAUSAL:
        m_lo = tl.where(n0 >= prefix, (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M, 0)
        m_full = tl.where(n0 + BLOCK_N <= prefix, 0,
                          tl.cdiv(tl.maximum(n0 + BLOCK_N - offset - 1, 0), BLOCK_M) * BLOCK_M)
    else:
        m_lo = tl.zeros_like(n0)
        m_full = tl.zeros_like(n0)
    m_lo = tl.where(live, tl.minimum(m_lo, query_limit), query_limit)
    m_full = tl.where(whole, tl.minimum(tl.maximum(m_full, m_lo), query_limit), query_limit)
    return m_lo, m_full


@triton.jit
def tile_and_head(length, BLOCK: tl.constexpr, HEADS_FASTEST: tl.constexpr, DESCENDING: tl.constexpr):
    """(first row of this program's tile, its batch·head index) in a 1-D grid of cdiv(length, BLOCK) tiles per
    (batch, head); a 1-D grid has no 65,535 limit on batch × heads (a second grid axis would).
    Default order: tiles vary fastest, so programs that read the same keys run together. HEADS_FASTEST:
    tile by tile over every head, the last tiles first if DESCENDING: under a causal mask the heaviest
    programs start first and the light ones fill the gaps at the end (queries: last tiles heaviest;
    keys: first tiles heaviest)."""
    tiles = tl.cdiv(length, BLOCK)
    pid = tl.program_id(0)
    if HEADS_FASTEST:
        heads = tl.num_programs(0) // tiles
        tile = pid // heads
        if DESCENDING:
            tile = tiles - 1 - tile
        bh = pid % heads
    else:
        tile = pid % tiles
        bh = pid // tiles
    return tile * BLOCK, bh


@triton.jit
def batch_and_heads(bh, heads, group):
    """(batch, query head, key/value head) of a program's second grid index; batch is int64 so that
    batch * stride cannot overflow."""
    h = bh % heads
    return (bh // heads).to(tl.int64), h, h // group


KERNELS = ("forward", "dkdv", "dq")
# GPU-measured winners among candidate_configs, written by the GPU suite (benchmarks/gpu_suite.py, stage
# "autotune") and read by tile_config; keys from tuned_key, which names the Triton version (a winner timed
# under one Triton does not stand for another: register allocation differs). Absent or empty: the
# compiler-guided defaults.
TUNED_TABLE = Path(__file__).with_name("tuned_tiles.json")
_forced: dict[str, tuple[int, int, int, int]] = {}
_forced_path: list[str] = []


class Tiles(tuple):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one launch, unpacked like a tuple, and `arch`: the
    compute capability they were chosen for (80, 90, ...), None under the CPU interpreter."""

    def __new__(cls, config, arch: int | None = None):
        tiles = super().__new__(cls, tuple(config))
        tiles.arch = arch
        return tiles


def device_arch(device: torch.device) -> int | None:
    """The compute capability of a CUDA device as 80, 90, ...; None for another device (the CPU interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def block_sizes(kind: str, arch: int | None, head_dim: int, dtype: torch.dtype, tuned: bool = True,
                path: str = "tma") -> Tiles:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one attention kernel launch on a GPU of compute capability
    `arch` (`device_arch`'s answer, which the launch asked once for its load path too) that loads its tiles by
    `path` (`load_path`'s answer). Small tiles under the CPU interpreter (`arch` None), so that tests exercise
    many tiles and tails on short sequences. `tuned`: whether TUNED_TABLE's winners apply (they were timed on
    plain attention; see tile_config)."""
    if arch is None:
        return Tiles((16, 16, 4, 1))
    return Tiles(_forced[kind] if kind in _forced else tile_config(kind, head_dim, dtype, arch, tuned, path), arch)


def tile_config(kind: str, head_dim: int, dtype: torch.dtype, arch: int, tuned: bool = True,
                path: str = "tma") -> tuple[int, int, int, int]:
    """The GPU tiles of `kind` for a head dim, dtype, compute capability (80, 90, ...) and load path: the
    GPU-measured winner in TUNED_TABLE where there is one and `tuned` is set, else `default_tile_config`. The
    sweep times plain attention only, so the Bitune dual pass asks with tuned=False: its kernels hold more per
    tile (Triton 3.6 spills in its dK/dV at tiles plain attention compiles cleanly) and keep the
    compiler-guided defaults until a sweep of their own measures them. The sweep's tensors are contiguous, so
    on sm_90 its winners were timed on the TMA path: a launch there on pointer loads keeps the defaults."""
    timed = tuned and not (arch >= 90 and path == "pointer")
    winner = tuned_table().get(tuned_key(kind, head_dim, dtype, arch)) if timed else None
    return tuple(winner) if winner is not None else default_tile_config(kind, head_dim, dtype, arch, path=path)


@functools.cache  # read at every launch (tile_config, tuned_key); the installed version does not change
def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton that compiles the kernels: its register allocation differs by version."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def default_tile_config(kind: str, head_dim: int, dtype: torch.dtype, arch: int,
                        compiler: tuple[int, int] | None = None, path: str = "tma") -> tuple[int, int, int, int]:
    """The compiler-guided tiles of `kind` ("forward": BLOCK_M queries per program over BLOCK_N keys at a
    time; "dkdv": BLOCK_N keys per program over BLOCK_M query rows at a time; "dq"), standing until a GPU
    has timed the candidates.

    Chosen from what the compiler reports (`python -m kpro.ops.report`; benchmarks/RESULTS.md has the
    figures): shared memory within the smallest limit of the architecture (A100 163 KB, H100 227 KB), no
    register spills in bf16/fp16 forward kernels, nor in dK/dV at head dims 64 and 128 on sm_90a, and the
    head-dim-64 forward at 128 registers a thread on sm_90a (two 8-warp programs an SM; a key-padding
    mask adds its per-key loads). dK/dV tiles are tall (128 keys) and short (16-64 queries a step): the
    two fp32 accumulators [keys, head dim] take half the registers, and with 8 warps a tile of 64 keys
    makes the compiler compute Sᵀ twice (chained products put every warp on rows of its own: 16 a warp on
    sm_80, 64 a warp group on sm_90a; sm_80 d128 takes spills at 16x128 rather than that: 4 to 12 B a
    thread in plain attention, 20 to 32 B in the Bitune answer pass, Triton 3.9). Triton
    before 3.9 (`compiler`, (major, minor); default: the installed one) allocates registers differently: at
    the dK/dV tiles Triton 3.9 compiles without spills, Triton 3.6 spills 4 to 8 B a thread on sm_90a in plain
    attention and 12 to 228 B in the Bitune dual pass (3.8: up to 20 B), so under it sm_90a dK/dV takes
    half the queries a step (64 -> 32 at d64, 32 -> 16 at d128), which none of the three spills; on sm_80 at d64
    it spills 20 to 28 B in plain attention and 124 to 144 B in the Bitune pass with two pipeline stages, and
    at half the queries still 8 to 28 B, so there dK/dV takes one stage, which spills in none, and dQ 32 keys a
    step (the Bitune dQ spills 40 B a thread at 64, 28 B with one stage; 64x64 and 128x32 spill nothing, and
    128x32 keeps the programs and their K/V reads as they were). sm_90a dK/dV takes half the queries on
    pointer loads too (`path`: tensors TMA cannot read, as the [B, H, T, D] ones transposed that a
    Hugging Face model passes, or head dims that are not a power of two): Triton 3.9 spills 16 to 44 B a thread
    at 32x128 (d128, with grouped-query heads or a padding mask) and at 64x128 (d64, with a padding mask), none
    at half the queries. fp32 is the exact path, not the fast one: small tiles, as fp32 operands take twice the
    memory and do not use tensor cores (ieee); its dK/dV takes 16 queries a step above head dim 64, and on sm_90a
    at every head dim (at 32 queries, d64 spills 788 B a thread there; on sm_80, 12 B, and 20 B at 16), and on
    sm_80 under Triton before 3.9 (at 32 queries d64 spills 836 B a thread there, at 16 none). On
    sm_90a the fp32 forward and dQ spilled at 32x32 with 4 warps (d128: 1,600 and 1,288 B a thread in plain
    attention, 2,980 and 2,368 B in the Bitune dual pass); none spills at the tiles taken there: 8 warps at d64,
    and at d128 16x16 (forward) and 32x16 (dQ), the only ones of those the compiler was offered that spill in
    neither pass.
    """
    if kind not in KERNELS:
        raise ValueError(f"unknown attention kernel {kind!r}")
    if path not in ("tma", "pointer"):
        raise ValueError(f"unknown load path {path!r}")
    before_3_9 = (compiler or triton_version()) < (3, 9)
    if dtype == torch.float32:
        if arch >= 90 and head_dim > 64:  # at 32x32, 4 warps, the d128 forward spilled 1,600 B a thread, dQ 1,288 B
            return {"forward": (16, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}[kind]
        if arch >= 90:
            return (16, 32, 4, 1) if kind == "dkdv" else (32, 32, 8, 1)
        # sm_80 dK/dV at d64: 32 queries spill 12 B under Triton 3.9 (16: 20 B) and 836 B under 3.6 (16: none)
        return (16, 32, 4, 1) if kind == "dkdv" and (head_dim > 64 or before_3_9) else (32, 32, 4, 1)
    if head_dim > 128:  # every dot at least 64 rows, so that sm_90a lowers it to wgmma; dK/dV spills there
        return {"forward": (64, 32, 8, 2), "dkdv": (16, 64, 8, 2 if arch >= 90 else 1), "dq": (64, 16, 8, 2)}[kind]
    small = head_dim <= 64
    if arch >= 90:
        dkdv_rows = 64 if small else 32
        if before_3_9 or path == "pointer":
            dkdv_rows //= 2
        return {"forward": (128, 64, 8, 3), "dkdv": (dkdv_rows, 128, 8, 2), "dq": (128, 64, 8, 2)}[kind]
    if small:  # before 3.9, dK/dV's second pipeline stage spills (20-28 B a thread, 124-144 B in the Bitune pass)
        return {"forward": (128, 64, 8, 3), "dkdv": (32, 128, 8, 1 if before_3_9 else 2),
                "dq": (128, 32 if before_3_9 else 64, 8, 2)}[kind]
    return {"forward": (64, 64, 8, 2), "dkdv": (16, 128, 8, 2), "dq": (64, 64, 8, 2)}[kind]


def candidate_configs(kind: str, head_dim: int, dtype: torch.dtype, arch: int) -> list[tuple[int, int, int, int]]:
    """The configurations a GPU autotuning sweep times for one kernel, the default first. Only the
    half-precision tiles at head dims up to 128 have alternatives: the fp32 path is exact, not fast.
    The forward offers 128x64 and 128x128 key tiles (8 warps; 3 and 2 pipeline stages: 128x128 with 3
    stages would not fit an H100's shared memory at head dim 128). Each compiles within the shared memory
    of its architecture (`python -m kpro.ops.report --candidates` lists their figures)."""
    default = default_tile_config(kind, head_dim, dtype, arch)
    if dtype == torch.float32 or head_dim > 128:
        return [default]
    if arch >= 90:
        others = {
            "forward": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
            "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2), (64, 64, 8, 2), (32, 128, 8, 3)],
            "dq": [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2)],
        }[kind]
    else:
        others = {
            "forward": [(128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2)],
            "dkdv": [(32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 128, 8, 1)],
            "dq": [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2)],
        }[kind]
    return list(dict.fromkeys([default, *others]))


def tuned_key(kind: str, head_dim: int, dtype: torch.dtype, arch: int, compiler: tuple[int, int] | None = None) -> str:
    """The tuned table's key of one launch shape under Triton `compiler` (default: the installed one)."""
    major, minor = compiler or triton_version()
    return f"sm{arch}/triton{major}.{minor}/{kind}/d{head_dim}/{str(dtype).removeprefix('torch.')}"


@functools.cache
def tuned_table() -> dict[str, list[int]]:
    if not TUNED_TABLE.is_file():
        return {}
    table = json.loads(TUNED_TABLE.read_text(encoding="utf-8"))
    bad = {key: value for key, value in table.items() if not (isinstance(value, list) and len(value) == 4)}
    if bad:
        raise ValueError(f"{TUNED_TABLE}: entries must be [BLOCK_M, BLOCK_N, num_warps, num_stages], got {bad}")
    return table


@contextlib.contextmanager
def forced_tiles(kind: str, config: tuple[int, int, int, int]):
    """Launch attention kernels of `kind` with `config` inside the block (for autotuning sweeps; GPU
    launches only: the CPU interpreter keeps its small tiles)."""
    if kind not in KERNELS:
        raise ValueError(f"unknown attention kernel {kind!r}")
    before = _forced.get(kind)
    _forced[kind] = tuple(config)
    try:
        yield
    finally:
        if before is None:
            _forced.pop(kind)
        else:
            _forced[kind] = before


# ------------------------------------------------------------------------------------------ load path

TMA_HEAD_DIMS = (16, 32, 64, 128)  # a power of two (the tile is the row); at most 256 bytes a bf16 row


def load_path(arch: int | None, head_dim: int, dtype: torch.dtype, tensors) -> str:
    """"tma" or "pointer": how the attention kernels of one launch read and write their [rows, head dim]
    tiles. TMA tensor descriptors need an sm_90 GPU (Hopper and later), half precision (the fast path;
    fp32 keeps its exact FMA path), a power-of-two head dim of 16 to 128 (the descriptor's row is the
    whole head), and every tensor 16-byte aligned: its address, and every stride but the last (which is
    1) in bytes, none of them 0 (a broadcast view), with the heads of a time step side by side ([B, T, H, D]
    order in memory, as contiguous tensors and views of a packed QKV tensor are: the dK/dV kernel reads a
    batch row's heads through one descriptor). Anything else takes pointer loads: an sm_80 GPU, fp32, a
    [B, H, T, D] tensor transposed to [B, T, H, D]. `arch` None (the CPU interpreter) takes pointer loads
    unless a test forces TMA with `forced_load_path`."""
    if dtype not in (torch.bfloat16, torch.float16) or head_dim not in TMA_HEAD_DIMS:
        return "pointer"
    wanted = _forced_path[-1] if _forced_path else ("tma" if arch is not None and arch >= 90 else "pointer")
    if wanted == "pointer":
        return "pointer"
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s <= 0 or s * size % 16 for s in t.stride()[:-1]):
            return "pointer"
        if t.dim() >= 3 and t.stride(-3) < t.shape[-2] * t.stride(-2):  # heads interleaved with time
            return "pointer"
    return "tma"


@contextlib.contextmanager
def forced_load_path(path: str):
    """Inside the block, attention launches take `path` ("tma" or "pointer") wherever the tensors allow
    it, whatever the device: how the CPU interpreter tests the TMA path."""
    if path not in ("tma", "pointer"):
        raise ValueError(f"unknown load path {path!r}")
    _forced_path.append(path)
    try:
        yield
    finally:
        _forced_path.pop()


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def prepare_launch(path: str, like: torch.Tensor) -> None:
    """Before a launch on `path`: TMA descriptors made inside a kernel live in a global scratch buffer
    that Triton asks an allocator for; give it torch's (on the current device) unless one is set. The
    allocator is a context variable, so each thread (autograd runs the backward in its own) gets it."""
    if path != "tma" or like.device.type != "cuda":
        return
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator
        current = current.get() if hasattr(current, "get") else current
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_scratch)


def padded_head_dim(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))
