"""Model forward and forward+backward: kpro.Llama against a compact gpt-fast-style PyTorch LLaMA
(benchmarks/llama_baseline.py) and Hugging Face transformers when installed, on the same weights. Before
timing, each implementation's logits on the whole timed batch (and, for forward+backward, all its parameter
gradients) are checked against a reference that does not go through kpro.ops: the gpt-fast-style model on
the same weights in float64 on the CPU, fp32 on a GPU (where the models run in bf16: MODEL_TOLERANCE, as a
bf16 model rounds at every op), run one row at a time and kept for the case.

    pytest --benchmark -k model
"""
from types import SimpleNamespace

import pytest
import torch

import kpro
from conftest import (MODEL_TOLERANCE, CaseCache, check_close, check_gradients, describe_device, median_seconds,
                      record_ratios, timed)
from llama_baseline import BaselineLlama

SIZES = {  # name: (config fields, batch, sequence); the GPU sizes run only where CUDA is
    "cpu-small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096), 4, 256),
    "cpu-medium": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=8192), 2, 512),
    "gpu-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000), 4, 2048),
}
IMPLEMENTATIONS = ["kpro", "baseline", "transformers"]
REFERENCES = CaseCache()


def logits_of(out):
    return getattr(out, "logits", out)


def loss_of(logits):
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).logsumexp(-1).mean()


def wide_reference(model, ids):
    """Logits and parameter gradients (kpro's names) on the timed batch `ids`, from the gpt-fast-style model on
    `model`'s weights in float64 on the CPU, fp32 on a GPU: plain PyTorch (torch's RMSNorm, SDPA), so that a
    wrong kpro op cannot make the reference wrong too. One row at a time, the loss's gradients summed: the
    whole batch's fp32 logits and attention at gpu-1b would not fit beside the case."""
    ref = BaselineLlama.from_kpro(model, dtype=torch.float64 if ids.device.type == "cpu" else torch.float32)
    logits = []
    for row in ids.split(1):
        out = ref(row)
        (loss_of(out) * row.shape[0] / ids.shape[0]).backward()  # loss_of is a mean over the batch's positions
        logits.append(out.detach())
    return SimpleNamespace(logits=torch.cat(logits), grads=ref.kpro_grads())


def build(impl, size, device):
    fields, batch, seq = SIZES[size]
    if size.startswith("gpu") != (device.type == "cuda"):
        pytest.skip(f"{size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = kpro.LlamaConfig(max_position_embeddings=seq, **fields)
    torch.manual_seed(0)
    model = kpro.Llama(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    reference = REFERENCES.get((size, device.type), lambda: wide_reference(model, ids))
    if impl == "kpro":
        return model, ids, reference, dtype
    if impl == "baseline":
        other = BaselineLlama.from_kpro(model)
    else:
        transformers = pytest.importorskip("transformers")
        other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).to(device=device, dtype=dtype)
        other.load_state_dict({kpro.checkpoint.hf_name(k): v for k, v in model.state_dict().items()})
        other.config.use_cache = False
    return other, ids, reference, dtype


def record_tokens_per_s(benchmark, tokens):
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = round(tokens / median)


def named_grads(impl, model):
    """Parameter gradients under kpro's names."""
    if impl == "baseline":
        return model.kpro_grads()
    return {n.removeprefix("model.") if impl == "transformers" else n: p.grad
            for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", SIZES)
def test_forward(benchmark, device, impl, size):
    model, ids, reference, dtype = build(impl, size, device)
    with torch.no_grad():  # the timed batch, before timing: a faster wrong model is no baseline
        logits = logits_of(model(ids))
    check_close(impl, [("logits", logits, reference.logits)], dtype, tolerance=MODEL_TOLERANCE[dtype],
                benchmark=benchmark)
    del logits
    benchmark.group = f"model forward {size}"
    benchmark.extra_info.update(device=describe_device(device), tokens=ids.numel())

    def run():
        with torch.no_grad():
            logits_of(model(ids))

    timed(benchmark, device, run)
    record_tokens_per_s(benchmark, ids.numel())
    record_ratios(benchmark, impl, ours=impl == "kpro")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("size", SIZES)
def test_forward_backward(benchmark, device, impl, size):
    model, ids, reference, dtype = build(impl, size, device)
    logits = logits_of(model(ids))
    loss_of(logits).backward()
    check_close(impl, [("logits", logits, reference.logits)], dtype, tolerance=MODEL_TOLERANCE[dtype],
                benchmark=benchmark)
    check_gradients(impl, named_grads(impl, model), reference.grads, dtype, tolerance=MODEL_TOLERANCE[dtype],
                    benchmark=benchmark)
    del logits
    model.zero_grad(set_to_none=True)
    benchmark.group = f"model forward+backward {size}"
    benchmark.extra_info.update(device=describe_device(device), tokens=ids.numel())

    def run():
        loss_of(logits_of(model(ids))).backward()
        model.zero_grad(set_to_none=True)

    timed(benchmark, device, run)
    record_tokens_per_s(benchmark, ids.numel())
    record_ratios(benchmark, impl, ours=impl == "kpro")
