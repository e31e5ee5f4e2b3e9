"""Training throughput of kpro.train.fit against a minimal hand-written loop doing the same work (forward,
fp32 cross-entropy, backward, clipping, AdamW), on packed random tokens.

    pytest --benchmark -k train

The timed call is `steps` optimizer steps (for fit, with its final checkpoint, which is part of its cost);
`extra_info` holds the steady-state tokens/s (median over steps after the first, checkpoint excluded) and,
on CUDA, the model FLOPs utilisation: 6 · matmul parameters · tokens/s over the measured bf16 matmul rate.
"""
import io
import statistics
import time

import pytest
import torch

import kpro
from conftest import describe_device, synchronize
from kpro import train as kt

SIZES = {  # name: (config fields, batch, sequence, steps); gpu sizes run only where CUDA is
    "cpu-small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096), 4, 256, 6),
    "gpu-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000), 4, 2048, 20),
}


def setup_size(size, device):
    fields, batch, seq, steps = SIZES[size]
    if size.startswith("gpu") != (device.type == "cuda"):
        pytest.skip(f"{size} runs on {'CUDA' if size.startswith('gpu') else 'the CPU'} only")
    cfg = kpro.LlamaConfig(max_position_embeddings=seq, **fields)
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, cfg.vocab_size, (int(n),), generator=generator).tolist()
            for n in torch.randint(50, 2000, (batch * steps * seq // 900 + 8,), generator=generator)]
    rows = kt.pack_documents(docs, seq, eos_id=2)
    return cfg, rows, batch, steps


def fresh_model(cfg, device):
    torch.manual_seed(0)
    return kpro.Llama(cfg).to(device)


def parameter_counts(cfg) -> tuple[int, int]:
    """(all parameters, those that multiply activations: all but an untied input embedding table)."""
    with torch.device("meta"):
        model = kpro.Llama(cfg)
    total = model.num_parameters()
    return total, total - (0 if cfg.tie_word_embeddings else model.embed_tokens.weight.numel())


def bf16_matmul_rate(device, n=8192, reps=20) -> float:
    """Measured dense bf16 matmul FLOP/s of the device (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


class StepTimes(kt.Callback):
    def __init__(self):
        self.tokens_per_s = []

    def on_step_end(self, run, metrics):
        self.tokens_per_s.append(metrics["tokens_per_s"])


def plain_loop(model, batches, steps, device):
    """The same step, hand-written: what fit's bookkeeping is measured against."""
    optimizer = kt.adamw(model, 3e-4)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    rates = []
    for _, batch in zip(range(steps), batches):
        start = time.perf_counter()
        ids = batch["input_ids"].to(device)
        with autocast:
            loss = kt.causal_lm_loss(model(ids), ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        rates.append(ids.numel() / (time.perf_counter() - start))
    return rates


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", ["fit", "plain-loop"])
def test_train_throughput(benchmark, device, tmp_path, impl, size):
    cfg, rows, batch, steps = setup_size(size, device)
    benchmark.group = f"train {size}"
    rates, rounds = [], iter(range(1000))

    def setup():
        return (fresh_model(cfg, device), kt.Batches(rows, batch, seed=0)), {}

    def run(model, batches):
        if impl == "fit":
            timer = StepTimes()
            kt.fit(model, batches, tmp_path / f"run{next(rounds)}", steps=steps, callbacks=[timer], stream=io.StringIO())
            rates.extend(timer.tokens_per_s[1:])
        else:
            rates.extend(plain_loop(model, batches, steps, device)[1:])
        synchronize(device)

    benchmark.pedantic(run, setup=setup, rounds=3 if device.type == "cpu" else 1, iterations=1)
    tokens_per_s = statistics.median(rates)
    params, matmul_params = parameter_counts(cfg)
    info = dict(device=describe_device(device), tokens_per_step=batch * rows.shape[1], steps=steps,
                tokens_per_s=round(tokens_per_s), params=params)
    if device.type == "cuda":
        rate = bf16_matmul_rate(device)
        info.update(bf16_matmul_tflops=round(rate / 1e12, 1), mfu=round(6 * matmul_params * tokens_per_s / rate, 3))
    benchmark.extra_info.update(info)
    print(f"\n{impl} {size}: {tokens_per_s:,.0f} tokens/s (median of steps after the first) {info}")
