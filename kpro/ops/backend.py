"""Which implementation runs an op: `torch` (plain PyTorch, the reference), `triton`, or `cuda` (csrc/).

The choice is made per call and per op, from, in order: the innermost `with kpro.ops.backend(...)`
block that covers the op, the `KPRO_BACKEND` environment variable, else `auto` (under torch.compile, when
the op is traced: the blocks are guarded, the environment is not). `auto` takes the first backend of
`AUTO_ORDER` that can run the call. A backend named explicitly that cannot run the call raises
`BackendError`; nothing ever falls back silently to another implementation.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
import torch.autograd.forward_ad as forward_ad
from torch._subclasses.fake_tensor import is_fake

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

# Innermost last; the key "*" covers every op. Process-wide, not per thread: on a GPU autograd runs the
# backward in threads of its own, which must see the block a backward is called in.
_forced: list[dict[str, str]] = []


@contextlib.contextmanager
def backend(name: str | None = None, **per_op: str):
    """Force a backend (`auto`, `torch`, `triton`, `cuda`) for the ops called inside the block.

    `backend("triton", rms_norm="cuda", swiglu="cuda")` forces Triton for every op but RMSNorm and SwiGLU,
    which run the CUDA kernels; `backend(swiglu="torch")` changes swiglu only. A default covers every op:
    `backend("cuda")` alone refuses the ops with no CUDA kernel (attention, bitune_attention,
    linear_cross_entropy).
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
    (`triton`, or per op: `triton,rms_norm=cuda,swiglu=cuda`; spaces and empty entries are ignored), else
    `auto`."""
    if op != "*" and op not in IMPLEMENTED:  # a misspelt op would read as "auto"
        raise BackendError(f"unknown op {op!r}; kpro's ops are {', '.join(IMPLEMENTED)}")
    for choice in reversed(_forced):
        if op in choice or "*" in choice:
            return choice.get(op, choice.get("*"))
    # Under torch.compile Dynamo reads the environment at trace time and cannot guard on it (unlike _forced): a
    # change after the first compile is not seen (docs/ops.md says so)
    choice = _environment_choice()
    if op in choice or "*" in choice:
        return choice.get(op, choice.get("*"))
    return "auto"


def _environment_choice() -> dict[str, str]:
    """$KPRO_BACKEND parsed: {op or "*": backend}, empty where it is not set."""
    env = os.environ.get("KPRO_BACKEND", "")
    if not env:
        return {}
    default, per_op = None, {}
    for item in env.split(","):
        if not item.strip():  # a trailing or doubled comma says nothing
            continue
        key, eq, value = (part.strip() for part in item.rpartition("="))
        if eq and not key:
            raise BackendError(f"KPRO_BACKEND={env!r}: {item.strip()!r} names no op (write op=backend)")
        if (key and key in per_op) or (not key and default is not None):
            raise BackendError(f"KPRO_BACKEND={env!r} names a backend for {key or 'every op'} twice: "
                               "say it once")
        if key:
            per_op[key] = value
        else:
            default = value
    return _parse_choice(default, per_op, "KPRO_BACKEND")


def check_environment_backends() -> None:
    """A command's check of $KPRO_BACKEND before any work: its syntax, and that each op it covers has the backend
    asked for on some device (attention has no cuda kernel, say), which a model's first forward would refuse only
    after the model loaded. Library calls check an op's backend when the op runs: a script may ask for a backend
    only the ops it runs have."""
    choice = _environment_choice()
    asked = {op: choice.get(op, choice.get("*", "auto")) for op in IMPLEMENTED}
    impossible = [op for op, name in asked.items() if name not in IMPLEMENTED[op] + ("auto",)]
    if impossible:
        has = "; ".join(f"{op}={asked[op]}, but {op} has {'/'.join(IMPLEMENTED[op])}" for op in impossible)
        raise BackendError(f"KPRO_BACKEND={os.environ['KPRO_BACKEND']!r} asks for a backend kpro has no kernel of on "
                           f"any device: {has}; name those ops' backends ({impossible[0]}=triton), or leave them to "
                           "auto")


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


def check_tensors(op: str, **named) -> None:
    """Refuse, by name, arguments that are not tensors (a None weight, a NumPy array): an AttributeError deep
    in the op named neither."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(value).__name__}")


def values_readable(*tensors) -> bool:
    """Whether an op's checks may read the tensors' values into Python (bool(), int(), .tolist()): in eager
    mode on real tensors. Not under torch.compile (a graph break), nor with fake tensors (FakeTensorMode,
    make_fx, torch.export: there is no data) or meta ones; there the checks put `torch._assert_async` in
    the computation instead, which a traced graph keeps (and a fake or meta tensor skips)."""
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    return not any(t.is_meta or (type(t) not in _PLAIN_TENSORS and is_fake(t)) for t in tensors)


