"""Attention forward and forward+backward in TFLOP/s (only the work the mask allows counts), kpro's
backends against SDPA (each backend forced in turn; the first that runs the case correctly is the
baseline, and its name is recorded as `sdpa_backend`), FlexAttention (one
static-shape, full-graph compilation per shape, block masks) and flash-attn when installed; and the Bitune
dual pass against three FlexAttention calls plus an explicit mix, and against kpro's own plain attention
doing the same work in three calls. Every implementation is checked against a reference (fp32 on a GPU,
float64 on the CPU; output and, for forward+backward, every input gradient) before it is timed: SDPA for
attention, for the Bitune dual pass a dense masked softmax written here (bitune_dense_reference), which no
kpro op enters.
`fraction_of_matmul` is a case's TFLOP/s over the bf16 matmul rate measured in the same run.

    pytest --benchmark -k attention
"""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kpro import ops
from conftest import TOLERANCE, CaseCache, WrongResult, check_close, compiled, describe_device, record_ratios, record_tflops, timed

GPU_SEQS = [1024, 4096, 16384]
TOKENS_PER_BATCH = 16384  # batch = tokens / sequence
HIDDEN = 2048  # heads = hidden / head_dim
# SDPA's backends in the order tried; the first that runs the case (forward, and backward when timed) and
# passes the check is the baseline, and its name is recorded. kv heads are expanded for a backend only if it
# refuses GQA.
SDPA_ORDER = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
CASES = CaseCache()


def shape_for(device, seq, dim):
    if device.type != "cuda":
        return 1, 256, 4, dim  # a CPU smoke size: the code paths run, the timings mean little
    return max(1, TOKENS_PER_BATCH // seq), seq, HIDDEN // dim, dim


def visible_pairs(seq, prefix):
    """Query-key pairs a causal mask with a bidirectional prefix of `prefix` tokens lets through."""
    return prefix * prefix + sum(i + 1 for i in range(prefix, seq))


def prefix_mask(seq, prefix_lens):
    """[B, T, T] bool, True where query i may see key j: causal, plus the prompt both ways."""
    positions = torch.arange(seq, device=prefix_lens.device)
    rows, cols, prefix = positions[None, :, None], positions[None, None, :], prefix_lens[:, None, None]
    return (cols <= rows) | ((cols < prefix) & (rows < prefix))


def quiet(fn, *args):
    """Run fn with warnings silenced (SDPA warns about each backend it cannot use while probing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------- the reference

def sdpa_call(q, k, v, mask, dense, backend=None, expand=False):
    """SDPA in kpro's [B, T, H, D] layout; `backend` forces one (torch.nn.attention.SDPBackend), `expand`
    repeats the kv heads instead of asking for GQA."""
    from torch.nn.attention import sdpa_kernel

    group = q.shape[2] // k.shape[2]
    if expand and group > 1:
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kwargs = dict(is_causal=True) if mask == "causal" else dict(attn_mask=dense[:, None])
    gqa = not expand and group > 1
    if backend is None:
        return F.scaled_dot_product_attention(*args, **kwargs, enable_gqa=gqa).transpose(1, 2)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*args, **kwargs, enable_gqa=gqa).transpose(1, 2)


def reference(q, k, v, mask, dense, dout):
    """(output, (dq, dk, dv) or None) computed wide: float64 on the CPU; fp32 on a GPU with SDPA's
    memory-efficient kernel (exact softmax, no score matrix: fits at 16k tokens), kv heads expanded."""
    from torch.nn.attention import SDPBackend

    wide = torch.float64 if q.device.type == "cpu" else torch.float32
    leaves = [t.detach().to(wide).requires_grad_(dout is not None) for t in (q, k, v)]
    backends = [None] if q.device.type == "cpu" else [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    failures = []
    for backend in backends:
        try:
            out = quiet(sdpa_call, *leaves, mask, dense, backend, True)
            grads = torch.autograd.grad(out, leaves, dout.to(wide)) if dout is not None else None
            return out.detach(), grads
        except RuntimeError as err:  # the math kernel, the last resort, may not fit in memory
            failures.append(first_line(err))
    raise RuntimeError("no reference for this case: " + "; ".join(failures))


def build_case(device, seq, dim, mask, grad):
    batch, seq, heads, dim = shape_for(device, seq, dim)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda h: torch.randn(batch, seq, h, dim, device=device, dtype=dtype, generator=gen)
    q, k, v = make(heads), make(heads // 4), make(heads // 4)  # GQA 4:1
    dout = torch.randn(q.shape, device=device, dtype=dtype, generator=gen) if grad else None
    prefix = seq // 2
    prefix_lens = torch.full((batch,), prefix, device=device)
    dense = prefix_mask(seq, prefix_lens) if mask == "prefix" else None
    ref_out, ref_grads = reference(q, k, v, mask, dense, dout)
    pairs = visible_pairs(seq, prefix if mask == "prefix" else 0)
    return SimpleNamespace(q=q.requires_grad_(grad), k=k.requires_grad_(grad), v=v.requires_grad_(grad), dout=dout,
                           dtype=dtype, prefix_lens=prefix_lens, dense=dense, ref_out=ref_out, ref_grads=ref_grads,
                           flops=4 * batch * heads * dim * pairs)  # QK^T and PV, 2 flops per multiply-add


# --------------------------------------------------------------------------------- implementations

def flex_call(mask_mod, batch, seq_q, seq_k, device, key):
    """FlexAttention in kpro's [B, T, H, D] layout with the block mask of `mask_mod`, compiled for this shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(mask_mod, batch, None, seq_q, seq_k, device=device)
    flex = compiled(("flex_attention",) + tuple(key), flex_attention)
    return lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                block_mask=block_mask, enable_gqa=True).transpose(1, 2)


