"""Backend choice: env and context manager, auto, forced backends that cannot run, torch.compile."""
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kpro
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


def test_an_interpreter_asked_for_after_triton_was_imported_is_named(tmp_path):
    """Set after torch imported triton (an optimizer step does), TRITON_INTERPRET=1 reached kpro's kernels but not
    Triton's own helpers, defined at import: the call died in "Cannot call @triton.jit'd outside of the scope of
    a kernel" (an InterpreterError, no BackendError). A fresh process, as a user's script."""
    script = (
        "import os, sys, torch\n"
        "from kpro import ops\n"
        "p = torch.nn.Parameter(torch.randn(4)); opt = torch.optim.AdamW([p]); p.sum().backward(); opt.step()\n"
        "assert 'triton' in sys.modules\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    with ops.backend('triton'):\n"
        "        ops.rms_norm(torch.randn(3, 8), torch.ones(8))\n"
        "except ops.BackendError as err:\n"
        "    print(err)\n")
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "KPRO_BACKEND")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert "TRITON_INTERPRET=1 was set after triton was imported" in done.stdout, done.stdout + done.stderr[-2000:]


def test_bf16_under_the_interpreter_is_right_without_the_test_suite(tmp_path):
    """Triton's CPU interpreter reads bf16 bits as integers in tl.dot: kpro fixes it when its triton backend
    first runs, so a user (no conftest here: a fresh process) gets the right numbers, not garbage. That first
    run may be under torch.compile(fullgraph=True), which cannot trace the check: it runs eagerly there."""
    script = tmp_path / "bf16.py"
    script.write_text(
        "import torch\n"
        "from kpro import ops\n"
        "def norm(x, w):\n"
        "    with ops.backend('triton'):\n"
        "        return ops.rms_norm(x, w)\n"
        "x, w = torch.randn(3, 8).bfloat16(), torch.ones(8).bfloat16()\n"
        "compiled = torch.compile(norm, fullgraph=True, backend='aot_eager')(x, w)\n"
        "assert torch.equal(compiled, norm(x, w))\n"
        "q, k, v = (torch.randn(1, 5, 1, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))\n"
        "with ops.backend('triton'):\n"
        "    out = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())\n"
        "ref = ops.attention(q.double(), k.double(), v.double())\n"
        "print(float((out.double() - ref).norm() / ref.norm()))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "KPRO_BACKEND": ""}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-2


def test_bf16_is_refused_under_an_interpreter_kpro_cannot_fix(monkeypatch):
    """A later interpreter organised differently: bf16 is refused, naming why, rather than computed wrong."""
    backend_module = importlib.import_module("kpro.ops.backend")  # the module (kpro.ops exports the function)

    def cannot():
        raise AttributeError("no InterpreterBuilder")
    monkeypatch.setattr(backend_module, "_interpreter_bf16", None)
    monkeypatch.setattr(backend_module, "_fix_interpreter_bf16", cannot)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 3, 2, 8)
    with ops.backend("triton"):
        with pytest.raises(BackendError, match=r"attention: backend 'triton' cannot run this call: .*bfloat16"):
            select("attention", q.bfloat16())
        assert select("attention", q) == "triton"


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


@pytest.mark.parametrize("value, message", [
    ("torch,triton", "names a backend for every op twice"),  # the last one won, silently
    ("cuda,attention=torch,attention=triton", "names a backend for attention twice"),
    ("=torch", "'=torch' names no op"),  # an empty op name was taken as the default
])
def test_contradictory_backend_settings_are_refused(monkeypatch, value, message):
    monkeypatch.setenv("KPRO_BACKEND", value)
    with pytest.raises(BackendError, match=f"KPRO_BACKEND={value!r}.*{message}"):
        ops.requested_backend("rms_norm")


