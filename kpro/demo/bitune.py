"""Demo act `bitune`: plain LoRA against Bitune on a task whose question comes after the data it is about.

A tiny LLaMA is first pretrained (all weights) on a general task over the same symbols (sort digits). Then
each method tunes its adapters for the same steps on `Question: 3 8 1 0 7 5 max\\n\\nAnswer: 8`: the
operation (max, min, first, last) comes after the digits, so a model that reads the prompt only causally
must do all the work at the answer, while Bitune's bidirectional pass lets the digits see the question.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from .. import bitune
from ..checkpoint import load_pretrained, save_pretrained
from ..config import LlamaConfig
from ..model import Llama
from ..tokenizer import CharTokenizer
from ..train import Batches, Schedule, adamw, fit, pack_documents

OPERATIONS = {"max": max, "min": min, "first": lambda d: d[0], "last": lambda d: d[-1]}
SYMBOLS = "".join(dict.fromkeys("0123456789 |:\n" + "QuestionAnswer" + "".join(OPERATIONS)))


def question(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(6)]
    op = rng.choice(list(OPERATIONS))
    return " ".join(map(str, digits)) + " " + op, str(OPERATIONS[op](digits))


def sorting_text(rng: random.Random) -> str:
    digits = [rng.randrange(10) for _ in range(rng.randint(4, 8))]
    return " ".join(map(str, digits)) + " | " + " ".join(map(str, sorted(digits)))


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def act_bitune(out_dir: Path, pretrain_steps: int = 200, tune_steps: int = 300, held_out: int = 300,
               seed: int = 0) -> dict:
    print("== bitune: plain LoRA vs Bitune on questions asked after their data (same base, same steps)")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer(SYMBOLS)
    base = Llama(tiny_config(tok.vocab_size))
    documents = [tok.encode(sorting_text(rng), bos=True, eos=True) for _ in range(20_000)]
    print(f"pretraining a {base.num_parameters() / 1e6:.2f}M-parameter LLaMA on digit sorting ({pretrain_steps} steps)")
    fit(base, Batches(pack_documents(documents, 64, tok.eos_id), 32, seed=seed), out_dir / "pretrain-run",
        steps=pretrain_steps, optimizer=lambda m: adamw(m, 3e-3),
        schedule=Schedule("cosine", warmup_steps=pretrain_steps // 10, total_steps=pretrain_steps), keep_last=1)
    save_pretrained(base, out_dir / "base")
    examples = [bitune.Instruction(*question(rng)) for _ in range(4000)]
    pairs, _ = bitune.tokenize_instructions(tok, examples, max_length=96)
    held_out = [question(random.Random(10_000 + i)) for i in range(held_out)]
    results = {}
    for method in ("lora", "bitune"):
        print(f"tuning {method} adapters (rank 8) for {tune_steps} steps")
        start = time.perf_counter()
        tuned = bitune.tune(load_pretrained(out_dir / "base"), pairs, method, out_dir / method, steps=tune_steps,
                              batch_size=32, lr=2e-3, rank=8, alpha=16.0, seed=seed, pad_id=tok.pad_id)
        seconds = time.perf_counter() - start
        answers = bitune.generate_answers(tuned, tok, [q for q, _ in held_out], max_new_tokens=3)
        accuracy = sum(got == want for got, (_, want) in zip(answers, held_out)) / len(held_out)
        results[method] = {"accuracy": accuracy, "train_seconds": seconds}
    print(f"\n{'method':<10}{'held-out accuracy':>20}{'training time':>16}")
    for method, result in results.items():
        print(f"{method:<10}{result['accuracy']:>20.3f}{result['train_seconds']:>15.0f}s")
    print(f"(one seed, {len(held_out)} questions: differences of a few points are within noise; a Bitune step reads"
          " the prompt three times)")
    return results
