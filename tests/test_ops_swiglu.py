"""SwiGLU (separate and packed gate/up) on every backend against a float64 reference."""
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kpro import ops
from conftest import TOLERANCE, backend_devices, relative_error
from test_ops_rms_norm import bits

SHAPES = [(1, 1, 64), (3, 17, 96), (37, 200), (2, 5, 1000), (1, 37), (3, 4096), (2, 14336)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(gate, up, dy):
    """y = silu(g)·u and its gradients, written out in float64: d silu(g)/dg = s·(1 + g·(1 − s)), s = sigmoid(g).
    (Autograd of g·s·u sums the two terms of that derivative separately, each times u: an infinite u gave
    inf − inf = NaN where the derivative is finite and the gradient ±inf, on 37 of 60 seeds of the NaN test.)"""
    g, u, d = gate.detach().double(), up.detach().double(), dy.double()
    s = torch.sigmoid(g)
    return g * s * u, d * u * s * (1 + g * (1 - s)), d * g * s


def inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device)
    return make(), make(), make()


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_float64(backend, device, dtype, shape):
    check_against_float64(backend, *inputs(shape, dtype, device, seed=shape[-1]))


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
def test_zero_dim_inputs(backend, device):
    """0-dim gate and up: the torch backend took them, the kernels' launchers died in an IndexError."""
    check_against_float64(backend, *inputs((), torch.float32, device, seed=5))


def check_against_float64(backend, gate, up, dy):
    """swiglu on `backend`, forward and both gradients, within the dtype's tolerance of float64."""
    y_ref, dg_ref, du_ref = reference(gate, up, dy)
    gate.requires_grad_()
    up.requires_grad_()
    with ops.backend(backend):
        y = ops.swiglu(gate, up)
        y.backward(dy)
    tol = TOLERANCE[gate.dtype]
    assert y.dtype == gate.dtype
    assert relative_error(y, y_ref) <= tol
    assert relative_error(gate.grad, dg_ref) <= tol
    assert relative_error(up.grad, du_ref) <= tol


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 17, 96), (37, 200), (2, 5, 1000)], ids=str)
def test_packed_swiglu_matches_float64(backend, device, dtype, shape):
    gate, up, dy = inputs(shape, dtype, device, seed=7 + shape[-1])
    y_ref, dg_ref, du_ref = reference(gate, up, dy)
    gate_up = torch.cat((gate, up), dim=-1).requires_grad_()
    with ops.backend(backend):
        y = ops.swiglu_packed(gate_up)
        y.backward(dy)
    tol = TOLERANCE[dtype]
    assert y.shape == shape
    assert relative_error(y, y_ref) <= tol
    assert relative_error(gate_up.grad, torch.cat((dg_ref, du_ref), dim=-1)) <= tol


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
def test_packed_input_that_is_a_strided_view(backend, device):
    """gate_up as a slice of a wider projection output: rows are not contiguous in memory."""
    gate, up, dy = inputs((4, 6, 40), torch.float32, device, seed=8)
    y_ref, dg_ref, du_ref = reference(gate, up, dy)
    wide = torch.cat((gate, up, torch.randn_like(gate)), dim=-1).requires_grad_()
    with ops.backend(backend):
        y = ops.swiglu_packed(wide[..., :80])
        y.backward(dy)
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(wide.grad[..., :80], torch.cat((dg_ref, du_ref), -1)) <= 1e-5
    assert (wide.grad[..., 80:] == 0).all()


def column_slice(t, width):
    """t's values as the first columns of a `width`-wide buffer: a view whose rows are `width` apart."""
    wide = torch.zeros(*t.shape[:-1], width, dtype=t.dtype, device=t.device)
    wide[..., :t.shape[-1]] = t
    return wide[..., :t.shape[-1]]


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
@pytest.mark.parametrize("strided", ["gate", "up"])
def test_gate_up_and_gradient_of_different_row_strides(backend, device, strided):
    """One of gate and up a slice of a wider buffer (row stride 300 for 100 features), the other contiguous,
    and dy a slice of yet another width (row stride 200): the launchers take a row stride per tensor, and
    passing gate's for up (in the forward, or any tensor's for another in the backward) survived every test,
    whose separate tensors always shared a layout (mutation audit round 3, S01)."""
    gate, up, dy = inputs((9, 100), torch.float32, device, seed=12)
    if strided == "gate":
        gate = column_slice(gate, 300)
    else:
        up = column_slice(up, 300)
    check_against_float64(backend, gate, up, column_slice(dy, 200))


def with_sentinel_column(n_rows, n_cols, width, value, device):
    """[n_rows, n_cols] rows of a `width`-wide buffer filled with `value`, and the buffer: a write past a row's
    last column lands in the sentinel columns (not in the next row, whose program may overwrite it)."""
    buffer = torch.full((n_rows, width), value, device=device)
    return buffer[:, :n_cols], buffer


