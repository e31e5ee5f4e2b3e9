"""SwiGLU: silu(gate) * up, computed in the accumulation dtype and rounded once.

Two entry points: `swiglu(gate, up)` for separate projections, and `swiglu_packed(gate_up)` for models
that fuse them into one `[..., 2F]` tensor (gate first). Both save only their inputs and recompute
silu in the backward.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .backend import (check_tensors, eager_fast_path, kernels, needs_graph, once_differentiable,
                      refuse_function_transforms, select)
from .rms_norm import accumulation_dtype


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape, dtype and device."""
    check_tensors("swiglu", gate=gate, up=up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and "
                         f"up {tuple(up.shape)} {up.dtype} {up.device} differ")
    _check_floating(gate)
    refuse_function_transforms("swiglu", gate, up)
    backend = select("swiglu", gate)
    if eager_fast_path(gate, up):  # the same kernels without the custom op's dispatch (backend.eager_fast_path)
        if not needs_graph(gate, up):
            return _kernels(backend).forward(gate, up)
        return SwiGLUFunction.apply(gate, up, backend)
    return torch.ops.kpro.swiglu_forward(gate, up, backend)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with gate_up = cat(gate, up) on the last dimension: [..., 2F] -> [..., F]."""
    check_tensors("swiglu_packed", gate_up=gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: last dimension must be even (gate then up), got {tuple(gate_up.shape)}")
    _check_floating(gate_up, "swiglu_packed: gate_up", "has")
    refuse_function_transforms("swiglu_packed", gate_up)
    backend = select("swiglu", gate_up)
    if eager_fast_path(gate_up):
        if not needs_graph(gate_up):
            return _kernels(backend).packed_forward(gate_up)
        return SwiGLUPackedFunction.apply(gate_up, backend)
    return torch.ops.kpro.swiglu_packed_forward(gate_up, backend)


def _check_floating(x, what: str = "swiglu: inputs", verb: str = "have"):
    """`what`: the op and argument the message names (swiglu_packed's gate_up, not swiglu's inputs)."""
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}")
    if x.dim() > 0 and x.shape[-1] == 0:
        raise ValueError(f"{what} {tuple(x.shape)} {verb} no features (last dimension 0)")


# ------------------------------------------------------------------------------------ torch backend

def torch_forward(gate, up):
    acc = accumulation_dtype(gate.dtype)
    # Contiguous outputs whatever the inputs' layout, like the kernels' (and the fake implementations').
    return F.silu(gate.to(acc)).mul_(up.to(acc)).to(gate.dtype).contiguous()


def torch_backward(dy, gate, up):
    acc = accumulation_dtype(gate.dtype)
    g, d = gate.to(acc), dy.to(acc)
    dgate = torch.ops.aten.silu_backward(d * up.to(acc), g)  # d·u·silu'(g), one fused kernel
    return dgate.to(gate.dtype).contiguous(), F.silu(g).mul_(d).to(up.dtype).contiguous()


def torch_packed_forward(gate_up):
    return torch_forward(*gate_up.chunk(2, dim=-1))


def torch_packed_backward(dy, gate_up):
    return torch.cat(torch_backward(dy, *gate_up.chunk(2, dim=-1)), dim=-1)


TORCH_KERNELS = SimpleNamespace(forward=torch_forward, backward=torch_backward,
                                packed_forward=torch_packed_forward, packed_backward=torch_packed_backward)


def _kernels(backend: str):
    """The backend's functions: forward, backward, packed_forward, packed_backward."""
    return kernels("swiglu", backend, TORCH_KERNELS)


# ------------------------------------------------------------------------------ custom op registration

@torch.library.custom_op("kpro::swiglu_forward", mutates_args=())
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend).forward(gate, up)


@swiglu_forward.register_fake
def _(gate, up, backend):  # every backend returns contiguous tensors
    return gate.new_empty(gate.shape)


@torch.library.custom_op("kpro::swiglu_backward", mutates_args=())
def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels(backend).backward(dy, gate, up)


@swiglu_backward.register_fake
def _(dy, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.kpro.swiglu_backward(dy, gate, up, ctx.backend)
    return dgate, dup, None


swiglu_forward.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("kpro::swiglu_packed_forward", mutates_args=())
def swiglu_packed_forward(gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend).packed_forward(gate_up)


@swiglu_packed_forward.register_fake
def _(gate_up, backend):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("kpro::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward(dy: torch.Tensor, gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend).packed_backward(dy, gate_up)


@swiglu_packed_backward.register_fake
def _(dy, gate_up, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup_packed(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.backend = inputs[1]


def _backward_packed(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.kpro.swiglu_packed_backward(dy, gate_up, ctx.backend), None


swiglu_packed_forward.register_autograd(_backward_packed, setup_context=_setup_packed)


# ------------------------------------------------------------------------------ the eager path
# The custom ops' kernels and saved tensors without their dispatch (backend.eager_fast_path); backwards once
# differentiable, as the custom ops' (no autograd formula for their backward ops).

class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, backend):
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        return _kernels(backend).forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = _kernels(ctx.backend).backward(dy, gate, up)
        return dgate, dup, None


class SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, backend):
        ctx.save_for_backward(gate_up)
        ctx.backend = backend
        return _kernels(backend).packed_forward(gate_up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return _kernels(ctx.backend).packed_backward(dy, gate_up), None
