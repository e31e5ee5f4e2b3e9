"""Cross-entropy fused with the output projection, in Triton.

Forward: a grid of (row block, vocabulary split) programs. Each computes the logits of its rows one
vocabulary tile at a time, [BLOCK_N, BLOCK_V] in fp32 on chip (tl.dot over BLOCK_D columns of hidden and
weight), and keeps, per row, a running max m, a running sum s of exp(logit - m) (the online log-sum-exp,
rescaled when m grows) and the target's logit. Only those three fp32 numbers per row and split are
written; a few torch ops combine the splits: the row's max M, log S = log(sum(s·exp(m - M))) and
loss = log S - (target - M), saved as (M, log S) for the backward. Splitting the vocabulary keeps every
SM busy when there are few row blocks. M is subtracted before anything else everywhere (here, in the
backward and in the row kernel of the gradients in the forward): a log-sum-exp M + log S rounded to fp32
at the logits' size would put its rounding error into every loss and scale the whole softmax.

Backward: dlogits = (softmax - onehot(label)) · dloss, recomputed as exp((logit - M) - log S) from the
saved (M, log S). The vocabulary is
cut into slices of at most SLICE_BYTES of dlogits in the input dtype ([rows, slice], never [N, V]); for
each slice one kernel recomputes the logit tiles on chip and writes dlogits, then two matmuls take it:
dW[slice] = dlogitsᵀ @ H (written once, fp32 accumulation inside the matmul, and only when the weight
requires grad) and dH += dlogits @ W[slice] (accumulated in fp32 across slices).

Gradients in the forward (forward_with_grads, where the loss module asks for it: a frozen head with any
reduction, a trainable one summed or averaged): per chunk of at most GRADIENT_CHUNK_BYTES of rows, the
logits [chunk, V] in fp32 from one cuBLAS matmul (fp32 output of half-precision inputs), then one program
per row reads them twice (online max and sum, then the gradient) and writes its loss and dlogits = softmax -
onehot(label) in the input dtype, and cuBLAS takes dlogits to dH = dlogits @ W (fp32) and dW += dlogitsᵀ @ H
(fp32). Two matmuls of the logits' size with a frozen head, three with a trainable one, all cuBLAS, against
the three and four of the forward and backward above (two of them on Triton's tl.dot); the backward then
only scales the gradients.

Rows whose label is ignore_index are dropped before either pass (one gather of the scored rows when there
are any), so they cost nothing. Row and vocabulary offsets are 64-bit: N·d, V·d and N·V may all pass 2³¹.
"""
import torch
import triton
import triton.language as tl

from .._layout import as_rows, device_guard
from ..linear_cross_entropy import scored_rows
from ._launch import FMA, cdiv, launch, launch_errors, program_count

SLICE_BYTES = 128 * 2**20  # backward: dlogits of one vocabulary slice, [rows, slice] in the input dtype
GRADIENT_CHUNK_BYTES = 512 * 2**20  # forward_with_grads: fp32 logits and dlogits of one chunk of rows


