"""The one test of "an integer" kpro's arguments share: a Python or NumPy integer (a swept hyperparameter is
often a NumPy one), never a bool (True is no count). Callers keep int(value): checkpoints and indexes are JSON."""
from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
