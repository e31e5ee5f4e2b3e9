"""The half-pace pilot of benchmarks/RESULTS.md ("ICoT-SI at 3×3, the CPU recipe"): a seed's explicit-CoT model
from `python -m kpro reproduce internalization-3x3` (its `explicit-cot/model`), internalized as RECIPE_3X3 does
but removing a CoT token every STEPS_PER_TOKEN steps at learning rate LR; the chain only, no no-CoT control.
Validation accuracy is printed every 500 steps, the test accuracy of the weights kept at the end; the run resumes
from its checkpoints.

    python benchmarks/icot_3x3_pace_pilot.py EXPLICIT_MODEL SEED RUN_DIR [STEPS_PER_TOKEN [LR [AFTER_STEPS]]]
        [--expand P] [--threads N] [--train-explicit]

EXPLICIT_MODEL: OUT/internalization-3x3/explicit-cot/model. `--expand P` inserts P blocks into it first, as
`kpro.expand` does (copies whose output projections are zero: the same function), and internalizes the deeper model.
`--threads N`: torch's threads (default 1, as the recorded runs; 2 made a 4-block run about 1.7 times faster on an
idle 2-core VM, with other float rounding). `--train-explicit`: EXPLICIT_MODEL does not exist yet; train it first
as the recipe's explicit phase does (the same initial weights, data, steps and learning rate as `train_chain` in
kpro/demo/internalization.py: its checkpoints go beside it, in EXPLICIT_MODEL/../run, and a killed run resumes).

The recorded runs: seeds 1 and 2, STEPS_PER_TOKEN 2000 (the recipe's is 1000), and STEPS_PER_TOKEN 1000 at LR
1.25e-4 (the recipe's is 2.5e-4); seed 2's then extended to AFTER_STEPS 16000 and 24000 (the recipe's 8000; the
same command with more steps resumes the run from its last checkpoint); seeds 1 and 2 with `--expand 2` at the
recipe's pace and lr (seed 2's to the end with `--threads 2 --train-explicit`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import kpro
from kpro.checkpoint import load_pretrained, save_pretrained
from kpro.demo.internalization import BATCH, SAVE_EVERY, _setup, held_out_sets
from kpro.demo.seeds import RECIPE_3X3
from kpro.internalize import (RemovalSchedule, ValidationAccuracy, evaluate, fit_internalization,
                              multiplication_tokenizer)
from kpro.internalize.loop import OFFICIAL_WEIGHT_DECAY, lr_schedule, mean_cot_tokens

COT_TOKENS = 24  # a 3x3 product's CoT


def main(explicit: Path, seed: int, run_dir: Path, steps_per_token: int = 2000,
         lr: float | None = None, after_steps: int | None = None, expand: int = 0, threads: int = 1,
         train_explicit: bool = False) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    r = RECIPE_3X3
    valid, train, initial = _setup(r["digits"], r["train_size"], seed, r["valid_size"], r["test_size"], r["hidden"], 2)
    if train_explicit and not explicit.exists():
        train_explicit_model(initial, train, explicit, seed)
    elif train_explicit:
        print(f"{explicit} exists: its explicit phase is not run again", flush=True)
    model = load_pretrained(explicit)
    if expand:
        kpro.expand(model, expand)
        print("expanded to", model.config.num_hidden_layers, "blocks", flush=True)
    tok = multiplication_tokenizer()
    steps = COT_TOKENS * steps_per_token + (r["after_steps"] if after_steps is None else after_steps)
    schedule = RemovalSchedule(steps_per_epoch=8 * steps_per_token, remove_per_epoch=8, smoothing_lambda=4.0)
    best = ValidationAccuracy(tok, valid, r["eval_every"], batch_size=len(valid), select_best=True, stream=sys.stdout)
    lr = r["lr"] if lr is None else lr
    fit_internalization(model, train, run_dir / "run", removal=schedule, steps=steps, batch_size=BATCH,
                        pad_id=tok.pad_id, lr=lr, schedule=lr_schedule(steps, r["decay_steps"]),
                        weight_decay=OFFICIAL_WEIGHT_DECAY, seed=seed, keep_last=1, save_every=SAVE_EVERY,
                        callbacks=[best], stream=sys.stdout)
    save_pretrained(model, run_dir / "model")
    print("selected", best.selected)
    # The kept weights on the seed's 1,000 test problems, as the act scores its models (run again, a finished
    # run only scores them)
    _, test, _ = held_out_sets(r["digits"], r["valid_size"], r["test_size"], seed)
    result = evaluate(model.eval(), tok, test, batch_size=len(test))
    print(f"test accuracy {result.accuracy:.3f} ({result.correct}/{result.total}), "
          f"{mean_cot_tokens(result, tok.eos_id):.1f} CoT tokens written per example")


def train_explicit_model(model, train, explicit: Path, seed: int) -> None:
    """The recipe's explicit phase, as train_chain runs it (RECIPE_3X3 sets no explicit_lr: it trains at lr)."""
    r = RECIPE_3X3
    fit_internalization(model, train, explicit.parent / "run", removal="none", steps=r["explicit_steps"],
                        batch_size=BATCH, pad_id=multiplication_tokenizer().pad_id, lr=r["lr"],
                        schedule=lr_schedule(r["explicit_steps"], warmup_steps=r["warmup_steps"]),
                        weight_decay=OFFICIAL_WEIGHT_DECAY, seed=seed, keep_last=1, save_every=SAVE_EVERY,
                        stream=sys.stdout)
    save_pretrained(model, explicit)


if __name__ == "__main__":
    args, options = sys.argv[1:], {"expand": 0, "threads": 1}
    train_explicit = "--train-explicit" in args
    args = [a for a in args if a != "--train-explicit"]
    for name in options:
        if f"--{name}" in args:
            at = args.index(f"--{name}")
            options[name], args = int(args[at + 1]), args[:at] + args[at + 2:]
    main(Path(args[0]), int(args[1]), Path(args[2]), *(int(a) for a in args[3:4]), *(float(a) for a in args[4:5]),
         *(int(a) for a in args[5:6]), **options, train_explicit=train_explicit)
