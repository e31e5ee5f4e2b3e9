"""Cross-entropy fused with the output projection, loss + backward: kpro's `linear_cross_entropy` against
the materialised path (logits = hidden @ weightᵀ, an fp32 copy, F.cross_entropy) and Liger-Kernel's fused
loss when it is installed (never faked), with the head trainable and frozen.

Each implementation is checked on the whole timed batch against a wider reference (float64 on the CPU, fp32
logits of the bf16 inputs on a GPU, built REFERENCE_ROWS rows at a time and kept for the case), its head
frozen or trainable as timed, before it is timed;
the CPU training steps check the loss and the trainable parameters' gradients against the same step in
float64 with materialised logits.
Besides the time, each row records `peak_extra_mb`, the most memory allocated at once during loss +
backward above what was allocated before (on the CPU from the profiler's allocation events, on a GPU from
max_memory_allocated), which counts the gradients it returns (dW of a trainable head: [V, d]; dhidden:
[N, d]); `working_mb` is that peak less those gradients, the memory the loss itself needs; kpro's rows carry
`peak_over_materialised` and `working_over_materialised`.

    pytest --benchmark -k linear_cross_entropy
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kpro import ops
from kpro.ops.backend import unavailable_reason
from conftest import CaseCache, check_close, check_gradients, describe_device, record_ratios, timed

# (tokens N, hidden d, vocabulary V)
GPU_CASES = [(n, 4096, v) for v in (32768, 131072) for n in (8192, 16384, 32768)]
CPU_CASES = [(2048, 256, 32768), (1024, 256, 131072)]
REFERENCE_ROWS = 2048  # rows of the reference's logits at once: [2048, 131072] fp32 is 1 GiB
IMPL_NAMES = ["kpro-torch", "kpro-triton", "materialised", "liger"]


def materialised(hidden, weight, labels):
    """The path the fused loss replaces: [N, V] logits in the input dtype, an fp32 copy, F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), labels)


def implementations(device):
    """name -> loss(hidden, weight, labels); missing baselines are skipped, never faked."""
    impls = {"materialised": materialised}
    for name in ("torch", "triton"):
        impls[f"kpro-{name}"] = (lambda b: lambda *a: _with_backend(b, *a))(name)
    if device.type == "cuda":  # Liger's kernels are Triton: GPU only
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = lambda hidden, weight, labels: liger(weight, hidden, labels)
        except ImportError as err:  # named in the skip: a broken install must not just drop the column
            MISSING["liger"] = f"{type(err).__name__}: {err}"
    return impls


MISSING: dict[str, str] = {}  # baseline -> why it could not be imported


def _with_backend(name, hidden, weight, labels):
    with ops.backend(name):
        return ops.linear_cross_entropy(hidden, weight, labels)


def cases_for(device):
    return GPU_CASES if device.type == "cuda" else CPU_CASES


def build_case(shape, device):
    """Inputs, and the reference loss and gradients of all N rows (the timed batch)."""
    n, d, vocab = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, d, device=device, generator=gen) * (4 / d ** 0.5)).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    labels[::7] = -100  # some unscored positions (prompt, padding)
    loss, dh, dw = wide_reference(hidden, weight, labels)
    return SimpleNamespace(hidden=hidden, weight=weight, labels=labels, dtype=dtype, loss=loss, dh=dh, dw=dw)


def wide_reference(hidden, weight, labels):
    """(loss, dhidden, dweight) of the mean cross-entropy over the scored rows, in float64 on the CPU and fp32
    on a GPU, with materialised logits REFERENCE_ROWS rows at a time: each chunk's summed loss over the batch's
    scored count, its backward giving that chunk's dhidden and adding to dweight. [32768, 131072] fp32 logits
    at once (16 GiB, and as much for their gradient) would not fit beside the case."""
    wide = torch.float64 if hidden.device.type == "cpu" else torch.float32
    w = weight.to(wide).requires_grad_()
    scored = int((labels != -100).sum())
    loss, dh = 0.0, []
    for h_rows, l_rows in zip(hidden.split(REFERENCE_ROWS), labels.split(REFERENCE_ROWS)):
        h = h_rows.to(wide).requires_grad_()
        part = F.cross_entropy(h @ w.T, l_rows, reduction="sum") / scored
        part.backward()
        loss, dh = loss + part.detach(), dh + [h.grad]
    return loss, torch.cat(dh), w.grad