@pytest.mark.parametrize("backend, device", backend_devices("swiglu")[1:2])  # the Triton launchers
@pytest.mark.parametrize("n_cols", [100, 37])
def test_triton_kernels_write_nothing_past_a_rows_last_column(backend, device, n_cols):
    """The kernels' masks keep the last, partial block of a row to the row. A mask one column too wide
    (`cols <= n_cols`) wrote y[r, n_cols], which in a contiguous y is y[r + 1, 0]: the interpreter runs the
    programs in order, so row r + 1 rewrote it and every test passed (mutation audit round 3, S02), while on a
    GPU the order is free (a race) and the last row writes past the buffer. Here each output row ends beside
    sentinel columns, and every tensor has its own row stride, so a launcher passing one tensor's stride for
    another's fails too."""
    from kpro.ops.triton_kernels import swiglu as kernels

    gate, up, dy = inputs((8, n_cols), torch.float32, device, seed=n_cols)
    gate, dy = column_slice(gate, n_cols + 5), column_slice(dy, n_cols + 9)
    y_ref, dg_ref, du_ref = reference(gate, up, dy)
    (y, y_buffer), (dg, dg_buffer), (du, du_buffer) = (with_sentinel_column(8, n_cols, n_cols + extra, value, device)
                                                       for extra, value in ((1, 7.0), (3, 8.0), (6, 9.0)))
    kernels._forward_rows(gate, up, y)
    kernels._backward_rows(dy, gate, up, dg, du)
    for buffer, value in ((y_buffer, 7.0), (dg_buffer, 8.0), (du_buffer, 9.0)):
        assert (buffer[:, n_cols:] == value).all()
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(dg, dg_ref) <= 1e-5 and relative_error(du, du_ref) <= 1e-5


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("seed", [0, 1, 9])
def test_nan_and_inf_propagate_like_the_reference(backend, device, seed):
    gate, up, dy = inputs((3, 16), torch.float32, device, seed=seed)
    gate[0, 1], gate[1, 2], up[2, 3] = float("nan"), float("-inf"), float("inf")
    y_ref, dg_ref, du_ref = reference(gate, up, dy)
    gate.requires_grad_()
    up.requires_grad_()
    with ops.backend(backend):
        y = ops.swiglu(gate, up)
        y.backward(dy)
    for out, ref in ((y, y_ref), (gate.grad, dg_ref), (up.grad, du_ref)):
        out, ref = out.detach().cpu().double(), ref.cpu()
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        assert torch.equal(out[ref.isinf()], ref[ref.isinf()])  # each infinity with the reference's sign
        finite = ref.isfinite()
        assert relative_error(out[finite], ref[finite]) <= 1e-5


