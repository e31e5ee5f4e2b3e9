"""Cross-entropy fused with the output projection, on every backend, against F.cross_entropy of float64
logits: loss and both gradients, every reduction, ignored rows, tails, half precision, V = 256k with
logits of ±1e3, every path at logits of ±1e3 and ±1e4; the frozen head (no dW, no [V, d] buffer);
torch.compile; and every kpro loss that uses it, down to `fit` step for step against materialised logits."""
import contextlib
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import kpro
from kpro import ops
from kpro import train as kt
from conftest import CUDA, TOLERANCE, backend_devices, relative_error, tiny_config

lce = importlib.import_module("kpro.ops.linear_cross_entropy")  # the module (kpro.ops.linear_cross_entropy is the op)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(n, d, vocab, dtype, device, seed, *, scale=1.0, ignored=()):
    """hidden [n, d], weight [V, d] with logits of about `scale` in size, labels [n] with rows `ignored` -100."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64) * (scale / d ** 0.5)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[list(ignored)] = -100
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), labels.to(device)


def reference(hidden, weight, labels, reduction, dloss=None, ignore_index=-100):
    """F.cross_entropy of the float64 logits of the same (already rounded) inputs: loss, dhidden, dweight."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    loss = F.cross_entropy((h @ w.T).flatten(0, -2), labels.cpu().flatten(), reduction=reduction,
                           ignore_index=ignore_index)
    loss = loss.view(labels.shape) if reduction == "none" else loss
    loss.backward(None if dloss is None else dloss.cpu().double())
    return loss.detach(), h.grad, w.grad


