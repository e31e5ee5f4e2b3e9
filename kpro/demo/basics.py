"""Demo act `basics`: train a tiny LLaMA from scratch with `kpro.train.fit` on a built-in synthetic task (reverse a
string of letters), save it in the Hugging Face layout, load it back, and decode held-out prompts with the
KV cache.
"""
from __future__ import annotations

import random
import shlex
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import load_pretrained, save_pretrained
from ..config import LlamaConfig
from ..generation import generate
from ..model import Llama
from ..tokenizer import CharTokenizer, pad_left
from ..train import Batches, Callback, Schedule, adamw, collate_prompt_answer, fit
from .act_settings import check_positive, records_settings
from .claims import claim_line, figure

LETTERS = "abcdefghij"
CLAIM = "a LLaMA trained with kpro.train.fit reverses held-out strings (>= 0.9) and answers the same after a save and reload"
LEARNED = 0.9


def reversal_task(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[str, str]:
    """A prompt like 'hfbd>' and its answer 'dbfh'."""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
    return word + ">", word[::-1]


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def training_examples(tok: CharTokenizer, rng: random.Random, count: int,
                      held_out: list[tuple[str, str]] = ()) -> list[tuple[list[int], list[int]]]:
    """(`<bos> prompt`, `answer <eos>`) token pairs, none of them a `held_out` prompt: the loss falls on the
    answer only."""
    pairs = drawn_outside(lambda: reversal_task(rng), count, held_out)
    return [(tok.encode(prompt, bos=True), tok.encode(answer, bos=False, eos=True)) for prompt, answer in pairs]


def drawn_outside(draw, count: int, held_out) -> list[tuple[str, str]]:
    """`count` (prompt, answer) pairs from `draw()`, skipping the prompts of `held_out`: a held-out question
    must not be a training one (short strings repeat: 38 of 200 did before)."""
    excluded = {prompt for prompt, _ in held_out}
    pairs = []
    while len(pairs) < count:
        pair = draw()
        if pair[0] not in excluded:
            pairs.append(pair)
    return pairs


class TokenizerInCheckpoints(Callback):
    """Write the tokenizer into every training checkpoint, so each one works with `python -m kpro generate`."""

    def __init__(self, tok):
        self.tok = tok

    def on_save(self, run, directory):
        self.tok.save(directory)


def answers(model: Llama, tok: CharTokenizer, examples: list[tuple[str, str]]) -> list[str]:
    """Greedy answers (KV cache, batched, left-padded) to the prompts of `examples`."""
    ids, mask = pad_left([tok.encode(p, bos=True) for p, _ in examples], tok.pad_id)
    out = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return [tok.decode(row[ids.shape[1]:].tolist()) for row in out]


def accuracy(model: Llama, tok: CharTokenizer, examples: list[tuple[str, str]]) -> float:
    got = answers(model, tok, examples)
    return sum(g == want for g, want in zip(got, (a for _, a in examples))) / len(examples)


def verdict(trained: list[str], reloaded: list[str], examples: list[tuple[str, str]]) -> tuple[bool, float]:
    """(shown, accuracy): the reloaded model's answers are the trained model's, and >= LEARNED of them right."""
    acc = sum(g == want for g, (_, want) in zip(reloaded, examples)) / len(examples)
    return trained == reloaded and acc >= LEARNED, acc


def run_directory(out_dir: Path) -> Path:
    """The training run's directory, beside the model's (out_dir, which holds the model alone)."""
    return out_dir.with_name(out_dir.name + "-run")


@records_settings(lambda steps, seed, **_: check_positive("act_basics", steps=steps, seed=seed), where=run_directory)
def act_basics(out_dir: Path, steps: int = 600, seed: int = 0) -> dict:
    print("== basics: a tiny LLaMA learns to reverse strings, is saved in the HF layout, reloaded and sampled")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer(LETTERS + ">")
    model = Llama(tiny_config(tok.vocab_size))
    held_out = [reversal_task(random.Random(10_000 + i)) for i in range(200)]
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters; accuracy before training {accuracy(model, tok, held_out):.2f}")
    batches = Batches(training_examples(tok, rng, 20_000, held_out), 64, partial(collate_prompt_answer, pad_id=tok.pad_id),
                      seed=seed)
    run_dir = run_directory(out_dir)
    print(f"training state in {run_dir}/ (metrics.jsonl, checkpoints): Ctrl-C saves a checkpoint and running "
          "the demo again resumes from it")
    fit(model, batches, run_dir, steps=steps, optimizer=lambda m: adamw(m, 3e-3, betas=(0.9, 0.98)),
        schedule=Schedule("cosine", warmup_steps=steps // 10, total_steps=steps), clip_grad_norm=1.0,
        keep_last=1, callbacks=[TokenizerInCheckpoints(tok)])
    trained = answers(model, tok, held_out)
    save_pretrained(model, out_dir)
    tok.save(out_dir)
    reloaded = load_pretrained(out_dir)
    again = answers(reloaded, tok, held_out)
    shown, acc = verdict(trained, again, held_out)
    same = sum(a == b for a, b in zip(trained, again))
    print(f"saved to {out_dir}/ and reloaded; held-out accuracy {acc:.2f} (greedy, KV cache); {same}/{len(held_out)} "
          "answers the same as before saving")
    for prompt, _ in held_out[:3]:
        ids = torch.tensor([tok.encode(prompt, bos=True)])
        sample = generate(reloaded, ids, 10, temperature=0.7, generator=torch.Generator().manual_seed(seed))
        print(f"  {prompt} -> {tok.decode(sample[0, ids.shape[1]:].tolist())}   (sampled at temperature 0.7)")
    print(f"try: python -m kpro generate {shlex.quote(str(out_dir))} --prompt 'abcdef>'")
    print(claim_line("basics", CLAIM, shown, f"held-out accuracy {figure(acc, LEARNED, acc >= LEARNED)} after "
                     f"reloading (needs >= {LEARNED}), "
                     f"{same}/{len(held_out)} answers unchanged by the save and reload") + "\n")
    return {"accuracy": acc, "same_answers": same, "claim_shown": shown}
