"""Where one expansion training step's time goes: the step of `test_expansion.py` (forward, fp32
cross-entropy, backward, AdamW on the new blocks) per implementation, timed and profiled.

    python benchmarks/profile_step.py OUT_DIR [--size gpu-pro] [--impl eager --impl kpro-frozen ...]

The first H200 run (benchmarks/RESULTS.md, 2026-12-04) measured kpro's model at 208 ms a step against
95 ms for the plain eager LLaMA, with each kernel, timed alone, within 1.4x of its baseline. This asks
whether the host, not the GPU, sets the step time. Per implementation it writes
  step_ms     the step's time: host clock around a synchronised step, median of `--steps`
  enqueue_ms  the host time to issue one step without waiting for the GPU; close to step_ms, the GPU
              waits for Python (launch overhead, not kernels, is the cost)
  syncs       device synchronisations and device-to-host reads inside one step, by name (each stalls
              the host's run-ahead)
  launches    GPU kernel launches in one step, and gpu_busy_ms, the sum of their times
  top_cpu     the 12 operators with the most self CPU time; top_gpu, the 12 with the most GPU time
to OUT_DIR/profile.json and a table to OUT_DIR/profile.md. Then, where the step's host time is the
question, what one call costs the host: kpro's ops (eager path, custom op, the backend's launcher alone, and
with Triton one launch split into the JIT's lookup and the compiled kernel's launch) next to the PyTorch ops
they replace, on tensors so small that the host sets the pace (host_costs.json and
a second table in profile.md). Without CUDA it profiles on the CPU (the GPU columns stay empty); the test in
tests/test_gpu_suite.py runs it that way at a tiny size.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent

# Host-side events that wait for the device, or read a device value (which waits for it).
SYNC_EVENTS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "aten::item",
               "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
TOP = 12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_module():
    """benchmarks/test_expansion.py, imported when first needed: it imports benchmarks/conftest.py as
    `conftest`, which a pytest process (the tests of this file) already holds under that name."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import test_expansion
    return test_expansion


def sync_counts(events) -> dict[str, int]:
    """{event name: calls} of the SYNC_EVENTS among a profile's key averages."""
    return {e.key: e.count for e in events if e.key in SYNC_EVENTS and e.count}


