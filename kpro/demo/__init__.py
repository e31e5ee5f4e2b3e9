"""`python -m kpro demo [act ...]`: the main job on embedded tiny defaults, a few minutes on 2 CPU cores.

Each act lives in its own module here and is registered in ACTS; `python -m kpro demo` runs them all.
"""
from __future__ import annotations

from pathlib import Path

from .basics import act_basics
from .bitune import act_bitune
from .expansion import act_expansion
from .internalization import act_internalization

# In the order `python -m kpro demo` runs them.
ACTS = {"expansion": act_expansion, "basics": act_basics, "internalization": act_internalization, "bitune": act_bitune}


def run(acts: list[str], out_dir: Path, seed: int = 0) -> dict:
    results = {}
    for name in acts:
        results[name] = ACTS[name](out_dir / name, seed=seed)
    return results
