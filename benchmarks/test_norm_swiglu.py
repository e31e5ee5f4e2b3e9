"""RMSNorm and SwiGLU, forward and forward+backward: kpro's backends against eager PyTorch,
torch.compile, and Liger-Kernel when installed. Achieved GB/s counts the bytes that must move.

    pytest --benchmark -k "rms_norm or swiglu"
"""
import pytest
import torch
import torch.nn.functional as F

from kpro import ops
from conftest import describe_device, record_bandwidth, synchronize

GPU_NORM_SHAPES = [(4096, 4096), (16384, 4096), (16384, 8192)]
GPU_SWIGLU_SHAPES = GPU_NORM_SHAPES + [(8192, 14336)]
CPU_SHAPES = [(2048, 1024)]


def eager_rms_norm(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def eager_swiglu(g, u):
    return F.silu(g) * u


def implementations(op, device):
    """name -> callable for this device; missing baselines are skipped, never faked."""
    kpro_fn = ops.rms_norm if op == "rms_norm" else ops.swiglu
    eager = eager_rms_norm if op == "rms_norm" else eager_swiglu
    impls = {"eager": eager, "torch.compile": torch.compile(eager)}
    backends = ["torch", "triton", "cuda"] if device.type == "cuda" else ["torch"]
    for name in backends:
        impls[f"kpro-{name}"] = (lambda b: lambda *a: _with_backend(b, kpro_fn, *a))(name)
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            # offset 0, LLaMA casting, and not in place: Liger would otherwise overwrite the reused dy with dx
            impls["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)
        else:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            impls["liger"] = LigerSiLUMulFunction.apply
    except ImportError:
        pass
    return impls


def _with_backend(name, fn, *args):
    with ops.backend(name):
        return fn(*args)


IMPL_NAMES = ["eager", "torch.compile", "kpro-torch", "kpro-triton", "kpro-cuda", "liger"]


def shapes_for(op, device):
    if device.type == "cuda":
        return GPU_NORM_SHAPES if op == "rms_norm" else GPU_SWIGLU_SHAPES
    return CPU_SHAPES


def setup_case(op, impl, shape, device, backward):
    if shape not in shapes_for(op, device):
        pytest.skip(f"shape {shape} is not benchmarked on {device.type}")
    impls = implementations(op, device)
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, cols = shape
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen, requires_grad=backward)
    b = (torch.randn(cols, device=device, dtype=dtype, generator=gen) if op == "rms_norm"
         else torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)).requires_grad_(backward)
    return impls[impl], a, b, dtype


ALL_SHAPES = sorted(set(GPU_SWIGLU_SHAPES + CPU_SHAPES))


@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_forward(benchmark, device, copy_bandwidth, op, impl, shape):
    fn, a, b, dtype = setup_case(op, impl, shape, device, backward=False)
    benchmark.group = f"{op} forward {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["device"] = describe_device(device)

    def run():
        with torch.no_grad():
            fn(a, b)
        synchronize(device)

    run()
    benchmark(run)
    n = a.numel() * a.element_size()
    record_bandwidth(benchmark, 2 * n if op == "rms_norm" else 3 * n, copy_bandwidth)


@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("op", ["rms_norm", "swiglu"])
def test_forward_backward(benchmark, device, copy_bandwidth, op, impl, shape):
    fn, a, b, dtype = setup_case(op, impl, shape, device, backward=True)
    benchmark.group = f"{op} forward+backward {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["device"] = describe_device(device)
    dy = torch.randn_like(a)

    def run():
        out = fn(a, b)
        out.backward(dy)
        a.grad = b.grad = None
        synchronize(device)

    run()
    benchmark(run)
    n = a.numel() * a.element_size()
    # rms_norm: x read and y written, then dy and x read and dx written; swiglu: 3 + 5 tensors.
    record_bandwidth(benchmark, 5 * n if op == "rms_norm" else 8 * n, copy_bandwidth)