def candidates(impl, mask, case, grad):
    """[(label, f(q, k, v))] for `impl`: one entry, or for SDPA one per backend and GQA handling, tried in
    order until one runs the case correctly."""
    q = case.q
    batch, seq, heads, dim = q.shape
    if impl.startswith("kpro-"):
        name = impl.removeprefix("kpro-")
        prefix = case.prefix_lens if mask == "prefix" else None

        def kpro_fn(q, k, v):
            with ops.backend(name):
                return ops.attention(q, k, v, causal=True, prefix_lens=prefix)
        return [(None, kpro_fn)]
    if impl == "sdpa":
        from torch.nn.attention import SDPBackend
        found = [(name, getattr(SDPBackend, name)) for name in SDPA_ORDER if hasattr(SDPBackend, name)]
        return [(name + (" (kv heads expanded)" if expand else ""),
                 (lambda b, e: lambda q, k, v: sdpa_call(q, k, v, mask, case.dense, b, e))(backend, expand))
                for name, backend in found for expand in (False, True)]
    if impl == "flex":
        if mask == "causal":
            mask_mod = lambda b, h, i, j: j <= i
        else:
            prefix_lens = case.prefix_lens
            mask_mod = lambda b, h, i, j: (j <= i) | ((j < prefix_lens[b]) & (i < prefix_lens[b]))
        return [(None, flex_call(mask_mod, batch, seq, seq, q.device, (mask, batch, seq, heads, dim, grad)))]
    if impl == "flash-attn" and mask == "causal":
        try:
            from flash_attn import flash_attn_func
        except ImportError as err:  # named in the skip: a broken install must not just drop the column
            MISSING["flash-attn"] = f"{type(err).__name__}: {err}"
            return []
        return [(None, lambda q, k, v: flash_attn_func(q, k, v, causal=True))]
    return []


IMPLS = ["kpro-triton", "kpro-torch", "sdpa", "flex", "flash-attn"]
MISSING: dict[str, str] = {}  # baseline -> why it could not be imported


def setup(device, seq, dim, mask, impl, grad):
    if device.type != "cuda" and seq != GPU_SEQS[0]:
        pytest.skip("one smoke size on the CPU")
    if device.type != "cuda" and impl == "kpro-triton":
        pytest.skip("Triton needs a GPU outside the interpreter")
    if device.type != "cuda" and impl == "flex" and grad:
        pytest.skip("FlexAttention has no backward on the CPU")
    if impl == "flash-attn" and (mask != "causal" or device.type != "cuda"):
        pytest.skip("flash-attn: causal masks on a GPU only")
    case = CASES.get((device.type, seq, dim, mask, grad), lambda: build_case(device, seq, dim, mask, grad))
    found = candidates(impl, mask, case, grad)
    if not found:
        pytest.skip(f"{impl} is not available for this case here" + (f" ({MISSING[impl]})" if impl in MISSING else ""))
    return case, found