@triton.jit
def _logit_tile(H, W, rows, cols, row_ok, col_ok, d, h_stride, w_stride,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """logits[rows, cols] = H[rows] @ W[cols]ᵀ, [BLOCK_N, BLOCK_V] in fp32 (rows, cols: int64)."""
    dims = tl.arange(0, BLOCK_D)
    h_ptr = H + rows[:, None] * h_stride + dims[None, :]
    w_ptr = W + cols[:, None] * w_stride + dims[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, d, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptr, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptr, mask=col_ok[:, None], other=0.0)
        else:
            dim_ok = (k + dims) < d
            h = tl.load(h_ptr, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            w = tl.load(w_ptr, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        h_ptr += BLOCK_D
        w_ptr += BLOCK_D
    return acc


@triton.jit
def _forward_kernel(H, W, LABELS, M, S, T, n_rows, n_vocab, d, h_stride, w_stride, tiles_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Per row of the block and this program's vocabulary split: max logit m, sum of exp(logit - m), and
    the target's logit (0 when the label is not in the split), written to M, S, T [splits, n_rows]."""
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(LABELS + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_vocab, BLOCK_V))
    for tile in range(first, last):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # tile * BLOCK_V < V
        col_ok = cols < n_vocab
        logits = _logit_tile(H, W, rows, cols, row_ok, col_ok, d, h_stride, w_stride, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))  # finite: every tile has a valid column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    out = split.to(tl.int64) * n_rows + rows
    tl.store(M + out, m, mask=row_ok)
    tl.store(S + out, s, mask=row_ok)
    tl.store(T + out, target, mask=row_ok)


@triton.jit
def _grad_logits_kernel(H, W, LABELS, STATS, DLOSS, G, n_rows, n_cols, col_start, d, h_stride, w_stride, g_stride,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """G[rows, cols] = (exp((logit - m) - log s) - [vocab == label]) * dloss for vocabulary columns
    col_start + cols of one slice, in G's dtype; STATS [n_rows, 2] holds each row's (m, log s)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    vocab = col_start + cols
    logits = _logit_tile(H, W, rows, vocab, row_ok, col_ok, d, h_stride, w_stride, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D)
    m = tl.load(STATS + 2 * rows, mask=row_ok, other=0.0)
    log_s = tl.load(STATS + 2 * rows + 1, mask=row_ok, other=0.0)
    scale = tl.load(DLOSS + rows, mask=row_ok, other=0.0)
    labels = tl.load(LABELS + rows, mask=row_ok, other=-1)
    grad = tl.exp((logits - m[:, None]) - log_s[:, None]) - tl.where(vocab[None, :] == labels[:, None], 1.0, 0.0)
    grad = grad * scale[:, None]
    tl.store(G + rows[:, None] * g_stride + cols[None, :], grad.to(G.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def tile_config(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages). Under the interpreter: small tiles, so tests
    cover many tiles and tails. On a GPU, half precision: 128 x 128 tiles over 64 columns, 8 warps, 3
    stages; compiled for sm_90a (wgmma) and sm_80 (mma) they take 96 and 64 KiB of shared memory and
    spill no registers when d is a multiple of 64 (any LLaMA). fp32 is the exact path (ieee dots, no
    tensor cores) with smaller tiles. From compiler reports, not yet timed on a GPU."""
    if device.type != "cuda":
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 128, 128, 64, 8, 3


def _scored(hidden, labels, ignore_index, *per_row):
    """The scored rows of hidden (unit column stride), their labels and the given per-row tensors, and
    their index (None when every row is scored: no copies)."""
    index = scored_rows(labels, ignore_index)
    if index is None:
        return index, as_rows(hidden), labels.contiguous(), [t.contiguous() for t in per_row]
    return index, as_rows(hidden[index]), labels[index], [t[index] for t in per_row]


def forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    loss = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    stats = torch.zeros(n_rows, 2, dtype=torch.float32, device=hidden.device)  # (m, log s) a row
    index, h, target, _ = _scored(hidden, labels, ignore_index)
    n, d = h.shape
    if n == 0:
        return loss, stats
    w = as_rows(weight)
    block_n, block_v, block_d, warps, stages = tile_config(hidden.device, hidden.dtype)
    row_blocks, vocab_tiles = cdiv(n, block_n), cdiv(vocab, block_v)
    splits = min(vocab_tiles, max(1, cdiv(program_count(h, row_blocks * vocab_tiles), row_blocks)))
    tiles_per_split = cdiv(vocab_tiles, splits)
    splits = cdiv(vocab_tiles, tiles_per_split)
    parts = torch.empty((3, splits, n), dtype=torch.float32, device=hidden.device)
    with device_guard(h), launch_errors("linear_cross_entropy"):
        launch(_forward_kernel, (row_blocks, splits), h, w, target, parts[0], parts[1], parts[2], n, vocab, d,
               h.stride(0), w.stride(0), tiles_per_split, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
               EVEN_D=d % block_d == 0, num_warps=warps, num_stages=stages, **FMA)
    m, s, t = parts.unbind(0)
    top = m.amax(0)
    log_total = torch.log((s * torch.exp(m - top)).sum(0))
    valid = (target >= 0) & (target < vocab)
    row_loss = torch.where(valid, log_total - (t.sum(0) - top), torch.nan)
    row_stats = torch.stack((top, log_total), 1)
    if index is None:
        return row_loss, row_stats
    loss[index], stats[index] = row_loss, row_stats
    return loss, stats


def slice_columns(n_rows: int, vocab: int, dtype: torch.dtype, block_v: int) -> int:
    """Vocabulary columns per backward slice: dlogits [n_rows, columns] within SLICE_BYTES, a multiple of
    block_v (at least one tile), or the whole vocabulary when it fits."""
    columns = SLICE_BYTES // (n_rows * torch.empty((), dtype=dtype).element_size())
    if columns >= vocab:
        return vocab
    return max(block_v, columns // block_v * block_v)


def backward(dloss, hidden, weight, labels, stats, ignore_index, hidden_grad: bool, weight_grad: bool):
    vocab = weight.shape[0]
    index, h, target, (row_stats, scale) = _scored(hidden, labels, ignore_index, stats, dloss.float())
    scale = torch.where((target >= 0) & (target < vocab), scale, torch.nan)  # NaN gradients where the loss is
    n, d = h.shape
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if weight_grad else None
    dh = None
    if n == 0:
        return (hidden.new_zeros(hidden.shape) if hidden_grad else None), (dw.zero_() if weight_grad else None)
    w = as_rows(weight)
    block_n, block_v, block_d, warps, stages = tile_config(hidden.device, hidden.dtype)
    columns = slice_columns(n, vocab, hidden.dtype, block_v)
    grad_buffer = torch.empty((n, columns), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, vocab, columns):
        width = min(columns, vocab - start)
        grad = grad_buffer[:, :width]
        with device_guard(h), launch_errors("linear_cross_entropy"):
            launch(_grad_logits_kernel, (cdiv(n, block_n), cdiv(width, block_v)), h, w, target, row_stats, scale, grad,
                   n, width, start, d, h.stride(0), w.stride(0), grad.stride(0), BLOCK_N=block_n, BLOCK_V=block_v,
                   BLOCK_D=block_d, EVEN_D=d % block_d == 0, num_warps=warps, num_stages=stages, **FMA)
        w_slice = w[start:start + width]
        if weight_grad:
            torch.mm(grad.T, h, out=dw[start:start + width])
        if hidden_grad:
            if width == vocab:
                dh = torch.mm(grad, w_slice)
            elif dh is None:
                dh = torch.mm(grad, w_slice).float()
            elif hidden.dtype == torch.float32:
                dh.addmm_(grad, w_slice)
            else:
                dh += torch.mm(grad, w_slice)
    if hidden_grad:
        dh = dh.to(hidden.dtype)
        if index is not None:
            dh = hidden.new_zeros(hidden.shape).index_copy_(0, index, dh)
    return dh, dw


# ------------------------------------------------------------------------------ gradients in the forward

@triton.jit
def _softmax_grad_kernel(LOGITS, LABELS, DLOGITS, LOSS, n_vocab, l_stride, g_stride, BLOCK_V: tl.constexpr):
    """One row of fp32 logits: LOSS = log s - (the target's logit - m) and DLOGITS = softmax - onehot(label),
    softmax = exp((logit - m) - log s), in DLOGITS' dtype, both NaN for a label outside [0, V). Two passes
    over the row: the running max m and sum s of exponentials (rescaled as the max grows), then the
    gradient."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    logits = LOGITS + row * l_stride
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        x = tl.load(logits + start + cols, mask=start + cols < n_vocab, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block has a valid column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    log_s = tl.log(s)
    valid = (label >= 0) & (label < n_vocab)
    for start in range(0, n_vocab, BLOCK_V):
        ok = start + cols < n_vocab
        x = tl.load(logits + start + cols, mask=ok, other=float("-inf"))
        grad = tl.exp((x - m) - log_s) - tl.where(start + cols == label, 1.0, 0.0)
        grad = tl.where(valid, grad, float("nan"))  # a NaN loss never comes with finite gradients
        tl.store(DLOGITS + row * g_stride + start + cols, grad.to(DLOGITS.dtype.element_ty), mask=ok)
    target = tl.load(logits + tl.where(valid, label, 0))
    tl.store(LOSS + row, tl.where(valid, log_s - (target - m), float("nan")))


def softmax_grad_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel, a pure stream over memory: 8 fp32 logits a thread a block
    on a GPU (two 16-byte loads), small blocks under the interpreter so tests cover several and a tail."""
    return (2048, 8) if device.type == "cuda" else (32, 1)


def gradient_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: their fp32 logits and dlogits in `dtype` within GRADIENT_CHUNK_BYTES (at least one)."""
    return max(1, GRADIENT_CHUNK_BYTES // (vocab * (4 + torch.empty((), dtype=dtype).element_size())))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a @ b. Half-precision inputs on a GPU: cuBLAS's fp32 output, no copy of either operand;
    elsewhere (the interpreter) a product of fp32 copies, the same products (a product of two half-precision
    numbers is exact in fp32) summed in another order."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, as _mm_fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def forward_with_grads(hidden, weight, labels, ignore_index, hidden_grad: bool, weight_grad: bool):
    """(loss [N], dh [N, d], dw [V, d]): the loss per row and the gradients of their sum, in fp32, zero on
    ignored rows, None where not asked for (see the module's docstring)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    loss = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if hidden_grad else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
    index, h, target, _ = _scored(hidden, labels, ignore_index)
    n = h.shape[0]
    if n == 0:
        return loss, dh, dw
    w = as_rows(weight)
    block_v, warps = softmax_grad_config(hidden.device)
    rows = min(n, gradient_chunk_rows(vocab, hidden.dtype))
    logits_buffer = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device)
    grad_buffer = torch.empty((rows, vocab), dtype=hidden.dtype, device=hidden.device)
    # Every row scored: results go straight to loss and dh; else to the scored rows' buffers, then scattered.
    row_loss = loss if index is None else torch.empty(n, dtype=torch.float32, device=hidden.device)
    row_dh = None
    if hidden_grad and index is not None:
        row_dh = torch.empty((rows, h.shape[1]), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h_chunk, logits, grad = h[start:stop], logits_buffer[:stop - start], grad_buffer[:stop - start]
        _mm_fp32(h_chunk, w.T, logits)
        with device_guard(h), launch_errors("linear_cross_entropy"):
            launch(_softmax_grad_kernel, (stop - start,), logits, target[start:stop], grad, row_loss[start:stop],
                   vocab, logits.stride(0), grad.stride(0), BLOCK_V=block_v, num_warps=warps, **FMA)
        if hidden_grad and index is None:
            _mm_fp32(grad, w, dh[start:stop])
        elif hidden_grad:
            dh.index_copy_(0, index[start:stop], _mm_fp32(grad, w, row_dh[:stop - start]))
        if weight_grad:
            _addmm_fp32(dw, grad.T, h_chunk)
    if index is not None:
        loss.index_copy_(0, index, row_loss)
    return loss, dh, dw