def run(backend, hidden, weight, labels, reduction, dloss=None, weight_grad=True, ignore_index=-100):
    """The op on `backend`: (loss, dhidden, dweight) for fresh leaves of the given values."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(weight_grad)
    with ops.backend(backend):
        loss = ops.linear_cross_entropy(h, w, labels, reduction=reduction, ignore_index=ignore_index)
        loss.backward(dloss)
    return loss.detach(), h.grad, w.grad


def upstream(labels, reduction, device, seed=7):
    """The gradient flowing into the loss: random per row for "none", None (1) for a scalar."""
    if reduction != "none":
        return None
    return torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed)).to(device)


def check_against_float64(backend, hidden, weight, labels, reduction, tol=None):
    dloss = upstream(labels, reduction, hidden.device)
    loss, dh, dw = run(backend, hidden, weight, labels, reduction, dloss)
    loss_ref, dh_ref, dw_ref = reference(hidden, weight, labels, reduction, dloss)
    tol = TOLERANCE[hidden.dtype] if tol is None else tol
    assert loss.dtype == torch.float32 and dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert loss.shape == loss_ref.shape and dh.shape == hidden.shape and dw.shape == weight.shape
    errors = relative_error(loss, loss_ref), relative_error(dh, dh_ref), relative_error(dw, dw_ref)
    assert all(e <= tol for e in errors), errors  # NaN fails
    return errors


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, device, dtype, reduction):
    """Odd N, d and V (301: no multiple of any tile), a third of the rows ignored, some in one block."""
    ignored = [0, 5, 6, 7, 30] + list(range(12, 26))
    check_against_float64(backend, *inputs(37, 40, 301, dtype, device, seed=1, scale=8.0, ignored=ignored), reduction)


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_ignore_index_that_is_a_token_id_matches_float64(backend, device, reduction):
    """ignore_index=7, a valid token that labels hold in 9 of 29 rows (they are ignored, not scored), against
    F.cross_entropy(ignore_index=7): loss and gradients, on both paths (the gradients in the forward and the
    logits recomputed in the backward: a trainable head's per-row losses), trainable and frozen head. An op
    that dropped the argument for -100 scored those rows: its loss was 10% off, its gradients 56%."""
    hidden, weight, labels = inputs(29, 23, 51, torch.float32, device, seed=16, scale=6.0)
    ignored = [0, 3, 4, 5, 11, 12, 20, 27, 28]
    labels[labels == 7] = 8  # no other row is 7 by chance
    labels[ignored] = 7
    dloss = upstream(labels, reduction, device)
    loss_ref, dh_ref, dw_ref = reference(hidden, weight, labels, reduction, dloss, ignore_index=7)
    for trainable in (True, False):
        loss, dh, dw = run(backend, hidden, weight, labels, reduction, dloss, weight_grad=trainable, ignore_index=7)
        assert (dw is not None) == trainable
        errors = [relative_error(loss, loss_ref), relative_error(dh, dh_ref)]
        errors += [relative_error(dw, dw_ref)] if trainable else []
        assert all(e <= TOLERANCE[torch.float32] for e in errors), (trainable, errors)  # NaN fails
        assert dh[ignored].eq(0).all() and (reduction != "none" or loss[ignored].eq(0).all())


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy"))
@pytest.mark.parametrize("shape", [(1, 1, 5, 3), (2, 9, 24, 97), (1, 64, 16, 33)], ids=str)
def test_shapes_batch_one_and_leading_dimensions(backend, device, shape):
    """A single row and vocabulary of 3; [B, T, d] inputs with [B, T] labels; d = one tile."""
    b, t, d, vocab = shape
    hidden, weight, labels = inputs(b * t, d, vocab, torch.float32, device, seed=sum(shape), scale=4.0)
    hidden, labels = hidden.view(b, t, d), labels.view(b, t)
    for reduction in ("none", "mean"):
        check_against_float64(backend, hidden, weight, labels, reduction)


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy"))
def test_many_chunks_and_slices_with_a_chunk_of_ignored_rows(backend, device, monkeypatch):
    """Chunks of 8 rows (torch; Triton's gradients in the forward) and vocabulary slices of 64 columns (Triton
    backward), where rows 16-39 (three chunks, more than a tile of rows) are all ignored."""
    from kpro.ops.triton_kernels import linear_cross_entropy as triton_lce
    hidden, weight, labels = inputs(50, 24, 300, torch.float32, device, seed=3, scale=6.0, ignored=range(16, 40))
    monkeypatch.setattr(lce, "CHUNK_BYTES", 8 * 300 * 4)
    monkeypatch.setattr(triton_lce, "SLICE_BYTES", 26 * 64 * 4)  # 26 scored rows
    monkeypatch.setattr(triton_lce, "GRADIENT_CHUNK_BYTES", 8 * 300 * (4 + 4))
    assert lce.chunk_rows(300, torch.float32) == 8 and triton_lce.slice_columns(26, 300, torch.float32, 32) == 64
    assert triton_lce.gradient_chunk_rows(300, torch.float32) == 8
    assert triton_lce.softmax_grad_config(hidden.device)[0] < 300  # several blocks a row, and a tail
    for reduction in ("sum", "none"):
        check_against_float64(backend, hidden, weight, labels, reduction)
    for dtype in (torch.bfloat16, torch.float16):  # gradients in the forward (the slices' fp32 sum: the test below)
        check_against_float64(backend, hidden.to(dtype), weight.to(dtype), labels, "sum")


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy"))
def test_a_batch_with_every_row_ignored(backend, device):
    hidden, weight, labels = inputs(6, 16, 40, torch.float32, device, seed=4, ignored=range(6))
    loss, dh, dw = run(backend, hidden, weight, labels, "sum")
    assert loss.item() == 0.0 and torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    losses, _, _ = run(backend, hidden, weight, labels, "none", dloss=torch.ones(6, device=device))
    assert torch.equal(losses, torch.zeros(6, device=device))
    with pytest.raises(ValueError, match="mean over no tokens: every one of the 6 labels is ignore_index=-100"):
        run(backend, hidden, weight, labels, "mean")


def test_a_mean_over_an_empty_batch_says_it_holds_no_rows():
    """It said "every one of the 0 labels is ignore_index=-100" of a batch with no rows, where no label is ignored."""
    with pytest.raises(ValueError, match=r"a mean over no tokens: the batch holds no rows \(use reduction='sum'"):
        ops.linear_cross_entropy(torch.randn(0, 8), torch.randn(10, 8), torch.zeros(0, dtype=torch.long))


def test_large_vocabulary_and_large_logits_torch():
    """V = 256k with logits of magnitude ~1e3 (max over the vocabulary ~4e3): within twice the error of
    plain fp32 PyTorch (F.cross_entropy on fp32 logits), which already loses ~1e-4 to fp32 rounding of
    logits that large; bf16 inputs within the bf16 tolerance."""
    vocab = 256 * 1024
    hidden, weight, labels = inputs(6, 8, vocab, torch.float32, "cpu", seed=5, scale=1000.0, ignored=[2])
    logits = hidden @ weight.T
    assert 500 < logits.abs().mean() < 2000 and logits.abs().max() > 3000
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain_loss = F.cross_entropy(h @ w.T, labels, reduction="sum")
    plain_loss.backward()
    ref = reference(hidden, weight, labels, "sum")
    plain = [relative_error(a, b) for a, b in zip((plain_loss, h.grad, w.grad), ref)]
    errors = check_against_float64("torch", hidden, weight, labels, "sum", tol=1e-3)
    assert all(e <= max(2 * p, 1e-6) for e, p in zip(errors, plain)), (errors, plain)
    check_against_float64("torch", hidden.bfloat16(), weight.bfloat16(), labels, "mean")


def test_large_logits_triton_over_many_tiles():
    """The Triton kernels (interpreter on the CPU) over 63 vocabulary tiles and 2 splits with logits of ±1e3,
    fp32 and bf16 (whose logits stay fp32 on chip)."""
    device = "cuda" if CUDA else "cpu"
    hidden, weight, labels = inputs(20, 16, 2011, torch.float32, device, seed=6, scale=1000.0, ignored=[3])
    assert (hidden @ weight.T).abs().mean() > 500
    check_against_float64("triton", hidden, weight, labels, "sum", tol=1e-4)
    check_against_float64("triton", hidden.bfloat16(), weight.bfloat16(), labels, "none")


def offset_logits_inputs(offset, device):
    """hidden [23, 16] and weight [301, 16] whose logits are ±offset plus a few units, exactly in fp32 (the
    first column of hidden is 1 and the weight's holds ±offset; everything else is a multiple of 1/4 in
    [-1, 1], so every partial sum is a multiple of 1/16 below 2^15), so fp32 logits carry no rounding
    and what is left is the softmax's: a third of the vocabulary at -offset, the rest at +offset, where the
    softmax is far from one-hot; labels among the +offset tokens, rows 4 and 11 ignored."""
    gen = torch.Generator().manual_seed(int(offset))
    hidden = torch.randint(-4, 5, (23, 16), generator=gen).float() / 4
    weight = torch.randint(-4, 5, (301, 16), generator=gen).float() / 4
    hidden[:, 0] = 1.0
    weight[:, 0] = torch.where(torch.arange(301) % 3 == 0, -offset, offset)
    labels = 3 * torch.randint(0, 100, (23,), generator=gen) + 1  # +offset tokens
    labels[[4, 11]] = -100
    assert torch.equal(hidden.double() @ weight.double().T, (hidden @ weight.T).double())  # exact in fp32
    return hidden.to(device), weight.to(device), labels.to(device)


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy"))
@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["1e3", "1e4"])
@pytest.mark.parametrize("head", ["no-gradient", "frozen", "trainable"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_large_logits_every_path_within_twice_plain_fp32(backend, device, offset, head, reduction):
    """Every path of both backends at logits of ±1e3 and ±1e4: the forward alone (no gradient), the gradients
    in the forward (a frozen head, any reduction; a trainable head's sum and mean) and the logits recomputed
    in the backward (a trainable head's per-row losses). Loss, dH and dW against float64 within twice the
    error of plain fp32 PyTorch (F.cross_entropy of the same fp32 logits) on the same inputs. The
    log-sum-exp was rounded to fp32 at the logits' size before the target logit (loss) or each logit
    (softmax) was subtracted from it: an error up to half an ulp of 1e4 (5e-4) in every loss, and a softmax
    off by a common factor, which the head's ±1e4 column turned into a relative dH error of 1.1 on the
    Triton backend and the torch one's recomputing backward (plain fp32: 9e-4)."""
    hidden, weight, labels = offset_logits_inputs(offset, device)
    dloss = upstream(labels, reduction, device)
    h, w = hidden.clone().requires_grad_(head != "no-gradient"), weight.clone().requires_grad_(head == "trainable")
    plain = F.cross_entropy(h @ w.T, labels, reduction=reduction)
    with ops.backend(backend):
        loss = ops.linear_cross_entropy(h, w, labels, reduction=reduction)
    ref = reference(hidden, weight, labels, reduction, dloss)
    pairs = [(loss, plain, ref[0])]
    if head != "no-gradient":
        grads = torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad], dloss)
        plain_grads = torch.autograd.grad(plain, [t for t in (h, w) if t.requires_grad], dloss)
        pairs += list(zip(grads, plain_grads, ref[1:]))
    errors = [(relative_error(got, want), relative_error(fp32, want)) for got, fp32, want in pairs]
    assert all(e <= 2 * max(p, 1e-7) for e, p in errors), errors  # (kpro, plain fp32) for loss, dH, dW; NaN fails


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_gradients_in_the_forward_at_gpu_sizes(monkeypatch, dtype):
    """On a GPU the Triton backend's gradients in the forward take cuBLAS matmuls with fp32 output of half
    inputs (torch.mm and torch.addmm with out_dtype): a frozen head's mean and a trainable head's sum, over
    four chunks of rows with a sixth of them ignored, against float64."""
    from kpro.ops.triton_kernels import linear_cross_entropy as triton_lce
    hidden, weight, labels = inputs(1000, 1024, 32000, dtype, "cuda", seed=24, scale=8.0,
                                    ignored=range(0, 1000, 6))
    monkeypatch.setattr(triton_lce, "GRADIENT_CHUNK_BYTES", 250 * 32000 * 6)
    for reduction, trainable in (("mean", False), ("sum", True)):
        loss, dh, dw = run("triton", hidden, weight, labels, reduction, weight_grad=trainable)
        loss_ref, dh_ref, dw_ref = reference(hidden, weight, labels, reduction)
        assert relative_error(loss, loss_ref) <= 1e-5 and relative_error(dh, dh_ref) <= TOLERANCE[dtype]
        assert dw is None if not trainable else relative_error(dw, dw_ref) <= TOLERANCE[dtype]


def allocations(fn) -> list[int]:
    """The size in bytes of every CPU allocation torch makes while `fn` runs (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
def test_frozen_head_computes_no_weight_gradient(backend, device, monkeypatch):
    """A frozen weight gets no gradient, the kernels are told not to compute one (in the backward, or in the
    forward where the backend computes the gradients there), and neither pass allocates anything of the
    weight's size (each chunk of logits, [rows < d, V], is smaller); with a trainable weight the same
    measurement sees the [V, d] gradient, so it would see a dW computed for a frozen one."""
    n, d, vocab = 40, 96, 700
    hidden, weight, labels = inputs(n, d, vocab, torch.float32, device, seed=8, ignored=[1, 2])
    weight_bytes = vocab * d * 4
    flags = []
    kernels = lce._kernels(backend)
    for name in ("backward", "forward_with_grads"):  # each takes weight_grad last
        real = getattr(kernels, name, None)
        if real is not None:
            monkeypatch.setattr(kernels, name, lambda *a, real=real: flags.append(a[-1]) or real(*a))
    largest, grads = {}, {}
    for trainable in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        with ops.backend(backend):
            largest[trainable] = max(allocations(lambda: ops.linear_cross_entropy(h, w, labels).backward()))
        grads[trainable] = h.grad, w.grad
    assert flags == [True, False]
    assert grads[False][1] is None and torch.equal(grads[False][0], grads[True][0])
    assert largest[True] >= weight_bytes > 2 * largest[False]


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
def test_gradient_for_the_weight_only(backend, device):
    hidden, weight, labels = inputs(9, 20, 50, torch.float32, device, seed=9, ignored=[4])
    _, _, dw_ref = reference(hidden, weight, labels, "mean")
    w = weight.clone().requires_grad_()
    with ops.backend(backend):
        ops.linear_cross_entropy(hidden, w, labels).backward()
    assert relative_error(w.grad, dw_ref) <= 1e-5


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_frozen_head_every_reduction_and_ignored_rows_with_any_dloss(backend, device, reduction):
    """A frozen head (dH computed in the forward, and the backward scales it by each row's dloss) against
    float64, odd sizes; per row, ignored rows get a zero gradient even where their incoming
    dloss is inf or NaN, as when they were never computed."""
    hidden, weight, labels = inputs(29, 23, 151, torch.float32, device, seed=21, scale=6.0, ignored=[0, 7, 8, 28])
    dloss = upstream(labels, reduction, device)
    if dloss is not None:
        dloss[[0, 7, 28]] = torch.tensor([float("inf"), float("nan"), -float("inf")], device=device)
    loss, dh, dw = run(backend, hidden, weight, labels, reduction, dloss, weight_grad=False)
    finite = None if dloss is None else dloss.nan_to_num(0.0, 0.0, 0.0)  # the reference's ignored rows: any dloss
    loss_ref, dh_ref, _ = reference(hidden, weight, labels, reduction, finite)
    assert dw is None and dh[[0, 7, 8, 28]].eq(0).all()
    assert relative_error(loss, loss_ref) <= 1e-6 and relative_error(dh, dh_ref) <= 1e-5


def matmuls(fn) -> int:
    """How many matrix products (aten::mm, aten::addmm and addmm_) `fn` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
@pytest.mark.parametrize("head, reduction, forward, backward", [
    ("frozen", "mean", 2, 0), ("frozen", "none", 2, 0), ("trainable", "sum", 3, 0), ("trainable", "none", 1, 3)])
def test_gradients_computed_in_the_forward_cost_one_matmul_less(monkeypatch, backend, device, head, reduction,
                                                               forward, backward):
    """Per chunk of rows (three: chunks cut to 8 rows): the logits, then dH (and dW with a trainable head)
    from the same logits in the forward, and a backward without any matmul. Only a trainable head's per-row
    losses (reduction="none") recompute the logits in the backward: on the torch backend one torch matmul
    in the forward and three in the backward; Triton computes its logits with tl.dot, so only its backward's
    two cuBLAS matmuls (dW, dH) a slice count there."""
    from kpro.ops.triton_kernels import linear_cross_entropy as triton_lce
    expected = (3 * forward, 3 * backward)
    if backend == "triton" and reduction == "none" and head == "trainable":
        expected = (0, 2)  # tl.dot logits; one vocabulary slice of the backward
    hidden, weight, labels = inputs(24, 16, 50, torch.float32, device, seed=22)
    monkeypatch.setattr(lce, "CHUNK_BYTES", 8 * 50 * 4)
    monkeypatch.setattr(triton_lce, "GRADIENT_CHUNK_BYTES", 8 * 50 * (4 + 4))
    h, w = hidden.requires_grad_(), weight.requires_grad_(head == "trainable")
    losses = []
    with ops.backend(backend):
        counts = (matmuls(lambda: losses.append(ops.linear_cross_entropy(h, w, labels, reduction=reduction).sum())),
                  matmuls(lambda: losses[0].backward()))
    assert counts == expected
    _, dh_ref, dw_ref = reference(hidden, weight, labels, "sum" if reduction == "none" else reduction)
    assert relative_error(h.grad, dh_ref) <= 1e-5
    assert w.grad is None if head == "frozen" else relative_error(w.grad, dw_ref) <= 1e-5


def test_gradients_in_the_forward_keep_neither_input_for_the_backward():
    """What the backward keeps: the [N, d] gradient (and the [V, d] one with a trainable head) and the labels,
    not hidden or the head: a frozen head is never held by the loss."""
    hidden, weight, labels = inputs(9, 12, 31, torch.float32, "cpu", seed=23, ignored=[2])
    for trainable, shapes in ((False, [(9, 12), (0,), (9,)]), (True, [(9, 12), (31, 12), (9,), ()])):
        saved = []
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ops.linear_cross_entropy(h, w, labels, reduction="none" if not trainable else "mean")
        assert [tuple(t.shape) for t in saved] == shapes  # and the mean's division its count
        assert not any(t.data_ptr() in (h.data_ptr(), w.data_ptr()) for t in saved if t.numel())


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_never_pass(backend, device):
    """Both paths: the logits recomputed in the backward (a trainable head's per-row losses) and the gradients
    computed in the forward (a frozen head's, a sum's)."""
    hidden, weight, labels = inputs(5, 16, 30, torch.float32, device, seed=10)
    hidden[1, 3] = float("nan")
    hidden[3, 0] = float("inf")
    for trainable in (True, False):
        losses, dh, _ = run(backend, hidden, weight, labels, "none", dloss=torch.ones(5, device=device),
                            weight_grad=trainable)
        assert losses[1].isnan() and not losses[3].isfinite() and losses[[0, 2, 4]].isfinite().all()
        assert dh[1].isnan().all() and dh[[0, 2, 4]].isfinite().all()
    total, dh, dw = run(backend, hidden, weight, labels, "sum")
    assert total.isnan() and dh[1].isnan().all() and dh[[0, 2, 4]].isfinite().all() and dw.isnan().any()


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
def test_a_label_outside_the_vocabulary_gives_nan_gradients_where_it_is_not_checked(backend, device, monkeypatch):
    """Where labels are not checked (a GPU's: no device read), a label >= V gave a NaN loss with a finite,
    wrong gradient (the clamped label's on the torch backend, the softmax alone on Triton's): a masked or
    nansum-ed loss trained on it. Both paths of both backends now give NaN gradients there."""
    monkeypatch.setattr(lce, "_check_args", lambda *args: None)  # as on a GPU
    hidden, weight, labels = inputs(5, 16, 30, torch.float32, device, seed=13)
    for bad in (30, -7):
        labels[2] = bad
        for trainable in (True, False):
            losses, dh, dw = run(backend, hidden, weight, labels, "none", dloss=torch.ones(5, device=device),
                                 weight_grad=trainable)
            assert losses[2].isnan() and losses[[0, 1, 3, 4]].isfinite().all()
            assert dh[2].isnan().all() and dh[[0, 1, 3, 4]].isfinite().all()
            assert not trainable or dw.isnan().any()
        total, dh, dw = run(backend, hidden, weight, labels, "sum", weight_grad=False)  # gradients in the forward
        assert total.isnan() and dh[2].isnan().all() and dh[[0, 1, 3, 4]].isfinite().all()


def test_labels_are_checked_as_the_kernels_read_them_and_under_compile():
    """uint8 labels were compared in uint8, where -100 is 156: a label 156 passed as ignored and was scored
    (a NaN loss). Under torch.compile the CPU label check and the mean's count were skipped: NaN, no error."""
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="label 156 is outside"):
        ops.linear_cross_entropy(h, w, torch.tensor([1, 2, 156, 3], dtype=torch.uint8))
    assert ops.linear_cross_entropy(h, w, torch.tensor([1, 2, 9, 3], dtype=torch.uint8)).isfinite()
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y), fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(h, w, torch.tensor([1, 2, -100, 3])),
                          ops.linear_cross_entropy(h, w, torch.tensor([1, 2, -100, 3])))
    with pytest.raises(RuntimeError, match="a label is outside"):
        compiled(h, w, torch.tensor([1, 2, 10, 3]))
    with pytest.raises(RuntimeError, match="a mean over no tokens"):
        compiled(h, w, torch.full((4,), -100))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fake_and_meta_tensors_take_the_checks_as_assertions(reduction):
    """The label check and the mean's count read values outside torch.compile only: under FakeTensorMode
    and make_fx(tracing_mode="fake") they failed with a data-dependent error, on meta tensors the mean failed
    in int(count). There they are assertions now, as under torch.compile, which a traced graph keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 3])
    shape = (4,) if reduction == "none" else ()
    with FakeTensorMode() as mode:
        fake = ops.linear_cross_entropy(*(mode.from_tensor(t) for t in (h, w, y)), reduction=reduction)
    meta = ops.linear_cross_entropy(*(t.to("meta") for t in (h, w, y)), reduction=reduction)
    assert fake.shape == meta.shape == shape and meta.is_meta and fake.dtype == meta.dtype == torch.float32
    graph = make_fx(lambda *args: ops.linear_cross_entropy(*args, reduction=reduction), tracing_mode="fake")(h, w, y)
    assert torch.equal(graph(h, w, y), ops.linear_cross_entropy(h, w, y, reduction=reduction))
    with pytest.raises(RuntimeError, match="a label is outside"):
        graph(h, w, torch.tensor([1, 2, 10, 3]))
    if reduction == "mean":
        with pytest.raises(RuntimeError, match="a mean over no tokens"):
            graph(h, w, torch.full((4,), -100))


def test_bad_arguments_are_refused():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 3])
    for args, message in [((h, torch.randn(10, 7), y), "weight must be"), ((h, w, y[:3]), "leading shape"),
                          ((torch.randn(4, 0), torch.randn(10, 0), y), r"weight must be \[V >= 1, d >= 1\]"),
                          ((h, w, y.float()), "integers"), ((h, w.double(), y), "one floating-point dtype"),
                          ((h, w, torch.tensor([1, 2, 10, 0])), "label 10 is outside"),
                          ((h, w, torch.tensor([1, -1, 0, 0])), "label -1 is outside"),
                          ((h, w, [1, 2, 3, 4]), "labels must be a tensor, got list")]:  # was an AttributeError
        with pytest.raises(ValueError, match=message):
            ops.linear_cross_entropy(*args)
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(h, w, y, reduction="avg")
    # -100.5 was truncated to -100 for the kernels while the mean counted the -100 labels as scored
    for ignore_index in (-100.5, torch.tensor(-100), True, None, 2**64):  # 2**64: an OverflowError of torch's
        with pytest.raises(ValueError, match="ignore_index must be an int"):
            ops.linear_cross_entropy(h, w, y, ignore_index=ignore_index)
    assert ops.linear_cross_entropy(h, w, torch.tensor([1, 7, 0, 0]), ignore_index=7).isfinite()


def test_autocast_casts_the_inputs_like_a_linear_layer():
    hidden, weight, labels = inputs(7, 32, 50, torch.float32, "cpu", seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(hidden, weight, labels)
    expected = ops.linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
    hidden, weight = hidden.double(), weight.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 matmuls alone: so does kpro
        loss = ops.linear_cross_entropy(hidden, weight, labels)
        assert torch.nn.functional.linear(hidden, weight).dtype == torch.float64
    assert loss.dtype == torch.float64 and torch.equal(loss, ops.linear_cross_entropy(hidden, weight, labels))


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:2])
def test_compiles_without_graph_breaks_and_opcheck(backend, device):
    hidden, weight, labels = inputs(12, 16, 45, torch.float32, device, seed=12, ignored=[0, 5])
    for args in ((hidden, weight, labels, -100, backend), (hidden.requires_grad_(), weight.requires_grad_(), labels, -100, backend)):
        torch.library.opcheck(torch.ops.kpro.linear_cross_entropy_forward.default, args)
    if backend == "torch":  # the gradients in the forward: per row with a frozen head, and a sum with both
        for flags in ((True, True, False), (False, True, True), (False, False, True)):
            h, w = hidden.detach().requires_grad_(flags[1]), weight.detach().requires_grad_(flags[2])
            torch.library.opcheck(torch.ops.kpro.linear_cross_entropy_with_grads.default,
                                  (h, w, labels, -100, backend, *flags))

    def loss_fn(h, w, y):
        with ops.backend(backend):
            return ops.linear_cross_entropy(h, w, y, reduction="sum")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss_fn):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- eager path (autograd.Function) vs custom ops

def graph_names(t: torch.Tensor) -> set[str]:
    """The names of every autograd node behind `t`."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_eager_calls_skip_the_custom_ops_and_tracing_takes_them(monkeypatch):
    """Eager calls run the kernels through autograd.Functions, not the custom ops; torch.compile traces the
    registered ops. Both paths of the torch backend: gradients computed in the forward (a sum) and the
    logits recomputed in the backward (a trainable head's per-row losses). The ops are wrapped to count their
    calls after the compiled call: traced through a wrapper, the compile failed where no earlier test of the
    process had compiled the op (this test alone)."""
    hidden, weight, labels = inputs(12, 16, 45, torch.float32, "cpu", seed=13, ignored=[2])
    hidden.requires_grad_(), weight.requires_grad_()
    paths = {"sum": ("linear_cross_entropy_with_grads", "linear_cross_entropy_scale_grads",
                     "GradientsInForwardFunction"),
             "none": ("linear_cross_entropy_forward", "linear_cross_entropy_backward", "LinearCrossEntropyFunction")}
    for reduction, (forward_op, backward_op, function) in paths.items():
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        compiled = torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y, reduction=reduction),
                                 backend=record, fullgraph=True)
        eager = ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        assert torch.equal(compiled(hidden, weight, labels), eager)
        assert f"kpro.{forward_op}" in graphs[0].code and function not in graphs[0].code
        calls = []
        with monkeypatch.context() as patch:
            for name in (forward_op, backward_op):
                real = getattr(torch.ops.kpro, name)
                patch.setattr(torch.ops.kpro, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
            loss = ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction).sum()
            loss.backward()
            assert calls == [] and f"{function}Backward" in graph_names(loss)
            assert hidden.grad.isfinite().all() and weight.grad.abs().sum() > 0
            patch.setattr(lce, "eager_fast_path", lambda *tensors: False)
            ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction).sum().backward()
        assert calls == [forward_op, backward_op]


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[:3])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_eager_path_is_bit_identical_to_the_custom_ops(backend, device, monkeypatch):
    """The loss per row and summed, dH and dW (dH alone for a frozen head), ignored rows and a NaN row included,
    and the tensors saved for the backward: bit for bit the custom ops', on odd sizes."""
    from test_ops_rms_norm import bits

    hidden, weight, labels = inputs(11, 19, 37, torch.float32, device, seed=14, ignored=[3, 8])
    hidden[5, 2] = float("nan")
    dloss = upstream(labels, "none", device)
    runs = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(lce, "eager_fast_path", lambda *tensors: False)
        saved, results = [], []
        for reduction, train_head in (("none", True), ("sum", False), ("mean", True), ("none", False)):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
            with ops.backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                                   lambda t: t):
                loss = ops.linear_cross_entropy(h, w, labels, reduction=reduction)
            functions = {"LinearCrossEntropyFunctionBackward", "GradientsInForwardFunctionBackward"}
            assert bool(functions & graph_names(loss)) == eager
            loss.backward(dloss if reduction == "none" else None)
            results += [loss, h.grad] + ([w.grad] if train_head else [])
        runs.append((results, saved))
    (fast, fast_saved), (op, op_saved) = runs
    assert fast[0][5].isnan() and fast[0][[3, 8]].eq(0).all() and fast[1].isfinite()[[0, 1, 2, 4]].all()
    assert len(fast) == len(op) and all(torch.equal(bits(a), bits(b)) for a, b in zip(fast, op))
    assert [(t.shape, t.dtype) for t in fast_saved] == [(t.shape, t.dtype) for t in op_saved]
    assert all(torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)
               for a, b in zip(fast_saved, op_saved))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises_on_both_paths(monkeypatch, reduction):
    """No double backward, on the eager path and the custom ops'. Where the gradients come from the forward
    (a loss, or a frozen head's per-row losses) the create_graph backward itself is refused: those gradients
    are linked to nothing, so a second derivative would leave the loss's term out. Where the backward
    recomputes (a trainable head's per-row losses) it gives a gradient whose own backward raises."""
    hidden, weight, labels = inputs(6, 8, 13, torch.float64, "cpu", seed=15, ignored=[1])
    for eager, head_trains in itertools.product((True, False), (True, False)):
        if not eager:
            monkeypatch.setattr(lce, "eager_fast_path", lambda *tensors: False)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(head_trains)
        with pytest.raises(RuntimeError, match="no double backward|no autograd formula"):
            (dh,) = torch.autograd.grad(ops.linear_cross_entropy(h, w, labels, reduction=reduction).sum(), h,
                                        create_graph=True)
            dh.sum().backward()
        assert torch.autograd.gradcheck(lambda a, b: ops.linear_cross_entropy(a, b, labels, reduction=reduction),
                                        (h, w))


