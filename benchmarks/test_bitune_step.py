"""A Bitune training step: the fused three-stream path against the same step done as separate passes
(the reference code's way), in tokens/s, with saved activation bytes (CPU) or peak memory (GPU). Before
timing, each path's loss and gradients (adapters and mixing scalars) are checked against the separate
passes on kpro's plain-PyTorch path in fp32 (no autocast).

    pytest --benchmark -k bitune_step
"""
import copy

import pytest
import torch

import kpro
from kpro import ops
from kpro.bitune import Bitune
from conftest import (MODEL_TOLERANCE, CaseCache, check_gradients, check_loss, describe_device, median_seconds,
                      record_ratios, timed)

SIZES = {  # config fields, batch, prompt length, answer length
    "cpu-small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096), 4, 128, 64),
    "gpu-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000), 8, 512, 256),
}


REFERENCES = CaseCache()


def fp32_reference(bt, ids, prompt_lens):
    """(loss, trainable gradients) of the separate passes on the torch backend in fp32, no autocast."""
    ref = copy.deepcopy(bt).float()
    with ops.backend("torch"):
        loss = ref.loss(ids, prompt_lens, fused=False)
        loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward during fn(). fn's result, and with it the
    graph holding those tensors, is dropped here: kept by the caller, it would count in the peak memory of
    the timed steps that follow (17 GiB at gpu-1b)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("path", ["fused", "separate-passes"])
@pytest.mark.parametrize("size", SIZES)
def test_bitune_training_step(benchmark, device, path, size):
    fields, batch, prompt_len, answer_len = SIZES[size]
    if size.startswith("gpu") != (device.type == "cuda"):
        pytest.skip(f"{size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only")
    torch.manual_seed(0)
    model = kpro.Llama(kpro.LlamaConfig(max_position_embeddings=prompt_len + answer_len, **fields)).to(device)
    bt = Bitune(model, rank=8, seed=0).to(device)
    ids = torch.randint(3, fields["vocab_size"], (batch, prompt_len + answer_len), device=device)
    prompt_lens = torch.full((batch,), prompt_len, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    fused = path == "fused"

    reference_loss, reference_grads = REFERENCES.get((size, device.type), lambda: fp32_reference(bt, ids, prompt_lens))
    with autocast:
        loss = bt.loss(ids, prompt_lens, fused=fused)
    loss.backward()
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_loss(path, loss.item(), reference_loss, compute)
    check_gradients(path, {n: p.grad for n, p in bt.named_parameters() if p.grad is not None}, reference_grads,
                    compute, tolerance=MODEL_TOLERANCE[compute], benchmark=benchmark)
    bt.zero_grad(set_to_none=True)

    def step():
        with autocast:
            loss = bt.loss(ids, prompt_lens, fused=fused)
        loss.backward()
        bt.zero_grad(set_to_none=True)

    step()
    with autocast:
        activation_bytes = saved_bytes(lambda: bt.loss(ids, prompt_lens, fused=fused))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    benchmark.group = f"bitune training step {size}"
    timed(benchmark, device, step, warmup_ms=0, rep_ms=1000, min_reps=5, max_reps=20)
    median = median_seconds(benchmark)
    tokens = batch * (prompt_len + answer_len)
    benchmark.extra_info.update(device=describe_device(device), tokens=tokens, saved_activation_mb=round(activation_bytes / 2**20, 1))
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = round(tokens / median)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        benchmark.extra_info.update(peak_memory_gb=round(peak / 2**30, 2), step_peak_gb=round((peak - resident) / 2**30, 2))
    record_ratios(benchmark, path, ours=fused)
