"""Demo act `internalization`: stepwise internalization of chain-of-thought on 2×2 multiplication.

Three tiny LLaMAs from scratch on the same data: an explicit-CoT model; an internalized one (the
explicit-CoT model trained on while its CoT is removed from the left, one token more every
`steps_per_token` steps, until none is left); and a no-CoT model trained as many steps as the two others
together. Each is decoded greedily on held-out problems: accuracy and examples/s. The task is 2×2 because
it fits the budget of a few minutes on 2 CPU cores: a model this size needs ~10× the steps to learn even
the explicit CoT of 3×3 (`digits=3` runs it anyway). All data is generated, the test pairs left out of
training.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..config import LlamaConfig
from ..internalize import (RemovalSchedule, evaluate, fit_internalization, mean_cot_tokens, multiplication_lines,
                           multiplication_pairs, multiplication_tokenizer, multiplication_training_set, parse_line,
                           tokenize_examples)
from ..model import Llama

BATCH = 32
LR = 2e-3


def demo_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def act_internalization(out_dir: Path, seed: int = 0, digits: int = 2, explicit_steps: int = 1600,
                        internalize_steps: int = 1400, steps_per_token: int = 100, test_size: int = 200) -> dict:
    print(f"== internalization: a tiny LLaMA learns {digits}x{digits} multiplication with a chain of thought, "
          "then learns to do without it (ICoT-SI)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and lose much on a busy machine
    try:
        return _run(out_dir, seed, digits, explicit_steps, internalize_steps, steps_per_token, test_size)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, seed, digits, explicit_steps, internalize_steps, steps_per_token, test_size) -> dict:
    tok = multiplication_tokenizer()
    test_pairs = multiplication_pairs(digits, test_size, seed + 1)
    test = [parse_line(line) for line in multiplication_lines(test_pairs, digits)]
    operands = 10 ** digits - (10 ** (digits - 1) if digits > 1 else 0)
    available = operands ** 2 - test_size  # 2x2: all 7,900 other pairs, each seen several times
    size = min(BATCH * (explicit_steps + internalize_steps), available)
    lines = multiplication_training_set(digits, size, seed, exclude=test_pairs)
    train = tokenize_examples([parse_line(line) for line in lines], tok)
    cot = train[0].cot_length
    print(f"data: {len(train):,} generated training lines, {len(test)} held-out test problems; the CoT is {cot} "
          f"tokens, e.g. {lines[0]}")
    # The schedule's "epoch" is 8 tokens' worth of steps: the whole CoT is gone after cot * steps_per_token steps.
    schedule = RemovalSchedule(steps_per_epoch=8 * steps_per_token, remove_per_epoch=8)
    if cot * steps_per_token > internalize_steps:
        print(f"(the schedule removes the last CoT token at step {cot * steps_per_token}, after these "
              f"{internalize_steps} steps: the internalized model still writes part of its CoT)")

    def train_model(name: str, model: Llama, removal, steps: int) -> Llama:
        print(f"-- {name}: {steps} steps of {BATCH}")
        fit_internalization(model, train, out_dir / name, removal=removal, steps=steps, batch_size=BATCH,
                            pad_id=tok.pad_id, lr=LR, seed=seed, keep_last=1, log_every=max(1, steps // 4))
        return model

    torch.manual_seed(seed)
    explicit = train_model("explicit-cot", Llama(demo_config(tok.vocab_size)), "none", explicit_steps)
    internalized = train_model("internalized", copy.deepcopy(explicit), schedule, internalize_steps)
    torch.manual_seed(seed)
    no_cot = train_model("no-cot", Llama(demo_config(tok.vocab_size)), "all", explicit_steps + internalize_steps)

    results = {}
    print(f"held-out {digits}x{digits} test set, greedy decoding in batches of {test_size} on the CPU (1 thread):")
    for name, model, steps in (("explicit CoT", explicit, explicit_steps),
                               ("no CoT", no_cot, explicit_steps + internalize_steps),
                               ("internalized", internalized, explicit_steps + internalize_steps)):
        model.eval()
        result = evaluate(model, tok, test, batch_size=test_size)
        written = mean_cot_tokens(result, tok.eos_id)
        results[name] = {"accuracy": result.accuracy, "examples_per_second": result.examples_per_second,
                         "cot_tokens": written}
        print(f"  {name:13s} accuracy {result.accuracy:.3f}  {result.examples_per_second:7,.0f} examples/s  "
              f"{written:4.1f} CoT tokens written  ({steps} training steps)")
    example = test[0]
    prediction = evaluate(internalized, tok, [example]).predictions[0]
    print(f"  e.g. internalized: {example.input} -> [{prediction.cot}] #### {prediction.answer}  "
          f"(reference {example.answer})")
    speedup = results["internalized"]["examples_per_second"] / results["explicit CoT"]["examples_per_second"]
    print(f"internalized vs explicit CoT: {speedup:.1f}x the examples/s")
    return results
