"""Tensor layout helpers shared by the Triton and CUDA launchers."""
import contextlib
from types import SimpleNamespace

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, cols] view (a copy only when needed) whose columns are contiguous; a 0-dim tensor is [1, 1]."""
    rows = t.reshape(-1, t.shape[-1] if t.dim() else 1)
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU, not whichever is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def swiglu_functions(forward_rows, backward_rows) -> SimpleNamespace:
    """A SwiGLU backend (forward, backward, packed_forward, packed_backward) from two launchers over
    2-D row views with unit column stride: forward_rows(g, u, y) and backward_rows(dy, g, u, dg, du).
    The packed layout passes the two halves of each row as strided views of one buffer."""

    def run_forward(g, u, out_shape, like):
        y = torch.empty(g.shape, dtype=like.dtype, device=like.device)
        if y.numel():
            with device_guard(like):
                forward_rows(g, u, y)
        return y.view(out_shape)

    def run_backward(dy, g, u, dg, du):
        if g.numel():
            with device_guard(g):
                backward_rows(as_rows(dy), g, u, dg, du)

    def forward(gate, up):
        return run_forward(as_rows(gate), as_rows(up), gate.shape, gate)

    def backward(dy, gate, up):
        g, u = as_rows(gate), as_rows(up)
        dg, du = torch.empty(g.shape, dtype=gate.dtype, device=gate.device), torch.empty(u.shape, dtype=up.dtype, device=up.device)
        run_backward(dy, g, u, dg, du)
        return dg.view(gate.shape), du.view(up.shape)

    def packed_forward(gate_up):
        rows = as_rows(gate_up)
        half = rows.shape[1] // 2
        return run_forward(rows[:, :half], rows[:, half:], (*gate_up.shape[:-1], half), gate_up)

    def packed_backward(dy, gate_up):
        rows = as_rows(gate_up)
        half = rows.shape[1] // 2
        d = torch.empty(rows.shape, dtype=gate_up.dtype, device=gate_up.device)
        run_backward(dy, rows[:, :half], rows[:, half:], d[:, :half], d[:, half:])
        return d.view(gate_up.shape)

    return SimpleNamespace(forward=forward, backward=backward, packed_forward=packed_forward, packed_backward=packed_backward)