def make_step(impl: str, size: str, device: torch.device, blocks: tuple[int, int] | None = None):
    """The benchmark's model, flags and step for `impl` (test_expansion.expanded_model and prepare);
    `blocks` = (original, new) replaces its 32 + 8 for a quick check."""
    from kpro.train import adamw, causal_lm_loss

    expansion = benchmark_module()
    if blocks is not None:
        expansion.ORIGINAL_BLOCKS, expansion.NEW_BLOCKS = blocks
    model, new_ids, ids = expansion.expanded_model(size, device)
    model = expansion.prepare(impl, model, new_ids)
    optimizer = adamw(model, 1e-4)

    def step():
        causal_lm_loss(model(ids), ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (with_launch_cache(step) if impl == "kpro-frozen-launch-cache" else step), ids.numel()


def with_launch_cache(step):
    """`step` with KPRO_LAUNCH_CACHE's cache on during each call, as the benchmark's case sets it (for that
    case alone), and restored after: the implementations' steps interleave (timed, then profiled)."""
    from kpro.ops.triton_kernels import _launch

    def cached_step():
        previous, _launch.LAUNCH_CACHE = _launch.LAUNCH_CACHE, True
        try:
            step()
        finally:
            _launch.LAUNCH_CACHE = previous
    return cached_step


def time_step(step, device: torch.device, steps: int) -> tuple[float, float]:
    """(step_ms, enqueue_ms): medians over `steps` synchronised steps after a warm-up (Triton compilations,
    allocator growth, optimizer state)."""
    for _ in range(2):
        step()
    synchronize(device)
    step_times, enqueue_times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        enqueued = time.perf_counter()
        synchronize(device)
        step_times.append(time.perf_counter() - start)
        enqueue_times.append(enqueued - start)
    return round(1e3 * statistics.median(step_times), 2), round(1e3 * statistics.median(enqueue_times), 2)


def profile_one_step(step, device: torch.device) -> dict:
    """Syncs, launches, GPU busy time and the top operators of one step under torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.key_averages()
    gpu_time = (lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) or 0)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    top = lambda key: [dict(op=e.key, calls=e.count, self_ms=round(key(e) / 1e3, 3))
                       for e in sorted(events, key=key, reverse=True)[:TOP] if key(e) > 0]
    return dict(syncs=sync_counts(events), launches=len(kernels),
                gpu_busy_ms=round(sum(k.device_time_total if hasattr(k, "device_time_total") else k.cuda_time_total
                                      for k in kernels) / 1e3, 2) if kernels else None,
                top_cpu=top(lambda e: e.self_cpu_time_total), top_gpu=top(gpu_time) if kernels else [])


def markdown(results: list[dict]) -> str:
    """The step table, and each profiled step's top operators; a step timed but not yet profiled has dashes."""
    lines = ["| implementation | step | host time to issue it | GPU busy | launches | syncs in a step |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "launches" not in r:
            lines.append(f"| {r['impl']} | {r['step_ms']} ms | {r['enqueue_ms']} ms | — | — | not profiled |")
            continue
        syncs = ", ".join(f"{name} ×{count}" for name, count in r["syncs"].items()) or "none"
        busy = f"{r['gpu_busy_ms']} ms" if r["gpu_busy_ms"] is not None else "—"
        lines.append(f"| {r['impl']} | {r['step_ms']} ms | {r['enqueue_ms']} ms | {busy} | {r['launches']} | {syncs} |")
    for r in (r for r in results if "launches" in r):
        lines += ["", f"{r['impl']}: most self CPU time — "
                  + "; ".join(f"{t['op']} {t['self_ms']} ms ×{t['calls']}" for t in r["top_cpu"])]
        if r["top_gpu"]:
            lines.append(f"{r['impl']}: most GPU time — "
                         + "; ".join(f"{t['op']} {t['self_ms']} ms ×{t['calls']}" for t in r["top_gpu"]))
    return "\n".join(lines) + "\n"


def host_microseconds(fn, device: torch.device, calls: int = 200) -> tuple[float, float]:
    """(host time to issue one call, time per call with the device's work) in microseconds, over `calls`
    back-to-back calls after a warm-up: on tiny tensors the device finishes each call before the host has
    issued the next, so the two agree and measure the host's cost."""
    for _ in range(10):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    synchronize(device)
    done = time.perf_counter()
    return 1e6 * (issued - start) / calls, 1e6 * (done - start) / calls


def host_costs(device: torch.device) -> list[dict]:
    """The host's cost of one call of each kpro op in a layer, forward and forward+backward, beside the PyTorch
    ops they replace, and of the op's parts: the custom op (what compiled graphs call) and the backend's
    launcher alone (Triton's or the CUDA library's on a GPU, the torch functions on the CPU)."""
    import importlib

    import torch.nn.functional as F
    from kpro import ops

    # The modules (kpro.ops.backend and kpro.ops.swiglu are the functions of those names)
    kpro_backend, swiglu_module = (importlib.import_module(f"kpro.ops.{m}") for m in ("backend", "swiglu"))

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    # 16 rows at gpu-pro's widths (1024 features, 16 heads of 64, frozen norms): the kernels the step compiled
    # should serve these calls (the same block sizes and launch-argument specialisations), so that compiling
    # does not eat the stage's budget.
    g, u, x = (torch.randn(16, 1024, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    w = torch.ones(1024, device=device, dtype=dtype)  # frozen, as most of the expansion step's norms
    q, k, v = (torch.randn(1, 16, 16, 64, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    dy, dq = torch.ones_like(g), torch.ones_like(q)
    name = kpro_backend.select("swiglu", g)
    launcher = kpro_backend.kernels("swiglu", name, swiglu_module.TORCH_KERNELS)
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
    with torch.no_grad():
        forward = [("torch: silu(g) * u", lambda: F.silu(g) * u),
                   ("kpro swiglu (eager path)", lambda: ops.swiglu(g, u)),
                   ("kpro swiglu, custom op", lambda: torch.ops.kpro.swiglu_forward(g, u, name)),
                   (f"kpro swiglu, {name} launcher alone", lambda: launcher.forward(g, u))]
        rows = [(label, "forward") + host_microseconds(fn, device) for label, fn in forward]
    both = [("torch: silu(g) * u", lambda: (F.silu(g) * u).backward(dy)),
            ("kpro swiglu", lambda: ops.swiglu(g, u).backward(dy)),
            ("torch: RMSNorm of x, frozen weight",
             lambda: (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(dtype) * w).backward(dy)),
            ("kpro rms_norm, frozen weight", lambda: ops.rms_norm(x, w).backward(dy)),
            ("torch: SDPA, causal", lambda: sdpa().backward(dq)),
            ("kpro attention, causal", lambda: ops.attention(q, k, v, causal=True).backward(dq))]
    for tensor in (g, u, x, q, k, v):  # gradients accumulate across calls; their values are not used
        tensor.grad = None
    rows += [(label, "forward+backward") + host_microseconds(fn, device) for label, fn in both]
    if name == "triton":
        rows += triton_launch_parts(g, u, device)
    return [dict(call=row[0], pass_=row[1], backend=name, host_us=round(row[2], 1), per_call_us=round(row[3], 1))
            if len(row) == 4 else dict(call=row[0], pass_=row[1], backend=name, error=row[2]) for row in rows]


def triton_launch_parts(g, u, device) -> list[tuple]:
    """The SwiGLU forward kernel launched as Triton's JIT launches it (binding the arguments, computing the
    specialisation, finding the compiled kernel), then through the compiled kernel alone, on the same
    arguments (how much of a launch's host time the lookup is), then kpro's launcher with its launch cache
    on (kpro.ops.triton_kernels._launch). These use Triton's internals (CompiledKernel[grid]); an error is
    recorded in its row, not raised."""
    from kpro.ops.triton_kernels import _launch, swiglu as kernels
    from kpro.ops.triton_kernels._launch import FMA

    y = torch.empty_like(g)
    grid, block = kernels._grid(*g.shape)
    args = (g, u, y, g.stride(0), u.stride(0), y.stride(0), g.shape[1])
    jit = lambda: kernels._forward_kernel[grid](*args, BLOCK=block, **FMA)
    rows = [timed_row("triton: the kernel through JITFunction (bind, specialise, look up, launch)", lambda: jit,
                      device),
            timed_row("triton: the compiled kernel alone (CompiledKernel[grid])",
                      # a CompiledKernel's grid has three dimensions (Triton 3.6 reads grid[2])
                      lambda: functools.partial(jit()[tuple(grid) + (1,) * (3 - len(grid))], *args, block), device)]
    previous, _launch.LAUNCH_CACHE = _launch.LAUNCH_CACHE, True
    try:
        rows.append(timed_row("kpro swiglu, triton launcher with KPRO_LAUNCH_CACHE=1",
                              lambda: functools.partial(kernels.forward, g, u), device))
    finally:
        _launch.LAUNCH_CACHE = previous
    return rows


def timed_row(label: str, make_call, device: torch.device) -> tuple:
    """(label, "forward", host µs, µs per call) of the call make_call() returns, or (label, "forward", error)
    when making or timing it raises."""
    try:
        return (label, "forward") + host_microseconds(make_call(), device)
    except Exception as err:  # Triton's internals differ between versions: report what broke
        return (label, "forward", f"{type(err).__name__}: {err}"[:200])


def host_costs_markdown(rows: list[dict]) -> str:
    lines = ["", f"Host cost of one call on tiny tensors (kpro's backend: {rows[0]['backend']}):", "",
             "| call | pass | host time to issue | time per call |", "|---|---|---|---|"]
    lines += [f"| {r['call']} | {r['pass_']} | {r['host_us']} µs | {r['per_call_us']} µs |" if "error" not in r
              else f"| {r['call']} | {r['pass_']} | not measured: {r['error']} | — |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", default=None, help="a size of test_expansion.SIZES (default: gpu-pro on CUDA, "
                                                     "cpu-pro elsewhere)")
    parser.add_argument("--impl", action="append", help="repeatable; default: eager, kpro-frozen (the same model "
                                                        "and flags: the difference is kpro's) and kpro-train_only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("ORIGINAL", "NEW"),
                        help="blocks before expansion and blocks it adds, in place of 32 and 8 (a quick check); "
                             "both positive, NEW dividing ORIGINAL (the interleaved layout)")
    args = parser.parse_args(argv)
    expansion = benchmark_module()
    unknown = sorted(set(args.impl or []) - set(expansion.IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--impl must be among {', '.join(expansion.IMPLEMENTATIONS)}, got {', '.join(unknown)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("gpu-pro" if device.type == "cuda" else "cpu-pro")
    if size not in expansion.SIZES:
        parser.error(f"--size must be one of {', '.join(expansion.SIZES)}, got {size!r}")
    if size.startswith("gpu") != (device.type == "cuda"):  # the benchmark's rule, a pytest.skip there
        parser.error(f"--size {size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only, and this "
                     f"machine's device is {device.type}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.blocks:
        from kpro.expansion.layout import check_expansion
        try:  # kpro.expand's own rule, before any model is built
            check_expansion(*args.blocks, "interleave")
        except ValueError as err:
            parser.error(f"--blocks {' '.join(map(str, args.blocks))}: {err}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every clock reading comes before the first torch.profiler session: in the second H200 run's profile, the
    # implementation timed after another's profile took 180.6 ms a step where the benchmark measured 93.8 ms,
    # and a profiler that stays attached to the driver (CUPTI) is one suspected cause. So all models are built
    # and timed, then the host costs are read, and only then is each step profiled.
    impls = args.impl or ["eager", "kpro-frozen", "kpro-train_only"]
    blocks = tuple(args.blocks) if args.blocks else None
    steps, results = {}, []
    for impl in impls:
        steps[impl], tokens = make_step(impl, size, device, blocks)
        step_ms, enqueue_ms = time_step(steps[impl], device, args.steps)
        results.append(dict(impl=impl, size=size, device=str(device), tokens=tokens, step_ms=step_ms,
                            enqueue_ms=enqueue_ms))
        print(f"{impl}: step {step_ms} ms, issued in {enqueue_ms} ms", flush=True)
        (out / "profile.json").write_text(json.dumps(results, indent=1) + "\n")  # each as it finishes
        (out / "profile.md").write_text(markdown(results))  # the table stands should a later part fail
    costs = host_costs(device)
    (out / "host_costs.json").write_text(json.dumps(costs, indent=1) + "\n")
    for result in results:
        result.update(profile_one_step(steps[result["impl"]], device))
        print(f"{result['impl']}: {result['launches']} launches, syncs {result['syncs'] or 'none'}", flush=True)
        (out / "profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "profile.md").write_text(markdown(results) + host_costs_markdown(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
