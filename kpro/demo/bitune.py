"""Demo act `bitune`: does reading the prompt bidirectionally help where the answer needs look-ahead?

Each question lists distinct digits and asks for their records counted from the left or from the right:
`Question: 3 8 1 0 7 5 right\\n\\nAnswer: 3`. A digit is a record from the left when it is larger than every
digit before it (3, 8: two), from the right when it is larger than every digit after it (8, 7, 5: three).
Over distinct digits drawn uniformly both counts have the same distribution, so the two sides differ only
in the reading they need: a model that reads causally knows at each digit whether it beats the digits
before it, but whether it beats the digits after it only once those have been read, and the word that
says which side is asked comes last. Bitune's bidirectional pass lets every digit see the whole prompt.

A tiny 2-block LLaMA is pretrained (all weights) on digit sorting, then three adapter set-ups are tuned on
the same questions for the same steps: plain LoRA (one causal adapter); `only_causal`, Bitune's ablation
with the same two adapters, three passes and learned mix, but both prompt passes causal; and Bitune. The
claim is Bitune's: its gain over `only_causal` on the questions that need look-ahead (`right`) is
bidirectional reading's, since nothing else differs. Shown when that gain exceeds 3 standard errors.

Measured (benchmarks/RESULTS.md): not shown over seeds. The questions do not separate the readings at this
size: the same model trained from scratch, all weights, as a prefix LM does no better on `right` than read
causally, and read causally it is no better on `left` than on `right` (`python -m kpro reproduce
bitune-readings`).
"""
from __future__ import annotations

import io
import math
import random
import time
from pathlib import Path

import torch

from .. import bitune
from ..checkpoint import load_pretrained, save_pretrained
from ..config import LlamaConfig
from ..model import Llama
from ..tokenizer import CharTokenizer, load_tokenizer
from ..train import Batches, Schedule, adamw, fit, pack_documents
from .act_settings import check_positive, records_settings
from .claims import (claim_line, difference_standard_error, exceeds_standard_errors, in_standard_errors, not_finite,
                     standard_error)
from .parallel import default_workers, run_jobs

SIDES = ("left", "right")
DIGITS = 6  # distinct digits per question
SYMBOLS = "".join(dict.fromkeys("0123456789 |:\n" + "QuestionAnswer" + "".join(SIDES)))
METHODS = {  # name: (tune's method, Bitune mode), in the order of the table
    "lora": ("lora", None),
    "only_causal": ("bitune", "only_causal"),
    "bitune": ("bitune", "bitune"),
}
DESCRIPTIONS = {"lora": "LoRA, one causal adapter", "only_causal": "two adapters, both passes causal",
                "bitune": "Bitune: causal + bidirectional"}
CLAIM = "bidirectional reading of the prompt (Bitune) beats the same set-up read causally on 'right'"


def records(digits, side: str) -> int:
    """How many digits are larger than every digit before them (side "left") or after them ("right")."""
    count, best = 0, None
    for digit in (digits if side == "left" else reversed(digits)):
        if best is None or digit > best:
            count, best = count + 1, digit
    return count


def question(rng: random.Random, side: str | None = None, digits: int = DIGITS) -> tuple[str, str, str]:
    """(question text, answer, side): `3 8 1 0 7 5 right` -> `3`, over `digits` distinct digits."""
    if not 1 <= digits <= 9:  # ten would allow the count 10, two tokens where the answer is one
        raise ValueError(f"digits must be 1 to 9 so that the count is one digit, got {digits}")
    digits = rng.sample(range(10), digits)
    side = side or rng.choice(SIDES)
    return " ".join(map(str, digits)) + " " + side, str(records(digits, side)), side