def refuse_function_transforms(op: str, *tensors) -> None:
    """Refuse, naming `op`, the differentiation that kpro's custom ops (torch.library, with a backward
    registered for reverse-mode autograd only) cannot do: torch.func's grad, vjp and jacrev, which raise
    a message about autograd.Function's setup_context, and forward-mode AD (torch.func.jvp, jacfwd,
    torch.autograd.forward_ad), which returned zero or no tangent as if the output did not depend on the
    inputs. torch.vmap alone runs the ops one example at a time and is let through. Nothing is checked
    under torch.compile (the tracer handles these itself) and the common case costs one C call."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        if TransformType.Grad in kinds or TransformType.Jvp in kinds:
            raise BackendError(f"{op}: torch.func.grad, vjp, jacrev, jvp and jacfwd cannot differentiate kpro's ops "
                               "(custom ops with a reverse-mode backward only); use torch.autograd "
                               "(loss.backward(), torch.autograd.grad)")
    if forward_ad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise BackendError(f"{op}: forward-mode AD (torch.autograd.forward_ad) cannot differentiate kpro's ops "
                           "(custom ops with a reverse-mode backward only): their tangent would be lost; use "
                           "reverse mode (loss.backward(), torch.autograd.grad)")


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exact types: a subclass (FakeTensor, DTensor) is not plain


def eager_fast_path(*tensors) -> bool:
    """True where an op may run its kernels through a plain torch.autograd.Function instead of its registered
    custom ops: the same kernel functions with the same arguments, forward and backward, without the custom
    ops' dispatch (0.26 ms an RMSNorm forward and backward on the 2-core VM: benchmarks/RESULTS.md).

    Only in plain eager mode: not under torch.compile, torch.jit.trace, a torch.func transform (vmap; grad
    and jvp are refused before), a TorchDispatchMode (FakeTensorMode, make_fx, selective checkpointing) or
    a TorchFunctionMode, and only for plain strided tensors or Parameters (no subclass, no meta or nested
    tensor); `None` entries (optional tensors) pass. Everywhere else the custom ops, which those need."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None):
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or t.is_meta or t.is_nested
                              or t.layout is not torch.strided):
            return False
    return True