# ----------------------------------------------------------------------------- the losses that use it

def materialised_lm_loss(model, batch):
    """fit's default loss as it was: the logits, in fp32, through F.cross_entropy."""
    logits = model(batch["input_ids"], batch.get("attention_mask"))
    return kt.LossSum(kt.causal_lm_loss(logits, batch["labels"], reduction="sum"), kt.count_loss_tokens(batch["labels"]))


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return kpro.Llama(tiny_config(**overrides))


def prompt_answer_batches(seed=3):
    gen = torch.Generator().manual_seed(seed)
    pairs = [([1] + torch.randint(3, 67, (int(n),), generator=gen).tolist(), torch.randint(3, 67, (3,), generator=gen).tolist() + [2])
             for n in torch.randint(1, 7, (24,), generator=gen)]
    return kt.Batches(pairs, 6, lambda ex: kt.collate_prompt_answer(ex, pad_id=0), seed=seed)


@contextlib.contextmanager
def no_logits(model):
    """Make any call of the output head an error: the loss must never compute logits. Not a hook on the head,
    which makes it more than its weight, so that the losses make the logits through it."""
    head, forward = model.lm_head, torch.nn.Linear.forward

    def refuse(module, x):
        if module is head:
            raise AssertionError("lm_head was called: the logits were materialised")
        return forward(module, x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Linear, "forward", refuse)
        yield


