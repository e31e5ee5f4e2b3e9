"""SwiGLU forward and backward in Triton, for separate gate/up tensors and for a packed [..., 2F] one.

Both layouts run the same kernels: they take a row stride per tensor, so the packed gate and up are two
strided views of one buffer. silu is recomputed in the backward from the saved gate.
"""
import triton
import triton.language as tl

from .._layout import swiglu_functions
from ._launch import FMA, cdiv, launch, next_power_of_2

BLOCK_MAX = 1024


@triton.jit
def _forward_kernel(G, U, Y, g_stride, u_stride, y_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(DY, G, U, DG, DU, dy_stride, g_stride, u_stride, dg_stride, du_stride, n_cols,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * dg_stride + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * du_stride + cols, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(next_power_of_2(n_cols), BLOCK_MAX)
    return (n_rows, cdiv(n_cols, block)), block


def _forward_rows(g, u, y):
    grid, block = _grid(*g.shape)
    launch(_forward_kernel, grid, g, u, y, g.stride(0), u.stride(0), y.stride(0), g.shape[1], BLOCK=block, **FMA)


def _backward_rows(dy, g, u, dg, du):
    grid, block = _grid(*g.shape)
    launch(_backward_kernel, grid, dy, g, u, dg, du, dy.stride(0), g.stride(0), u.stride(0), dg.stride(0),
           du.stride(0), g.shape[1], BLOCK=block, **FMA)


_functions = swiglu_functions(_forward_rows, _backward_rows)
forward, backward = _functions.forward, _functions.backward
packed_forward, packed_backward = _functions.packed_forward, _functions.packed_backward
