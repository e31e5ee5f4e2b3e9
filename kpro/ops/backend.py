"""Which implementation runs an op: `torch` (plain PyTorch, the reference), `triton`, or `cuda` (csrc/).

The choice is made per call and per op, from, in order: the innermost `with kpro.ops.backend(...)`
block that covers the op, the `KPRO_BACKEND` environment variable, else `auto`. `auto` takes the first
backend of `AUTO_ORDER` that can run the call. A backend named explicitly that cannot run the call
raises `BackendError`; nothing ever falls back silently to another implementation.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from .errors import BackendError

BACKENDS = ("torch", "triton", "cuda")

# Backends each op has.
IMPLEMENTED = {
    "rms_norm": ("torch", "triton", "cuda"),
    "swiglu": ("torch", "triton", "cuda"),
    "attention": ("torch", "triton"),
    "bitune_attention": ("torch", "triton"),
    "linear_cross_entropy": ("torch", "triton"),
}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)

# What `auto` tries, by device. The CUDA C++ kernels are chosen only when forced until they have been
# validated and measured on a GPU (benchmarks/RESULTS.md); on the CPU the reference always runs.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

_forced: list[dict[str, str]] = []  # innermost last; the key "*" covers every op


@contextlib.contextmanager
def backend(name: str | None = None, **per_op: str):
    """Force a backend (`auto`, `torch`, `triton`, `cuda`) for the ops called inside the block.

    `backend("cuda", attention="triton")` forces CUDA for every op but attention;
    `backend(swiglu="torch")` changes swiglu only.
    """
    _forced.append(_parse_choice(name, per_op, "kpro.ops.backend()"))
    try:
        yield
    finally:
        _forced.pop()


def forced_backends() -> tuple[dict[str, str], ...]:
    """The `backend()` blocks in force now, outermost first: for code that re-runs ops later (recomputation
    in a backward pass, outside those blocks) and must choose the same backends."""
    return tuple(dict(choice) for choice in _forced)


@contextlib.contextmanager
def backends_forced(choices: tuple[dict[str, str], ...]):
    """Run the block under exactly `choices` (from `forced_backends()`), whatever blocks surround it."""
    outer = _forced[:]
    _forced[:] = [dict(choice) for choice in choices]
    try:
        yield
    finally:
        _forced[:] = outer


def requested_backend(op: str = "*") -> str:
    """The backend asked for `op` now: the innermost `backend()` block covering it, else $KPRO_BACKEND
    (`cuda`, or per op: `cuda,attention=triton`), else `auto`."""
    for choice in reversed(_forced):
        if op in choice or "*" in choice:
            return choice.get(op, choice.get("*"))
    env = os.environ.get("KPRO_BACKEND", "")
    if env:
        default, per_op = None, {}
        for item in env.split(","):
            key, _, value = item.strip().rpartition("=")
            if key:
                per_op[key] = value
            else:
                default = value
        choice = _parse_choice(default, per_op, "KPRO_BACKEND")
        if op in choice or "*" in choice:
            return choice.get(op, choice.get("*"))
    return "auto"


def select(op: str, x: torch.Tensor) -> str:
    """The backend that runs `op` on tensors like `x` (its device and dtype)."""
    name = requested_backend(op)
    if name == "auto":
        for candidate in AUTO_ORDER.get(x.device.type, ("torch",)):
            if unavailable_reason(candidate, op, x) is None:
                return candidate
        raise BackendError(f"{op}: no backend can run {x.dtype} tensors on {x.device}")
    reason = unavailable_reason(name, op, x)
    if reason is not None:
        raise BackendError(f"{op}: backend {name!r} cannot run this call: {reason}")
    return name


def unavailable_reason(name: str, op: str, x: torch.Tensor) -> str | None:
    """Why backend `name` cannot run `op` on tensors like `x`, or None if it can."""
    if name not in IMPLEMENTED[op]:
        return f"kpro has no {name} implementation of {op} (it has: {', '.join(IMPLEMENTED[op])})"
    allowed = TORCH_DTYPES if name == "torch" else KERNEL_DTYPES
    if x.dtype not in allowed:
        return f"dtype {x.dtype} is not supported (supported: {', '.join(str(d) for d in allowed)})"
    if name == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if x.device.type == "cpu" and not triton_interpreter():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if x.device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {x.device.type} tensors"
    if name == "cuda":
        if x.device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got a tensor on {x.device}"
        from .cuda_kernels.library import library_problem

        return library_problem()
    return None


def kernels(op: str, backend: str, torch_kernels):
    """The namespace of `op`'s functions in `backend`: `torch_kernels`, or the op's module in
    triton_kernels/ or cuda_kernels/ (imported on first use)."""
    if backend == "torch":
        return torch_kernels
    package = {"triton": "triton_kernels", "cuda": "cuda_kernels"}[backend]
    return importlib.import_module(f".{package}.{op}", __package__)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _parse_choice(default: str | None, per_op: dict, where: str) -> dict[str, str]:
    choice = dict(per_op)
    if default is not None:
        choice["*"] = default
    for op, name in choice.items():
        if op != "*" and op not in IMPLEMENTED:
            raise BackendError(f"{where}: unknown op {op!r}; kpro's ops are {', '.join(IMPLEMENTED)}")
        if name not in BACKENDS + ("auto",):
            raise BackendError(f"{where}: unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return choice
