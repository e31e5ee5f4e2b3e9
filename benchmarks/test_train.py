"""Training throughput of kpro.train.fit against a minimal hand-written loop doing the same work (forward,
fp32 cross-entropy, backward, clipping, AdamW), on packed random tokens. Both compute the loss as fit does by
default (`lm_loss`: kpro.ops.linear_cross_entropy from the final hidden states, no logits), so the figures
compare fit's bookkeeping, not two ways of computing the loss.

    pytest --benchmark -k train_throughput

The timed call is `steps` optimizer steps (for fit, with its final checkpoint, which is part of its cost);
`extra_info` holds the steady-state tokens/s (median over steps after the first, checkpoint excluded; each
step timed from the previous step's end to its own, on both sides, so fit's figure holds its whole loop
iteration, bookkeeping and data included, as the hand-written loop's holds its own), fit's
steady-state step time over the loop's (`time_over_plain-loop`: the same work, the checkpoint left out) and,
on CUDA, the model FLOPs utilisation: 6 · matmul parameters · tokens/s over the bf16 matmul rate measured
in the same run (conftest.matmul_flops). A training loop waits for each step's loss, so its steps are timed
by the host clock (on a GPU too). Both loops' first-step loss, and the gradients their optimizer gets at
that step (clipped), must equal those of the same fresh model on the same first batch (kpro's plain-PyTorch
path, fp32, no autocast, the logits materialised, not the fused loss both loops use); a loop cannot be run
untimed here, so this is checked on the timed run (the gradients before its first update, outside the
steady-state steps) and fails the case when it disagrees.
"""
import contextlib
import io
import statistics
import time

import pytest
import torch

import kpro
from conftest import MODEL_TOLERANCE, TOLERANCE, check_gradients, describe_device, record_ratios, synchronize
from kpro import ops
from kpro import train as kt
from kpro.train.loss import count_loss_tokens
from torch.optim.optimizer import register_optimizer_step_pre_hook

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


CLIP = 1.0  # fit's default clip_grad_norm, and the hand-written loop's


def reference_first_step(cfg, rows, batch, device) -> tuple[float, dict]:
    """The loss of a fresh model on the first batch either loop sees, and its gradients as the optimizer gets
    them (clipped at CLIP): kpro's plain-PyTorch path, fp32, no autocast, the logits materialised (both loops use
    the fused loss). One row at a time, the sums added up: at gpu-1b the whole batch's fp32 logits and
    attention would not fit beside the run."""
    model = fresh_model(cfg, device)
    ids = next(iter(kt.Batches(rows, batch, seed=0)))["input_ids"].to(device)
    count, total = count_loss_tokens(ids), 0.0
    with ops.backend("torch"):
        for row in ids.split(1):
            loss = kt.causal_lm_loss(model(row), row, reduction="sum") / count
            loss.backward()
            total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    return total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def first_step_checked(impl, model, reference_grads, tolerance):
    """Check the gradients that the first optimizer step gets (after clipping) against the reference's: fit's
    optimizer is its own, so any optimizer's step is caught (check_gradients raises WrongResult, which ends the
    run before its first update)."""
    names, checked = {p: n for n, p in model.named_parameters()}, []

    def check(optimizer, args, kwargs):
        if not checked:
            checked.append(True)
            grads = {names[p]: p.grad for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None}
            check_gradients(impl, grads, reference_grads, torch.float32, tolerance=tolerance)
    handle = register_optimizer_step_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
    assert checked, f"{impl}: no optimizer step was taken, so its gradients were not checked"


class StepTimes(kt.Callback):
    """fit's tokens/s of each step after the first, timed from the previous step's end to this one's: its whole
    iteration (data, callbacks, metrics, progress, the step), as the hand-written loop is timed. fit's own
    `tokens_per_s` times its training step alone and would leave its bookkeeping out."""

    def __init__(self):
        self.tokens_per_s, self.losses, self._last_end = [], [], None

    def on_step_end(self, run, metrics):
        now = time.perf_counter()
        if self._last_end is not None:
            self.tokens_per_s.append(metrics["tokens"] / (now - self._last_end))
        self._last_end = now
        self.losses.append(float(metrics["loss"]))


def plain_loop(model, batches, steps, device):
    """The same step, hand-written: what fit's bookkeeping is measured against. Returns the tokens/s of each step
    after the first, timed from the previous step's end to this one's (the batch fetch included, as in
    StepTimes), and every step's loss."""
    optimizer = kt.adamw(model, 3e-4)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    rates, losses, last_end = [], [], None
    for _, batch in zip(range(steps), batches):
        ids = batch["input_ids"].to(device)
        with autocast:  # fit's default loss (lm_loss): the head's cross-entropy from the hidden states, no logits
            loss = kt.causal_lm_loss_from_hidden(model(ids, head=False), model.lm_head.weight, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        now = time.perf_counter()
        if last_end is not None:
            rates.append(ids.numel() / (now - last_end))
        last_end = now
    return rates, losses


@pytest.mark.parametrize("impl", ["fit", "plain-loop"])
@pytest.mark.parametrize("size", SIZES)
def test_train_throughput(benchmark, device, matmul_flops, tmp_path, impl, size):
    cfg, rows, batch, steps = setup_size(size, device)
    reference_loss, reference_grads = reference_first_step(cfg, rows, batch, device)
    tolerance = MODEL_TOLERANCE[torch.bfloat16] if device.type == "cuda" else TOLERANCE[torch.float32]  # bf16 autocast
    benchmark.group = f"train {size}"
    rates, first_losses, rounds = [], [], iter(range(1000))

    def setup():
        return (fresh_model(cfg, device), kt.Batches(rows, batch, seed=0)), {}

    def run(model, batches):
        with first_step_checked(impl, model, reference_grads, tolerance):
            if impl == "fit":
                timer = StepTimes()
                kt.fit(model, batches, tmp_path / f"run{next(rounds)}", steps=steps, callbacks=[timer],
                       stream=io.StringIO())
                rates.extend(timer.tokens_per_s)
                first_losses.append(timer.losses[0])
            else:
                step_rates, losses = plain_loop(model, batches, steps, device)
                rates.extend(step_rates)
                first_losses.append(losses[0])
        synchronize(device)

    benchmark.pedantic(run, setup=setup, rounds=3 if device.type == "cpu" else 1, iterations=1)
    loss_tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on a GPU
    assert all(abs(loss - reference_loss) <= loss_tolerance * abs(reference_loss) for loss in first_losses), \
        f"{impl} is wrong: first-step losses {first_losses} against the reference's {reference_loss}"
    tokens_per_s = statistics.median(rates)
    params, matmul_params = parameter_counts(cfg)
    info = dict(device=describe_device(device), tokens_per_step=batch * rows.shape[1], steps=steps,
                tokens_per_s=round(tokens_per_s), params=params, timer="host clock (per step)")
    if matmul_flops:
        info.update(matmul_tflops=round(matmul_flops / 1e12, 1),
                    mfu=round(6 * matmul_params * tokens_per_s / matmul_flops, 3))
    benchmark.extra_info.update(info)
    # fit's round holds its final checkpoint (13 GB fsynced at gpu-1b), the loop's none: compare steady-state steps
    record_ratios(benchmark, impl, ours=impl == "fit", seconds=batch * rows.shape[1] / tokens_per_s)
    print(f"\n{impl} {size}: {tokens_per_s:,.0f} tokens/s (median of steps after the first) {info}")
