"""GPU timing shared by the benchmarks (conftest.py) and the GPU suite (gpu_suite.py): CUDA events around
each of many back-to-back calls, the L2 cache flushed before each call, the median taken by the caller.

The method is the one of `triton.testing.do_bench`, written out here so that the per-call times come back
as a list (pytest-benchmark computes its statistics from them) and nothing depends on Triton's testing
module: one call (compilation, allocator warm-up); an estimate from three timed calls; warm-up calls worth
`warmup_ms`; then calls worth `rep_ms`, clamped to [min_reps, max_reps], each preceded by zeroing a 256 MB
buffer (five times the 50 MB L2 of an H100/H200, so no call finds its inputs in L2) and bracketed by a pair
of CUDA events recorded on the current stream. The host never waits inside the timed loop: the buffer write
(~0.1 ms) lets it queue the next call while the GPU works, so launch latency is hidden as it is in a
training step, and only one synchronisation ends the loop.
"""
from __future__ import annotations

import functools
import statistics

import torch

L2_FLUSH_BYTES = 256 * 2**20


@functools.cache
def flush_buffer(device_index: int) -> torch.Tensor:
    """The 256 MB buffer written before each timed call, allocated once per device and kept."""
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=torch.device("cuda", device_index))


def cuda_times(fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000,
               flush: bool = True) -> list[float]:
    """Seconds that each of many back-to-back calls of `fn()` took on the current CUDA device.

    `fn` must not synchronise (a `.item()`, a `print` of a tensor) or the host time it waits is measured
    too; gradients it accumulates should be reset inside it (`t.grad = None`), as a training step does."""
    buffer = flush_buffer(torch.cuda.current_device()) if flush else None

    def timed_calls(count: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for start, end in zip(starts, ends):
            if buffer is not None:
                buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]  # elapsed_time is in ms

    fn()
    torch.cuda.synchronize()
    estimate_ms = max(statistics.median(timed_calls(3)) * 1e3, 1e-3)
    for _ in range(min(max_reps, max(1, int(warmup_ms / estimate_ms)))):
        fn()
    return timed_calls(min(max_reps, max(min_reps, int(rep_ms / estimate_ms))))


def median_time(fn, **options) -> float:
    """The median of `cuda_times(fn, **options)`, in seconds."""
    return statistics.median(cuda_times(fn, **options))