def test_only_gate_and_up_are_saved():
    gate, up = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ"):
        ops.swiglu(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="differ"):
        ops.swiglu(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        ops.swiglu_packed(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"inputs \(2, 0\) have no features"):
        ops.swiglu(torch.randn(2, 0), torch.randn(2, 0))
    # swiglu_packed's own argument, named (it said "swiglu: inputs ...")
    with pytest.raises(ValueError, match=r"^swiglu_packed: gate_up \(2, 0\) has no features"):
        ops.swiglu_packed(torch.randn(2, 0))
    with pytest.raises(ValueError, match="^swiglu_packed: gate_up must be floating point, got torch.int64"):
        ops.swiglu_packed(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("backend, device", backend_devices("swiglu")[:2] + backend_devices("swiglu")[2:])
def test_opcheck_registration(backend, device):
    """Fake and real outputs agree (shapes, dtypes, strides), also for inputs that are not contiguous."""
    make = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.kpro.swiglu_forward.default, (make(3, 24), make(3, 24), backend))
    gate, up = (torch.randn(24, 6, device=device).t().requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.kpro.swiglu_forward.default, (gate, up, backend))
    torch.library.opcheck(torch.ops.kpro.swiglu_packed_forward.default, (make(3, 48), backend))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_inputs(backend, dtype):
    """gate starting one element past a 16-byte boundary, and a width no vector divides."""
    for n_rows, n_cols, shift in ((5, 4096, 1), (3, 4099, 0)):
        g_ref, up, dy = inputs((n_rows, n_cols), dtype, "cuda", seed=n_cols)
        gate = torch.empty(n_rows * n_cols + shift, dtype=dtype, device="cuda")[shift:].view(n_rows, n_cols)
        gate.copy_(g_ref)
        check_against_float64(backend, gate, up, dy)


# ---------------------------------------------------------------- eager path (autograd.Function) vs custom op

SWIGLU_MODULE = sys.modules["kpro.ops.swiglu"]


def test_eager_calls_skip_the_custom_ops_and_tracing_takes_them(monkeypatch):
    """Eager calls run the kernels through SwiGLUFunction / SwiGLUPackedFunction; torch.compile and fake tensors
    get the registered custom ops."""
    gate, up = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda g, u: (ops.swiglu(g, u), ops.swiglu_packed(torch.cat((g, u), -1))),
                             backend=record, fullgraph=True)
    assert torch.equal(compiled(gate, up)[0], ops.swiglu(gate, up))
    assert "kpro.swiglu_forward" in graphs[0].code and "kpro.swiglu_packed_forward" in graphs[0].code

    calls = []
    for name in ("swiglu_forward", "swiglu_packed_forward"):
        real = getattr(torch.ops.kpro, name)
        monkeypatch.setattr(torch.ops.kpro, name, lambda *args, real=real: calls.append(args) or real(*args))
    outs = ops.swiglu(gate, up), ops.swiglu_packed(torch.cat((gate, up), -1))
    sum(out.sum() for out in outs).backward()
    assert calls == [] and [type(out.grad_fn).__name__ for out in outs] == ["SwiGLUFunctionBackward",
                                                                           "SwiGLUPackedFunctionBackward"]
    packed = torch.cat((gate, up), -1)
    with FakeTensorMode() as mode:
        ops.swiglu(mode.from_tensor(gate), mode.from_tensor(up))
        ops.swiglu_packed(mode.from_tensor(packed))
    assert len(calls) == 2


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_path_is_bit_identical_to_the_custom_ops(backend, device, dtype, monkeypatch):
    """Output, dgate and dup of swiglu and swiglu_packed, a NaN included, and the tensors saved for the backward:
    bit for bit the custom ops', on an odd shape."""
    gate, up, dy = inputs((3, 5, 37), dtype, device, seed=9)
    gate[0, 1, 2], up[2, 3, 4] = float("nan"), float("nan")
    runs = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(SWIGLU_MODULE, "eager_fast_path", lambda *tensors: False)
        saved = []
        g, u, gu = gate.clone().requires_grad_(), up.clone().requires_grad_(), torch.cat((gate, up), -1).requires_grad_()
        with ops.backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, y_packed = ops.swiglu(g, u), ops.swiglu_packed(gu)
        assert ("SwiGLUFunction" in type(y.grad_fn).__name__) == eager
        assert ("SwiGLUPackedFunction" in type(y_packed.grad_fn).__name__) == eager
        torch.autograd.backward((y, y_packed), (dy, dy))
        runs.append(([y, y_packed, g.grad, u.grad, gu.grad], saved))
    (fast, fast_saved), (op, op_saved) = runs
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fast, op))
    assert len(fast_saved) == len(op_saved) == 3
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fast_saved, op_saved))


def test_double_backward_raises_on_both_paths(monkeypatch):
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(SWIGLU_MODULE, "eager_fast_path", lambda *tensors: False)
        gate, up = (torch.randn(3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        for fn in (lambda g, u: ops.swiglu(g, u), lambda g, u: ops.swiglu_packed(torch.cat((g, u), -1))):
            (dgate,) = torch.autograd.grad(fn(gate, up).sum(), gate, create_graph=True)
            assert dgate.requires_grad
            with pytest.raises(RuntimeError, match="no double backward|no autograd formula"):
                dgate.sum().backward()
            assert torch.autograd.gradcheck(fn, (gate, up))


@pytest.mark.parametrize("backend, device", backend_devices("swiglu"))
def test_swiglu_up_gradient_is_rounded_once_for_bfloat16(backend, device):
    """O02: d(up) = dy * silu(gate) computed in float32 and rounded to bfloat16 once: within half an ulp (plus
    float32 rounding) of the float64 value. Rounding silu(gate) to bfloat16 first errs by up to about one ulp."""
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(4093, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    up = torch.randn(4093, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    dy = torch.randn(4093, generator=g).to(device, torch.bfloat16)
    with ops.backend(backend):
        out = ops.swiglu(gate, up)
        _, dup = torch.autograd.grad(out, (gate, up), dy)
    reference = dy.double() * torch.nn.functional.silu(gate.detach().double())
    ulp = torch.exp2(torch.floor(torch.log2(reference.abs().clamp_min(1e-30))) - 7)
    assert float(((dup.double() - reference).abs() / ulp).max()) <= 0.5 + 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_gradient_reaches_up_when_only_up_requires_it(backend):
    """A frozen gate beside a trainable up: the eager path must record a graph (it asked whether gate needed
    one, and a kernel backend then gave up no gradient; the torch backend's aten ops record their own)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    gate, up, dy = (torch.randn(3, 7, generator=gen) for _ in range(3))
    up.requires_grad_()
    with ops.backend(backend):
        y = ops.swiglu(gate, up)
    assert y.requires_grad
    y.backward(dy)
    torch.testing.assert_close(up.grad, (F.silu(gate.double()) * dy.double()).float())  # d(silu(g)·u)/du
