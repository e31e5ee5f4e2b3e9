"""RMSNorm: y = x / sqrt(mean(x²) + eps) * weight over the last dimension.

One differentiable entry point, `rms_norm`, registered as torch.library custom ops (forward and backward)
so torch.compile traces it whole and autograd calls our backward. The forward saves only x and the
per-row rstd; the backward computes dW only when the weight requires grad (a frozen weight skips the
reduction, the expensive part, entirely).
"""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace

import torch

from .backend import (check_tensors, eager_fast_path, kernels, needs_graph, no_autocast, once_differentiable,
                      refuse_function_transforms, select)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape); output in x's dtype."""
    check_tensors("rms_norm", x=x, weight=weight)
    check_rms_norm_args(x, weight, eps)
    refuse_function_transforms("rms_norm", x, weight)
    backend = select("rms_norm", x)
    if eager_fast_path(x, weight):  # the same kernels without the custom op's dispatch (backend.eager_fast_path)
        if not needs_graph(x, weight):
            return _run_forward(x, weight, float(eps), backend)[0]
        return RmsNormFunction.apply(x, weight, float(eps), backend)
    return torch.ops.kpro.rms_norm_forward(x, weight, float(eps), backend)[0]


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)} (last dim)")
    if x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} has no features to normalise (last dimension 0)")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device}, weight on {weight.device}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    check_eps(eps)


def check_eps(eps) -> None:
    """eps must be a finite number >= 0: a bool (True read as 1.0), a string, an infinity (every output 0) or a
    tensor that requires grad (the op takes a float: its gradient would be dropped) is refused by name."""
    if isinstance(eps, torch.Tensor):
        if eps.requires_grad or eps.dim() != 0 or eps.dtype == torch.bool or not eps.dtype.is_floating_point:
            raise ValueError(f"rms_norm: eps must be a number or a 0-dim floating-point tensor without grad, got "
                             f"{tuple(eps.shape)} {eps.dtype}{' requiring grad' if eps.requires_grad else ''}")
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")
    if not 0 <= eps < math.inf:  # comparisons, not float(): under torch.compile(dynamic=True) eps is a SymFloat
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {float(eps)}")


# ------------------------------------------------------------------------------------ torch backend

def torch_forward(x, weight, eps):
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    # ‖x‖² / n in one reduction, without materialising x²; in-place ops on our own temporaries.
    rstd = torch.linalg.vector_norm(xf, dim=-1).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    # Contiguous outputs whatever x's layout, like the kernels' (and the fake implementation's).
    return (xf * rstd[..., None]).mul_(weight.to(acc)).to(x.dtype).contiguous(), rstd.contiguous()


def torch_backward(dy, x, weight, rstd, weight_grad: bool):
    acc = accumulation_dtype(x.dtype)
    x_hat = x.to(acc) * rstd[..., None]
    g = dy.to(acc) * weight.to(acc)
    dw = None
    if weight_grad:
        dw = (dy.to(acc) * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    mean_gx = torch.linalg.vecdot(g, x_hat).div_(x.shape[-1])
    dx = g.sub_(x_hat.mul_(mean_gx[..., None])).mul_(rstd[..., None])  # rstd * (g - x_hat * mean(g * x_hat))
    return dx.to(x.dtype).contiguous(), dw


TORCH_KERNELS = SimpleNamespace(forward=torch_forward, backward=torch_backward)


def _kernels(backend: str):
    """The backend's functions: forward(x, weight, eps) and backward(dy, x, weight, rstd, weight_grad)."""
    return kernels("rms_norm", backend, TORCH_KERNELS)


# ------------------------------------------------------------------------------ custom op registration

def _run_forward(x, weight, eps, backend):
    """The forward of both paths, the custom op and RmsNormFunction: (y, rstd)."""
    with no_autocast(x):
        return _kernels(backend).forward(x, weight, eps)


def _run_backward(dy, x, weight, rstd, weight_grad, backend):
    """The backward of both paths: (dx, dw), dw None without weight_grad."""
    with no_autocast(x):  # the torch backward's vecdot would run in bf16 under a CPU autocast block
        return _kernels(backend).backward(dy, x, weight, rstd, weight_grad)


@torch.library.custom_op("kpro::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y like x, rstd [x.shape[:-1]] in the accumulation dtype."""
    return _run_forward(x, weight, eps, backend)


@rms_norm_forward.register_fake
def _(x, weight, eps, backend):  # every backend returns contiguous tensors
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("kpro::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      weight_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); dw is an empty tensor when weight_grad is False."""
    dx, dw = _run_backward(dy, x, weight, rstd, weight_grad, backend)
    return dx, (dw if dw is not None else weight.new_empty(0))


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, weight_grad, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape) if weight_grad else weight.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx, dw = torch.ops.kpro.rms_norm_backward(dy, x, weight, rstd, weight_grad, ctx.backend)
    return dx, (dw if weight_grad else None), None, None


rms_norm_forward.register_autograd(_backward, setup_context=_setup_context)


class RmsNormFunction(torch.autograd.Function):
    """The eager path: the custom ops' kernels and saved tensors (x, weight, rstd) without their dispatch.
    Its backward is once differentiable, as the custom op's (no autograd formula for its backward op)."""

    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        y, rstd = _run_forward(x, weight, eps, backend)
        ctx.save_for_backward(x, weight, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]
        dx, dw = _run_backward(dy, x, weight, rstd, weight_grad, ctx.backend)
        return dx, (dw if weight_grad else None), None, None
