"""`python -m kpro reproduce bitune-readings`: do the bitune act's questions separate the two readings at all?

The control behind the bitune act's null result, with no adapters, no mix and no pretraining: the act's
2-block LLaMA trained from scratch, all weights, on the act's questions (records counted from the left or
the right), the prompt read either causally (the library's forward) or as a prefix LM, where every prompt
token attends to the whole prompt (`kpro.ops.attention(prefix_lens=)`). Nothing else differs. If full
training gains nothing from bidirectional reading on `right`, no adapter set-up can show Bitune's gain on
these questions at this size. `reproduce_bitune_readings(out, digits=9)` asks the same of longer questions
(the act's have 6 distinct digits; 9 is the most whose count stays one digit).
"""
from __future__ import annotations

import io
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..bitune.data import PROMPT_TEMPLATE
from ..model import Llama, positions_from_mask
from ..rope import apply_rope
from ..tokenizer import CharTokenizer
from ..train import Batches, Schedule, fit
from .act_settings import check_positive, records_settings
from .bitune import DIGITS, SIDES, SYMBOLS, question_sets, tiny_config
from .claims import claim_line, in_standard_errors
from .parallel import run_jobs
from .seeds import seeds_inputs, seeds_verdict

READINGS = ("causal", "prefix")
# The reproduction's settings (scripts in benchmarks/RESULTS.md read them from here)
DEFAULTS = dict(steps=3000, lr=1e-3, warmup_steps=100, train_questions=8000, held_out=1000, digits=DIGITS)
CLAIM = "a prefix LM (the prompt read bidirectionally) beats causal reading on 'right', all weights trained"


def prefix_hidden_states(model: Llama, input_ids, attention_mask, prompt_lens) -> torch.Tensor:
    """The final-norm hidden states [B, T, d] of `model` read as a prefix LM: each row's first
    `prompt_lens` tokens attend to one another both ways, the tokens after them causally. The same blocks
    and weights as `model(..., head=False)`, which is this with every prompt length 1."""
    batch, length = input_ids.shape
    mask = attention_mask.bool()
    x = model.embed_tokens(input_ids)
    cos, sin = model.rope(positions_from_mask(mask, 0, length, input_ids.device), x.dtype)
    for block in model.layers:
        attn, h = block.self_attn, block.input_layernorm(x)
        q = apply_rope(attn.q_proj(h).view(batch, length, attn.num_heads, attn.head_dim), cos, sin)
        k = apply_rope(attn.k_proj(h).view(batch, length, attn.num_kv_heads, attn.head_dim), cos, sin)
        v = attn.v_proj(h).view(batch, length, attn.num_kv_heads, attn.head_dim)
        out = ops.attention(q, k, v, causal=True, prefix_lens=prompt_lens, attention_mask=mask)
        x = x + attn.o_proj(out.reshape(batch, length, attn.num_heads * attn.head_dim))
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.norm(x)


def collate(examples, tok: CharTokenizer) -> dict:
    """`<bos>Question: digits side\\n\\nAnswer: ` right-padded; the target is the count's digit, predicted at
    the position of the space after the prompt (index `prompt_lens`)."""
    prompts = [tok.encode(PROMPT_TEMPLATE.format(instruction=q), bos=True) for q, _, _ in examples]
    rows = [prompt + tok.encode(" ", bos=False) for prompt in prompts]
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([row + [tok.pad_id] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows]),
            "prompt_lens": torch.tensor([len(prompt) for prompt in prompts]),
            "targets": torch.tensor([tok.encode(answer, bos=False)[0] for _, answer, _ in examples])}


def answer_logits(model: Llama, batch: dict, reading: str) -> torch.Tensor:
    """[B, vocab]: the logits of the count's digit, the prompt read `causal`ly or as a `prefix` LM."""
    if reading == "causal":
        hidden = model(batch["input_ids"], batch["attention_mask"], head=False)
    else:
        hidden = prefix_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"])
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.lm_head(hidden[rows, batch["prompt_lens"]])


