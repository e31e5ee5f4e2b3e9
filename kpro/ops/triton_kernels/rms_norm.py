"""RMSNorm forward and backward in Triton.

Forward: one program per row, fp32 accumulation, output in x's dtype, rstd saved per row. Rows wider
than MAX_BLOCK are processed in column blocks (two passes over the row).
Backward: each program walks a contiguous range of rows, computing dX and, only when the weight needs a
gradient, accumulating dW in fp32 for its rows; a second small kernel adds up the per-program partial
sums and casts them to the weight's dtype. With a frozen weight there is no partial buffer, no
accumulation and no reduction, and every row gets its own program.
"""
import torch
import triton
import triton.language as tl

from .._layout import as_rows, device_guard
from ._launch import FMA, cdiv, launch, next_power_of_2, program_count, warps_for

MAX_BLOCK = 16384  # widest row kept in registers in one block; wider rows loop over column blocks
WEIGHT_GRAD_BLOCK = 1024  # columns per program of the dW reduction
# The backward prefetches the next row (and holds the weight) where a thread holds few enough elements of a
# row, in 16-byte vectors: at 16384, or with rows that only scalar loads can read, the second row's registers
# spill (ptxas, sm_80 and sm_90a: python -m kpro.ops.report --only rms_norm).
PREFETCH_MAX_BLOCK = 8192


@triton.jit
def _forward_kernel(X, W, Y, RSTD, x_stride, y_stride, n_cols, eps,
                    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    y_row = Y + row * y_stride
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, MEAN_GX, dy_stride, x_stride, dx_stride, n_rows, n_cols,
                     rows_per_program, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                     PREFETCH: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    first = program * rows_per_program  # int64, and so is the loop's row index
    last = tl.minimum(first + rows_per_program, n_rows)
    partial = DW_PARTIAL + program * n_cols
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        # The weight stays in registers over the rows where they are prefetched (a thread holds at most 16
        # elements of a row); wider rows and scalar loads read it again each row, from L1: held, it made the
        # kernel spill more than reading it costs (width 16,384: ptxas counted 176 B of spill stores a thread on
        # sm_90a, and as many loads, against 64 B read a row).
        if PREFETCH:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        # With PREFETCH, row r + 1 is loaded (in the input dtype) before row r's reduction, so its loads are
        # in flight while this row is reduced and written. (A row past `last` gets an empty mask: its columns
        # are compared with 0 instead of n_cols.)
        mask_next = cols < tl.where(first < last, n_cols, 0)
        x_next = tl.load(X + first * x_stride + cols, mask=mask_next, other=0.0)
        dy_next = tl.load(DY + first * dy_stride + cols, mask=mask_next, other=0.0)
        for row in range(first, last):
            if not PREFETCH:
                x_next = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
                dy_next = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0)
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            if PREFETCH:
                mask_next = cols < tl.where(row + 1 < last, n_cols, 0)
                x_next = tl.load(X + (row + 1) * x_stride + cols, mask=mask_next, other=0.0)
                dy_next = tl.load(DY + (row + 1) * dy_stride + cols, mask=mask_next, other=0.0)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            if not PREFETCH:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * w
            if WEIGHT_GRAD:  # before the reduction, so that dy is not held across it
                dw += dy * x_hat
            mean_gx = tl.sum(g * x_hat, axis=0) / n_cols
            tl.store(DX + row * dx_stride + cols, (rstd * (g - x_hat * mean_gx)).to(DX.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            tl.store(partial + cols, dw, mask=mask)
    else:
        # Rows wider than one block: first each row's mean of g·x_hat (kept in MEAN_GX), then the column
        # blocks in the outer loop, so that a block's dW partial sum stays in registers over all the rows
        # and is written once, not read and written back once per row.
        for row in range(first, last):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                acc += dy * w * x
            tl.store(MEAN_GX + row, tl.sum(acc, axis=0) * rstd / n_cols)
        # One thread stored each mean and every thread reads it back: without a barrier, warps past it could
        # read MEAN_GX before the store (Triton synchronises shared memory only; bar.sync orders global
        # memory among the block's threads too).
        tl.debug_barrier()
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            if not WEIGHT_GRAD:  # with dW, the block's partial takes the registers: the weight is read each row
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK], dtype=tl.float32)
            for row in range(first, last):
                if WEIGHT_GRAD:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                x_hat = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dx = rstd * (dy * w - x_hat * tl.load(MEAN_GX + row))
                tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if WEIGHT_GRAD:
                    dw += dy * x_hat
            if WEIGHT_GRAD:
                tl.store(partial + cols, dw, mask=mask)


@triton.jit
def _weight_grad_kernel(DW_PARTIAL, DW, parts, n_cols, BLOCK: tl.constexpr):
    """dW = the column sums of the programs' fp32 partial rows, cast to the weight's dtype, in one pass."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    total = tl.zeros([BLOCK], dtype=tl.float32)
    row = DW_PARTIAL + cols
    for _ in range(0, parts):
        total += tl.load(row, mask=mask, other=0.0)
        row += n_cols  # pointer arithmetic is 64-bit: no int32 product parts * n_cols
    tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=mask)


def _vectorisable(rows: torch.Tensor) -> bool:
    """Rows the compiled kernel reads with 16-byte loads: Triton vectorises when the pointer is 16-byte
    aligned and the row length and stride, as integers, are multiples of 16 (its launch specialisation)."""
    return rows.data_ptr() % 16 == 0 and rows.shape[1] % 16 == 0 and rows.stride(0) % 16 == 0


def _block(n_cols: int) -> tuple[int, bool]:
    block = min(next_power_of_2(n_cols), MAX_BLOCK)
    return block, n_cols <= block


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    rows = as_rows(x)
    n_rows, n_cols = rows.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        block, one_block = _block(n_cols)
        with device_guard(x):
            launch(_forward_kernel, (n_rows,), rows, weight.contiguous(), y, rstd, rows.stride(0), y.stride(0),
                   n_cols, eps, BLOCK=block, ONE_BLOCK=one_block, num_warps=warps_for(block), **FMA)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, weight_grad: bool):
    rows, dy_rows = as_rows(x), as_rows(dy)
    n_rows, n_cols = rows.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx.view(x.shape), (torch.zeros_like(weight) if weight_grad else None)
    block, one_block = _block(n_cols)
    # Without dW, rows are independent: one program each. With dW, few programs, each summing its rows.
    programs = program_count(x, n_rows) if weight_grad else n_rows
    rows_per_program = cdiv(n_rows, programs)
    programs = cdiv(n_rows, rows_per_program)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if weight_grad else dx
    mean_gx = dx if one_block else torch.empty(n_rows, dtype=torch.float32, device=x.device)  # dx: unused dummy
    prefetch = one_block and block <= PREFETCH_MAX_BLOCK and all(_vectorisable(t) for t in (rows, dy_rows, dx))
    with device_guard(x):
        launch(_backward_kernel, (programs,), dy_rows, rows, weight.contiguous(), rstd.contiguous(), dx, partial,
               mean_gx, dy_rows.stride(0), rows.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
               BLOCK=block, ONE_BLOCK=one_block, WEIGHT_GRAD=weight_grad, PREFETCH=prefetch,
               num_warps=warps_for(block), **FMA)
        if not weight_grad:
            return dx.view(x.shape), None
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
        launch(_weight_grad_kernel, (cdiv(n_cols, WEIGHT_GRAD_BLOCK),), partial, dw, programs, n_cols,
               BLOCK=WEIGHT_GRAD_BLOCK, num_warps=4, **FMA)
    return dx.view(x.shape), dw
