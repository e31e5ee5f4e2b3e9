"""Backend choice: env and context manager, auto, forced backends that cannot run, torch.compile."""
import pytest
import torch

from kpro import ops
from kpro.ops import BackendError
from kpro.ops.backend import select

x = torch.randn(4, 8)


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("KPRO_BACKEND", raising=False)
    assert select("rms_norm", x) == "torch"
    w = torch.randn(8)
    with ops.backend("torch"):
        forced = ops.rms_norm(x, w)
    assert torch.equal(ops.rms_norm(x, w), forced)


def test_environment_and_context_manager(monkeypatch):
    monkeypatch.setenv("KPRO_BACKEND", "torch")
    assert select("swiglu", x) == "torch"
    monkeypatch.setenv("KPRO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("swiglu", x) == "triton"
    with ops.backend("torch"):  # the innermost block wins over the environment
        assert select("swiglu", x) == "torch"
        with ops.backend("auto"):
            assert select("swiglu", x) == "torch"
    assert ops.requested_backend() == "triton"


def test_cuda_backend_on_cpu_tensor_raises():
    with ops.backend("cuda"), pytest.raises(BackendError, match="need CUDA tensors"):
        ops.rms_norm(x, torch.randn(8))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.backend("triton"), pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        ops.swiglu(x, x)


def test_triton_refuses_float64():
    with ops.backend("triton"), pytest.raises(BackendError, match="dtype torch.float64 is not supported"):
        ops.swiglu(x.double(), x.double())


def test_op_without_such_backend():
    q = torch.randn(1, 3, 2, 8)
    with ops.backend("cuda"), pytest.raises(BackendError, match="no cuda implementation of attention"):
        select("attention", q)


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        with ops.backend("fast"):
            pass
    monkeypatch.setenv("KPRO_BACKEND", "fast")
    with pytest.raises(BackendError, match="KPRO_BACKEND: unknown backend 'fast'"):
        ops.rms_norm(x, torch.randn(8))


def test_model_compiles_without_graph_breaks(make_model):
    """torch.compile(fullgraph=True) traces the whole model, forward and backward, through the custom ops."""
    model = make_model(dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for attention_mask in (None, mask):
        out, ref = compiled(ids, attention_mask), model(ids, attention_mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    compiled(ids, mask).logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, mask).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_per_op_choice(monkeypatch):
    q = torch.randn(1, 3, 2, 8)
    with ops.backend("cuda", attention="torch"):
        assert select("attention", q) == "torch"
        with pytest.raises(BackendError, match="need CUDA tensors"):
            select("rms_norm", x)
        with ops.backend(rms_norm="torch"):
            assert select("rms_norm", x) == "torch"
            with pytest.raises(BackendError):
                select("swiglu", x)  # still cuda from the outer block
    monkeypatch.setenv("KPRO_BACKEND", "cuda, attention=torch")
    assert ops.requested_backend("attention") == "torch" and ops.requested_backend("swiglu") == "cuda"
    monkeypatch.setenv("KPRO_BACKEND", "swiglu=torch")
    assert ops.requested_backend("rms_norm") == "auto"
    with pytest.raises(BackendError, match="unknown op 'softmax'"):
        with ops.backend(softmax="torch"):
            pass


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_model_compiles_on_gpu_with_each_backend(make_model, name):
    """Inductor, fullgraph, on the GPU: every backend traces and matches eager (CUDA has no attention yet)."""
    model = make_model(dtype=torch.float32).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")
    with ops.backend(name, attention="torch" if name == "cuda" else name):
        compiled = torch.compile(model, fullgraph=True)
        out, ref = compiled(ids), model(ids)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        compiled(ids).logsumexp(-1).sum().backward()
