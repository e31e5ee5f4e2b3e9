"""RMSNorm through csrc/rms_norm.cu."""
import math

import torch

from .._layout import as_rows, device_guard
from ..errors import BackendError
from .library import call, dtype_code, stream

MAX_COLS = 16384  # 1024 threads x 16 elements each (see with_items in csrc/rms_norm.cu)
MAX_ROWS = 2**31 - 1  # one block a row (forward; backward of a frozen weight): CUDA's grid.x limit
ROWS_PER_BLOCK_TARGET = 2  # blocks per SM with dW: as many as fit (512-thread blocks of ~60 registers: 2)


def _check(x, weight):
    if weight.dtype != x.dtype:
        raise BackendError(f"rms_norm: the CUDA kernel needs weight dtype == x dtype, got {weight.dtype} and {x.dtype}")
    if x.shape[-1] > MAX_COLS:
        raise BackendError(f"rms_norm: the CUDA kernel takes rows of at most {MAX_COLS} elements, got {x.shape[-1]}")
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS:  # the .cu would turn the int64 count into an unsigned grid size: fail or wrap
        raise BackendError(f"rms_norm: the CUDA kernel takes at most {MAX_ROWS:,} rows (2**31 - 1), got {rows:,} "
                           "(a block a row): split the rows, or run the torch backend")


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    _check(x, weight)
    rows, w = as_rows(x), weight.contiguous()
    n_rows, n_cols = rows.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    with device_guard(x):
        call("kpro_rms_norm_forward", dtype_code(x), rows.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(),
             n_rows, n_cols, rows.stride(0), y.stride(0), float(eps), stream(x))
    return y.view(x.shape), rstd.view(x.shape[:-1])


def backward(dy, x, weight, rstd, weight_grad: bool):
    _check(x, weight)
    rows, dy_rows, w, rstd = as_rows(x), as_rows(dy), weight.contiguous(), rstd.contiguous()
    n_rows, n_cols = rows.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if weight_grad and n_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    if weight_grad:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        rows_per_block = -(-n_rows // (sms * ROWS_PER_BLOCK_TARGET))
        partial = torch.empty((-(-n_rows // rows_per_block), n_cols), dtype=torch.float32, device=x.device)
        dw = torch.empty(n_cols, dtype=weight.dtype, device=x.device)  # the kernel sums partial into it
    else:
        rows_per_block, partial, dw = 1, None, None
    with device_guard(x):
        call("kpro_rms_norm_backward", dtype_code(x), dy_rows.data_ptr(), rows.data_ptr(), w.data_ptr(),
             rstd.data_ptr(), dx.data_ptr(), None if partial is None else partial.data_ptr(),
             None if dw is None else dw.data_ptr(), n_rows, n_cols, rows_per_block, dy_rows.stride(0),
             rows.stride(0), dx.stride(0), stream(x))
    return dx.view(x.shape), None if dw is None else dw.view(weight.shape)
