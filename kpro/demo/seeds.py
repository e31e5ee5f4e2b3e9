"""Reproductions that run a demo act over several seeds (or at a larger size) and pool what it measures.

Each is registered in kpro.demo.REPRODUCTIONS: `python -m kpro reproduce NAME [--seed S]` runs seeds S,
S + 1, ... and prints a table per seed and the pooled figures; benchmarks/RESULTS.md holds the runs.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .act_settings import check_positive
from .bitune import FULL as BITUNE_FULL
from .bitune import SIDES, act_bitune
from .claims import claim_line, exceeds_standard_errors, in_standard_errors, not_finite
from .expansion import act_expansion
from .internalization import act_internalization, cot_figure

BITUNE_SEEDS = EXPANSION_SEEDS = 5
INTERNALIZATION_SEEDS = 3


def reproduce_bitune_seeds(out_dir: Path, seed: int = 0, seeds: int = BITUNE_SEEDS, **act) -> dict:
    """The bitune act over `seeds` seeds; per method and side the mean accuracy over seeds and its standard
    error, and Bitune's gain over only_causal on `right` with the larger of two standard errors: the
    seeds' spread of the paired differences, and the binomial one of the pooled questions."""
    act = {**BITUNE_FULL, **act}
    check_positive("reproduce_bitune_seeds", seeds=seeds, seed=seed)
    for s in range(seed, seed + seeds):  # every seed's settings before the first seed's work
        act_bitune.check(out_dir / f"seed-{s}", seed=s, **act)
    runs = [act_bitune(out_dir / f"seed-{s}", seed=s, **act) for s in range(seed, seed + seeds)]
    held_out = act["held_out"]
    print(f"== bitune over seeds {seed}-{seed + seeds - 1}: mean held-out accuracy ± standard error over the seeds "
          f"({held_out} questions a side each)")
    print(f"{'method':<14}" + "".join(f"{side:>18}" for side in SIDES))
    pooled = {}
    for name in ("lora", "only_causal", "bitune"):
        pooled[name] = {side: _mean_se([run[name][side] for run in runs]) for side in SIDES}
        print(f"{name:<14}" + "".join(f"{pooled[name][side][0]:>11.3f} ± {pooled[name][side][1]:.3f}" for side in SIDES))
    gains = [run["bitune"]["right"] - run["only_causal"]["right"] for run in runs]
    right = {name: pooled[name]["right"][0] for name in ("bitune", "only_causal")}
    shown, gain, se, seed_se, binomial_se = seeds_verdict(gains, right["bitune"], right["only_causal"],
                                                          held_out * seeds)
    print(claim_line("bitune", "bidirectional reading beats the same set-up read causally on 'right', over seeds",
                     shown, f"gain {gain:+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gains)}), standard error "
                     f"{se:.3f} (seeds {seed_se:.3f}, questions {binomial_se:.3f}): "
                     f"{in_standard_errors(gain, se, 3, shown, (held_out * seeds,) * 2)} (needs > 3)", seeds_inputs(gains, right, seed)))
    return {"runs": runs, "pooled": pooled, "gain": gain, "gain_se": se, "claim_shown": shown}


def seeds_verdict(gains: list[float], bitune_right: float, only_causal_right: float, questions: int):
    """(shown, mean gain, its standard error, the seeds' one, the questions' one): Bitune's gain over
    only_causal on `right` per seed, shown when its mean exceeds 3 standard errors, the larger of the seeds'
    spread and the binomial error of `questions` pooled questions a method. The binomial one treats the two
    methods' scores as independent (unpaired), an upper bound for scores on the same questions (unless one
    method tends to fail where the other succeeds), so the rule is conservative."""
    gain, seed_se = _mean_se(gains)
    if not_finite(seeds_inputs(gains, {"bitune": bitune_right, "only_causal": only_causal_right})):
        return False, gain, math.nan, seed_se, math.nan  # math.sqrt refuses an infinite accuracy's variance
    binomial_se = math.sqrt(bitune_right * (1 - bitune_right) / questions
                            + only_causal_right * (1 - only_causal_right) / questions)
    se = max(seed_se, binomial_se)
    return exceeds_standard_errors(gain, se, (questions, questions)), gain, se, seed_se, binomial_se


