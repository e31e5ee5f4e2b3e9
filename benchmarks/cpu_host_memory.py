"""The allocator experiment of benchmarks/RESULTS.md ("Tried and not adopted: keeping freed host memory"): the
ICoT demo act's training step on the CPU, with glibc's default malloc thresholds or raised ones. glibc reads
them from the environment when a process starts, and the act's spawned workers inherit it:

    python benchmarks/cpu_host_memory.py step          # one process, one thread: ms, page faults, system ms a step
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/cpu_host_memory.py step
    python benchmarks/cpu_host_memory.py act OUT_DIR   # the shortened act, its two runs side by side: seconds
    python benchmarks/cpu_host_memory.py profile       # where the step's time goes, and its products' GFLOP/s

`step` also prints a checksum of the weights after its steps: the thresholds move memory, not arithmetic.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from kpro.demo.internalization import act_internalization, demo_config
from kpro.internalize import multiplication_tokenizer
from kpro.model import Llama
from kpro.train import lm_loss

BATCH, TOKENS = 32, 22  # the act's explicit-CoT batches: 32 rows of 22 tokens


def training_step():
    """The act's model and a step of it (lm_loss, backward, AdamW with weight decay 0.01), on one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = multiplication_tokenizer().vocab_size
    model = Llama(demo_config(vocab))
    ids = torch.randint(3, vocab, (BATCH, TOKENS))
    mask = torch.ones_like(ids)
    mask[:5, :3] = 0  # some left padding, as batches of different lengths have
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # nor on a row's first real token, which a pad would predict
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        lm_loss(model, batch).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def measure_step(warmup: int = 20, steps: int = 200) -> dict:
    model, step = training_step()
    for _ in range(warmup):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"ms_per_step": round(seconds / steps * 1e3, 1),
            "faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
            "system_ms_per_step": round((after.ru_stime - before.ru_stime) / steps * 1e3, 2),
            "weights_checksum": repr(model.layers[0].mlp.down_proj.weight.sum().item())}


def profile_step(steps: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile
    _, step = training_step()
    for _ in range(steps):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    rows, hidden, mlp = BATCH * TOKENS, 128, 512
    for name, (m, k, n) in {"up/gate forward": (rows, hidden, mlp), "down forward": (rows, mlp, hidden),
                            "up/gate weight grad": (mlp, rows, hidden), "q/k/v/o forward": (rows, hidden, hidden)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(10):
            a @ b
        start = time.perf_counter()
        for _ in range(100):
            a @ b
        seconds = (time.perf_counter() - start) / 100
        print(f"{name:20s} [{m}x{k}] @ [{k}x{n}]  {seconds * 1e3:.2f} ms  {2 * m * k * n / seconds / 1e9:.0f} GFLOP/s")


def time_act(out_dir: Path) -> dict:
    start = time.perf_counter()
    act_internalization(out_dir, explicit_steps=300, steps_per_token=150, after_steps=600, decay_steps=300,
                        warmup_steps=100)
    return {"act_seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":  # spawned workers import this module: nothing runs at import
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "step":
        print(json.dumps(measure_step()))
    elif mode == "profile":
        profile_step()
    elif mode == "act" and len(sys.argv) == 3:
        print(json.dumps(time_act(Path(sys.argv[2]))))
    else:
        sys.exit(__doc__)
