"""RMSNorm and SwiGLU, forward and forward+backward: kpro's backends against eager PyTorch, torch.compile
(one static-shape, full-graph compilation per shape) and Liger-Kernel when installed. Each implementation
is checked against a float64 reference (output, and both gradients) before it is timed. The inputs of a case
are shared by its implementations; Liger's SwiGLU, whose backward writes da, db into a, b, gets copies of its
own. Achieved GB/s counts the bytes that must move; `fraction_of_copy` is its share of the copy bandwidth
measured in the same run, `time_over_<impl>` kpro's time over each other implementation's.

    pytest --benchmark -k "rms_norm or swiglu"
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kpro import ops
from kpro.ops.backend import unavailable_reason
from conftest import CaseCache, check_close, compiled, describe_device, record_bandwidth, record_ratios, timed

GPU_NORM_SHAPES = [(4096, 4096), (16384, 4096), (16384, 8192)]
GPU_SWIGLU_SHAPES = GPU_NORM_SHAPES + [(8192, 14336)]
CPU_SHAPES = [(2048, 1024)]
EPS = 1e-6


def eager_rms_norm(x, w, eps=EPS):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def eager_swiglu(g, u):
    return F.silu(g) * u


def reference(op, a, b):
    """The op in float64 (the ground truth every implementation is checked against)."""
    if op == "rms_norm":
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + EPS) * b
    return F.silu(a) * b


def implementations(op, device, key):
    """name -> callable for this device; missing baselines are skipped, never faked."""
    kpro_fn = ops.rms_norm if op == "rms_norm" else ops.swiglu
    eager = eager_rms_norm if op == "rms_norm" else eager_swiglu
    impls = {"eager": eager, "torch.compile": lambda *a: compiled(key, eager)(*a)}
    backends = ["torch", "triton", "cuda"] if device.type == "cuda" else ["torch"]
    for name in backends:
        impls[f"kpro-{name}"] = (lambda b: lambda *a: _with_backend(b, kpro_fn, *a))(name)
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            # offset 0, LLaMA casting, and not in place: Liger would otherwise overwrite the reused dy with dx
            impls["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        else:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            impls["liger"] = LigerSiLUMulFunction.apply
            OVERWRITES_INPUTS.add("liger")  # its backward writes da, db into a, b (no option to turn it off)
    except ImportError as err:  # named in the skip: a broken install must not just drop the column
        MISSING["liger"] = f"{type(err).__name__}: {err}"
    return impls


MISSING: dict[str, str] = {}  # baseline -> why it could not be imported
# Implementations whose backward writes into their inputs: they get copies of their own (inputs_for), as the
# case's a, b are shared by every implementation of the case and must stay what the reference was computed on.
OVERWRITES_INPUTS: set[str] = set()


def _with_backend(name, fn, *args):
    with ops.backend(name):
        return fn(*args)


IMPL_NAMES = ["eager", "torch.compile", "kpro-torch", "kpro-triton", "kpro-cuda", "liger"]
CASES = CaseCache()


def shapes_for(op, device):
    if device.type == "cuda":
        return GPU_NORM_SHAPES if op == "rms_norm" else GPU_SWIGLU_SHAPES
    return CPU_SHAPES


def build_case(op, shape, device, backward):
    """Inputs (leaves), dy, and the float64 reference output and gradients."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, cols = shape
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
    b = (torch.randn(cols, device=device, dtype=dtype, generator=gen) if op == "rms_norm"
         else torch.randn(rows, cols, device=device, dtype=dtype, generator=gen))
    dy = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen) if backward else None
    a64, b64 = (t.double().requires_grad_(backward) for t in (a, b))
    out = reference(op, a64, b64)
    grads = torch.autograd.grad(out, (a64, b64), dy.double()) if backward else (None, None)
    return SimpleNamespace(a=a.requires_grad_(backward), b=b.requires_grad_(backward), dy=dy, dtype=dtype,
                           out=out.detach(), da=grads[0], db=grads[1])


def setup_case(op, impl, shape, device, backward):
    if shape not in shapes_for(op, device):
        pytest.skip(f"shape {shape} is not benchmarked on {device.type}")
    key = (op, shape, backward, device.type)
    impls = implementations(op, device, key)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here" + (f" ({MISSING[impl]})" if impl in MISSING else ""))
    case = CASES.get(key, lambda: build_case(op, shape, device, backward))
    if impl.startswith("kpro-"):
        reason = unavailable_reason(impl.removeprefix("kpro-"), op, case.a)
        if reason is not None:
            pytest.skip(f"{impl}: {reason}")
    return impls[impl], case


def inputs_for(impl, case):
    """The case's inputs a, b for `impl`: the shared leaves, or, for an implementation whose backward overwrites
    them, copies of its own made before its check call. Its timed rounds then run on whatever its previous
    backward left there; an elementwise kernel's time on a GPU does not depend on the values."""
    if impl not in OVERWRITES_INPUTS:
        return case.a, case.b
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in (case.a, case.b))


ALL_SHAPES = sorted(set(GPU_SWIGLU_SHAPES + CPU_SHAPES))


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_forward(benchmark, device, copy_bandwidth, op, impl, shape):
    fn, case = setup_case(op, impl, shape, device, backward=False)
    a, b = case.a, case.b
    with torch.no_grad():
        out = fn(a, b)
    check_close(impl, [("output", out, case.out)], case.dtype, benchmark=benchmark)
    del out
    benchmark.group = f"{op} forward {shape[0]}x{shape[1]} {str(case.dtype).removeprefix('torch.')}"
    benchmark.extra_info["device"] = describe_device(device)

    def run():
        with torch.no_grad():
            fn(a, b)

    timed(benchmark, device, run)
    n = a.numel() * a.element_size()
    record_bandwidth(benchmark, 2 * n if op == "rms_norm" else 3 * n, copy_bandwidth)
    record_ratios(benchmark, impl)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_forward_backward(benchmark, device, copy_bandwidth, op, impl, shape):
    fn, case = setup_case(op, impl, shape, device, backward=True)
    (a, b), dy = inputs_for(impl, case), case.dy
    out = fn(a, b)
    out.backward(dy)
    second = "weight gradient" if op == "rms_norm" else "up gradient"
    check_close(impl, [("output", out, case.out), ("input gradient", a.grad, case.da), (second, b.grad, case.db)],
                case.dtype, benchmark=benchmark)
    del out
    a.grad = b.grad = None
    benchmark.group = f"{op} forward+backward {shape[0]}x{shape[1]} {str(case.dtype).removeprefix('torch.')}"
    benchmark.extra_info["device"] = describe_device(device)

    def run():
        fn(a, b).backward(dy)
        a.grad = b.grad = None

    timed(benchmark, device, run)
    n = a.numel() * a.element_size()
    # rms_norm: x read and y written, then dy and x read and dx written; swiglu: 3 + 5 tensors.
    record_bandwidth(benchmark, 5 * n if op == "rms_norm" else 8 * n, copy_bandwidth)
    record_ratios(benchmark, impl)
