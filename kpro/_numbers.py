"""The one test of "an integer" kpro's arguments share: a Python or NumPy integer (a swept hyperparameter is
often a NumPy one), never a bool (True is no count). Callers keep int(value): checkpoints and indexes are JSON."""
from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The largest seed of a data order. Batches shuffles with hash((seed, epoch)), and Python hashes an int modulo
# 2**61 - 1, so seed s + 2**61 - 1 would draw seed s's order: every seed that orders data is from 0 to this.
MAX_SEED = 2 ** 61 - 2


def is_seed(value) -> bool:
    return is_integer(value) and 0 <= value <= MAX_SEED
