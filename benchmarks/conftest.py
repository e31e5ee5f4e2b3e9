"""Benchmark helpers: one device for the whole run (CUDA when present), fair timing, correctness checks
before timing, and the ratios the performance goals of SPEC.md are stated in, all measured in the same run.

Timing (`timed`). On the CPU pytest-benchmark times each call with its own clock, as it always has. On a
GPU a host clock around `torch.cuda.synchronize()` would add launch latency and the synchronisation to
every round, so GPU cases are timed with CUDA events by the method of `triton.testing.do_bench`
(gpu_timing.py: back-to-back calls, a 256 MB write before each to flush the 50 MB L2, the median).
The per-call event times then become pytest-benchmark's rounds: `benchmark.pedantic` replays them
through a clock that moves only by one measured time per round, so the tables, `--benchmark-json`,
`--benchmark-compare` and `median_seconds` all show the CUDA-event times, from a single measurement
(nothing is timed twice, no host figure is kept beside it). This beats keeping pytest-benchmark's own
host-clock rounds and putting the CUDA figure in extra_info: the tables and comparisons would then show the
unfair figure. The fixture reads its clock from `benchmark._timer` when a round starts (pytest-benchmark
3.x to 5.x); `timed` checks that the recorded median is the replayed one and fails loudly otherwise.
`--benchmark-cprofile` profiles one real call of the case after the replayed rounds: the host's work to issue it.
`extra_info["timer"]` names the clock of a figure. With `--benchmark-disable` (the CI) each case runs
once, untimed, on either device.

Correctness (`check_close`, `check_gradients`). Every implementation's output, and for forward+backward
cases its gradients, is compared with a reference by ‖out − ref‖/‖ref‖ before it is timed; a wrong one
fails its case with `WrongResult` and is never timed. Ops are checked against a wider computation (float64
on the CPU, fp32 or float64 on a GPU, TOLERANCE by dtype; the Bitune dual pass against a dense masked softmax
written in its benchmark), whole models against kpro's plain-PyTorch path in fp32 or, in the model and
expansion suites, the gpt-fast-style model in float64 on the CPU and fp32 on a GPU (on the whole timed batch),
which no kpro op enters (MODEL_TOLERANCE: a bf16 model rounds at every op of every layer).

Baselines. `compiled(key, fn)` gives one `torch.compile(fn, dynamic=False, fullgraph=True)` per shape key;
the recompile limits are raised at import (as the installed torch names them) so that no shape ever hits
them, `fail_on_recompile_limit_hit` is set and `suppress_errors` cleared: a graph break or a limit hit
raises instead of running eager, so a `torch.compile` row is always compiled code.

Ratios. `copy_bandwidth` (a device-to-device copy, timed like the cases) and `matmul_flops` (a bf16
8192³ matmul, GPU only) are measured once per session; `record_bandwidth` / `record_tflops` store each
case's fraction of them, and `record_ratios` stores, for every kpro implementation of a group, its time
over each other implementation's (`time_over_<impl>`; below 1 means kpro is faster).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch._dynamo

from gpu_timing import cuda_times, flush_buffer, median_time  # noqa: F401  (median_time: re-exported for the benchmark files)

TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Whole models against a wide reference: a bf16 model rounds at every op of every layer (about 1e-2 relative
# at 16-40 layers); a wrong implementation is off by order 1.
MODEL_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def _allow_recompiles(limit: int = 4096) -> None:
    """Raise dynamo's recompile limits (`recompile_limit`, `accumulated_recompile_limit`; older torch called
    them *cache_size_limit: whichever the installed torch has is set) and make hitting one, or a compile
    error, raise rather than fall back to eager."""
    config = torch._dynamo.config
    if hasattr(config, "suppress_errors"):  # first: dynamo refuses it together with fail_on_recompile_limit_hit
        config.suppress_errors = False
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        for name in names:
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), limit))
                break
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            setattr(config, name, True)
            break


_allow_recompiles()

# `pytest --benchmark` with no path first loads tests/conftest.py (the testpaths), which turns on Triton's CPU
# interpreter where there is no GPU. Benchmarks never time the interpreter (a kernel there runs for minutes and
# its time means nothing), so without a GPU it is turned off again: Triton cases skip, as they do under
# `pytest benchmarks`. (kpro reads the variable at each call to decide whether Triton can run CPU tensors.)
if not torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return session_device()


def session_device() -> torch.device:
    """CUDA when present, else the CPU. On CUDA the timing's L2-flush buffer (256 MB, kept for the session) is
    allocated here, before any case: allocated by the first timed call, it would count in the peak memory
    of whichever case is timed first (expansion's or Bitune's step peak above what was resident) and no other."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    flush_buffer(torch.cuda.current_device())
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------- timing

