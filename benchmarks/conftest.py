"""Benchmark helpers: one device for the whole run (CUDA when present), with synchronisation."""
import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written), the memory ceiling."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of fp32 on a GPU, 64 MiB on a CPU
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    import time
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def record_tflops(benchmark, flops: float, **info) -> None:
    """Store achieved TFLOP/s (useful flops / median time) with other facts of the case."""
    median = median_seconds(benchmark)
    benchmark.extra_info.update(info)
    if median is not None:
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 2)


def median_seconds(benchmark) -> float | None:
    """The median time of a finished benchmark; None when timing is off (--benchmark-disable)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def record_bandwidth(benchmark, bytes_moved: int, ceiling_gbps: float) -> None:
    """Store achieved GB/s (bytes that must move / median time) and its share of the copy ceiling."""
    median = median_seconds(benchmark)
    if median is None:
        return
    achieved = bytes_moved / median / 1e9
    benchmark.extra_info.update(gb_per_s=round(achieved, 1), copy_gb_per_s=round(ceiling_gbps, 1),
                                fraction_of_copy=round(achieved / ceiling_gbps, 3))