def needs_graph(*tensors) -> bool:
    """Whether a call records an autograd graph: grad mode on and an input (`None` entries skipped) requiring
    grad. Where none is recorded (generation, evaluation), an eager path calls its kernel functions directly:
    torch.autograd.Function.apply alone costs ~10 us a call on the 2-core VM (benchmarks/RESULTS.md)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def once_differentiable(backward):
    """For the backward of an eager path's autograd.Function: like the custom ops, whose backward ops have no
    autograd formula, a backward with create_graph=True gives gradients whose own backward raises (torch's
    @once_differentiable gives them no grad_fn at all where the incoming gradient does not require grad: a
    second derivative that would silently miss the op). The kernels run without a graph, as below the
    custom ops; a plain backward (grad mode off) costs one C call more."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        present = [i for i, g in enumerate(outputs) if g is not None]
        # The error node also takes the op's saved inputs and the incoming gradients that require grad: a
        # second derivative with respect to one of them (autograd.grad(..., inputs=[w]), a Hessian-vector
        # product) reaches the node and raises, where a node linked to fresh leaves alone was never visited
        # and the op's term silently left out.
        links = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        error = torch._C._functions.DelayedError(
            b"kpro's ops have no double backward: their backward (as the custom ops' kpro::*_backward, which "
            b"have no autograd formula) cannot be differentiated", len(present) + len(links))
        wrapped = error(*[outputs[i].detach().requires_grad_() for i in present], *links)
        wrapped = (wrapped if isinstance(wrapped, tuple) else (wrapped,))[:len(present)]
        outputs = list(outputs)
        for i, grad in zip(present, wrapped):
            outputs[i] = grad
        return tuple(outputs)

    return wrapper


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast casts a matmul's or SDPA's inputs: in the autocast dtype where autocast is on
    (fp32, fp16 and bf16 ones; float64 stays, as autocast leaves it), else unchanged. An op's entry point
    calls it, so every backend computes in the precision the torch one (PyTorch's own ops) would."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in tensors)


def autocast_note(t: torch.Tensor) -> str:
    """For a dtype error raised after `autocast_inputs`: what autocast made of the inputs, where it is on (the
    dtypes the error names are then not all the caller's), else ""."""
    device = t.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return ""
    return (f" (autocast cast the float32 and half-precision ones to {torch.get_autocast_dtype(device)}; "
            "float64 ones stay)")


def no_autocast(t: torch.Tensor):
    """Inside an op's implementation: run in the dtypes it is given. The torch backends call PyTorch ops that
    autocast would otherwise run in half precision (linalg.vecdot, matmuls) when the op, or its backward,
    is called inside an autocast block. Where autocast is off there is nothing to switch off: no context is
    entered (torch.autocast's Python enter and exit cost about 10 us, twice an RMSNorm forward and backward)."""
    device = t.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


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
        if x.device.type == "cpu" and not interpreter_took_effect():
            return ("TRITON_INTERPRET=1 was set after triton was imported (torch imports it on an optimizer step, for "
                    "one), and Triton's own helpers were defined for the GPU then: set it before, in the environment "
                    "or at the top of the script")
        if x.device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {x.device.type} tensors"
        if x.device.type == "cpu":
            problem = interpreter_bf16_problem()  # fixes the interpreter on first use where it can
            if problem is not None and x.dtype == torch.bfloat16:
                return problem
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
    module = _kernel_modules.get((op, backend))
    if module is None:  # import_module costs ~1.3 us even for a loaded module: once per op and backend
        package = {"triton": "triton_kernels", "cuda": "cuda_kernels"}[backend]
        module = _kernel_modules[op, backend] = importlib.import_module(f".{package}.{op}", __package__)
    return module


_kernel_modules: dict[tuple[str, str], object] = {}


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_took_effect() -> bool:
    """Whether triton was imported under the interpreter: its standard library's jit functions are defined at
    import, and kernels calling them fail in the interpreter ("Cannot call @triton.jit'd outside of the scope
    of a kernel") where they were defined for the GPU."""
    from triton.language import standard

    return type(standard.sum).__name__ == "InterpretedFunction"


_interpreter_bf16: str | None = None  # "" once the interpreter computes bf16 right, else why it does not


def interpreter_bf16_problem() -> str | None:
    """Why Triton's CPU interpreter would compute bfloat16 kernels wrong, or None (first, on Triton 3.6 with
    numpy >= 2.4, its loop bounds are fixed: `_fix_interpreter_loop_bounds`).

    The interpreter (triton 3.x) stores bf16 as raw uint16 bits and (1) hands them to np.matmul as
    integers, so tl.dot on bf16 returns garbage, and (2) casts fp32 to bf16 by truncating the mantissa,
    where GPUs round to nearest even. On first call, each of the two that a small check finds wrong is
    patched (dots decode the bits and accumulate in fp32, as tensor cores do; casts round to nearest even;
    the kernels are unchanged) and checked again: an interpreter this does not fit gets bf16 refused."""
    global _interpreter_bf16
    if _interpreter_bf16 is None:
        try:
            _fix_interpreter_loop_bounds()
            _interpreter_bf16 = _fix_interpreter_bf16()
        except Exception as err:  # an interpreter organised differently
            _interpreter_bf16 = f"kpro cannot check Triton's interpreter for bfloat16 ({type(err).__name__}: {err})"
    return _interpreter_bf16 or None


# Where torch.compile traces a process's first call, the check runs eagerly and its answer (fixed for the
# process) goes into the graph as a constant: dynamo cannot trace its numpy and Triton internals ("Unsupported
# ndarray attribute access"). What torch.compiler.assume_constant_result sets, without importing dynamo
# (1.7 s) at kpro's import.
interpreter_bf16_problem._dynamo_marked_constant = True


def _fix_interpreter_loop_bounds() -> None:
    """Let Triton 3.6's interpreter take a loop bound computed in the kernel under numpy >= 2.4.

    The interpreter holds a scalar as a one-element array and turns it into a `range` bound with
    int(array); numpy 2.4 refuses that ("only 0-dimensional arrays can be converted to Python scalars"),
    so every kernel whose tile loop starts or ends at a computed tile failed. Triton 3.8 squeezes the array
    first: do the same. The kernels are unchanged."""
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kpro_squeezes", False):  # organised differently, or done
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    patch_lang_tensor._kpro_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _fix_interpreter_bf16() -> str:
    import numpy as np
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def as_float32(h):
        return (h.data.astype(np.uint32) << 16).view(np.float32) if h.dtype.scalar == tl.bfloat16 else h.data

    def bf16_bits(values) -> np.ndarray:
        return torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(as_float32(a), as_float32(b), dtype=np.float32)
        return handle(product + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def dot_ok(dot):  # [1.5, -2] · [3, 0.25] = 4
        a, b = handle(bf16_bits([[1.5, -2.0]]), tl.bfloat16), handle(bf16_bits([[3.0], [0.25]]), tl.bfloat16)
        out = dot(builder(), a, b, handle(np.zeros((1, 1), np.float32), tl.float32), "ieee", 0)
        return out.dtype.scalar == tl.float32 and float(out.data[0, 0]) == 4.0

    def cast_ok(cast):  # 1 + 3/4 of bf16's step above 1 rounds up to the next step; truncation keeps 1
        x = 1 + 0.75 * 2 ** -7
        out = cast(builder(), handle(np.array([x], np.float32), tl.float32), tl.bfloat16)
        return out.dtype.scalar == tl.bfloat16 and np.array_equal(out.data, bf16_bits([x]))

    # Checked before anything is changed: an interpreter that fails the checks is left as it is.
    dot = original_dot if dot_ok(original_dot) else create_dot
    cast = original_cast if cast_ok(original_cast) else cast_impl
    if not (dot_ok(dot) and cast_ok(cast)):
        return (f"Triton {triton.__version__}'s CPU interpreter computes bfloat16 wrong (tl.dot reads its bits as "
                "integers) in a way kpro cannot fix; use float16 or float32, or a GPU")
    builder.create_dot, builder.cast_impl = dot, cast
    return ""


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
