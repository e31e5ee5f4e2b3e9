"""Helpers shared by the Triton launchers."""
import contextlib

import torch

from ..backend import BackendError

# Programs per SM for kernels that loop over rows (RMSNorm backward); a few per SM hide memory latency.
PROGRAMS_PER_SM = 4
# Under the CPU interpreter every program runs in Python: keep the count small.
INTERPRETER_PROGRAMS = 4


def program_count(t: torch.Tensor, work_items: int) -> int:
    if t.device.type == "cuda":
        slots = torch.cuda.get_device_properties(t.device).multi_processor_count * PROGRAMS_PER_SM
    else:
        slots = INTERPRETER_PROGRAMS
    return max(1, min(work_items, slots))


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


def check_32bit_rows(op: str, *tensors: torch.Tensor) -> None:
    """The attention kernels offset within one batch row (all its positions and heads) in 32-bit
    arithmetic: refuse a row of 2**31 elements or more rather than read the wrong memory."""
    for t in tensors:
        if t.shape[0] and t.numel() // t.shape[0] >= 2**31:
            raise BackendError(f"{op}: one batch row holds {t.numel() // t.shape[0]:,} elements of {tuple(t.shape)}; "
                               "the Triton kernels index a row with 32-bit offsets (below 2**31)")
