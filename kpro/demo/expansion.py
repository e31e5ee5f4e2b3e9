"""Demo act `expansion`: LLaMA Pro block expansion against plain fine-tuning, on a tiny model.

A LLaMA is pretrained on a "general" task: reverse a string of letters (`hfbd>` -> `dbfh`). Then it learns a
"domain" task, new to it, that works the other way round: read a string of digits *forwards* and spell each
digit as a letter, 0 = a ... 9 = j (`3917=` -> `djbh`). Two ways, on the same domain corpus for the same steps
and learning rate: (a) expanded by interleaved new blocks and only those trained (`kpro.expand`,
`kpro.train_only`), and (b) as a control, every weight of the unexpanded model fine-tuned. The domain corpus
holds a small share of general examples, as a code corpus holds some English. Writing letters in reading
order is what the general task must not do, so fine-tuning the shared weights for it overwrites the
reversal, while the frozen original blocks keep it. A table shows held-out accuracy on both tasks before
and after for both ways.
"""
from __future__ import annotations

import copy
import io
import random
from functools import partial
from pathlib import Path

import torch

from ..expansion import expand, train_only
from ..model import Llama
from ..tokenizer import CharTokenizer
from ..train import Batches, Schedule, adamw, collate_prompt_answer, fit
from .basics import LETTERS, accuracy, reversal_task, tiny_config

DIGITS = "0123456789"


def domain_task(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[str, str]:
    """A prompt like '3917=' and its answer 'djbh': the digits in reading order, each spelled 0=a ... 9=j."""
    digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len)))
    return digits + "=", "".join(LETTERS[int(d)] for d in digits)


def encode(pairs, tok: CharTokenizer) -> list[tuple[list[int], list[int]]]:
    """(`<bos> prompt`, `answer <eos>`) token pairs: the loss falls on the answer only."""
    return [(tok.encode(prompt, bos=True), tok.encode(answer, bos=False, eos=True)) for prompt, answer in pairs]


def domain_corpus(rng: random.Random, count: int, general_share: float) -> list[tuple[str, str]]:
    return [(reversal_task if rng.random() < general_share else domain_task)(rng) for _ in range(count)]


def train(model: Llama, data, tok: CharTokenizer, run_dir: Path, steps: int, lr: float, batch_size: int,
          seed: int) -> None:
    batches = Batches(data, batch_size, partial(collate_prompt_answer, pad_id=tok.pad_id), seed=seed)
    fit(model, batches, run_dir, steps=steps, optimizer=lambda m: adamw(m, lr, betas=(0.9, 0.98)),
        schedule=Schedule("cosine", warmup_steps=steps // 10, total_steps=steps), clip_grad_norm=1.0, keep_last=1,
        stream=io.StringIO())  # running the demo again resumes (or reuses) each run


def act_expansion(out_dir: Path, pretrain_steps: int = 400, domain_steps: int = 500, new_blocks: int = 4,
                  general_share: float = 0.02, lr: float = 1e-3, eval_examples: int = 200, seed: int = 0) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and the numbers stay the same
    try:
        return _run(out_dir, pretrain_steps, domain_steps, new_blocks, general_share, lr, eval_examples, seed)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, pretrain_steps, domain_steps, new_blocks, general_share, lr, eval_examples, seed) -> dict:
    print("== expansion: a tiny LLaMA learns a new domain task by block expansion (only new blocks train) or by "
          "fine-tuning every weight; which one keeps its general task?")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer(LETTERS + DIGITS + ">=")
    held_out = {"domain": [domain_task(random.Random(20_000 + i)) for i in range(eval_examples)],
                "general": [reversal_task(random.Random(10_000 + i)) for i in range(eval_examples)]}

    def scores(model):
        return {task: accuracy(model, tok, examples) for task, examples in held_out.items()}

    base = Llama(tiny_config(tok.vocab_size))
    print(f"pretraining {base.num_parameters() / 1e6:.2f}M parameters on the general task (reverse letters, "
          f"'hfbd>' -> 'dbfh'), {pretrain_steps} steps")
    train(base, encode((reversal_task(rng) for _ in range(20_000)), tok), tok, out_dir / "pretrain", pretrain_steps,
          lr, 64, seed)
    before = scores(base)
    domain = encode(domain_corpus(rng, 16_000, general_share), tok)
    print(f"domain task: digits in reading order, spelled 0=a ... 9=j ('3917=' -> 'djbh'); the domain corpus holds "
          f"{general_share:.0%} general examples; {domain_steps} steps of 32 examples, peak lr {lr:g}, both ways")

    expanded = copy.deepcopy(base)
    new_ids = expand(expanded, new_blocks)
    plan = train_only(expanded, new_ids)
    trainable = sum(p.numel() for p in expanded.parameters() if p.requires_grad)
    print(f"(a) expanded {len(base.layers)} -> {len(expanded.layers)} blocks; {plan.describe()}; "
          f"{trainable / 1e6:.2f}M trainable parameters")
    train(expanded, domain, tok, out_dir / "expanded", domain_steps, lr, 32, seed)
    after_expanded = scores(expanded)

    control = copy.deepcopy(base)
    print(f"(b) control: all {control.num_parameters() / 1e6:.2f}M weights of the unexpanded model fine-tuned")
    train(control, domain, tok, out_dir / "control", domain_steps, lr, 32, seed)
    after_control = scores(control)

    print(f"\n{'held-out accuracy (greedy, exact)':<36}{'domain':>8}{'general':>9}")
    for name, result in [("pretrained model", before), ("(a) expanded, new blocks trained", after_expanded),
                         ("(b) control, all weights trained", after_control)]:
        print(f"{name:<36}{result['domain']:>8.2f}{result['general']:>9.2f}")
    print(f"general task kept: {after_expanded['general']:.2f} with expansion, {after_control['general']:.2f} "
          f"with full fine-tuning\n")
    return {"before": before, "expanded": after_expanded, "control": after_control, "new_blocks": new_ids}
