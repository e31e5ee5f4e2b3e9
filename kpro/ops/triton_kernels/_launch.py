"""Helpers shared by the Triton launchers."""
import contextlib

import torch

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


@contextlib.contextmanager
def launch_errors(op: str):
    """A kernel that does not fit the device (shared memory, registers) is a BackendError naming the op."""
    from triton.runtime.errors import OutOfResources

    try:
        yield
    except OutOfResources as err:
        raise BackendError(f"{op}: the Triton kernel does not fit this GPU ({err}); run it with the torch "
                           "backend, or report the shapes and device") from None


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
