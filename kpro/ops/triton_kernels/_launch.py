"""Helpers shared by the Triton launchers."""
import os

import torch
from triton.runtime.errors import OutOfResources

from ..errors import BackendError

# Every launch asks for FMA contraction (a*b + c as one rounding) rather than taking Triton's default, which is on
# up to 3.9 and off from 3.10 (3.9 warns of the change): the kernels' speed, their rounding and the compile
# report's figures are those of the contracted code, whatever the Triton version.
FMA = {"enable_fp_fusion": True}

# Programs per SM for kernels that loop over rows (RMSNorm backward with dW): as many as fit at once. The
# compile report gives that kernel 111-122 registers at 8 warps (2 blocks an SM); capping it at 80 to fit
# 3 spills 92-108 B, so 2 it is (python -m kpro.ops.report --only rms_norm).
PROGRAMS_PER_SM = 2
# Under the CPU interpreter every program runs in Python: keep the count small.
INTERPRETER_PROGRAMS = 4


def program_count(t: torch.Tensor, work_items: int) -> int:
    if t.device.type == "cuda":
        slots = torch.cuda.get_device_properties(t.device).multi_processor_count * PROGRAMS_PER_SM
    else:
        slots = INTERPRETER_PROGRAMS
    return max(1, min(work_items, slots))


# Host-side integer helpers in plain Python: in Triton 3.6 and 3.9, triton.cdiv and triton.next_power_of_2 are
# constexpr functions whose Python call costs ~2.5 us on the 2-core VM (kpro's: 0.08), a dozen times a layer and step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def warps_for(block: int) -> int:
    """4 warps up to 2K elements a row block, then more, at most 16."""
    return min(16, max(4, block // 512))


class launch_errors:
    """A kernel that does not fit the device (shared memory, registers) is a BackendError naming the op.
    A class, not a generator context manager: entering and leaving one costs 0.6 us on the 2-core VM against
    4.2, and every attention, Bitune and cross-entropy call enters one."""
    __slots__ = ("op",)

    def __init__(self, op: str):
        self.op = op

    def __enter__(self):
        return None

    def __exit__(self, kind, err, traceback):
        if kind is not None and issubclass(kind, OutOfResources):
            raise BackendError(f"{self.op}: the Triton kernel does not fit this GPU ({err}); run it with the torch "
                               "backend, or report the shapes and device") from None
        return False


# The attention kernels offset within one batch row in 32-bit arithmetic (the batch offset is 64-bit).
ROW_OFFSET_LIMIT = 2**31


def largest_row_offset(t: torch.Tensor) -> int:
    """The largest element offset inside one batch row, from the strides: sum of (size - 1) * stride over
    every dimension but the first. A strided view (q sliced from a packed QKV tensor, stride_t = 3·H·D)
    reaches further than its element count suggests."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 0)


def within_32bit_rows(op: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, each one whose strided rows reach past 32-bit offsets copied to a contiguous layout
    (the same values, reachable with smaller offsets); a BackendError when even that layout cannot fit."""
    out = []
    for t in tensors:
        if t.numel() and largest_row_offset(t) >= ROW_OFFSET_LIMIT:
            if t.numel() // t.shape[0] > ROW_OFFSET_LIMIT:
                raise BackendError(f"{op}: one batch row holds {t.numel() // t.shape[0]:,} elements of "
                                   f"{tuple(t.shape)}; the Triton kernels index a row with 32-bit offsets "
                                   f"(below 2**31): split the batch row, or run the torch backend")
            t = t.contiguous()
        out.append(t)
    return tuple(out)


# ------------------------------------------------------------------------------------------- launch cache
# Every kernel launch goes through `launch`. By default it is `kernel[grid](*args, **meta)`, Triton's JIT
# launch: bind the arguments, compute their specialisation, look the compiled kernel up, launch. On the second
# H200 run that host work made a launch cost ~57 us, and kpro's expansion step waited on its host (benchmarks/
# RESULTS.md). KPRO_LAUNCH_CACHE=1 keeps the compiled kernel of each specialisation and launches it directly.
# Experimental and off by default: it has not yet run on a GPU. It relies on Triton's specialisation rules
# (3.6 to 3.9: a tensor by dtype and 16-byte alignment, an int by type range, divisibility by 16 and being 1,
# constexprs by value), which its key covers and refines; an argument of any other kind bypasses it.
LAUNCH_CACHE = os.environ.get("KPRO_LAUNCH_CACHE", "0") == "1"
_compiled: dict = {}  # (kernel, specialisation key) -> (compiled kernel, names of the kwargs it takes)
INT32 = range(-2**31, 2**31)
PLAIN = (int, float, bool, str, type(None))


def launch(kernel, grid: tuple, *args, **meta):
    """kernel[grid](*args, **meta), through the launch cache when KPRO_LAUNCH_CACHE=1."""
    if not LAUNCH_CACHE:
        return kernel[grid](*args, **meta)
    key = specialisation_key(kernel, args, meta)
    hit = _compiled.get(key) if key is not None else None
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        if key is not None and hasattr(compiled, "run"):  # the interpreter and the compile report return None
            names = kernel.arg_names[len(args):]
            _compiled[key] = (compiled, names) if all(n in meta for n in names) else None
        return compiled
    compiled, names = hit
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *(meta[n] for n in names))
    return compiled


def specialisation_key(kernel, args: tuple, meta: dict):
    """What Triton specialises a launch on, refined (so one key never covers two of its compilations), or
    None where the cache does not apply: an argument of another kind, no CUDA tensor (the interpreter), a
    constexpr or option of another kind than a number, bool, string or None (a key must not hold a tensor
    alive). The current device is part of it: a compiled kernel is loaded on one."""
    constexprs = getattr(kernel, "constexprs", None)  # the interpreter's functions have none
    if constexprs is None or not all(isinstance(v, PLAIN) for v in meta.values()):
        return None
    # Types beside values: True == 1 and 1.0 == 1 in Python, not in Triton.
    parts, on_cuda = [kernel, tuple((name, type(v), v) for name, v in sorted(meta.items()))], False
    for i, arg in enumerate(args):
        if i in constexprs:
            if not isinstance(arg, PLAIN):
                return None
            parts.append(("c", type(arg), arg))
        elif isinstance(arg, torch.Tensor):
            on_cuda = on_cuda or arg.is_cuda
            parts.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or arg is None:
            parts.append(("v", arg))
        elif isinstance(arg, int):
            parts.append(("i", arg in INT32, arg >= 2**63, arg == 1, arg % 16 == 0))
        elif isinstance(arg, float):
            parts.append(("f",))
        else:
            return None
    if not on_cuda:
        return None
    parts.append(torch.cuda.current_device())
    return tuple(parts)
