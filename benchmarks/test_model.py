"""Model forward and forward+backward: kpro.Llama against a compact gpt-fast-style PyTorch LLaMA
(benchmarks/llama_baseline.py) and Hugging Face transformers when installed, on the same weights.

    pytest --benchmark -k model
"""
import pytest
import torch

import kpro
from conftest import describe_device, synchronize
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


def build(impl, size, device):
    fields, batch, seq = SIZES[size]
    if size.startswith("gpu") != (device.type == "cuda"):
        pytest.skip(f"{size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = kpro.LlamaConfig(max_position_embeddings=seq, **fields)
    torch.manual_seed(0)
    model = kpro.Llama(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    if impl == "kpro":
        return model, ids
    if impl == "baseline":
        other = BaselineLlama.from_kpro(model)
    else:
        transformers = pytest.importorskip("transformers")
        other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).to(device=device, dtype=dtype)
        other.load_state_dict({kpro.checkpoint.hf_name(k): v for k, v in model.state_dict().items()})
        other.config.use_cache = False
    with torch.no_grad():  # same function before timing: a faster wrong model is no baseline
        theirs = other(ids[:1, :64])
        theirs = getattr(theirs, "logits", theirs)
        torch.testing.assert_close(theirs.float(), model(ids[:1, :64]).float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)
    return other, ids


def logits_of(out):
    return getattr(out, "logits", out)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl, size):
    model, ids = build(impl, size, device)
    benchmark.group = f"model forward {size}"
    benchmark.extra_info.update(device=describe_device(device), tokens=ids.numel())

    def run():
        with torch.no_grad():
            logits_of(model(ids))
        synchronize(device)

    run()  # warm-up
    benchmark(run)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl, size):
    model, ids = build(impl, size, device)
    benchmark.group = f"model forward+backward {size}"
    benchmark.extra_info.update(device=describe_device(device), tokens=ids.numel())

    def run():
        logits_of(model(ids)).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        synchronize(device)

    run()  # warm-up
    benchmark(run)
