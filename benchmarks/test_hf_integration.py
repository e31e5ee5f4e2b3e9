"""A Hugging Face `transformers` LlamaForCausalLM on kpro's ops (kpro.integrations.hf) against the stock model:
saved activation bytes and the time of a training step, full training and training only some layers.

    pytest --benchmark -k hf_integration

Implementations, on the same weights:
    hf-sdpa          the stock model, attn_implementation="sdpa" (transformers' default)
    kpro-hf          kpro.integrations.hf.apply(model): RMSNorm, SwiGLU and attention on kpro's ops
and for training only 2 of 8 layers (the rest, embeddings and head frozen):
    hf-frozen        the stock model with requires_grad_(False) on everything else
    kpro-hf-train_only   apply + kpro.integrations.hf.train_only(model, ids)
    kpro-hf-recompute    the same with recompute_frozen=True
A step is the model's own loss (`model(input_ids, labels=...)`: logits, then transformers' cross-entropy),
backward and an AdamW step. Before timing, each implementation's loss and gradients are checked against the
stock model in fp32 (conftest.check_gradients); on a GPU (bf16 weights) the step is timed with CUDA events.
`extra_info` holds the saved activation bytes (distinct storages autograd packs in the forward, weights left
out) and their ratio to the stock model's.
"""
import copy

import pytest
import torch

from conftest import (MODEL_TOLERANCE, CaseCache, check_gradients, check_loss, describe_device, median_seconds,
                      record_ratios, timed)
from kpro.expansion import saved_activation_bytes

transformers = pytest.importorskip("transformers")
kpro_hf = pytest.importorskip("kpro.integrations.hf")

SIZES = {  # name: (config fields, batch, sequence); the GPU size runs only where CUDA is
    "cpu-small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096), 4, 256),
    "gpu-1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000), 4, 2048),
}
FULL = ["hf-sdpa", "kpro-hf"]
PARTIAL = ["hf-frozen", "kpro-hf-train_only", "kpro-hf-recompute"]
TRAIN_LAYERS = lambda n: [n // 2, n - 1]  # noqa: E731  two layers train, as new blocks would


def stock_model(size, device):
    fields, batch, seq = SIZES[size]
    if size.startswith("gpu") != (device.type == "cuda"):
        pytest.skip(f"{size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only")
    config = transformers.LlamaConfig(max_position_embeddings=seq, rms_norm_eps=1e-5, use_cache=False,
                                      attn_implementation="sdpa", **fields)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, ids.to(device)


def prepare(impl, stock, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = copy.deepcopy(stock).to(device=device, dtype=dtype)
    layers = TRAIN_LAYERS(len(model.model.layers))
    if impl.startswith("kpro"):
        kpro_hf.apply(model)
    if impl == "hf-frozen":
        freeze_all_but(model, layers)
    elif impl in ("kpro-hf-train_only", "kpro-hf-recompute"):
        kpro_hf.train_only(model, layers, recompute_frozen=impl == "kpro-hf-recompute")
    return model


def freeze_all_but(model, layers):
    model.requires_grad_(False)
    for i in layers:
        model.model.layers[i].requires_grad_(True)


REFERENCES = CaseCache()


def fp32_reference(stock, ids, partial):
    """(loss, gradients by name) of the stock model in fp32."""
    ref = copy.deepcopy(stock).to(ids.device)
    if partial:
        freeze_all_but(ref, TRAIN_LAYERS(len(ref.model.layers)))
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


SAVED: dict = {}


@pytest.mark.parametrize("impl", FULL + PARTIAL)
@pytest.mark.parametrize("size", SIZES)
def test_hf_integration_step(benchmark, device, impl, size):
    stock, ids = stock_model(size, device)
    partial = impl in PARTIAL
    reference_loss, reference_grads = REFERENCES.get((size, partial), lambda: fp32_reference(stock, ids, partial))
    model = prepare(impl, stock, device)
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    benchmark.group = f"hf {'train 2 layers' if partial else 'full training'} {size}"

    def loss_of():
        return model(input_ids=ids, labels=ids).loss

    saved, loss = saved_activation_bytes(loss_of, model.parameters())
    loss.backward()
    check_loss(impl, loss.item(), reference_loss, dtype)
    check_gradients(impl, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, reference_grads,
                    dtype, tolerance=MODEL_TOLERANCE[dtype], benchmark=benchmark)
    optimizer.zero_grad(set_to_none=True)

    def step():
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if not benchmark.disabled:
        step()  # warm-up (CI runs each case once, untimed: no warm-up there)
    timed(benchmark, device, step, rounds=3, warmup_ms=0, rep_ms=1000, min_reps=5, max_reps=10)
    baseline = "hf-frozen" if partial else "hf-sdpa"
    SAVED[size, impl] = saved
    benchmark.extra_info.update(device=describe_device(device), tokens=ids.numel(),
                                saved_activation_mb=round(saved / 2**20, 1))
    if (size, baseline) in SAVED:
        benchmark.extra_info[f"saved_vs_{baseline}"] = round(saved / SAVED[size, baseline], 3)
    record_ratios(benchmark, impl)
    median = median_seconds(benchmark)
    print(f"\n{impl} {size}: saved activations {saved / 2**20:.1f} MiB"
          + (f" ({saved / SAVED[size, baseline]:.3f} of {baseline})" if (size, baseline) in SAVED else "")
          + (f", median step {median * 1e3:.0f} ms" if median is not None else ""))
