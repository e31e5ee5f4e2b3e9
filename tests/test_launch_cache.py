"""kpro.ops.triton_kernels._launch: `launch` is Triton's JIT launch by default; with KPRO_LAUNCH_CACHE=1, the
compiled kernel of each specialisation launched directly. The key must separate every pair of launches that
Triton would compile apart (alignment, int divisibility and range, constexpr values, options). And
`launch_errors`, which names the op when a kernel does not fit the device."""
import os
from unittest import mock

import pytest
import torch

from kpro import ops
from kpro.ops.triton_kernels import _launch, swiglu as swiglu_kernels
from conftest import CUDA


class FakeCompiled:
    """Stands in for Triton's CompiledKernel: records the direct launches."""

    def __init__(self):
        self.launches = []

    def run(self, *args):  # present, as on a real compiled kernel
        raise AssertionError("launch() goes through compiled[grid](...)")

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


class FakeKernel:
    """Stands in for a JITFunction f(X, n, BLOCK: constexpr): records the JIT launches."""
    arg_names = ["X", "n", "BLOCK"]
    constexprs = [2]

    def __init__(self):
        self.jit_launches, self.compiled = [], []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.jit_launches.append((grid, args, meta))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return run


@pytest.fixture
def as_if_on_cuda(monkeypatch):
    """CPU tensors taken for CUDA ones, device 0, the cache on: the key and the cache's logic on this machine."""
    monkeypatch.setattr(_launch, "LAUNCH_CACHE", True)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_the_key_separates_what_triton_compiles_apart(as_if_on_cuda):
    kernel = FakeKernel()
    key = lambda *args, **meta: _launch.specialisation_key(kernel, args, meta)
    x = torch.zeros(64)
    assert key(x, 16, BLOCK=64) == key(torch.zeros(64), 32, BLOCK=64)  # aligned, divisible by 16, i32 alike
    different = [key(x[1:], 16, BLOCK=64),  # 4 bytes off: not 16-byte aligned
                 key(x.double(), 16, BLOCK=64), key(x, 17, BLOCK=64), key(x, 1, BLOCK=64), key(x, 2**31, BLOCK=64),
                 key(x, 2**63, BLOCK=64), key(x, 16, BLOCK=128), key(x, 16, BLOCK=64, num_warps=8),
                 key(x, 16, 64)]  # the constexpr given by position: its value, not its class
    assert len({key(x, 16, BLOCK=64), *different}) == len(different) + 1
    assert key(x, 16, 64) != key(x, 16, 128)
    assert key(x, 16, BLOCK=1) != key(x, 16, BLOCK=True) and key(x, 16, True) != key(x, 16, 1)
    assert key(x, (1, 2), BLOCK=64) is None  # an argument kind the key does not cover: no cache
    assert key(x, 16, BLOCK=[64]) is None and key(x, 16, x) is None  # a constexpr must be a plain value
    assert key(x, 16, BLOCK=64, MASK=x) is None  # a tensor in a key would be kept alive by the cache


def test_a_hit_launches_the_compiled_kernel_with_every_argument_in_order(as_if_on_cuda):
    kernel, x = FakeKernel(), torch.zeros(64)
    first = _launch.launch(kernel, (3,), x, 16, BLOCK=64, num_warps=4)
    assert len(kernel.jit_launches) == 1 and first is kernel.compiled[0]
    _launch.launch(kernel, (3,), x, 32, BLOCK=64, num_warps=4)
    assert len(kernel.jit_launches) == 1  # the same specialisation: no JIT launch
    assert first.launches == [((3, 1, 1), (x, 32, 64))]  # grid padded to 3, BLOCK appended in signature order
    _launch.launch(kernel, (3,), x[1:], 32, BLOCK=64, num_warps=4)
    assert len(kernel.jit_launches) == 2  # misaligned: a specialisation of its own


def test_off_by_default_and_bypassed_without_a_cuda_tensor(monkeypatch):
    kernel, x = FakeKernel(), torch.zeros(8)
    assert _launch.LAUNCH_CACHE == (os.environ.get("KPRO_LAUNCH_CACHE") == "1")
    monkeypatch.setattr(_launch, "LAUNCH_CACHE", True)
    monkeypatch.setattr(_launch, "_compiled", {})
    for _ in range(2):
        _launch.launch(kernel, (1,), x, 16, BLOCK=8)
    assert len(kernel.jit_launches) == 2 and _launch._compiled == {}  # CPU tensors: the interpreter, every time


def test_the_interpreter_gives_the_same_results_with_the_cache_on(monkeypatch):
    g, u = torch.randn(5, 37), torch.randn(5, 37)
    with ops.backend("triton"):
        off = ops.swiglu(g, u)
        monkeypatch.setattr(_launch, "LAUNCH_CACHE", True)
        on = ops.swiglu(g, u)
    assert torch.equal(off, on)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
def test_cached_launches_match_jit_launches_bit_for_bit_on_a_gpu(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
    g, u, x, w = r(33, 1000), r(33, 1000), r(33, 1000), r(1000)
    q, k, v = r(2, 77, 8, 64), r(2, 77, 2, 64), r(2, 77, 2, 64)

    def run():
        with ops.backend("triton"):
            outs = [ops.swiglu(g, u), ops.rms_norm(x, w), ops.attention(q, k, v, causal=True)]
        grads = torch.autograd.grad(sum(o.float().square().sum() for o in outs), [g, u, x, w, q, k, v])
        return [o.detach() for o in outs] + list(grads)

    jit = run()
    monkeypatch.setattr(_launch, "LAUNCH_CACHE", True)
    monkeypatch.setattr(_launch, "_compiled", {})
    run()  # fills the cache
    assert any(entry is not None for entry in _launch._compiled.values())
    with mock.patch.object(type(swiglu_kernels._forward_kernel), "run", side_effect=AssertionError("JIT launch")):
        cached = run()  # every launch a hit: Triton's JIT is not called
    for a, b in zip(jit, cached):
        assert torch.equal(a, b)


def test_a_kernel_too_big_for_the_device_is_a_backend_error_naming_the_op():
    from triton.runtime.errors import OutOfResources

    with pytest.raises(ops.BackendError, match=r"attention backward: the Triton kernel does not fit this GPU"):
        with _launch.launch_errors("attention backward"):
            raise OutOfResources(232448, 227328, "shared memory")
    with pytest.raises(KeyError):  # anything else passes through untouched
        with _launch.launch_errors("attention"):
            raise KeyError("x")
    with _launch.launch_errors("attention"):
        pass