def question_sets(rng: random.Random, seed: int, held_out: int, train_questions: int,
                  digits: int = DIGITS) -> tuple[list, list]:
    """(held-out, training) questions as (text, answer, side): `held_out` a side, drawn from their own seed's
    stream so that every run of `seed` scores the same ones, and `train_questions` from `rng`, none of them
    held out; all of `digits` distinct digits."""
    test_rng = random.Random(10_000 + seed)
    test = [question(test_rng, side, digits) for side in SIDES for _ in range(held_out)]
    seen, train = {q for q, _, _ in test}, []
    if len(seen) == len(SIDES) * math.perm(10, digits):
        raise ValueError(f"the held-out questions take all {len(seen)} {digits}-digit questions; none is left to "
                         "train on")
    while len(train) < train_questions:
        example = question(rng, digits=digits)
        if example[0] not in seen:
            train.append(example)
    return test, train


def sorting_text(rng: random.Random) -> str:
    digits = [rng.randrange(10) for _ in range(rng.randint(4, 8))]
    return " ".join(map(str, digits)) + " | " + " ".join(map(str, sorted(digits)))


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def verdict(results: dict, held_out_per_side: int) -> tuple[bool, float, float]:
    """(shown, gain, its standard error): Bitune's accuracy on `right` minus only_causal's, shown when the
    gain exceeds 3 standard errors of the difference. Both answer the same questions, but the standard error
    treats the two scores as independent (unpaired), an upper bound for scores on the same questions (unless
    one model tends to fail where the other succeeds), so the rule is conservative; it was fixed before the
    results were seen, and stays."""
    a, b = results["bitune"]["right"], results["only_causal"]["right"]
    se = difference_standard_error(a, held_out_per_side, b, held_out_per_side)
    return exceeds_standard_errors(a - b, se, (held_out_per_side, held_out_per_side)) and not not_finite(verdict_inputs(results)), a - b, se


def verdict_inputs(results: dict) -> dict[str, float]:
    """The accuracies the verdict compares, by name (the claim line names those that are not finite)."""
    return {"Bitune's accuracy on right": results["bitune"]["right"],
            "only_causal's accuracy on right": results["only_causal"]["right"]}


# The full run, per seed (`python -m kpro reproduce bitune-seeds` runs it over seeds 0-4). The demo's act is
# shortened to fit the demo's time: fewer tuning steps and held-out questions, so its verdict is weaker.
FULL = dict(tune_steps=600, held_out=1000)
DEMO = dict(tune_steps=150, held_out=300)


def check_arguments(pretrain_steps, tune_steps, held_out, train_questions, lr, seed, **_) -> None:
    """act_bitune's arguments, refused before the base is pretrained rather than after."""
    check_positive("act_bitune", pretrain_steps=pretrain_steps, tune_steps=tune_steps, held_out=held_out,
                   train_questions=train_questions, lr=lr, seed=seed)


