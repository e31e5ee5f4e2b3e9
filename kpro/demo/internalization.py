"""Demo act `internalization`: stepwise internalization of chain-of-thought (ICoT-SI) on 2×2 multiplication.

Three tiny LLaMAs (2 blocks, width 128) from scratch on the same generated data: an explicit-CoT model; an
internalized one (the explicit-CoT model trained on while its CoT is removed from the left, one token more
every `steps_per_token` steps, then `after_steps` more with no CoT at all); and a no-CoT model trained as
many steps as the two others together. Both of the latter keep their best weights by validation accuracy
once no CoT is left in training (the official code's selection). Each is decoded greedily on held-out
problems: accuracy, examples/s and CoT tokens written. The explicit chain and the no-CoT model train side
by side (`kpro.demo.parallel`), one thread each, and a progress line follows both (`training_groups`). Every
operand pair not held out is in the training set (2×2 has 8,100); the valid and test pairs are left out.

The recipe is the slow removal that works at this size: a token every 1,000 steps of 32 (the paper's pace for
its data, 808,000 examples and Δ = 8, is a token every ~3,000), λ = 4 smoothing, lr 5e-4, AdamW with weight
decay 0.01 on every parameter and a fresh optimizer at each removal while any CoT is left, as the official
code, then 4,000 steps with none left. Unlike the official code, the two runs from scratch (the explicit phase
and the no-CoT model) warm the rate up linearly over their first 500 steps, and the internalized and the
no-CoT runs decay it linearly to 0 over their last 2,000 steps, both ending at the act's last step. Without
the warmup, seed 1's explicit model stopped at 0.716 after its 2,500 steps and the claim failed there; with
it, the claim held on seeds 0-4 (under emulated AVX2 rounding on seeds 0, 1, 3 and 4, not 2, whose no-CoT
control reached 0.970). At a constant rate, the demo needed 8,000 steps after the CoT was gone for seed 0 to reach
0.900 (0.848 with 4,000); decaying, 4,000 steps suffice (benchmarks/RESULTS.md). Removing a token every 100
steps, as an earlier version of this act did, loses the task.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from ..checkpoint import load_pretrained, save_pretrained
from ..config import LlamaConfig
from ..internalize import (RemovalSchedule, ValidationAccuracy, evaluate, fit_internalization, mean_cot_tokens,
                           multiplication_lines, multiplication_pairs, multiplication_tokenizer,
                           multiplication_training_set, parse_line, tokenize_examples)
from ..internalize.loop import OFFICIAL_WEIGHT_DECAY, lr_schedule
from ..model import Llama
from .act_settings import check_positive, records_settings
from .claims import (claim_line, difference_standard_error, exceeds_standard_errors, figure, in_standard_errors,
                     not_finite)
from .parallel import default_workers
from .progress import run_jobs_reporting

BATCH = 32
DECAY_STEPS = 2000  # the last steps of the internalized and no-CoT runs, lr decaying linearly to 0
WARMUP_STEPS = 500  # the first steps of the explicit and no-CoT runs, lr rising linearly from 0
CLAIM = "the internalized model answers with no CoT at >= 0.9 held-out accuracy, clearly above the no-CoT model"
EXPLICIT_TARGET = 0.95  # the recipe's explicit-CoT accuracy before the removal starts (issue 17)
# Ctrl-C saves; these let a killed run (an ended session, a lost machine) resume at most this many steps back.
SAVE_EVERY = 1000


def demo_config(vocab_size: int, hidden: int = 128, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def held_out_sets(digits: int, valid_size: int, test_size: int, seed: int):
    """(valid, test) CoTExamples of distinct operand pairs, and the pairs (to leave out of training)."""
    pairs = multiplication_pairs(digits, valid_size + test_size, seed + 1)
    lines = multiplication_lines(pairs, digits)
    return [parse_line(line) for line in lines[:valid_size]], [parse_line(line) for line in lines[valid_size:]], pairs


def training_set(digits: int, size: int, seed: int, held_out_pairs):
    return tokenize_examples([parse_line(line) for line in multiplication_training_set(
        digits, size, seed, exclude=held_out_pairs)], multiplication_tokenizer())


def explicit_note(accuracy: float, explicit_steps: int, internalize_steps: int) -> str | None:
    """A line for an explicit model below the recipe's EXPLICIT_TARGET (None at or above it): the act trains a
    fixed number of explicit steps, and how far they get varies with the seed and the CPU's float rounding, so an
    internalized model may end above the explicit one it started from."""
    if accuracy >= EXPLICIT_TARGET:
        return None
    return (f"  the explicit model stopped at {accuracy:.3f} after its fixed {explicit_steps:,} steps, short of the "
            f"recipe's {EXPLICIT_TARGET}; the internalized model trained {internalize_steps:,} steps more from it")


def cot_figure(mean_tokens: float) -> str:
    """CoT tokens written per answer, one decimal; more where a few tokens in all would print as 0.0 beside
    a verdict that needs none."""
    return f"{mean_tokens:.1f}" if mean_tokens == 0 or mean_tokens >= 0.05 else f"{mean_tokens:.4f}"


def verdict(results: dict, test_size: int) -> tuple[bool, float, float]:
    """(shown, margin over no CoT, its standard error): shown when the internalized model writes no CoT
    token, scores >= 0.9 and beats the no-CoT model by more than 3 standard errors of the difference. Both
    answer the same problems, but the standard error treats the two scores as independent (unpaired), an upper
    bound for scores on the same problems (unless one model tends to fail where the other succeeds), so the rule
    is conservative; it was fixed before the results were seen, and stays."""
    internalized, no_cot = results["internalized"], results["no CoT"]
    se = difference_standard_error(internalized["accuracy"], test_size, no_cot["accuracy"], test_size)
    margin = internalized["accuracy"] - no_cot["accuracy"]
    shown = internalized["cot_tokens"] == 0 and internalized["accuracy"] >= 0.9 and exceeds_standard_errors(margin, se, (test_size, test_size))
    return shown and not not_finite(verdict_inputs(results)), margin, se


def verdict_inputs(results: dict) -> dict[str, float]:
    """The figures the verdict compares, by name (the claim line names those that are not finite)."""
    return {"internalized accuracy": results["internalized"]["accuracy"],
            "internalized CoT tokens": results["internalized"]["cot_tokens"],
            "no CoT accuracy": results["no CoT"]["accuracy"]}


def check_arguments(seed, digits, explicit_steps, steps_per_token, after_steps, decay_steps, warmup_steps, lr,
                    explicit_lr, weight_decay, valid_size, test_size, eval_every, train_size, hidden, layers, **_) -> None:
    """act_internalization's arguments, refused before any training rather than minutes into it."""
    check_positive("act_internalization", seed=seed, digits=digits, explicit_steps=explicit_steps,
                   steps_per_token=steps_per_token, valid_size=valid_size, test_size=test_size, eval_every=eval_every,
                   hidden=hidden, layers=layers, lr=lr, explicit_lr=explicit_lr)
    if isinstance(after_steps, bool) or not isinstance(after_steps, int) or after_steps < 0:
        raise ValueError(f"act_internalization: after_steps must be an integer >= 0, got {after_steps!r}")
    if train_size is not None:
        check_positive("act_internalization", train_size=train_size)
    # as fit_internalization refuses it, but before the act's work and by the act's name
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < 1:
        raise ValueError(f"act_internalization: weight_decay must be a number from 0 to below 1, got {weight_decay!r}")
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or not 0 <= decay_steps <= after_steps:
        raise ValueError(f"decay_steps must be an integer from 0 to after_steps ({after_steps}): the rate decays "
                         f"once the CoT is gone; got {decay_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < explicit_steps:
        raise ValueError(f"warmup_steps must be an integer from 0 to explicit_steps - 1 ({explicit_steps - 1}): the "
                         f"rate warms up within the explicit phase; got {warmup_steps!r}")
    demo_config(multiplication_tokenizer().vocab_size, hidden, layers)  # a width its 4 heads cannot split, say


@records_settings(check_arguments)
def act_internalization(out_dir: Path, seed: int = 0, digits: int = 2, explicit_steps: int = 2500,
                        steps_per_token: int = 1000, after_steps: int = 4000, decay_steps: int = DECAY_STEPS,
                        warmup_steps: int = WARMUP_STEPS, lr: float = 5e-4, explicit_lr: float | None = None,
                        weight_decay: float = OFFICIAL_WEIGHT_DECAY,
                        valid_size: int = 200, test_size: int = 500, eval_every: int = 250,
                        train_size: int | None = None, hidden: int = 128, layers: int = 2,
                        workers: int | None = None) -> dict:
    """The act; its defaults are the demo's. `explicit_lr` sets the explicit phase's learning rate alone (default
    `lr`): the removal and the no-CoT control train at `lr` whatever it is, so the control stays the same.
    `decay_steps`: the internalized and the no-CoT runs both decay `lr` linearly to 0 over their last
    `decay_steps` steps (the same steps of the act: both end at its last; 0: constant throughout). `warmup_steps`:
    the explicit and the no-CoT runs, both from scratch, raise it linearly from 0 over their first `warmup_steps`
    steps (0: none)."""
    print(f"== internalization: a tiny LLaMA learns {digits}x{digits} multiplication with a chain of thought, "
          "then learns to do without it (ICoT-SI)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and lose much on a busy machine
    try:
        return _run(out_dir, seed, digits, explicit_steps, steps_per_token, after_steps, decay_steps, warmup_steps, lr,
                    lr if explicit_lr is None else explicit_lr, weight_decay, valid_size, test_size, eval_every,
                    train_size, hidden, layers, workers)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, seed, digits, explicit_steps, steps_per_token, after_steps, decay_steps, warmup_steps, lr,
         explicit_lr, weight_decay, valid_size, test_size, eval_every, train_size, hidden, layers, workers) -> dict:
    tok = multiplication_tokenizer()
    valid, test, held_out_pairs = held_out_sets(digits, valid_size, test_size, seed)
    operands = 10 ** digits - (10 ** (digits - 1) if digits > 1 else 0)
    size = train_size or operands ** 2 - len(held_out_pairs)  # 2x2: every other pair
    example = multiplication_lines(held_out_pairs[:1], digits)[0]
    cot = len(parse_line(example).cot.split())  # symbols: one token each
    internalize_steps = cot * steps_per_token + after_steps
    total = explicit_steps + internalize_steps
    print(f"data: {size:,} generated training problems; {valid_size} validation and {test_size} test problems left "
          f"out; the CoT is {cot} tokens, e.g. {example}")
    decay = f", both decaying it linearly to 0 over their last {decay_steps:,} steps" if decay_steps else ""
    warmup = f"; the explicit and no-CoT runs warm it up over their first {warmup_steps:,} steps" if warmup_steps else ""
    print(f"explicit CoT {explicit_steps:,} steps of {BATCH} at lr {explicit_lr:g}; then internalization: one CoT "
          f"token removed every {steps_per_token:,} steps (lambda 4), {after_steps:,} steps more with none left "
          f"({internalize_steps:,} in all) at lr {lr:g}; no CoT: {total:,} steps at lr {lr:g}{decay}{warmup}; "
          f"weight decay {weight_decay:g}; "
          + ("the two runs side by side" if (workers or default_workers()) > 1 else "the two runs one after the other"))
    settings = dict(out_dir=out_dir, digits=digits, size=size, seed=seed, lr=lr, decay_steps=decay_steps,
                    warmup_steps=warmup_steps, weight_decay=weight_decay, valid_size=valid_size, test_size=test_size,
                    eval_every=eval_every, hidden=hidden, layers=layers)
    start = time.perf_counter()
    chain, no_cot = run_jobs_reporting([(train_chain, dict(settings, explicit_lr=explicit_lr,
                                                           explicit_steps=explicit_steps, steps_per_token=steps_per_token,
                                                           internalize_steps=internalize_steps)),
                                        (train_no_cot, dict(settings, steps=total))], workers,
                                       training_groups(out_dir, explicit_steps + internalize_steps, total))
    print(f"trained in {time.perf_counter() - start:.0f} s; the internalized model kept step {_kept(chain)} of its "
          f"run, the no-CoT model step {_kept(no_cot)}")

    results = {}
    print(f"held-out {digits}x{digits} test set ({test_size} problems), greedy decoding in one batch on the CPU "
          f"(1 thread):")
    for name, directory, steps in (("explicit CoT", "explicit-cot", explicit_steps), ("no CoT", "no-cot", total),
                                   ("internalized", "internalized", total)):
        model = load_pretrained(out_dir / directory / "model").eval()
        result = evaluate(model, tok, test, batch_size=test_size)
        written = mean_cot_tokens(result, tok.eos_id)
        results[name] = {"accuracy": result.accuracy, "examples_per_second": result.examples_per_second,
                         "cot_tokens": written, "steps": steps}
        print(f"  {name:13s} accuracy {result.accuracy:.3f}  {result.examples_per_second:7,.0f} examples/s  "
              f"{cot_figure(written):>4} CoT tokens written  ({steps:,} training steps)")
        if name == "internalized":
            prediction = evaluate(model, tok, test[:1]).predictions[0]
            print(f"  e.g. internalized: {test[0].input} -> [{prediction.cot}] #### {prediction.answer}  "
                  f"(reference {test[0].answer})")
    note = explicit_note(results["explicit CoT"]["accuracy"], explicit_steps, internalize_steps)
    if note:
        print(note)
    speedup = results["internalized"]["examples_per_second"] / results["explicit CoT"]["examples_per_second"]
    shown, margin, se = verdict(results, test_size)
    internalized = results["internalized"]
    print(claim_line("internalization", CLAIM, shown,
                     f"internalized {figure(internalized['accuracy'], 0.9, internalized['accuracy'] >= 0.9, digits=3)} "
                     f"with {cot_figure(internalized['cot_tokens'])} CoT tokens, no CoT "
                     f"{results['no CoT']['accuracy']:.3f} (margin {margin:+.3f} = "
                     f"{in_standard_errors(margin, se, 3, questions=(test_size, test_size))}; needs >= 0.9 with 0 CoT tokens and a "
                     "margin "
                     f"> 3 standard errors), {speedup:.1f}x the explicit model's examples/s", verdict_inputs(results))
          + "\n")
    return {**results, "speedup": speedup, "claim_shown": shown, "selected": {"internalized": chain["selected"],
                                                                              "no CoT": no_cot["selected"]}}


def training_groups(out_dir: Path, chain_steps: int, no_cot_steps: int) -> dict:
    """What the act's progress line follows (`RunsProgress`): the chain (explicit CoT, then internalization) and
    the no-CoT model."""
    run = lambda name: Path(out_dir) / name / "run" / "metrics.jsonl"
    return {"explicit CoT then internalization": ([run("explicit-cot"), run("internalized")], chain_steps),
            "no CoT": ([run("no-cot")], no_cot_steps)}


def _kept(job: dict) -> str:
    return "(none: CoT was never gone)" if job["selected"] is None else f"{job['selected']['step']:,}"


def _setup(digits, size, seed, valid_size, test_size, hidden, layers):
    valid, _, held_out_pairs = held_out_sets(digits, valid_size, test_size, seed)
    return valid, training_set(digits, size, seed, held_out_pairs), Llama(demo_config(multiplication_tokenizer().vocab_size,
                                                                                       hidden, layers))


def train_chain(out_dir: Path, digits, size, seed, lr, decay_steps, warmup_steps, weight_decay, valid_size, test_size,
                eval_every, hidden, layers, explicit_lr, explicit_steps, steps_per_token, internalize_steps) -> dict:
    """The explicit-CoT model, then the internalized one trained on from it; both saved under out_dir."""
    torch.manual_seed(seed)
    valid, train, model = _setup(digits, size, seed, valid_size, test_size, hidden, layers)
    tok = multiplication_tokenizer()
    quiet = io.StringIO()
    fit_internalization(model, train, out_dir / "explicit-cot" / "run", removal="none", steps=explicit_steps,
                        batch_size=BATCH, pad_id=tok.pad_id, lr=explicit_lr,
                        schedule=lr_schedule(explicit_steps, warmup_steps=warmup_steps), weight_decay=weight_decay,
                        seed=seed, keep_last=1, save_every=SAVE_EVERY, stream=quiet)
    save_pretrained(model, out_dir / "explicit-cot" / "model")
    # The schedule's "epoch" is 8 tokens' worth of steps: one more token every steps_per_token steps.
    schedule = RemovalSchedule(steps_per_epoch=8 * steps_per_token, remove_per_epoch=8, smoothing_lambda=4.0)
    best = ValidationAccuracy(tok, valid, eval_every, batch_size=len(valid), select_best=True, stream=quiet)
    fit_internalization(model, train, out_dir / "internalized" / "run", removal=schedule, steps=internalize_steps,
                        batch_size=BATCH, pad_id=tok.pad_id, lr=lr, schedule=lr_schedule(internalize_steps, decay_steps),
                        weight_decay=weight_decay, seed=seed, keep_last=1, save_every=SAVE_EVERY, callbacks=[best],
                        stream=quiet)
    save_pretrained(model, out_dir / "internalized" / "model")
    return {"selected": best.selected}


def train_no_cot(out_dir: Path, digits, size, seed, lr, decay_steps, warmup_steps, weight_decay, valid_size, test_size,
                 eval_every, hidden, layers, steps) -> dict:
    """The no-CoT baseline from the same initial weights, its best weights by validation kept; saved under out_dir."""
    torch.manual_seed(seed)
    valid, train, model = _setup(digits, size, seed, valid_size, test_size, hidden, layers)
    tok = multiplication_tokenizer()
    quiet = io.StringIO()
    best = ValidationAccuracy(tok, valid, eval_every, batch_size=len(valid), select_best=True, stream=quiet)
    fit_internalization(model, train, out_dir / "no-cot" / "run", removal="all", steps=steps, batch_size=BATCH,
                        pad_id=tok.pad_id, lr=lr, schedule=lr_schedule(steps, decay_steps, warmup_steps),
                        weight_decay=weight_decay, seed=seed, keep_last=1, save_every=SAVE_EVERY, callbacks=[best],
                        stream=quiet)
    save_pretrained(model, out_dir / "no-cot" / "model")
    return {"selected": best.selected}
