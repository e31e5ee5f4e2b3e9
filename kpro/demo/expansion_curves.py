"""`python -m kpro reproduce expansion-curves`: how each way of the expansion act loses and re-learns the general task.

The act's two ways of learning the domain (`kpro.demo.expansion`), from the same pretrained models and with
the same settings (the act's defaults unless given), scored on both held-out tasks every `every` steps, for
seeds 0 and 4 (`seed` shifts both). benchmarks/RESULTS.md holds what it shows: the new blocks break the
general task in the first steps, and each way then re-learns it from the general examples in the domain
corpus, the expanded model far sooner.
"""
from __future__ import annotations

from pathlib import Path

from .expansion import (ARMS, DOMAIN_LR, DOMAIN_STEPS, GENERAL_SHARE, NEW_BLOCKS, PRETRAIN_STEPS, arm_jobs,
                        pretrain_jobs, progress_groups)
from .act_settings import records_settings
from .progress import run_jobs_reporting

SEEDS = (0, 4)


@records_settings()  # a rerun with another `every` or eval_examples reused the old runs' curves, silently
def reproduce_expansion_curves(out_dir: Path, seed: int = 0, seeds: tuple[int, ...] = SEEDS, every: int = 50,
                               pretrain_steps: int = PRETRAIN_STEPS, domain_steps: int = DOMAIN_STEPS,
                               new_blocks: int = NEW_BLOCKS, general_share: float = GENERAL_SHARE,
                               lr: float = DOMAIN_LR, eval_examples: int = 200, workers: int | None = None) -> dict:
    seeds = [seed + s for s in seeds]
    print(f"== expansion curves: held-out domain / general accuracy every {every} steps while each way learns the "
          f"domain ({general_share:.0%} general examples, {domain_steps} steps, peak lr {lr:g}), seeds "
          f"{', '.join(map(str, seeds))}")
    directory = lambda s: out_dir / f"seed-{s}"
    run_jobs_reporting(pretrain_jobs(directory, seeds, pretrain_steps, eval_examples), workers,
                       progress_groups(directory, seeds, {"pretraining": "pretrain"}, pretrain_steps))
    jobs = arm_jobs(directory, seeds, domain_steps, new_blocks, general_share, lr, eval_examples, curve_every=every)
    results = run_jobs_reporting(jobs, workers, progress_groups(directory, seeds, {arm: arm for arm in ARMS},
                                                                domain_steps))
    curves = {}
    for (_, job), result in zip(jobs, results):
        curves.setdefault(f"seed-{job['seed']}", {})[job["arm"]] = result["curve"]
        print(f"seed {job['seed']} {ARMS[job['arm']]}: " + "  ".join(
            f"{step}: {domain:.2f}/{general:.2f}" for step, domain, general in result["curve"]))
    return {"curves": curves}