def train_reading(out_dir: Path, reading: str, seed: int, steps: int, lr: float, warmup_steps: int,
                  train_questions: int, held_out: int, digits: int = DIGITS) -> dict:
    """One run from scratch on questions of `digits` distinct digits (the act's 6 by default); held-out
    accuracy per side and the training seconds."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; choose from {', '.join(READINGS)}")
    torch.manual_seed(seed)
    rng, tok = random.Random(seed), CharTokenizer(SYMBOLS)
    model = Llama(tiny_config(tok.vocab_size))
    test, train = question_sets(rng, seed, held_out, train_questions, digits)  # the act's at its 6 digits
    start = time.perf_counter()
    fit(model, Batches(train, 32, lambda examples: collate(examples, tok), seed=seed), out_dir, steps=steps,
        loss_fn=lambda m, batch: F.cross_entropy(answer_logits(m, batch, reading), batch["targets"]),
        lr=lr, schedule=Schedule("cosine", warmup_steps=warmup_steps, total_steps=steps), keep_last=1,
        stream=io.StringIO())
    seconds = time.perf_counter() - start
    model.eval()
    result = {"train_seconds": seconds}
    with torch.no_grad():
        for i, side in enumerate(SIDES):
            batch = collate(test[i * held_out:(i + 1) * held_out], tok)
            result[side] = (answer_logits(model, batch, reading).argmax(-1) == batch["targets"]).float().mean().item()
    print(f"seed {seed}, {reading}: left {result['left']:.3f}, right {result['right']:.3f} after {steps} steps "
          f"({seconds:.0f} s)", flush=True)  # progress: the table waits for every run
    return result


# A rerun with other settings would reuse the old runs' checkpoints. Each setting is a parameter of its own, not
# **settings, so that the file records every one in effect (defaults included), as the acts' do.
@records_settings()
def reproduce_bitune_readings(out_dir: Path, seed: int = 0, seeds: int = 3, workers: int | None = None,
                              steps: int = DEFAULTS["steps"], lr: float = DEFAULTS["lr"],
                              warmup_steps: int = DEFAULTS["warmup_steps"],
                              train_questions: int = DEFAULTS["train_questions"], held_out: int = DEFAULTS["held_out"],
                              digits: int = DEFAULTS["digits"]) -> dict:
    """Both readings over `seeds` seeds, two runs at a time; per seed the accuracies, and the prefix LM's gain
    on `right` over causal reading with the larger of the seeds' and the questions' standard error."""
    settings = dict(steps=steps, lr=lr, warmup_steps=warmup_steps, train_questions=train_questions,
                    held_out=held_out, digits=digits)
    check_positive("reproduce_bitune_readings", seeds=seeds, seed=seed)
    seed_list = list(range(seed, seed + seeds))
    print(f"== bitune-readings: the bitune act's 2-block LLaMA trained from scratch, all weights, {settings['steps']} "
          f"steps of 32, the prompt read causally or as a prefix LM; questions of {settings['digits']} digits, "
          f"seeds {seed_list[0]}-{seed_list[-1]}, {settings['held_out']} held-out questions a side")
    jobs = [(train_reading, dict(out_dir=out_dir / f"seed-{s}" / reading, reading=reading, seed=s, **settings))
            for s in seed_list for reading in READINGS]
    done = iter(run_jobs(jobs, workers))
    runs = {s: {reading: next(done) for reading in READINGS} for s in seed_list}
    print(f"{'seed':<6}" + "".join(f"{reading + ' ' + side:>16}" for reading in READINGS for side in SIDES)
          + f"{'gain on right':>16}")
    for s, run in runs.items():
        print(f"{s:<6}" + "".join(f"{run[reading][side]:>16.3f}" for reading in READINGS for side in SIDES)
              + f"{run['prefix']['right'] - run['causal']['right']:>+16.3f}")
    gains = [run["prefix"]["right"] - run["causal"]["right"] for run in runs.values()]
    mean = {reading: sum(run[reading]["right"] for run in runs.values()) / seeds for reading in READINGS}
    shown, gain, se, seed_se, binomial_se = seeds_verdict(gains, mean["prefix"], mean["causal"],
                                                          settings["held_out"] * seeds)
    print(claim_line("bitune-readings", CLAIM, shown, f"gain {gain:+.3f}, standard error {se:.3f} (seeds "
                     f"{seed_se:.3f}, questions {binomial_se:.3f}): {in_standard_errors(gain, se, 3, shown, (settings['held_out'] * seeds,) * 2)} "
                     "(needs > 3)", seeds_inputs(gains, {reading: mean[reading] for reading in READINGS}, seed)))
    return {"runs": runs, "gain": gain, "gain_se": se, "claim_shown": shown}