class _ReplayClock:
    """A clock for pytest-benchmark that moves only when `tick` advances it by the next measured time."""

    def __init__(self, times: list[float]):
        self.__name__ = "cuda_events"  # how pytest-benchmark names the timer in its JSON
        self.now, self._times = 0.0, iter(times)

    def __call__(self) -> float:
        return self.now

    def tick(self) -> bool:
        """Advance by the next measured time; False once every one is used."""
        step = next(self._times, None)
        if step is None:
            return False
        self.now += step
        return True


def timed(benchmark, device: torch.device, fn, *, rounds: int | None = None, **cuda_options) -> None:
    """Time `fn()` (which must not synchronise) into `benchmark`: on a GPU with CUDA events (gpu_timing),
    on the CPU with pytest-benchmark's clock (`rounds`: a fixed round count through `pedantic`)."""
    if device.type != "cuda":
        benchmark.extra_info["timer"] = "host clock"
        if rounds is None:
            benchmark(fn)
        else:
            benchmark.pedantic(fn, rounds=rounds, iterations=1)
        return
    if not benchmark.enabled:  # --benchmark-disable: run once, untimed
        benchmark.pedantic(fn)
        return
    times = cuda_times(fn, **cuda_options)
    clock = _ReplayClock(times)

    def replay():
        # after the rounds, --benchmark-cprofile calls the target once more: profile a real call, not the replay
        if not clock.tick():
            fn()
    benchmark._timer = clock
    benchmark.pedantic(replay, rounds=len(times), iterations=1)
    recorded = median_seconds(benchmark)
    if recorded is None or abs(recorded - statistics.median(times)) > 1e-9 * max(1.0, recorded):
        raise RuntimeError("pytest-benchmark did not take the replayed CUDA-event times (its fixture no longer "
                           "reads `_timer`): benchmarks/conftest.py needs updating for this version")
    benchmark.extra_info.update(timer="cuda events, L2 flushed", reps=len(times))


def median_seconds(benchmark) -> float | None:
    """The median time of a finished benchmark; None when timing is off (--benchmark-disable)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written), the memory ceiling: the
    median of CUDA-event times on a GPU (as the cases), the best of ten host-clock copies on the CPU."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of fp32 on a GPU, 64 MiB on a CPU
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    if device.type == "cuda":
        return moved / median_time(lambda: dst.copy_(src)) / 1e9
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return moved / best / 1e9


@pytest.fixture(scope="session")
def matmul_flops(device) -> float | None:
    """Measured dense bf16 matmul FLOP/s of the GPU (8192³, CUDA events, median), the compute ceiling that
    TFLOP/s figures are compared with; None on the CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(a)
    return 2 * n**3 / median_time(lambda: torch.matmul(a, b, out=out), min_reps=20)


def record_tflops(benchmark, flops: float, matmul_flops: float | None = None, **info) -> None:
    """Store achieved TFLOP/s (useful flops / median time), its fraction of the session's bf16 matmul
    rate when measured, and other facts of the case."""
    median = median_seconds(benchmark)
    benchmark.extra_info.update(info)
    if median is not None:
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 2)
        if matmul_flops:
            benchmark.extra_info.update(matmul_tflops=round(matmul_flops / 1e12, 1),
                                        fraction_of_matmul=round(flops / median / matmul_flops, 3))


def record_bandwidth(benchmark, bytes_moved: int, ceiling_gbps: float) -> None:
    """Store achieved GB/s (bytes that must move / median time) and its share of the copy ceiling."""
    median = median_seconds(benchmark)
    if median is None:
        return
    achieved = bytes_moved / median / 1e9
    benchmark.extra_info.update(gb_per_s=round(achieved, 1), copy_gb_per_s=round(ceiling_gbps, 1),
                                fraction_of_copy=round(achieved / ceiling_gbps, 3))


_GROUP_TIMES: dict[str, dict[str, tuple[float, dict, bool]]] = {}


def record_ratios(benchmark, impl: str, ours: bool | None = None, seconds: float | None = None) -> None:
    """Store, in `extra_info` of every kpro implementation (`ours`, by default a name starting with "kpro")
    of this benchmark's group timed so far in this run, its median time over each other implementation's
    as `time_over_<impl>`. pytest-benchmark writes extra_info at the end of the session (the GPU suite's
    benchmarks.jsonl too), so the rows of implementations timed earlier get the ratios of those timed later.
    `seconds`: the time to compare instead of the median, where the timed call holds work that the others'
    do not (fit's checkpoint)."""
    median = median_seconds(benchmark) if seconds is None or not benchmark.enabled else seconds
    if median is None:
        return
    group = _GROUP_TIMES.setdefault(benchmark.group or benchmark.name, {})
    group[impl] = (median, benchmark.extra_info, impl.startswith("kpro") if ours is None else ours)
    for name, (seconds, info, is_ours) in group.items():
        if is_ours:
            for other, (other_seconds, _, _) in group.items():
                if other != name:
                    info[f"time_over_{other}"] = round(seconds / other_seconds, 3)


