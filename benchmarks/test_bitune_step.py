"""A Bitune training step: the fused three-stream path against the same step done as separate passes
(the reference code's way), in tokens/s, with saved activation bytes (CPU) or peak memory (GPU).

    pytest --benchmark -k bitune_step
"""
import pytest
import torch

import kpro
from kpro.bitune import Bitune
from conftest import describe_device, median_seconds, synchronize

SIZES = {  # config fields, batch, prompt length, answer length
    "cpu-small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096), 4, 128, 64),
    "gpu-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000), 8, 512, 256),
}


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward during fn()."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("path", ["fused", "separate-passes"])
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

    def step():
        with autocast:
            loss = bt.loss(ids, prompt_lens, fused=fused)
        loss.backward()
        bt.zero_grad(set_to_none=True)
        synchronize(device)

    step()
    with autocast:
        activation_bytes, _ = saved_bytes(lambda: bt.loss(ids, prompt_lens, fused=fused))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.group = f"bitune training step {size}"
    benchmark(step)
    median = median_seconds(benchmark)
    tokens = batch * (prompt_len + answer_len)
    benchmark.extra_info.update(device=describe_device(device), tokens=tokens, saved_activation_mb=round(activation_bytes / 2**20, 1))
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = round(tokens / median)
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
