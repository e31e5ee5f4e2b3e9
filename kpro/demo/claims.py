"""The one line each act ends with: the method's claim, and whether this run's numbers showed it.

Every act computes its verdict from its printed figures with a pure function (tested on made-up numbers),
so the line can be checked against the table above it.
"""
from __future__ import annotations

import math


def claim_line(act: str, claim: str, shown: bool, figures: str) -> str:
    return f"claim ({act}): {claim} -- {'SHOWN' if shown else 'NOT SHOWN'} by this run: {figures}"


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on n independent questions."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def difference_standard_error(a: float, n_a: int, b: float, n_b: int) -> float:
    """The standard error of a − b for accuracies measured on independent sets of n_a and n_b questions."""
    return math.hypot(standard_error(a, n_a), standard_error(b, n_b))


def in_standard_errors(difference: float, se: float) -> str:
    """`+2.3 standard errors`; with a zero standard error (both accuracies at 0 or at 1) there is none to count."""
    return f"{difference / se:+.1f} standard errors" if se else "no spread to measure it against"
