#!/usr/bin/env bash
# The GPU suite in one command: the cuda-marked tests, the attention tile sweep, a profiled expansion step
# and every benchmark at its headline shapes, in at most 8 minutes on one H100/H200, from the source tree
# (no install, no network).
#
#   benchmarks/gpu_suite.sh OUT_DIR [--stages tests,autotune,profile,benchmarks] [--force] [--budget NAME=SECONDS] [--list] [--report-only]
#
# Everything is in benchmarks/gpu_suite.py (its docstring explains the stages, budgets, outputs and
# resuming); this wrapper only puts the repository on PYTHONPATH. PYTHON chooses the interpreter.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_suite.py" "$@"