@pytest.mark.parametrize("value, attention, rms_norm", [
    ("triton,", "triton", "triton"),  # was "names a backend for every op twice"
    (" cuda , attention = torch ", "torch", "cuda"),  # was "unknown op 'attention '"
    ("attention=torch,, ", "torch", "auto"),
    (" , ", "auto", "auto"),
])
def test_backend_setting_strips_spaces_and_skips_empty_entries(monkeypatch, value, attention, rms_norm):
    monkeypatch.setenv("KPRO_BACKEND", value)
    assert (ops.requested_backend("attention"), ops.requested_backend("rms_norm")) == (attention, rms_norm)


def test_the_per_op_example_of_the_docs_runs_every_op(monkeypatch):
    """docs/ops.md's per-op example was `cuda,attention=torch`, which leaves linear_cross_entropy and
    bitune_attention on cuda, where they have no kernel: refused whatever the device."""
    from kpro.ops.backend import IMPLEMENTED

    text = (Path(__file__).resolve().parents[1] / "docs" / "ops.md").read_text(encoding="utf-8")
    setting = re.search(r"per op\s+`([^`]+)`", text).group(1)
    call = ast.parse(re.search(r"with (ops\.backend\([^)]*\)):", text).group(1)).body[0].value
    monkeypatch.setenv("KPRO_BACKEND", setting)
    from_env = {op: ops.requested_backend(op) for op in IMPLEMENTED}
    monkeypatch.delenv("KPRO_BACKEND")
    with ops.backend(*map(ast.literal_eval, call.args), **{k.arg: ast.literal_eval(k.value) for k in call.keywords}):
        from_block = {op: ops.requested_backend(op) for op in IMPLEMENTED}
    for choice in (from_env, from_block):
        assert all(choice[op] in IMPLEMENTED[op] for op in IMPLEMENTED), (setting, ast.unparse(call), choice)


def test_arguments_of_the_wrong_kind_are_refused_by_name():
    """An op name misspelt in requested_backend read as "auto"; a None weight or a NumPy array failed with an
    AttributeError deep in the op; bitune_attention took modulo by zero heads, or 0 ** -0.5, instead of
    naming them; a complex 0-dim scale failed in a float conversion."""
    with pytest.raises(BackendError, match="unknown op 'rmsnorm'; kpro's ops are rms_norm"):
        ops.requested_backend("rmsnorm")
    q = torch.randn(1, 3, 2, 4)
    for call, message in [(lambda: ops.rms_norm(x, None), "rms_norm: weight must be a tensor, got NoneType"),
                          (lambda: ops.swiglu(x.numpy(), x), "swiglu: gate must be a tensor, got ndarray"),
                          (lambda: ops.swiglu_packed([1.0, 2.0]), "swiglu_packed: gate_up must be a tensor"),
                          (lambda: ops.attention(q, q.numpy(), q), "attention: k must be a tensor, got ndarray"),
                          (lambda: ops.attention(q, q, q, scale=torch.tensor(0.5 + 0j)), "scale must be a number")]:
        with pytest.raises(ValueError, match=message):
            call()
    lens = torch.tensor([2])
    for heads, kv_heads, dim in [(2, 0, 4), (0, 1, 4), (2, 1, 0)]:
        p_q, p_kv = torch.randn(2, 1, 3, heads, dim), torch.randn(2, 1, 3, kv_heads, dim)
        a_q, a_kv = torch.randn(1, 2, heads, dim), torch.randn(1, 2, kv_heads, dim)
        with pytest.raises(ValueError, match="bitune_attention: head dim and head counts must be positive"):
            ops.bitune_attention(p_q, p_kv, p_kv, a_q, a_kv, a_kv, torch.tensor(0.5), torch.tensor(0.5), lens,
                                 lens, scale=0.5)


def compiled_matches_eager(module, compiled, batches, tolerance=(1e-5, 1e-5)):
    """Run `compiled` forward and backward on each (ids, mask) and compare output and every gradient with
    the eager `module` (rtol, atol = `tolerance`)."""
    for ids, mask in batches:
        module.zero_grad()
        out = compiled(ids, mask)
        out.logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad()
        ref = module(ids, mask)
        ref.logsumexp(-1).sum().backward()
        torch.testing.assert_close(out, ref, rtol=tolerance[0], atol=tolerance[1])
        assert grads.keys() == {n for n, p in module.named_parameters() if p.grad is not None} and grads
        for name, p in module.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[name], p.grad, rtol=tolerance[0], atol=tolerance[1] / 10, msg=name)