# ------------------------------------------------------------------------------------------ correctness

class WrongResult(AssertionError):
    """An implementation's result disagrees with the reference: the case fails and is not timed."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 on the tensors' device (NaN anywhere gives NaN; a zero reference
    compares the absolute norm)."""
    out, ref = out.detach().double(), ref.detach().to(out.device).double()
    if out.numel() == 0:
        return 0.0
    scale = float(ref.norm())
    return float((out - ref).norm()) / (scale if scale > 0 else 1.0)


def check_close(impl: str, pairs, dtype: torch.dtype, *, tolerance: float | None = None, benchmark=None) -> float:
    """Raise WrongResult unless each (label, result, reference) agrees within the dtype's tolerance;
    return the largest relative error (also stored as extra_info["max_rel_err"] when `benchmark` is given)."""
    limit = TOLERANCE[dtype] if tolerance is None else tolerance
    worst = 0.0
    for label, out, ref in pairs:
        if out is None:
            raise WrongResult(f"{impl} is wrong: no {label} (a gradient did not reach it); not timed")
        if tuple(out.shape) != tuple(ref.shape):
            raise WrongResult(f"{impl} is wrong: {label} has shape {tuple(out.shape)}, the reference "
                              f"{tuple(ref.shape)}; not timed")
        err = relative_error(out, ref)
        if not err <= limit:  # NaN fails too
            raise WrongResult(f"{impl} is wrong: {label} relative error {err:.3g} > {limit:g} against the "
                              "reference; not timed")
        worst = max(worst, err)
    if benchmark is not None:
        benchmark.extra_info["max_rel_err"] = float(f"{worst:.3g}")
    return worst


# --------------------------------------------------------------------------------------------- baselines

_COMPILED: dict = {}


def compiled(key, fn):
    """One `torch.compile(fn, dynamic=False, fullgraph=True)` per key (a shape and whatever else changes
    the graph): static shapes as a user of one shape gets, and an error, never eager, on a graph break."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[key]


class CaseCache:
    """The inputs and reference results of the case being benchmarked, built once and shared by its
    implementations, which run one after another (`impl` is the fastest-varying parameter of each
    benchmark); building the next case frees the previous one first."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build):
        if key != self.key:
            self.key, self.value = None, None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.value = build()
            self.key = key
        return self.value


def check_loss(impl: str, loss: float, reference: float, dtype: torch.dtype) -> None:
    """A training step's loss against the fp32 reference's, before any timing (a faster wrong model is no
    baseline): within 2e-2 relative in bf16 compute, 1e-4 otherwise."""
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(loss - reference) <= tolerance * abs(reference), \
        f"{impl} is wrong: loss {loss} against the reference's {reference}; not timed"


def check_gradients(impl: str, grads: dict, reference: dict, dtype: torch.dtype, *, tolerance: float | None = None,
                    benchmark=None) -> float:
    """Raise WrongResult unless `grads` (name -> tensor), taken as one vector, is within tolerance of the
    reference's: ‖grads − ref‖/‖ref‖ (one vector: a parameter whose gradient is tiny cannot fail a deep bf16
    model on rounding alone). A name with a gradient on one side only must have an all-zero one there (a
    path may compute zeros where another builds no graph). Returns the error (extra_info["grad_rel_err"])."""
    limit = TOLERANCE[dtype] if tolerance is None else tolerance
    diff = total = 0.0
    for name in sorted(set(reference) | set(grads)):
        got, ref = grads.get(name), reference.get(name)
        if got is None or ref is None:  # no gradient reached it on one side: it must be zero on the other
            present = got if ref is None else ref
            if present.numel() and not bool(present.detach().abs().max() == 0):  # NaN is not zero either
                side = impl if ref is None else "the reference"
                raise WrongResult(f"{impl} is wrong: {name} has a gradient only in {side}; not timed")
            continue
        got, ref = got.detach().double(), ref.detach().to(got.device).double()
        if tuple(got.shape) != tuple(ref.shape):
            raise WrongResult(f"{impl} is wrong: gradient of {name} has shape {tuple(got.shape)}, the reference "
                              f"{tuple(ref.shape)}; not timed")
        diff += float((got - ref).norm()) ** 2
        total += float(ref.norm()) ** 2
    err = diff ** 0.5 / (total ** 0.5 if total > 0 else 1.0)
    if not err <= limit:
        raise WrongResult(f"{impl} is wrong: gradients' relative error {err:.3g} > {limit:g} against the reference; "
                          "not timed")
    if benchmark is not None:
        benchmark.extra_info["grad_rel_err"] = float(f"{err:.3g}")
    return err