def seeds_inputs(gains: list[float], right: dict[str, float], first_seed: int = 0) -> dict[str, float]:
    """seeds_verdict's figures by name, the gain on each seed and each method's mean accuracy on `right` (the
    claim line names those that are not finite)."""
    return {**{f"gain on seed {first_seed + i}": gain for i, gain in enumerate(gains)},
            **{f"{name}'s mean accuracy on right": accuracy for name, accuracy in right.items()}}


def reproduce_expansion_seeds(out_dir: Path, seed: int = 0, seeds: int = EXPANSION_SEEDS, **act) -> dict:
    """The expansion act over `seeds` seeds at once (its verdict asks for the margin on every seed)."""
    return act_expansion(out_dir, seed=seed, seeds=seeds, **act)


def reproduce_internalization_seeds(out_dir: Path, seed: int = 0, seeds: int = INTERNALIZATION_SEEDS, **act) -> dict:
    """The internalization act over `seeds` seeds: each seed's table and verdict, then a summary."""
    check_positive("reproduce_internalization_seeds", seeds=seeds, seed=seed)
    for s in range(seed, seed + seeds):  # every seed's settings before the first seed's work
        act_internalization.check(out_dir / f"seed-{s}", seed=s, **act)
    runs = [act_internalization(out_dir / f"seed-{s}", seed=s, **act) for s in range(seed, seed + seeds)]
    print(f"== internalization over seeds {seed}-{seed + seeds - 1} (held-out accuracy; CoT tokens written)")
    for name in ("explicit CoT", "no CoT", "internalized"):
        print(f"{name:<14}" + "".join(f"{run[name]['accuracy']:>8.3f} ({cot_figure(run[name]['cot_tokens'])})"
                                      for run in runs))
    shown = all(run["claim_shown"] for run in runs)
    print(f"claim shown on {sum(run['claim_shown'] for run in runs)} of {seeds} seeds")
    return {"runs": runs, "claim_shown": shown}


# The CPU recipe for 3x3 (24 CoT tokens): a longer explicit phase, the removal pace and the steps after it of 2x2,
# a 2-block model of width 256 at lr 2.5e-4, constant (warmup_steps=0, decay_steps=0). Run on seeds 0-2
# (benchmarks/RESULTS.md): explicit CoT 1.000 on each, internalized 0.941 on seed 0, 0.151 and 0.351 on seeds 1
# and 2 (both lost at the 8th token removed), with 0 CoT tokens, no CoT 0.012, 0.012 and 0.041. Not carried
# through the 24 tokens: width 128 at lr 5e-4 (internalized 0.158, no CoT 0.051), the same at the paper's pace
# (steps_per_token=3000, warmup 500, decay 2000: 0.032 against 0.230), width 256 at lr 5e-4 (0.012 against 0.011).
RECIPE_3X3 = dict(digits=3, train_size=100_000, explicit_steps=8000, steps_per_token=1000, after_steps=8000,
                  decay_steps=0, warmup_steps=0, test_size=1000, valid_size=200, eval_every=500, hidden=256,
                  lr=2.5e-4)


def reproduce_internalization_3x3(out_dir: Path, seed: int = 0, **act) -> dict:
    """ICoT-SI on 3x3 multiplication on the CPU: the internalization act with RECIPE_3X3."""
    return act_internalization(out_dir, seed=seed, **{**RECIPE_3X3, **act})


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) > 1 and not_finite(dict(enumerate(values))):
        return mean, math.nan  # statistics.stdev raises on a NaN
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)