@pytest.mark.parametrize("tied", [False, True])
def test_fit_with_the_fused_loss_equals_fit_with_materialised_logits(tmp_path, tied):
    """fit's default loss never calls the head, and trains step for step as the logits path does."""
    runs = {}
    for name, loss_fn in (("fused", kt.lm_loss), ("materialised", materialised_lm_loss)):
        model = make_model(tie_word_embeddings=tied)
        # SGD: Adam's g/sqrt(v) would blow the rounding noise of near-zero gradients up
        with no_logits(model) if name == "fused" else contextlib.nullcontext():
            run = kt.fit(model, prompt_answer_batches(), tmp_path / name, steps=4, loss_fn=loss_fn,
                         clip_grad_norm=None, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
        runs[name] = [m["loss"] for m in kt.read_metrics(run.out_dir / "metrics.jsonl")], model.state_dict()
    (fused, fused_state), (materialised, materialised_state) = runs["fused"], runs["materialised"]
    assert fused == pytest.approx(materialised, rel=1e-6) and len(fused) == 4
    for name, tensor in materialised_state.items():
        torch.testing.assert_close(fused_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_the_frozen_head_of_an_expanded_model_gets_no_weight_gradient(tmp_path, monkeypatch):
    """train_only freezes the head: fit's loss asks the kernel for dH only."""
    model = make_model(num_hidden_layers=2)
    new = kpro.expand(model, 1, position="top")
    kpro.train_only(model, new)
    flags = []
    for name in ("backward", "forward_with_grads"):  # each takes (hidden_grad, weight_grad) last
        real = getattr(lce.TORCH_KERNELS, name)
        monkeypatch.setattr(lce.TORCH_KERNELS, name, lambda *a, real=real, name=name: flags.append((name, *a[-2:]))
                            or real(*a))
    with no_logits(model):
        kt.fit(model, prompt_answer_batches(), tmp_path, steps=2, lr=1e-2)
    assert flags == [("forward_with_grads", True, False)] * 2 and model.lm_head.weight.grad is None


def test_bitune_losses_use_no_logits_and_equal_the_materialised_loss():
    from kpro.bitune import Bitune, bitune_loss
    from kpro.bitune.streams import answer_targets, split_streams
    torch.manual_seed(0)
    bt = Bitune(kpro.Llama(tiny_config()), rank=2, seed=0)
    batch = next(iter(prompt_answer_batches()))
    ids, plens, mask = batch["input_ids"], batch["prompt_lens"], batch["attention_mask"]
    logits = bt(ids, plens, mask)
    targets = answer_targets(split_streams(ids, plens, mask))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    with no_logits(bt.model):
        summed = bitune_loss(bt, batch)
        mean = bt.loss(ids, plens, mask)
    torch.testing.assert_close(summed.total, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, expected / int((targets != -100).sum()), rtol=1e-6, atol=0)


def test_internalization_model_loss_equals_the_loss_of_the_logits():
    from kpro.internalize import TrainingBatch
    model = make_model()
    ids = torch.randint(3, 67, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    batch = TrainingBatch(ids, mask, labels, torch.zeros(3), torch.zeros(3))
    expected = batch.loss(model(ids, mask))
    with no_logits(model):
        torch.testing.assert_close(batch.model_loss(model), expected, rtol=1e-6, atol=0)
    # a head that is more than its weight (a soft-capping hook) makes the logits, as the model's forward
    handle = model.lm_head.register_forward_hook(lambda module, args, out: 3 * torch.tanh(out / 3))
    torch.testing.assert_close(batch.model_loss(model), batch.loss(model(ids, mask)), rtol=1e-6, atol=0)
    handle.remove()


def test_lm_loss_finds_the_head_through_wrappers_and_falls_back_to_logits():
    from kpro import lora
    model = make_model()
    lora.add_adapters(model, ["causal"], rank=2, seed=0)
    adapted = lora.AdaptedModel(model, "causal")
    assert kt.loss.output_head_weight(adapted) is model.lm_head.weight
    assert kt.loss.output_head_weight(torch.compile(adapted)) is model.lm_head.weight
    ids = torch.randint(3, 67, (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    expected = materialised_lm_loss(adapted, batch)
    with no_logits(model):
        fused = kt.lm_loss(adapted, batch)
    torch.testing.assert_close(fused.total, expected.total, rtol=1e-6, atol=0)

    class Other(torch.nn.Module):  # not a kpro Llama: asked for its logits, as before
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask)

    assert kt.loss.output_head_weight(Other()) is None
    torch.testing.assert_close(kt.lm_loss(Other(), batch).total, materialised_lm_loss(model, batch).total)


@pytest.mark.parametrize("backend, device", backend_devices("linear_cross_entropy")[1:2])  # the Triton backward
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_dh_over_many_vocabulary_slices_is_summed_in_fp32(backend, device, dtype, monkeypatch):
    """The Triton backward (a trainable head, reduction="none") sums dH over vocabulary slices in fp32. 512 slices
    of 32 columns: dH's relative error is 2.8-3.0e-3 (bf16) and 3.4-3.6e-4 (fp16) summed in fp32, 3.1-3.7e-2 and
    5.6-6.2e-3 summed in the input dtype (seeds 5-7); half the suite's tolerance keeps fp16's wide of the latter."""
    from kpro.ops.triton_kernels import linear_cross_entropy as triton_lce
    hidden, weight, labels = inputs(16, 32, 16384, dtype, device, seed=5, scale=4.0)
    monkeypatch.setattr(triton_lce, "SLICE_BYTES", 16 * 32 * 2)
    assert triton_lce.slice_columns(16, 16384, dtype, 32) == 32  # 512 slices
    check_against_float64(backend, hidden, weight, labels, "none", tol=TOLERANCE[dtype] / 2)


def _float64_head_inputs():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    return hidden, weight, torch.tensor([1, 4, -100, 10, 0, 7]), gen


def test_a_trainable_head_over_frozen_hidden_states_gets_its_per_row_gradient():
    """reduction="none" with a trainable head and frozen hidden states: the losses record a graph and the head's
    gradient is F.cross_entropy's (a check of hidden's flag alone ran them without one: no gradient)."""
    hidden, weight, labels, gen = _float64_head_inputs()
    dloss = torch.randn(6, generator=gen, dtype=torch.float64)
    w = weight.clone().requires_grad_()
    losses = ops.linear_cross_entropy(hidden, w, labels, reduction="none")
    assert losses.requires_grad
    losses.backward(dloss)
    w_ref = weight.clone().requires_grad_()
    F.cross_entropy(hidden @ w_ref.T, labels, reduction="none").backward(dloss)
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "custom-op"])
def test_create_graph_through_a_trainable_head_alone_is_refused(eager, monkeypatch):
    """Frozen hidden states, a trainable head, a summed loss: the gradient computed in the forward has no graph,
    so create_graph is refused (a check of hidden's flag alone returned a second derivative missing the loss's
    term, silently)."""
    if not eager:
        monkeypatch.setattr(lce, "eager_fast_path", lambda *tensors: False)
    hidden, weight, labels, _ = _float64_head_inputs()
    w = weight.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hidden, w, labels, reduction="sum")
    with pytest.raises(ops.BackendError, match="no double backward"):
        torch.autograd.grad(loss, w, create_graph=True)