def length_changing_batches(vocab: int):
    """Two sequence lengths, each without and with a left-padding mask: under dynamic=None the second
    length recompiles with dynamic shapes, where a shape test passed to SDPA as `is_causal` was a SymBool."""
    gen = torch.Generator().manual_seed(0)
    for length in (9, 13):
        ids = torch.randint(0, vocab, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        yield ids, None
        yield ids, mask


@pytest.mark.parametrize("dynamic, frozen, dtype", [(None, False, torch.float32), (True, True, torch.float32),
                                                    (True, True, torch.float64)],
                         ids=["dynamic=None", "dynamic=True-train_only", "dynamic=True-train_only-float64"])
def test_model_compiles_without_graph_breaks(make_model, dynamic, frozen, dtype):
    """torch.compile(fullgraph=True) traces the whole model, forward and backward, through the custom ops,
    at changing sequence lengths, with and without masks: a plain model under the default dynamic=None
    (the second length recompiles with dynamic shapes), and under dynamic=True one with kpro.train_only's
    frozen-block runners on 3 blocks, training block 1: block 0 runs without a graph and block 2 is recomputed
    (recompute_frozen), in fp32 and float64, with the gradients of the eager model. With 2 blocks no block
    was recomputed, and a recomputed one failed to trace (it swapped the forced backends and called
    torch.autograd.grad in its backward)."""
    model = make_model(dtype=dtype, num_hidden_layers=3 if frozen else 2)
    if frozen:
        kpro.train_only(model, [1], recompute_frozen=True)
        assert [runner.__name__ for runner in model.block_runners] == ["run_without_graph_or_recomputed", "run_block",
                                                                       "run_recomputed"]
    torch._dynamo.reset()
    compiled_matches_eager(model, torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic),
                           length_changing_batches(model.config.vocab_size))
    assert all(p.grad is None for p in model.layers[0].parameters()) == frozen
    assert all(p.grad is None for p in model.layers[-1].parameters()) == frozen


def test_bitune_attention_compiles_at_changing_lengths():
    """The Bitune dual-pass op under fullgraph torch.compile with dynamic=True, forward and backward (the
    mixing weights' gradients included), at two prompt and answer lengths (GQA's head test was a SymBool)."""
    def call(*args):
        return ops.bitune_attention(*args)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager", dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for tp, ta in ((7, 5), (11, 9)):
        shapes = [(2, 2, tp, 4, 16), (2, 2, tp, 2, 16), (2, 2, tp, 2, 16),
                  (2, ta, 4, 16), (2, ta, 2, 16), (2, ta, 2, 16)]
        leaves = [torch.randn(*s, generator=gen) for s in shapes] + [torch.tensor(0.3), torch.tensor(0.7)]
        lens = (torch.tensor([tp, tp - 3]), torch.tensor([ta, 2]))
        results = []
        for fn in (compiled, call):
            args = [t.clone().requires_grad_() for t in leaves]
            o_p, o_a = fn(*args, *lens)
            (o_p.square().sum() + o_a.square().sum()).backward()
            results.append([o_p, o_a] + [t.grad for t in args])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
    """Inductor, fullgraph, on the GPU: every backend traces and matches eager, output and every parameter's
    gradient, at changing lengths with and without masks (CUDA has no attention yet)."""
    model = make_model(dtype=torch.float32).cuda()
    batches = [(ids.cuda(), None if mask is None else mask.cuda())
               for ids, mask in length_changing_batches(model.config.vocab_size)]
    torch._dynamo.reset()
    with ops.backend(name, attention="torch" if name == "cuda" else name):
        compiled_matches_eager(model, torch.compile(model, fullgraph=True), batches, tolerance=(1e-4, 1e-4))


