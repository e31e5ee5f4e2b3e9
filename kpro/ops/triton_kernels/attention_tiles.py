"""The tile loops shared by kpro's flash attention kernels (plain attention and the Bitune dual pass).

Visibility model. Every mask kpro supports says, for query row i and key column j of one (batch, head):
    visible(i, j) = j < end(i)  and  key_lo <= j < key_limit  and  i < query_limit  and  key_ok(j)
with end(i) = max(i + offset + 1, prefix) for causal attention (queries aligned to the end of the keys
by `offset = Tk - Tq`; the first `prefix` keys are seen by every query) and end(i) = +inf otherwise,
`key_limit` / `query_limit` the valid lengths of right-padded streams, and, for a key-padding mask, its
window [key_lo, key_limit) from the row's first to its last real key and `key_ok` for any holes inside
(a mask that is left or right padding has none: `key_dense`, and key_ok is never read). So the visible
keys of a row are a range, and a tile of queries visits: key tiles before the window, skipped; the tile
where the window starts, masked; tiles fully visible to every valid row, unmasked (no mask arithmetic);
boundary tiles, masked; and nothing after the last key any row sees.

Scores are kept in base 2: s = q·k * scale * log2(e), so softmax uses exp2 and the saved log-sum-exp is
lse2 = log2(sum exp2(s)). A row that sees no key has lse2 = -inf and an output of zeros.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NO_END = tl.constexpr(2**30)  # end(i) for non-causal attention: beyond any sequence (constexpr: Triton compiles no plain globals)


@triton.jit
def row_end(rows, offset, prefix, CAUSAL: tl.constexpr):
    """end(i) for a block of query rows: keys j < end(i) are positionally visible."""
    if CAUSAL:
        return tl.maximum(rows + offset + 1, prefix)
    return tl.zeros_like(rows) + NO_END


@triton.jit
def load_keys(K, V, K2, V2, alpha_k, alpha_v, stride_kt, stride_vt, cols, dims, col_ok, dim_ok, dtype,
              MIX: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of keys and values; with MIX, the Bitune mix of two caches,
    (1 - alpha) * first + alpha * second, formed in fp32 in registers and never written to memory."""
    mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=mask, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=mask, other=0.0)
    if MIX:
        k2 = tl.load(K2 + cols[:, None] * stride_kt + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(V2 + cols[:, None] * stride_vt + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        k = (k + alpha_k * (k2 - k)).to(dtype)
        v = (v + alpha_v * (v2 - v)).to(dtype)
    return k, v


@triton.jit
def visibility(rows, cols, ends, key_limit, query_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK: tl.constexpr):
    visible = (cols[None, :] < ends[:, None]) & (cols[None, :] < key_limit) & (rows[:, None] < query_limit)
    if HAS_KEY_MASK:  # the mask is read only where it has holes inside the window
        holes = (tl.zeros_like(cols) + key_dense) == 0  # broadcast first: the interpreter takes no scalar & vector mask
        key_ok = tl.load(KEY_OK + cols, mask=(cols < key_limit) & holes, other=1)
        visible = visible & (cols[None, :] >= key_lo) & (key_ok[None, :] != 0)
    return visible


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
def forward_tiles(acc, m_i, l_i, q, K, V, K2, V2, alpha_k, alpha_v, stride_kt, stride_vt, rows, ends,
                  key_limit, query_limit, KEY_OK, key_lo, key_dense, n_lo, n_hi, scale2, dims, dim_ok,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MIX: tl.constexpr):
    """Online softmax over key tiles [n_lo, n_hi) for one tile of queries. Unmasked tiles are fully
    visible to every row and skip the mask arithmetic."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < key_limit
        k, v = load_keys(K, V, K2, V2, alpha_k, alpha_v, stride_kt, stride_vt, cols, dims, col_ok, dim_ok,
                         q.dtype, MIX)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale2
        if MASKED:
            visible = visibility(rows, cols, ends, key_limit, query_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(s - m_ref[:, None])
        rescale = tl.exp2(m_i - m_ref)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def softmax_grad_tile(q, k, v, do, lse2, delta, visible, scale2, MASKED: tl.constexpr):
    """Recomputed probabilities P and the score gradient dS = P * (dO·Vᵀ − delta) of one tile (`visible`
    is read only when MASKED)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale2
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    return p, p * (dp - delta[:, None])


@triton.jit
def tile_and_head(length, BLOCK: tl.constexpr):
    """(first row of this program's tile, its batch·head index) in a 1-D grid of cdiv(length, BLOCK) tiles per
    (batch, head). Tiles vary fastest, so programs that read the same keys run together, and a 1-D grid
    has no 65,535 limit on batch × heads (a second grid axis would)."""
    tiles = tl.cdiv(length, BLOCK)
    pid = tl.program_id(0)
    return (pid % tiles) * BLOCK, pid // tiles


@triton.jit
def batch_and_heads(bh, heads, group):
    """(batch, query head, key/value head) of a program's second grid index; batch is int64 so that
    batch * stride cannot overflow."""
    h = bh % heads
    return (bh // heads).to(tl.int64), h, h // group


@triton.jit
def dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, stride_qt, stride_dot, cols, col_ok, ends_offset, prefix,
               key_limit, query_limit, KEY_OK, key_lo, key_dense, m_lo, m_hi, scale2, dims, dim_ok,
               BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [m_lo, m_hi) of one query head.
    dk is left unscaled (the caller multiplies by the softmax scale once). Unmasked: every row of these
    tiles sees every key of the tile (rows past the queries load zeros and add nothing)."""
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < query_limit
        mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + dims[None, :], mask=mask, other=0.0)
        lse2 = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        visible = row_ok[:, None]
        if MASKED:
            visible = visibility(rows, cols, row_end(rows, ends_offset, prefix, CAUSAL), key_limit, query_limit,
                                 KEY_OK, key_lo, key_dense, HAS_KEY_MASK)
        p, ds = softmax_grad_tile(q, k, v, do, lse2, delta, visible, scale2, MASKED)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    return dk, dv


@triton.jit
def dq_tiles(dq, q, do, lse2, delta, K, V, K2, V2, alpha_k, alpha_v, stride_kt, stride_vt, rows, ends,
             key_limit, query_limit, KEY_OK, key_lo, key_dense, n_lo, n_hi, scale2, dims, dim_ok,
             BLOCK_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, MIX: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over key tiles [n_lo, n_hi)."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < key_limit
        k, v = load_keys(K, V, K2, V2, alpha_k, alpha_v, stride_kt, stride_vt, cols, dims, col_ok, dim_ok,
                         q.dtype, MIX)
        visible = col_ok[None, :]
        if MASKED:
            visible = visibility(rows, cols, ends, key_limit, query_limit, KEY_OK, key_lo, key_dense, HAS_KEY_MASK)
        _, ds = softmax_grad_tile(q, k, v, do, lse2, delta, visible, scale2, MASKED)
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def tile_plan(rows, ends, key_limit, query_limit, BLOCK_N: tl.constexpr):
    """(full, last): key tiles [0, full) are visible to every valid row of this query tile, tiles
    [full, last) need the mask, and keys from `last` on are hidden from all of them."""
    row_ok = rows < query_limit
    first = tl.minimum(tl.min(tl.where(row_ok, ends, NO_END), 0), key_limit)
    last = tl.minimum(tl.max(tl.where(row_ok, ends, 0), 0), key_limit)
    return tl.minimum((first // BLOCK_N) * BLOCK_N, last), last


@triton.jit
def finish_rows(acc, m_i, l_i, rows, query_limit):
    """Normalised output and base-2 log-sum-exp. Rows that saw nothing, and rows past the valid queries
    (which the unmasked tiles did not exclude), give zeros and -inf."""
    empty = (l_i == 0.0) | (rows >= query_limit)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    return out, lse2


KERNELS = ("forward", "dkdv", "dq")


def block_sizes(kind: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one attention kernel launch on `device`. Small tiles
    under the CPU interpreter, so that tests exercise many tiles and tails on short sequences."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    major, minor = torch.cuda.get_device_capability(device)
    return tile_config(kind, head_dim, dtype, 10 * major + minor)


def tile_config(kind: str, head_dim: int, dtype: torch.dtype, arch: int) -> tuple[int, int, int, int]:
    """The GPU tiles of `kind` ("forward", "dkdv": BLOCK_N keys per program over BLOCK_M query rows at a
    time, "dq") for a head dim, dtype and compute capability (80, 90, ...).

    Chosen from what the compiler reports, as no GPU could time them yet: shared memory within the
    smallest limit of the architecture (A100 163 KB, H100 227 KB) and few register spills in bf16/fp16
    (ptxas on sm_90: none in the forward and dQ; up to a few hundred bytes in dK/dV, whose masked and
    unmasked loops both stay live). fp32 spills more: it is the exact path, not the fast one. Timing
    them on a GPU is the next step (benchmarks/RESULTS.md lists what ptxas reports for each).
    fp32 tiles are small: fp32 operands take twice the memory and do not use tensor cores (ieee
    precision). tests/test_triton_gpu_compile.py compiles every configuration for sm_80 and sm_90.
    """
    if kind not in KERNELS:
        raise ValueError(f"unknown attention kernel {kind!r}")
    if dtype == torch.float32:
        return (16, 32, 4, 1) if kind == "dkdv" and head_dim > 64 else (32, 32, 4, 1)
    if head_dim > 128:
        return {"forward": (64, 32, 4, 2), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}[kind]
    small = head_dim <= 64
    if kind == "forward":
        return (128, 64, 8, 3) if small else (128, 32, 8, 2) if arch >= 90 else (64, 64, 4, 2)
    if kind == "dkdv":
        return 64, 64, 8, 2
    return (128, 64, 8, 2) if small else (64, 64, 8, 2)


def padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))
