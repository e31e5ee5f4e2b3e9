"""`python -m kpro demo`: the main job on an embedded tiny default, a few minutes on 2 CPU cores.

Act `basics`: train a tiny LLaMA from scratch on a built-in synthetic task (reverse a string of
letters), save it in the Hugging Face layout, load it back, and decode held-out prompts with the KV cache.
"""
from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_pretrained, save_pretrained
from .config import LlamaConfig
from .generation import generate
from .model import Llama
from .tokenizer import CharTokenizer, pad_left

LETTERS = "abcdefghij"


def reversal_task(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[str, str]:
    """A prompt like 'hfbd>' and its answer 'dbfh'."""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
    return word + ">", word[::-1]


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def training_batch(tok: CharTokenizer, rng: random.Random, size: int):
    """Right-padded sequences `<bos> prompt answer <eos>`, with the loss on answer tokens only."""
    rows, targets = [], []
    for _ in range(size):
        prompt, answer = reversal_task(rng)
        p, a = tok.encode(prompt, bos=True), tok.encode(answer, bos=False, eos=True)
        rows.append(p + a)
        targets.append([-100] * len(p) + a)
    length = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (length - len(r)) for r in rows])
    labels = torch.tensor([t + [-100] * (length - len(t)) for t in targets])
    return ids[:, :-1], labels[:, 1:]


def accuracy(model: Llama, tok: CharTokenizer, examples: list[tuple[str, str]]) -> float:
    ids, mask = pad_left([tok.encode(p, bos=True) for p, _ in examples], tok.pad_id)
    out = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    answers = [tok.decode(row[ids.shape[1]:].tolist()) for row in out]
    return sum(got == want for got, want in zip(answers, (a for _, a in examples))) / len(examples)


def progress(step: int, total: int, loss: float, start: float, stream=None) -> None:
    stream = stream or sys.stdout
    elapsed = time.perf_counter() - start
    eta = elapsed / step * (total - step)
    line = f"step {step:5d}/{total}  loss {loss:.4f}  {step / elapsed:5.1f} steps/s  eta {eta:4.0f}s"
    if stream.isatty():
        stream.write("\r" + line + ("\n" if step == total else ""))
    elif step % 50 == 0 or step == total:
        stream.write(line + "\n")
    stream.flush()


def act_basics(out_dir: Path, steps: int = 600, seed: int = 0) -> dict:
    print("== basics: a tiny LLaMA learns to reverse strings, is saved in the HF layout, reloaded and sampled")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer(LETTERS + ">")
    model = Llama(tiny_config(tok.vocab_size))
    held_out = [reversal_task(random.Random(10_000 + i)) for i in range(200)]
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters; accuracy before training {accuracy(model, tok, held_out):.2f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        ids, labels = training_batch(tok, rng, 64)
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress(step, steps, loss.item(), start)
    save_pretrained(model, out_dir)
    tok.save(out_dir)
    reloaded = load_pretrained(out_dir)
    acc = accuracy(reloaded, tok, held_out)
    print(f"saved to {out_dir}/ and reloaded; held-out accuracy {acc:.2f} (greedy, KV cache)")
    for prompt, _ in held_out[:3]:
        ids = torch.tensor([tok.encode(prompt, bos=True)])
        sample = generate(reloaded, ids, 10, temperature=0.7, generator=torch.Generator().manual_seed(seed))
        print(f"  {prompt} -> {tok.decode(sample[0, ids.shape[1]:].tolist())}   (sampled at temperature 0.7)")
    print(f"try: python -m kpro generate {out_dir} --prompt 'abcdef>'")
    return {"accuracy": acc}


ACTS = {"basics": act_basics}


def run(acts: list[str], out_dir: Path, seed: int = 0) -> dict:
    results = {}
    for name in acts:
        results[name] = ACTS[name](out_dir / name, seed=seed)
    return results
