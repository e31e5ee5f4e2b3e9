"""The one line each act ends with: the method's claim, and whether this run's numbers showed it.

Every act computes its verdict from its printed figures with a pure function (tested on made-up numbers),
so the line can be checked against the table above it.
"""
from __future__ import annotations

import math


def claim_line(act: str, claim: str, shown: bool, figures: str, inputs: dict[str, float] | None = None) -> str:
    """The act's last line; `inputs`, its verdict's figures by name, adds those that are not finite numbers."""
    bad = not_finite(inputs or {})
    note = "; not a finite number: " + ", ".join(f"{name} ({inputs[name]})" for name in bad) if bad else ""
    return f"claim ({act}): {claim} -- {'SHOWN' if shown else 'NOT SHOWN'} by this run: {figures}{note}"


def not_finite(inputs: dict[str, float]) -> list[str]:
    """The names of a verdict's inputs that are not finite numbers (a diverged run's NaN). A verdict given one is
    not shown: a NaN fails every comparison, so a `not x < t` passes it, and min() and max() keep or skip it by
    its place."""
    return [name for name, value in inputs.items() if not math.isfinite(value)]


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on n independent questions."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def difference_standard_error(a: float, n_a: int, b: float, n_b: int) -> float:
    """The standard error of a − b for accuracies measured on independent sets of n_a and n_b questions. For two
    models scored on the same questions it is an upper bound (unless one model tends to fail where the other
    succeeds), so a rule that asks for a multiple of it is conservative there."""
    return math.hypot(standard_error(a, n_a), standard_error(b, n_b))


def exceeds_standard_errors(margin: float, se: float, questions: tuple[int, int], times: float = 3) -> bool:
    """Whether `margin`, a difference of two accuracies measured on `questions` (n_a, n_b), is more than `times`
    standard errors `se`, as the exact accuracies decide it: a margin of exactly 3 (72/72 against 64/72 over 72
    questions a side) computes as 3.0000000000000004 standard errors, which is not "more than 3". The count is
    rounded at 1e-9, as at_threshold rounds a difference: its float noise is far below that, and counts from
    accuracies over up to some 10,000 questions a side that differ from `times` at all differ by more. A NaN is
    not more. With no spread (`se` 0: one side all right, the other all wrong, or both alike) there is nothing
    to count in, and 1 right of 1 against 0 of 1 is no evidence: a positive margin is more where so clean a
    split is as unlikely between equal accuracies as a margin of `times` standard errors (`clean_split`)."""
    if se == 0:
        return at_threshold(margin) > 0 and clean_split(*questions) < normal_tail(times)
    return round(margin / se, 9) > times


def clean_split(n_a: int, n_b: int) -> float:
    """The chance that, of n_a + n_b answers by two equally accurate models with as many right in all as
    n_a, exactly the first model's n_a are the right ones: 1 / C(n_a + n_b, n_a) (Fisher's exact test of a
    table with all right on one side, all wrong on the other)."""
    if n_a < 1 or n_b < 1:
        raise ValueError(f"question counts must be positive, got {n_a} and {n_b}")
    return 1 / math.comb(n_a + n_b, n_a)


def normal_tail(times: float) -> float:
    """The chance of a normal variable exceeding its mean by more than `times` standard deviations."""
    return 0.5 * math.erfc(times / math.sqrt(2))


def in_standard_errors(difference: float, se: float, needs: float | None = None, met: bool | None = None,
                       questions: tuple[int, int] | None = None) -> str:
    """`+2.3 standard errors`; with a zero standard error (both accuracies at 0 or at 1) there is none to count,
    and a positive difference of accuracies over `questions` (n_a, n_b) is told by its `clean_split` chance.
    Given the verdict's threshold (`needs`, a count of standard errors to exceed) and whether it was `met`
    (default: the count exceeds it), as many more decimals as it takes to agree with it (+3.04, not +3.0,
    where more than 3 were needed and met)."""
    if not se:
        if questions is None or not at_threshold(difference) > 0:
            return "no spread to measure it against"
        tail = "" if needs is None else f" ({needs:g} standard errors: 1 in {1 / normal_tail(needs):,.0f})"
        return (f"all right against all wrong, no spread to count standard errors in; between equal accuracies a split "
                f"this clean has a chance of 1 in {math.comb(sum(questions), questions[0]):,}{tail}")
    if needs is None:
        return f"{difference / se:+.1f} standard errors"
    met = exceeds_standard_errors(difference, se, questions, needs) if met is None else met
    return f"{figure(difference / se, needs, met, digits=1, strict=True, sign=True)} standard errors"


def figure(value: float, threshold: float, met: bool, *, digits: int = 2, strict: bool = False,
           sign: bool = False, style: str = "f") -> str:
    """`value` printed with `digits` decimals, or as many more (up to 9) as it takes for the printed figure to
    compare with `threshold` (`>=`, or `>` where `strict`) as the verdict found (`met`): an accuracy of 0.795
    where 0.8 was needed prints 0.795, not a 0.80 beside NOT SHOWN. `style` "e" counts the decimals of the
    mantissa (1.04e-05, not 1.0e-05, where more than 1e-05 was found)."""
    for places in range(digits, 10):
        text = f"{value:{'+' if sign else ''}.{places}{style}}"
        if (float(text) > threshold if strict else float(text) >= threshold) == met:
            break
    return text


def before_after(before: float, after: float, digits: int = 3) -> tuple[str, str]:
    """`before` and `after` printed with `digits` decimals, or as many more (up to 9) as it takes for the printed
    figures to compare as the numbers do (after < before, or not): a loss that fell from 2.3454 to 2.3451 prints
    2.3454 -> 2.3451, not 2.345 -> 2.345 beside "fell"."""
    for places in range(digits, 10):
        texts = f"{before:.{places}f}", f"{after:.{places}f}"
        if (float(texts[1]) < float(texts[0])) == (after < before):
            break
    return texts


def at_threshold(value: float) -> float:
    """A difference of accuracies without its float noise (0.85 - 0.65 is 0.19999999999999996), so that a
    margin printed as +0.20 meets a threshold of 0.2: accuracies of at most a million questions differ by
    multiples of 1e-6, far above the 1e-9 this rounds at."""
    return round(value, 9)
