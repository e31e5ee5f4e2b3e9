"""Reproduction entry `smollm2-cpu-figures`: what kpro's CPU path does on a real LLaMA geometry (SmolLM2-135M:
30 blocks x 576, 9/3 heads, vocabulary 49,152, tied embeddings), measured in one process:

- generation: greedy decoding with the KV cache, batch 1 and 8 (prefill and decode tokens/s);
- training throughput: forward + backward at sequence 256 (batch 4), every weight training;
- LLaMA Pro's step: the model expanded 30 -> 36 blocks, `train_only` the 6 new blocks against every weight
  training, the same batch: step time (forward, backward, AdamW) and the activations autograd saves.
Each time is the median of `repeats` after one warm-up; the threads torch uses are printed with the figures.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .._files import write_atomic
from ..checkpoint import load_pretrained
from ..expansion import expand, saved_activation_bytes, train_only
from ..generation import generate
from ..tokenizer import load_tokenizer
from ..train import adamw, collate_packed, lm_loss
from .smollm2 import GENERAL_QUESTIONS, MODEL_DIR, converted_model, missing_requirement, packed_rows, stdlib_files


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _generation(model, tok, batch: int, new_tokens: int, repeats: int) -> dict:
    questions = (GENERAL_QUESTIONS * 8)[:batch]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    ids, mask = tok.pad_left(prompts)
    with torch.no_grad():
        prefill = _median_seconds(lambda: model(ids, attention_mask=mask), repeats)
        total = _median_seconds(lambda: generate(model, ids, new_tokens, attention_mask=mask, eos_token_id=[]), repeats)
    decode = max(total - prefill, 1e-9)
    return {"batch": batch, "prompt_tokens": int(mask.sum()), "new_tokens": new_tokens * batch,
            "prefill_tokens_per_s": int(mask.sum()) / prefill, "decode_tokens_per_s": new_tokens * batch / decode,
            "end_to_end_tokens_per_s": new_tokens * batch / total}


def _step(model, batch, optimizer=None):
    loss = lm_loss(model, batch).mean
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    for p in model.parameters():
        p.grad = None


def measure_smollm2_cpu_figures(out_dir: Path, seed: int = 0, repeats: int = 3, seq_len: int = 256,
                                batch_size: int = 4, new_tokens: int = 64) -> dict:
    print(f"== smollm2-cpu-figures: generation, forward+backward at sequence {seq_len}, and train_only against full "
          f"training (30 + 6 blocks) on SmolLM2-135M's geometry; torch threads: {torch.get_num_threads()}")
    missing = missing_requirement()
    if missing:
        print(f"skipped: {missing}")
        return {"skipped": missing}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    directory, _ = converted_model(out_dir.parent / MODEL_DIR)  # shared by the reproductions
    tok = load_tokenizer(directory)
    torch.manual_seed(seed)
    model = load_pretrained(directory).eval()
    results = {"threads": torch.get_num_threads(), "repeats": repeats}
    results["generation"] = [_generation(model, tok, b, new_tokens, repeats) for b in (1, 8)]
    for g in results["generation"]:
        print(f"generation, batch {g['batch']}: prefill {g['prefill_tokens_per_s']:.0f} tokens/s, decode "
              f"{g['decode_tokens_per_s']:.1f} tokens/s ({new_tokens} new tokens per row, greedy, KV cache)")

    rows = packed_rows(tok, stdlib_files(), seq_len, batch_size, seed)
    batch = collate_packed(rows)
    tokens = batch_size * seq_len
    model.train()
    fwd_bwd = _median_seconds(lambda: _step(model, batch), repeats)
    results["forward_backward"] = {"tokens": tokens, "seconds": fwd_bwd, "tokens_per_s": tokens / fwd_bwd}
    print(f"forward+backward, {batch_size} x {seq_len} tokens, all weights training: {fwd_bwd * 1e3:.0f} ms, "
          f"{tokens / fwd_bwd:.0f} tokens/s")

    new_ids = expand(model, 6)
    for name, blocks in (("train_only", new_ids), ("full", None)):
        plan = train_only(model, blocks)
        optimizer = adamw(model, 1e-5)
        step = _median_seconds(lambda: _step(model, batch, optimizer), repeats)
        saved, loss = saved_activation_bytes(lambda: lm_loss(model, batch).mean, model.parameters())
        loss.backward()
        for p in model.parameters():
            p.grad = None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[name] = {"step_seconds": step, "tokens_per_s": tokens / step, "saved_activation_bytes": saved,
                         "trainable_parameters": trainable}
        print(f"36 blocks, {name:<10}: step {step * 1e3:.0f} ms ({tokens / step:.0f} tokens/s), saved activations "
              f"{saved / 2**20:.0f} MiB, {trainable / 1e6:.1f}M trainable ({plan.describe().split(';')[0]})")
    ratio = results["full"]["step_seconds"] / results["train_only"]["step_seconds"]
    memory = 1 - results["train_only"]["saved_activation_bytes"] / results["full"]["saved_activation_bytes"]
    print(f"train_only: step {ratio:.2f}x faster than full training, {memory:.1%} fewer saved activation bytes\n")
    write_atomic(out_dir / "figures.json", json.dumps(results, indent=2) + "\n")
    return results