@records_settings(check_arguments)
def act_bitune(out_dir: Path, pretrain_steps: int = 300, tune_steps: int = DEMO["tune_steps"],
               held_out: int = DEMO["held_out"], train_questions: int = 8000, lr: float = 2e-3, seed: int = 0,
               workers: int | None = None) -> dict:
    """`held_out` questions per side (left, right); returns each method's accuracy per side and the verdict.
    The defaults are the demo's short run; FULL holds the settings of the reproduction."""
    print("== bitune: do the digits need to see the whole question? Records counted from the left or from the "
          "right, LoRA vs Bitune vs Bitune read only causally (same base, data and steps)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread
    try:
        return _run(out_dir, pretrain_steps, tune_steps, held_out, train_questions, lr, seed, workers)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, pretrain_steps, tune_steps, held_out, train_questions, lr, seed, workers) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer(SYMBOLS)
    base = Llama(tiny_config(tok.vocab_size))
    documents = [tok.encode(sorting_text(rng), bos=True, eos=True) for _ in range(20_000)]
    print(f"pretraining a {base.num_parameters() / 1e6:.2f}M-parameter, {base.config.num_hidden_layers}-block LLaMA "
          f"on digit sorting ({pretrain_steps} steps)")
    fit(base, Batches(pack_documents(documents, 64, tok.eos_id), 32, seed=seed), out_dir / "pretrain-run",
        steps=pretrain_steps, optimizer=lambda m: adamw(m, 3e-3),
        schedule=Schedule("cosine", warmup_steps=pretrain_steps // 10, total_steps=pretrain_steps), keep_last=1,
        log_every=max(1, pretrain_steps // 2))
    save_pretrained(base, out_dir / "base")
    tok.save(out_dir / "base")
    test, train = question_sets(rng, seed, held_out, train_questions)
    train = [(q, answer) for q, answer, _ in train]
    example = test[held_out]
    print(f"tuning rank-8 adapters for {tune_steps} steps of 32 on {len(train):,} questions like "
          f"{example[0]!r} -> {example[1]!r}, {min(workers or default_workers(), len(METHODS))} at a time; {held_out} "
          "held-out questions a side")
    jobs = [(tune_and_score, dict(base_dir=out_dir / "base", out_dir=out_dir / name, method=method, mode=mode,
                                  train=train, test=test, steps=tune_steps, lr=lr, seed=seed))
            for name, (method, mode) in sorted(METHODS.items(), key=lambda item: item[0] != "bitune")]  # longest first
    results = dict(zip(sorted(METHODS, key=lambda name: name != "bitune"), run_jobs(jobs, workers)))
    results = {name: results[name] for name in METHODS}

    print(f"\n{'held-out accuracy ± standard error':<40}{'left':>14}{'right':>14}{'tuning':>9}")
    for name, result in results.items():
        cells = "".join(f"{result[side]:>8.3f} ± {standard_error(result[side], held_out):.3f}" for side in SIDES)
        print(f"{name + ' (' + DESCRIPTIONS[name] + ')':<40}{cells}{result['train_seconds']:>8.0f}s")
    shown, gain, se = verdict(results, held_out)
    print(claim_line("bitune", CLAIM, shown, f"right {results['bitune']['right']:.3f} vs "
                     f"{results['only_causal']['right']:.3f}, gain {gain:+.3f} = "
                     f"{in_standard_errors(gain, se, 3, shown, (held_out, held_out))} "
                     f"(needs > 3); one seed, {tune_steps} tuning steps, {held_out} questions a side"
                     + ("" if (tune_steps, held_out) == (FULL["tune_steps"], FULL["held_out"]) else
                        "; the demo's short run: `python -m kpro reproduce bitune-seeds` runs "
                        f"{FULL['tune_steps']} steps, {FULL['held_out']} questions, 5 seeds"),
                     verdict_inputs(results)) + "\n")
    return {**results, "gain": gain, "gain_se": se, "claim_shown": shown}


def tune_and_score(base_dir: Path, out_dir: Path, method: str, mode: str | None, train, test, steps: int, lr: float,
                   seed: int) -> dict:
    """One method: tune adapters on the base, then greedy answers to the test questions, accuracy per side."""
    tok = load_tokenizer(base_dir)
    pairs, _ = bitune.tokenize_instructions(tok, [bitune.Instruction(q, a) for q, a in train], max_length=96)
    start = time.perf_counter()
    tuned = bitune.tune(load_pretrained(base_dir), pairs, method, out_dir, mode=mode or "bitune", steps=steps,
                        batch_size=32, lr=lr, rank=8, alpha=16.0, weighting="example", seed=seed, pad_id=tok.pad_id,
                        stream=io.StringIO())
    seconds = time.perf_counter() - start
    answers = bitune.generate_answers(tuned, tok, [q for q, _, _ in test], max_new_tokens=2)
    result = {"train_seconds": seconds}
    for side in SIDES:
        rows = [got == want for got, (_, want, s) in zip(answers, test) if s == side]
        result[side] = sum(rows) / len(rows)
    return result