def test_bitune_compiles_at_changing_lengths():
    """torch.compile(kpro.Bitune(...), fullgraph=True), called with the batch split into its streams, and a
    compiled `Bitune.loss`, at two lengths, forward and backward (adapters and mixing weights; dynamic=None:
    the second length recompiles with dynamic shapes). Ids with lengths cannot be traced (the streams'
    shapes are the lengths' values): the compiled call says how to split them first."""
    from kpro.bitune import Bitune, split_streams
    from conftest import tiny_config

    torch.manual_seed(0)
    bitune = Bitune(kpro.Llama(tiny_config(num_hidden_layers=1)))
    with torch.no_grad():
        for name, p in bitune.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the adapters' gradients reach A too

    torch._dynamo.reset()
    compiled = torch.compile(bitune, fullgraph=True, backend="aot_eager")
    compiled_loss = torch.compile(bitune.loss, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    for length, prompt_lens in ((9, [3, 4]), (13, [6, 2])):
        ids = torch.randint(0, 67, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        streams = split_streams(ids, torch.tensor(prompt_lens), mask)
        for got_fn, eager_fn in ((compiled, lambda s: bitune(ids, torch.tensor(prompt_lens), mask)),
                                 (compiled_loss, bitune.loss)):
            results = []
            for fn in (got_fn, eager_fn):
                bitune.zero_grad()
                out = fn(streams)
                (out.logsumexp(-1).sum() if out.dim() else out).backward()
                results.append((out, {n: p.grad.clone() for n, p in bitune.named_parameters() if p.grad is not None}))
            (out, grads), (ref, ref_grads) = results
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert grads.keys() == ref_grads.keys() and {"w_k", "w_v"} <= grads.keys()
            for name in grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    empty = split_streams(ids, torch.tensor(prompt_lens), mask)
    empty.answer_lens[1] = 1  # no answer token to predict: the compiled loss's check is an async assert
    with pytest.raises(RuntimeError, match="every row of the Streams needs an answer token to predict"):
        compiled_loss(empty)
    with pytest.raises(Exception, match="split the batch before the compiled call"):
        compiled(ids, torch.tensor(prompt_lens), mask)


def _one_call_of_each_op(q):
    """Each op as a function of one tensor q [1, 3, 2, 8] (the others fixed), to a scalar."""
    gen = torch.Generator().manual_seed(0)
    w, head, labels = torch.randn(8, generator=gen), torch.randn(11, 8, generator=gen), torch.tensor([1, 4, 9])
    kv = torch.randn(2, 1, 3, 2, 8, generator=gen)
    return {
        "rms_norm": lambda t: ops.rms_norm(t, w).sum(),
        "swiglu": lambda t: ops.swiglu(t, q).sum(),
        "swiglu_packed": lambda t: ops.swiglu_packed(t).sum(),
        "attention": lambda t: ops.attention(t, q, q).sum(),
        "bitune_attention": lambda t: ops.bitune_attention(
            kv, kv, kv, t, q, q, torch.tensor(0.5), torch.tensor(0.5), torch.tensor([3]), torch.tensor([3]))[1].sum(),
        "linear_cross_entropy": lambda t: ops.linear_cross_entropy(t[0, :, 0], head, labels),
    }


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_function_transforms_and_forward_mode_ad_are_refused_by_name(name):
    """torch.func's grad/vjp raised a message about autograd.Function's setup_context, and forward-mode AD
    (torch.func.jvp, torch.autograd.forward_ad) returned a zero or missing tangent: the custom ops have a
    reverse-mode backward only. Each is refused naming the op; torch.vmap still runs them. (The torch backend
    of the two attention ops is plain PyTorch, where torch.func is PyTorch's own business.)"""
    import torch.autograd.forward_ad as forward_ad

    q = torch.randn(1, 3, 2, 8)
    with ops.backend(name):
        for op, fn in _one_call_of_each_op(q).items():
            if name == "torch" and op in ("attention", "bitune_attention"):  # docs/ops.md: these run, exactly
                leaf = q.clone().requires_grad_()
                expected, = torch.autograd.grad(fn(leaf), leaf)
                assert torch.equal(torch.func.grad(fn)(q), expected), op
                continue
            for transform in (lambda: torch.func.grad(fn)(q), lambda: torch.func.vjp(fn, q),
                              lambda: torch.func.jvp(fn, (q,), (torch.ones_like(q),))):
                with pytest.raises(BackendError, match=f"^{op}: torch.func.grad"):
                    transform()
            with forward_ad.dual_level(), pytest.raises(BackendError, match=f"^{op}: forward-mode AD"):
                fn(forward_ad.make_dual(q, torch.ones_like(q)))
        with forward_ad.dual_level():  # a dual level without dual inputs is no concern of the ops
            assert torch.allclose(ops.rms_norm(q, torch.ones(8)), ops.rms_norm(q, torch.ones(8)))
        batched = torch.vmap(lambda t: ops.rms_norm(t, torch.ones(8)))(q)
        assert torch.allclose(batched, ops.rms_norm(q, torch.ones(8)), atol=1e-6)


EAGER_FUNCTIONS = {"rms_norm": ["RmsNormFunction"], "swiglu": ["SwiGLUFunction", "SwiGLUPackedFunction"],
                   "attention": ["AttentionFunction"], "bitune_attention": ["BituneAttentionFunction"],
                   "linear_cross_entropy": ["LinearCrossEntropyFunction", "GradientsInForwardFunction"]}


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_calls_that_record_no_graph_skip_the_autograd_function(name, monkeypatch):
    """Where no graph is recorded (grad mode off, or no input requiring grad: generation, evaluation), the eager
    path calls the kernel functions directly instead of its autograd.Function (whose apply alone costs ~10 us):
    the same values, bit for bit. Where one is, the Function runs. The Triton cross-entropy is the exception
    (docs/ops.md): a call that records a graph computes its gradients in the forward, from cuBLAS logits, and
    one that does not computes tiles of logits on chip, so their losses agree to fp32 rounding, not bit for
    bit (q was unseeded: this test failed on a third of the random inputs that reached it)."""
    from test_ops_rms_norm import bits

    applied = []
    for module, classes in EAGER_FUNCTIONS.items():
        for cls in (getattr(importlib.import_module(f"kpro.ops.{module}"), c) for c in classes):
            monkeypatch.setattr(cls, "apply", lambda *args, real=cls.apply, cls=cls: applied.append(cls) or real(*args))
    q = torch.randn(1, 3, 2, 8, generator=torch.Generator().manual_seed(25))  # a seed whose two Triton losses differ
    with ops.backend(name):
        for op, fn in _one_call_of_each_op(q).items():
            if name == "torch" and op in ("attention", "bitune_attention"):
                continue  # plain PyTorch: no Function either way
            applied.clear()
            recorded = fn(q.clone().requires_grad_())
            assert len(applied) == 1 and recorded.requires_grad, op
            with torch.no_grad():
                without_grad_mode = fn(q.clone().requires_grad_())
            no_input_needs_grad = fn(q.clone())
            assert len(applied) == 1 and not without_grad_mode.requires_grad, op
            assert torch.equal(bits(without_grad_mode), bits(no_input_needs_grad)), op
            if name == "triton" and op == "linear_cross_entropy":
                torch.testing.assert_close(recorded.detach(), without_grad_mode, rtol=1e-6, atol=0)
            else:
                assert torch.equal(bits(recorded), bits(without_grad_mode)), op


def test_eager_fast_path_only_for_plain_tensors_in_plain_eager_mode():
    """The ops skip their custom ops' dispatch only where nothing traces, transforms or intercepts them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.overrides import TorchFunctionMode
    from kpro.ops.backend import eager_fast_path

    x, p = torch.randn(2, 4), torch.nn.Parameter(torch.randn(4))
    assert eager_fast_path(x, p, None)
    assert not eager_fast_path(x, torch.empty(4, device="meta"))
    with FakeTensorMode() as mode:
        assert not eager_fast_path(x)
        fake = mode.from_tensor(x)
    assert not eager_fast_path(fake, p)
    seen = []
    make_fx(lambda t: seen.append(eager_fast_path(t)) or t + 1)(x)
    torch.vmap(lambda t: seen.append(eager_fast_path(t)) or t)(x)
    with TorchFunctionMode():
        seen.append(eager_fast_path(x))
    assert seen == [False, False, False]
    assert torch.equal(torch.compile(lambda t: t + eager_fast_path(t), backend="eager", fullgraph=True)(x), x)


def test_under_compile_the_environment_is_read_when_traced_and_a_backend_block_is_guarded(monkeypatch):
    """What docs/ops.md says: a change of KPRO_BACKEND after the first compile is not seen, even by a fresh
    torch.compile of the same function, but a compiled function called in another backend() block recompiles."""
    monkeypatch.delenv("KPRO_BACKEND", raising=False)
    w = torch.randn(8)
    cpu_refused = "the CUDA kernels need CUDA tensors"

    def norm(t, weight):
        return ops.rms_norm(t, weight)

    torch._dynamo.reset()
    try:
        expected = ops.rms_norm(x, w)
        compiled = torch.compile(norm, backend="eager")
        assert torch.equal(compiled(x, w), expected)
        monkeypatch.setenv("KPRO_BACKEND", "cuda")
        with pytest.raises(BackendError, match=cpu_refused):
            ops.rms_norm(x, w)  # eager: read per call
        for again in (compiled, torch.compile(norm, backend="eager")):  # traced with the environment unset
            assert torch.equal(again(x, w), expected)
        torch._dynamo.reset()
        with pytest.raises(BackendError, match=cpu_refused):
            torch.compile(norm, backend="eager")(x, w)  # traced again: read now
        monkeypatch.delenv("KPRO_BACKEND")
        torch._dynamo.reset()
        compiled = torch.compile(norm, backend="eager")
        assert torch.equal(compiled(x, w), expected)
        with ops.backend("cuda"), pytest.raises(BackendError, match=cpu_refused):
            compiled(x, w)  # recompiled
    finally:
        torch._dynamo.reset()


def _second_derivative_cases(device):
    """op name -> (inputs requiring grad, the op's scalar of them): each op as a first derivative would use it."""
    gen = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(device).requires_grad_()
    labels = torch.tensor([1, 4, 0, 2, 3]).to(device)
    lens = torch.tensor([3, 2]).to(device), torch.tensor([4, 1]).to(device)
    return {
        "rms_norm": ((leaf(3, 8), leaf(8)), lambda x, w: ops.rms_norm(x, w)),
        "swiglu": ((leaf(3, 8), leaf(3, 8)), lambda g, u: ops.swiglu(g, u)),
        "swiglu_packed": ((leaf(3, 8),), lambda gu: ops.swiglu_packed(gu)),
        "linear_cross_entropy": ((leaf(5, 8), leaf(6, 8)), lambda h, w: ops.linear_cross_entropy(h, w, labels)),
        "attention": ((leaf(1, 5, 2, 8), leaf(1, 5, 2, 8), leaf(1, 5, 2, 8)), lambda q, k, v: ops.attention(q, k, v)),
        "bitune_attention": ((leaf(2, 2, 3, 2, 8), leaf(2, 2, 3, 2, 8), leaf(2, 2, 3, 2, 8), leaf(2, 4, 2, 8),
                              leaf(2, 4, 2, 8), leaf(2, 4, 2, 8)),
                             lambda *s: torch.cat([o.flatten() for o in ops.bitune_attention(
                                 *s, torch.tensor(0.3, device=device), torch.tensor(0.6, device=device), *lens)])),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "swiglu_packed", "linear_cross_entropy", "attention",
                                "bitune_attention"])
def test_a_second_derivative_through_an_op_raises_whichever_input_it_asks_for(backend, op):
    """The eager path's error node hung on fresh leaves: a second derivative asked only of the op's inputs
    (autograd.grad(dx.sum(), w), a Hessian-vector product, a gradient penalty) never visited it, and the op's
    term came back as zeros or None, silently. It must raise, as the custom ops' backward does (the
    cross-entropy's gradients-in-forward path at the create_graph backward itself)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs, call = _second_derivative_cases(device)[op]
    with ops.backend(backend), \
            pytest.raises(RuntimeError, match="no double backward|no autograd formula|not implemented"):
        first = torch.autograd.grad(call(*inputs).pow(2).sum(), inputs[0], create_graph=True)[0]
        torch.autograd.grad(first.sum(), inputs[-1], allow_unused=True)
    if op == "rms_norm":
        x, w = inputs
        with ops.backend(backend), pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.functional.hvp(lambda a: ops.rms_norm(a, w).pow(2).sum(), x.detach(), torch.ones_like(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "swiglu_packed", "linear_cross_entropy", "attention",
                                "bitune_attention"])
def test_a_second_derivative_from_a_plain_loss_raises(backend, op):
    """The common case: the op's output summed as it is, so the incoming gradient does not require grad, and
    the second derivative asked of a scale applied before the op (a gradient penalty's). The cross-entropy,
    whose gradients come from its forward, kept nothing linked to its inputs and left its term out silently."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs, call = _second_derivative_cases(device)[op]
    scale = torch.tensor(1.3, device=device, requires_grad=True)
    # (the attention ops' torch backend is SDPA, whose backward has no derivative: its own error)
    with ops.backend(backend), \
            pytest.raises(RuntimeError, match="no double backward|no autograd formula|is not implemented"):
        first = torch.autograd.grad(call(inputs[0] * scale, *inputs[1:]).sum(), inputs[0], create_graph=True)[0]
        torch.autograd.grad(first.pow(2).sum(), scale, allow_unused=True)


def test_a_dtype_error_under_autocast_says_what_autocast_cast():
    """Under autocast the ops' dtype checks see the inputs after its cast: fp32 beside fp64 was reported as bfloat16
    beside float64, a dtype the caller never passed. The message now says what autocast did, and only under it."""
    r = lambda *shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype)
    calls = {
        "attention": lambda: ops.attention(r(1, 3, 2, 4), r(1, 3, 2, 4, dtype=torch.float64),
                                           r(1, 3, 2, 4, dtype=torch.float64)),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(r(3, 4), r(5, 4, dtype=torch.float64),
                                                                 torch.tensor([0, 1, 2])),
        "bitune_attention": lambda: ops.bitune_attention(
            r(2, 1, 3, 2, 4), r(2, 1, 3, 2, 4), r(2, 1, 3, 2, 4), r(1, 2, 2, 4), r(1, 2, 2, 4, dtype=torch.float64),
            r(1, 2, 2, 4), torch.tensor(0.5), torch.tensor(0.5), torch.tensor([3]), torch.tensor([2])),
    }
    note = "(autocast cast the float32 and half-precision ones to torch.bfloat16; float64 ones stay)"
    for op, call in calls.items():
        with ops.backend("torch"):
            with pytest.raises(ValueError, match=f"^{op}: .*float32.*float64") as plain:
                call()
            assert "autocast" not in str(plain.value)
            with torch.autocast("cpu", torch.bfloat16), pytest.raises(ValueError, match=f"^{op}: ") as cast:
                call()
        assert str(cast.value).endswith(note), (op, str(cast.value))


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated", "ignore::torch.jit.TracerWarning")
def test_torch_jit_trace_records_the_custom_op(name):
    """Under torch.jit.trace the eager fast path is off: the trace holds kpro's op (without the check, the torch
    backend's trace silently held aten ops, and the Triton launcher failed on traced sizes)."""
    gen = torch.Generator().manual_seed(0)
    x, x2, w = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen)
    with ops.backend(name):
        traced = torch.jit.trace(lambda a, b: ops.rms_norm(a, b), (x, w), check_trace=False)
        expected = ops.rms_norm(x2, w)
    assert "kpro::rms_norm_forward" in str(traced.graph)
    torch.testing.assert_close(traced(x2, w), expected)
