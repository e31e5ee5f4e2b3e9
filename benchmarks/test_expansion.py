"""Training only the new blocks of an expanded model (LLaMA Pro: 32 blocks + 8 interleaved): saved activation
bytes and step time of kpro.train_only against plain eager PyTorch with requires_grad_(False).

    pytest --benchmark -k expansion_step

Implementations, on the same weights:
    eager            the gpt-fast-style PyTorch LLaMA (llama_baseline.py), frozen parameters requires_grad_(False)
    kpro-frozen      kpro.Llama with the same requires_grad_(False) flags and nothing else (kpro's ops only)
    kpro-frozen-launch-cache  the same, its Triton kernels launched through KPRO_LAUNCH_CACHE's cache (GPU only):
                     how much of kpro's step is Triton's per-launch host work
    kpro-train_only  kpro.train_only(model, new_ids): no graph below the lowest new block, frozen blocks above
                     it input-gradient only
    kpro-recompute   kpro.train_only(model, new_ids, recompute_frozen=True)
A step is forward, fp32 cross-entropy, backward and an AdamW step on the new blocks. Before timing, each
implementation's loss and new-block gradients are checked against the gpt-fast-style model on the same weights
in float64 (fp32 on a GPU), which no kpro op enters; on a GPU the step is timed with CUDA events
(conftest.timed). `extra_info` holds the saved activation bytes (distinct storages packed by autograd during
the forward, weights left out) and their reduction against eager; on
CUDA also the peak memory allocated during the timed steps, in all and above what was resident before them
(`step_peak_mb`: activations, gradients and temporaries of a step).
"""
import pytest
import torch

import kpro
from conftest import (MODEL_TOLERANCE, CaseCache, check_gradients, check_loss, describe_device, median_seconds,
                      record_ratios, timed)
from kpro.expansion import saved_activation_bytes
from kpro.train import adamw, causal_lm_loss
from llama_baseline import BaselineLlama

# LLaMA-2-7B's shape (MHA, intermediate/hidden 2.69, vocab/hidden 7.8) at reduced widths; 32 blocks + 8 new.
SIZES = {  # name: (config fields, batch, sequence); the GPU size runs only where CUDA is
    "cpu-pro": (dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, vocab_size=2048), 2, 256),
    "gpu-pro": (dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=16, vocab_size=8192), 4, 2048),
}
IMPLEMENTATIONS = ["eager", "kpro-frozen", "kpro-frozen-launch-cache", "kpro-train_only", "kpro-recompute"]
ORIGINAL_BLOCKS, NEW_BLOCKS = 32, 8


def expanded_model(size, device):
    fields, batch, seq = SIZES[size]
    if size.startswith("gpu") != (device.type == "cuda"):
        pytest.skip(f"{size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = kpro.LlamaConfig(num_hidden_layers=ORIGINAL_BLOCKS, max_position_embeddings=seq, **fields)
    torch.manual_seed(0)
    model = kpro.Llama(cfg)
    new_ids = kpro.expand(model, NEW_BLOCKS)
    with torch.no_grad():  # as after some training: the new blocks contribute
        for i in new_ids:
            model.layers[i].self_attn.o_proj.weight.normal_(0, 0.02)
            model.layers[i].mlp.down_proj.weight.normal_(0, 0.02)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return model.to(device=device, dtype=dtype), new_ids, ids


def prepare(impl, model, new_ids):
    if impl == "eager":
        model = BaselineLlama.from_kpro(model)
    if impl in ("eager", "kpro-frozen", "kpro-frozen-launch-cache"):
        model.requires_grad_(False)
        for i in new_ids:
            model.layers[i].requires_grad_(True)
    else:
        kpro.train_only(model, new_ids, recompute_frozen=impl == "kpro-recompute")
    return model


REFERENCES = CaseCache()


def wide_reference(model, new_ids, ids):
    """(loss, new-block gradients by kpro name) of the gpt-fast-style model on `model`'s weights in float64 on
    the CPU, fp32 on a GPU: plain PyTorch (torch's RMSNorm, SDPA), so that a wrong kpro op cannot make the
    reference wrong too and drop the eager baseline. One row at a time, the loss's gradients summed: every row
    scores the same T - 1 tokens, so the batch's mean is the mean of the rows'."""
    ref = BaselineLlama.from_kpro(model, dtype=torch.float64 if ids.device.type == "cpu" else torch.float32)
    ref.requires_grad_(False)
    for i in new_ids:
        ref.layers[i].requires_grad_(True)
    loss = 0.0
    for row in ids.split(1):
        part = causal_lm_loss(ref(row), row) * row.shape[0] / ids.shape[0]
        part.backward()
        loss += part.item()
    return loss, ref.kpro_grads()


def new_block_grads(impl, model):
    if impl == "eager":
        return model.kpro_grads()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", SIZES)
def test_expansion_step(benchmark, device, impl, size, monkeypatch):
    if impl == "kpro-frozen-launch-cache":
        if device.type != "cuda":
            pytest.skip("the launch cache serves Triton's launches on a GPU")
        from kpro.ops.triton_kernels import _launch

        monkeypatch.setattr(_launch, "LAUNCH_CACHE", True)  # for this test only
    model, new_ids, ids = expanded_model(size, device)
    dtype = model.embed_tokens.weight.dtype
    reference_loss, reference_grads = REFERENCES.get((size, device.type), lambda: wide_reference(model, new_ids, ids))
    model = prepare(impl, model, new_ids)
    optimizer = adamw(model, 1e-4)
    benchmark.group = f"expansion step {size}"

    def loss_of():
        return causal_lm_loss(model(ids), ids)

    saved, loss = saved_activation_bytes(loss_of, model.parameters())
    loss.backward()
    check_loss(impl, loss.item(), reference_loss, dtype)
    check_gradients(impl, new_block_grads(impl, model), reference_grads, dtype, tolerance=MODEL_TOLERANCE[dtype],
                    benchmark=benchmark)
    optimizer.zero_grad(set_to_none=True)

    def step():
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()  # weights, optimizer state, this run's buffers
    timed(benchmark, device, step, rounds=3, warmup_ms=0, rep_ms=1000, min_reps=5, max_reps=10)
    info = dict(device=describe_device(device), tokens=ids.numel(), saved_activation_mb=round(saved / 2**20, 1),
                new_blocks=new_ids)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        info.update(peak_allocated_mb=round(peak / 2**20, 1), step_peak_mb=round((peak - resident) / 2**20, 1))
    benchmark.extra_info.update(info)
    SAVED[size, impl] = saved
    if (size, "eager") in SAVED:
        benchmark.extra_info["saved_vs_eager"] = round(saved / SAVED[size, "eager"], 3)
    record_ratios(benchmark, impl)
    median = median_seconds(benchmark)
    print(f"\n{impl} {size}: saved activations {saved / 2**20:.1f} MiB"
          + (f" ({saved / SAVED[size, 'eager'] - 1:+.1%} vs eager)" if (size, "eager") in SAVED else "")
          + (f", median step {median * 1e3:.0f} ms" if median is not None else ""))


SAVED: dict = {}  # (size, impl) -> saved bytes, so later implementations report against eager