CASES = CaseCache()
PEAKS: dict = {}


def peak_extra_bytes(fn, device) -> int:
    """The most memory allocated at once while fn() runs, above what was allocated when it began."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def record_memory(benchmark, key, impl, peak, grads):
    """Store peak_extra_mb and working_mb; on kpro's rows, their ratios to the materialised path's (rows
    measured earlier get the ratios when the materialised row arrives)."""
    working = peak - grads
    benchmark.extra_info.update(peak_extra_mb=round(peak / 2**20, 1), working_mb=round(working / 2**20, 1))
    group = PEAKS.setdefault(key, {})
    group[impl] = (peak, working, benchmark.extra_info)
    if "materialised" in group:
        ref_peak, ref_working, _ = group["materialised"]
        for name, (p, w, info) in group.items():
            if name.startswith("kpro"):
                info.update(peak_over_materialised=round(p / ref_peak, 4),
                            working_over_materialised=round(w / ref_working, 4))


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("shape", sorted(set(GPU_CASES + CPU_CASES)), ids=lambda s: f"N{s[0]}-d{s[1]}-V{s[2]}")
def test_loss_and_backward(benchmark, device, shape, head, impl):
    if shape not in cases_for(device):
        pytest.skip(f"{shape} is not benchmarked on {device.type}")
    impls = implementations(device)
    if impl not in impls:
        why = MISSING.get(impl, "no GPU: Liger's kernels are Triton" if impl == "liger" else None)
        pytest.skip(f"{impl} is not available here" + (f" ({why})" if why else ""))
    case = CASES.get((shape, device.type), lambda: build_case(shape, device))
    if impl.startswith("kpro-"):
        reason = unavailable_reason(impl.removeprefix("kpro-"), "linear_cross_entropy", case.hidden)
        if reason is not None:
            pytest.skip(f"{impl}: {reason}")
    fn, frozen = impls[impl], head == "frozen"
    hidden = case.hidden.detach().requires_grad_()
    weight = case.weight.detach().requires_grad_(not frozen)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, case.labels).backward()

    n, d, vocab = shape
    # Correct first: the timed call on the whole timed batch against the wider reference, the head frozen or
    # trainable as timed (a frozen head has a path of its own in kpro: no weight gradient). The row count
    # shapes the launch (the vocabulary split, the gradient chunks): a subset of the rows would not do.
    try:
        loss = fn(hidden, weight, case.labels)
        loss.backward()
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of memory at N={n}, V={vocab}")
    pairs = [("loss", loss, case.loss), ("dhidden", hidden.grad, case.dh)]
    check_close(impl, pairs + ([] if frozen else [("dweight", weight.grad, case.dw)]), case.dtype, benchmark=benchmark)
    del loss
    hidden.grad = weight.grad = None

    benchmark.group = f"linear cross-entropy N{n} d{d} V{vocab} {str(case.dtype).removeprefix('torch.')} {head} head"
    benchmark.extra_info.update(device=describe_device(device), tokens=n, hidden=d, vocab=vocab, head=head)
    try:
        peak = peak_extra_bytes(step, device)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of memory at N={n}, V={vocab}")
    grads = hidden.numel() * hidden.element_size() + (0 if frozen else weight.numel() * weight.element_size())
    assert frozen == (weight.grad is None)
    record_memory(benchmark, benchmark.group, impl, peak, grads)
    timed(benchmark, device, step, rounds=None if device.type == "cuda" else 3)
    record_ratios(benchmark, impl)


# ------------------------------------------------------------------------------ a whole training step

STEP_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=256)
STEP_BATCH, STEP_PROMPT = 4, 128  # rows of 256 tokens; Bitune: a 128-token prompt, the rest answer


def step_loss(method: str, loss: str):
    """(module, loss_fn(module) -> scalar) for one training step of `method` with the fused or the
    materialised loss, on the CPU-sized model: LLaMA Pro (2 new blocks trained, head frozen) or Bitune."""
    import kpro
    from kpro import train as kt
    from kpro.bitune import Bitune, bitune_loss
    from kpro.bitune.streams import answer_targets, split_streams

    torch.manual_seed(0)
    model = kpro.Llama(kpro.LlamaConfig(**STEP_MODEL))
    ids = torch.randint(3, STEP_MODEL["vocab_size"], (STEP_BATCH, STEP_MODEL["max_position_embeddings"]),
                        generator=torch.Generator().manual_seed(0))
    if method == "expansion":
        kpro.train_only(model, kpro.expand(model, 2))
        batch = {"input_ids": ids, "labels": ids}
        if loss == "fused":
            return model, lambda m: kt.lm_loss(m, batch).mean
        return model, lambda m: kt.causal_lm_loss(m(ids), ids)
    bt = Bitune(model, rank=8, seed=0)
    prompt_lens = torch.full((STEP_BATCH,), STEP_PROMPT)
    batch = {"input_ids": ids, "prompt_lens": prompt_lens, "attention_mask": torch.ones_like(ids)}
    if loss == "fused":
        return bt, lambda m: bitune_loss(m, batch).mean
    targets = answer_targets(split_streams(ids, prompt_lens, batch["attention_mask"]))
    return bt, lambda m: F.cross_entropy(widened(m(ids, prompt_lens, batch["attention_mask"])).flatten(0, 1),
                                         targets.flatten())


def widened(logits):
    """fp32 logits, float64 ones kept (the reference's)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def trainable_grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def step_reference(method: str):
    """(loss, trainable parameters' gradients) of the step, computed apart from both timed paths: the same fresh
    module in float64, kpro's plain-PyTorch ops, the logits materialised (no fused loss)."""
    module, loss_fn = step_loss(method, "materialised")
    module.double()
    with ops.backend("torch"):
        loss = loss_fn(module)
        loss.backward()
    return loss.detach(), trainable_grads(module)


STEP_REFERENCES: dict = {}


@pytest.mark.parametrize("loss", ["fused", "materialised"])
@pytest.mark.parametrize("method", ["expansion", "bitune"])
def test_training_step(benchmark, device, method, loss):
    """Forward + backward of a CPU-sized training step (d=256, V=32k, 4 x 256 tokens) with the fused loss
    against the same step with materialised logits: first the loss and the trainable parameters' gradients
    against a float64 reference (materialised logits, step_reference), then peak memory and time."""
    if device.type != "cpu":
        pytest.skip("the CPU-sized step: on a GPU the kernels' cases above apply")
    module, loss_fn = step_loss(method, loss)

    def step():
        module.zero_grad(set_to_none=True)
        loss_fn(module).backward()

    if method not in STEP_REFERENCES:
        STEP_REFERENCES[method] = step_reference(method)
    reference_loss, reference_grads = STEP_REFERENCES[method]
    value = loss_fn(module)
    value.backward()
    check_close(loss, [("loss", value, reference_loss)], torch.float32, benchmark=benchmark)
    check_gradients(loss, trainable_grads(module), reference_grads, torch.float32, benchmark=benchmark)
    module.zero_grad(set_to_none=True)
    benchmark.group = f"training step {method} d256 V32000 4x256"
    benchmark.extra_info.update(device=describe_device(device), loss=round(value.item(), 5))
    peak = peak_extra_bytes(step, device)
    grads = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    record_memory(benchmark, benchmark.group, "kpro" if loss == "fused" else "materialised", peak, grads)
    timed(benchmark, device, step, rounds=5)
    record_ratios(benchmark, "kpro-fused" if loss == "fused" else "materialised")
