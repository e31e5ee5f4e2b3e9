"""Helpers shared by the Triton launchers."""
import torch

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