def first_that_runs(found, attempt, check):
    """(label, fn, failures before it) of the first candidate whose attempt runs and whose result passes
    `check` (which raises WrongResult); a single candidate's error or wrong result propagates as it is.
    For SDPA: a backend that refuses the case, or computes it wrongly, is noted and the next one tried."""
    if len(found) == 1:
        label, fn = found[0]
        check(attempt(fn))
        return label, fn, []
    failures = []
    for label, fn in found:
        try:
            check(quiet(attempt, fn))
            return label, fn, failures
        except (RuntimeError, WrongResult) as err:
            failures.append(f"{label}: {first_line(err)}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise WrongResult("no SDPA backend runs this case correctly: " + " | ".join(failures))


def note_backend(benchmark, impl, label, failures):
    if impl == "sdpa":
        benchmark.extra_info["sdpa_backend"] = label
        if failures:
            benchmark.extra_info["sdpa_refused"] = failures


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["causal", "prefix"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq", GPU_SEQS)
def test_attention_forward(benchmark, device, matmul_flops, impl, seq, dim, mask):
    case, found = setup(device, seq, dim, mask, impl, grad=False)
    q, k, v = case.q, case.k, case.v

    def forward(fn):
        with torch.no_grad():
            return fn(q, k, v)

    label, fn, failures = first_that_runs(
        found, forward, lambda out: check_close(impl, [("output", out, case.ref_out)], case.dtype, benchmark=benchmark))
    note_backend(benchmark, impl, label, failures)
    benchmark.group = f"attention forward {mask} T={q.shape[1]} D={dim}"
    timed(benchmark, device, lambda: forward(fn))
    record_tflops(benchmark, case.flops, matmul_flops, device=describe_device(device), shape=list(q.shape),
                  dtype=str(case.dtype))
    record_ratios(benchmark, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["causal", "prefix"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq", GPU_SEQS)
def test_attention_forward_backward(benchmark, device, matmul_flops, impl, seq, dim, mask):
    case, found = setup(device, seq, dim, mask, impl, grad=True)
    q, k, v, dout = case.q, case.k, case.v, case.dout

    def forward_backward(fn):
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v)
        out.backward(dout)
        return out.detach(), (q.grad, k.grad, v.grad)

    def check(result):
        out, grads = result
        check_close(impl, [("output", out, case.ref_out)] +
                    [(f"d{name}", got, want) for name, got, want in zip("qkv", grads, case.ref_grads)],
                    case.dtype, benchmark=benchmark)

    label, fn, failures = first_that_runs(found, forward_backward, check)
    q.grad = k.grad = v.grad = None
    note_backend(benchmark, impl, label, failures)
    benchmark.group = f"attention forward+backward {mask} T={q.shape[1]} D={dim}"

    def run():
        fn(q, k, v).backward(dout)
        q.grad = k.grad = v.grad = None

    timed(benchmark, device, run)
    # backward does 2.5x the forward's matrix work (recomputed scores, dV, dP, dQ, dK)
    record_tflops(benchmark, 3.5 * case.flops, matmul_flops, device=describe_device(device), shape=list(q.shape),
                  dtype=str(case.dtype))
    record_ratios(benchmark, impl)


# ----------------------------------------------------------------------------------- Bitune dual pass

BITUNE_SIZES = {  # batch, prompt length, answer length, heads, head dim; "spec" is SPEC.md's target shape
    "spec": (8, 512, 256, 32, 128),
    "long": (8, 1024, 1024, 32, 128),
}
BITUNE_CPU_SIZE = (1, 64, 64, 4, 64)


def bitune_three_flex_calls(batch, tp, ta, prompt_lens, answer_lens, device, key):
    """The same computation as kpro.ops.bitune_attention with three FlexAttention calls and an explicit mix.
    The block masks are built here, once, outside the timed calls (they depend on the lengths only)."""
    lp, la = prompt_lens, answer_lens
    causal = flex_call(lambda b, h, i, j: (j <= i) & (j < lp[b]), batch, tp, tp, device, ("causal",) + key)
    bidir = flex_call(lambda b, h, i, j: j < lp[b], batch, tp, tp, device, ("bidir",) + key)
    answer = flex_call(lambda b, h, i, j: (j < lp[b]) | ((j >= tp) & (j - tp <= i) & (j - tp < la[b])),
                       batch, ta, tp + ta, device, ("answer",) + key)

    def fn(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens):
        k_mix = (1 - alpha_k) * k_p[0] + alpha_k * k_p[1]
        v_mix = (1 - alpha_v) * v_p[0] + alpha_v * v_p[1]
        o_p = torch.stack((causal(q_p[0], k_p[0], v_p[0]), bidir(q_p[1], k_p[1], v_p[1])))
        return o_p, answer(q_a, torch.cat((k_mix, k_a), 1), torch.cat((v_mix, v_a), 1))
    return fn


def bitune_plain_kpro(backend):
    """The same work with kpro's plain attention: two prompt calls, the mix, one answer call (queries
    aligned to the end of [mixed prompt | answer] keys). Valid for full-length streams, as benchmarked."""
    def fn(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens):
        with ops.backend(backend):
            k_mix = (1 - alpha_k) * k_p[0] + alpha_k * k_p[1]
            v_mix = (1 - alpha_v) * v_p[0] + alpha_v * v_p[1]
            o_p = torch.stack((ops.attention(q_p[0], k_p[0], v_p[0], causal=True),
                               ops.attention(q_p[1], k_p[1], v_p[1], causal=False)))
            return o_p, ops.attention(q_a, torch.cat((k_mix, k_a), 1), torch.cat((v_mix, v_a), 1), causal=True)
    return fn


def bitune_fused(backend):
    """The op as kpro.Bitune calls it in every layer: check_values=False. Its value check (lengths and mixing
    weights in range) reads the device, one sync, which kpro.Bitune makes once per forward; timed here it
    would stall the host's run-ahead inside each timed call, a cost the compared calls do not have (the first
    H200 run timed it so: benchmarks/RESULTS.md)."""
    def fn(*args):
        with ops.backend(backend):
            return ops.bitune_attention(*args, check_values=False)
    return fn


def build_bitune_case(device, dims, grad):
    batch, tp, ta, heads, dim = dims
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen)
    kv = heads // 4
    tensors = [make(2, batch, tp, heads, dim), make(2, batch, tp, kv, dim), make(2, batch, tp, kv, dim),
               make(batch, ta, heads, dim), make(batch, ta, kv, dim), make(batch, ta, kv, dim),
               torch.tensor(0.3, device=device), torch.tensor(0.6, device=device)]
    lens = [torch.full((batch,), tp, device=device), torch.full((batch,), ta, device=device)]
    douts = (make(2, batch, tp, heads, dim), make(batch, ta, heads, dim)) if grad else None
    ref, ref_grads = bitune_dense_reference(tensors, lens, douts)
    pairs = batch * heads * (tp * (tp + 1) // 2 + tp * tp + ta * tp + ta * (ta + 1) // 2)
    return SimpleNamespace(tensors=[t.requires_grad_(grad) for t in tensors], lens=lens, douts=douts, dtype=dtype,
                           ref=ref, ref_grads=ref_grads, flops=4 * dim * pairs)


def dense_attention(q, k, v, visible, scale):
    """softmax(scale · q·kᵀ where `visible` [Tq, Tk], else −inf) · v of one example: q [Tq, H, D], k, v
    [Tk, Hkv, D], query head h reading key/value head h // (H / Hkv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


def bitune_dense_reference(tensors, lens, douts):
    """(outputs, input gradients or None) of the Bitune dual pass from its definition (docs/bitune.md), through
    no kpro op, so that a defect of kpro's own paths cannot be in it too: per example, a dense masked softmax for
    the causal and the bidirectional prompt streams, the mix K = (1 − α_k)·K_causal + α_k·K_bidir (likewise V),
    and the answer over [mixed prompt | answer] keys, all of the valid prompt and causally its own. In float64 on
    the CPU, fp32 on a GPU, one example at a time (the long size's fp32 scores would take 2 GiB a stream at once);
    padded query rows give zeros (they see every key, so that no row's softmax is over nothing)."""
    q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v = tensors
    wide = torch.float64 if q_a.device.type == "cpu" else torch.float32
    grad = douts is not None
    alphas = [a.detach().to(wide).requires_grad_(grad) for a in (alpha_k, alpha_v)]
    tp, ta, scale = q_p.shape[2], q_a.shape[1], q_p.shape[-1] ** -0.5
    i_p, i_a = torch.arange(tp, device=q_a.device), torch.arange(ta, device=q_a.device)
    outs, grads = [], []
    for b, (lp, la) in enumerate(zip(*lens)):
        row = [x[:, b] for x in (q_p, k_p, v_p)] + [x[b] for x in (q_a, k_a, v_a)]
        row = [x.detach().to(wide).requires_grad_(grad) for x in row]
        (qp, kp, vp, qa, ka, va), (ak, av) = row, alphas
        p_rows, a_rows = i_p < lp, i_a < la  # valid positions of the prompt streams and of the answer
        with torch.set_grad_enabled(grad):
            causal = dense_attention(qp[0], kp[0], vp[0], ((i_p[None] <= i_p[:, None]) & p_rows) | ~p_rows[:, None],
                                     scale)
            bidir = dense_attention(qp[1], kp[1], vp[1], p_rows[None] | ~p_rows[:, None], scale)
            k_mix, v_mix = (1 - ak) * kp[0] + ak * kp[1], (1 - av) * vp[0] + av * vp[1]
            own = (i_a[None] <= i_a[:, None]) & a_rows
            answer = dense_attention(qa, torch.cat((k_mix, ka)), torch.cat((v_mix, va)),
                                     torch.cat((p_rows.expand(ta, tp), own), 1) | ~a_rows[:, None], scale)
            out = (torch.stack((causal, bidir)) * p_rows[:, None, None], answer * a_rows[:, None, None])
        if grad:
            grads.append(torch.autograd.grad(out, row + alphas, [douts[0][:, b].to(wide), douts[1][b].to(wide)]))
        outs.append([o.detach() for o in out])
    ref = [torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs])]
    if not grad:
        return ref, None
    stacked = [torch.stack([g[i] for g in grads], 1 if i < 3 else 0) for i in range(6)]
    return ref, stacked + [sum(g[6] for g in grads), sum(g[7] for g in grads)]


BITUNE_INPUTS = ("q_p", "k_p", "v_p", "q_a", "k_a", "v_a", "alpha_k", "alpha_v")


@pytest.mark.parametrize("impl", ["kpro-triton-plain", "kpro-triton", "kpro-torch", "three-flex-calls"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("size", BITUNE_SIZES)
def test_bitune_dual_pass(benchmark, device, matmul_flops, impl, grad, size):
    if impl.startswith("kpro-triton") and device.type != "cuda":
        pytest.skip("Triton needs a GPU outside the interpreter")
    if impl == "three-flex-calls" and grad and device.type != "cuda":
        pytest.skip("FlexAttention has no backward on the CPU")
    if device.type != "cuda" and size != "spec":
        pytest.skip("one smoke size on the CPU")
    dims = BITUNE_SIZES[size] if device.type == "cuda" else BITUNE_CPU_SIZE
    batch, tp, ta, heads, dim = dims
    case = CASES.get(("bitune", device.type, dims, grad), lambda: build_bitune_case(device, dims, grad))
    args = case.tensors + case.lens
    if impl == "three-flex-calls":
        fn = bitune_three_flex_calls(batch, tp, ta, *case.lens, device, (batch, tp, ta, heads, dim, grad))
    elif impl == "kpro-triton-plain":
        fn = bitune_plain_kpro("triton")
    else:
        fn = bitune_fused(impl.removeprefix("kpro-"))

    if grad:
        outs = fn(*args)
        torch.autograd.backward(outs, case.douts)
        grads = [t.grad for t in case.tensors]
        pairs = [(f"d{name}", got, want) for name, got, want in zip(BITUNE_INPUTS, grads, case.ref_grads)]
        for t in case.tensors:
            t.grad = None
    else:
        with torch.no_grad():
            outs = fn(*args)
        pairs = []
    # the mixing scalars' gradients sum over every key and value: their rounding error is larger
    check_close(impl, [("prompt output", outs[0], case.ref[0]), ("answer output", outs[1], case.ref[1])] +
                [p for p in pairs if not p[0].startswith("dalpha")], case.dtype, benchmark=benchmark)
    check_close(impl, [p for p in pairs if p[0].startswith("dalpha")], case.dtype,
                tolerance=2.5 * TOLERANCE[case.dtype])
    del outs, pairs
    benchmark.group = (f"bitune dual pass {'forward+backward' if grad else 'forward'} "
                       f"B={batch} Tp={tp} Ta={ta} D={dim}")

    def run():
        if grad:
            torch.autograd.backward(fn(*args), case.douts)
            for t in case.tensors:
                t.grad = None
        else:
            with torch.no_grad():
                fn(*args)

    timed(benchmark, device, run)
    record_tflops(benchmark, case.flops * (3.5 if grad else 1.0), matmul_flops, device=describe_device(device),
                  dtype=str(case.dtype), heads=heads, kv_heads=heads // 4)
    record_ratios(benchmark, impl)
    plain = benchmark.extra_info.get("time_over_kpro-triton-plain")
    if impl == "kpro-triton" and plain:  # SPEC: the dual pass at >= 90% of kpro's plain-attention TFLOP/s
        benchmark.extra_info["fraction_of_plain_tflops"] = round(1 / plain, 3)
