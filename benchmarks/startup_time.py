"""Start-up time (issue 16): `python -m kpro --help`, `python -m kpro info DIR`, and the first and second
`kpro.load_pretrained` in a fresh process (torch imported before the clock starts), the median of N fresh
processes each.

    python benchmarks/startup_time.py [SOURCE_TREE ...] [--runs N]

SOURCE_TREE (default: this repository) is put first on PYTHONPATH, so a checkout of an older commit
(`git archive COMMIT | tar -x -C DIR`) measures the before. A tree without kpro/__init__.py, or whose
processes import kpro from elsewhere (an installed kpro), is refused: it would measure another kpro. The checkpoint is a tiny bf16 model: the cost
measured is start-up, not reading weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import sys, time, torch
from kpro import checkpoint
times = []
for _ in range(2):
    start = time.perf_counter()
    checkpoint.load_pretrained(sys.argv[1])
    times.append(time.perf_counter() - start)
print(*times)
"""


def tiny_checkpoint(directory: Path) -> Path:
    import torch

    import kpro

    cfg = kpro.LlamaConfig(vocab_size=67, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    kpro.save_pretrained(kpro.Llama(cfg).to(torch.bfloat16), directory)
    kpro.CharTokenizer("abcdefgh").save(directory)
    return directory


def tree_problem(tree: Path) -> str | None:
    """Why `tree` cannot be measured (its processes would not import kpro from it), or None."""
    init = tree / "kpro" / "__init__.py"
    if not init.is_file():
        return f"{tree} holds no kpro/__init__.py: give the root of a kpro source tree (the folder holding kpro/)"
    done = subprocess.run([sys.executable, "-c", "import kpro; print(kpro.__file__)"], cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if done.returncode != 0:
        return f"{tree}: kpro does not import from it: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    imported = Path(done.stdout.strip().splitlines()[-1])
    if imported.resolve() != init.resolve():
        return f"{tree}: its processes import kpro from {imported}, not from {init}"
    return None


def median_wall(args: list, tree: Path, runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_loads(tree: Path, checkpoint: Path, runs: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    pairs = [tuple(map(float, subprocess.run([sys.executable, "-c", LOAD, str(checkpoint)], cwd=tree, env=env,
                                             capture_output=True, text=True, check=True).stdout.split()))
             for _ in range(runs)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT], help="source trees (default: this one)")
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per figure, at least 1 (default: 7)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    for tree in args.trees:
        problem = tree_problem(tree)
        if problem:
            parser.error(problem)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "tiny")
        print("| source tree | `--help` | `info DIR` | `import torch` alone | first `load_pretrained` | second |")
        print("|---|---|---|---|---|---|")
        for tree in args.trees:
            first, second = first_loads(tree, checkpoint, args.runs)
            print(f"| {tree} | {median_wall(['-m', 'kpro', '--help'], tree, args.runs):.2f} s "
                  f"| {median_wall(['-m', 'kpro', 'info', str(checkpoint)], tree, args.runs):.2f} s "
                  f"| {median_wall(['-c', 'import torch'], tree, args.runs):.2f} s | {first:.3f} s | {second:.3f} s |")


if __name__ == "__main__":
    main()
