"""Multi-digit multiplication in the ICoT format, and seeded training sets of any size.

3719 × 3349 with n = 4 is the line

    9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) + 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1

Every number is written least-significant digit first, one digit per symbol, zero-padded to a fixed width:
the operands n digits; partial product j (a · b_j · 10^j, j = 0 … n−1) and the running sum after it n+1+j
digits; the product 2n digits. The partial products are joined by `+`, and each one except the first and
the last is followed by the running sum in `( … )` (after the last, the sum is the product after `####`).
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import numpy as np

from .._files import write_atomic
from .._numbers import is_integer
from .data import published_file, read_examples

PUBLISHED_SIZES = (4, 5, 7, 9)


def multiplication_example(a: int, b: int, n: int) -> str:
    """The line for a × b with n-digit operands, exactly as in the published `*_mult` files."""
    _check_digits(n)
    _check_operand("a", a, n)
    _check_operand("b", b, n)
    steps, total = [], 0
    for j, digit in enumerate(reversed(str(b))):
        partial = a * int(digit) * 10 ** j
        total += partial
        step = _reversed_digits(partial, n + 1 + j)
        if 0 < j < n - 1:
            step += f" ( {_reversed_digits(total, n + 1 + j)} )"
        steps.append(step)
    return (f"{_reversed_digits(a, n)} * {_reversed_digits(b, n)}||{' + '.join(steps)} "
            f"#### {_reversed_digits(a * b, 2 * n)}")


def multiplication_operands(source: str) -> tuple[int, int, int]:
    """(a, b, n) from the input of a multiplication line (`9 1 7 3 * 9 4 3 3`, or the whole line)."""
    source = source.split("||", 1)[0]
    # by whitespace-separated symbols, as the tokenizer reads them: tabs around the "*" are the same line
    symbols = source.split()
    star = symbols.index("*") if symbols.count("*") == 1 else None
    digits = [symbols[:star], symbols[star + 1:]] if star is not None else []
    if (star is None or not digits[0] or len(digits[0]) != len(digits[1])
            or not all(len(d) == 1 and d in "0123456789" for side in digits for d in side)):
        raise ValueError(f"not the input of a multiplication line (two runs of n digits joined by ' * '): {source!r}")
    a, b = (int("".join(reversed(side))) for side in digits)
    return a, b, len(digits[0])


def published_multiplication_pairs(n: int) -> set[tuple[int, int]]:
    """The operand pairs (a, b) of the published n × n valid and test sets (empty for other n)."""
    if n not in PUBLISHED_SIZES:
        return set()
    return {multiplication_operands(example.input)[:2]
            for split in ("valid", "test") for example in read_examples(published_file(f"{n}x{n}", split))}


def multiplication_pairs(n: int, size: int, seed: int, *, exclude_published: bool = True,
                         exclude=()) -> list[tuple[int, int]]:
    """`size` distinct operand pairs (a, b) of n-digit numbers, uniformly drawn, in random order.

    Leaves out the pairs of the published n × n valid/test sets (unless `exclude_published=False`) and
    any pair in `exclude`. The same (n, size, seed, exclusions) give the same pairs.
    """
    _check_digits(n)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size must be a non-negative integer, got {size!r}")
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    seed = int(seed)  # random.Random takes no NumPy integer
    low, high = _operand_range(n)
    count = high - low
    excluded = {tuple(pair) for pair in exclude} | (published_multiplication_pairs(n) if exclude_published else set())
    excluded_indices = {(a - low) * count + (b - low) for a, b in excluded if low <= a < high and low <= b < high}
    space = count * count
    if size > space - len(excluded_indices):
        raise ValueError(f"asked for {size:,} pairs of {n}-digit numbers, but only "
                         f"{space - len(excluded_indices):,} remain after the {len(excluded_indices):,} excluded")
    rng = random.Random(seed)
    if 2 * (size + len(excluded_indices)) >= space:
        # Dense (e.g. most of the 810,000 3x3 pairs): shuffle every pair index, keep the allowed ones.
        chosen = list(range(space))
        rng.shuffle(chosen)
        chosen = [index for index in chosen if index not in excluded_indices][:size]
    else:
        # Sparse (808,000 of the 81M 4x4 pairs): draw, and redraw a repeated or excluded pair; fewer
        # than half the draws are rejected, and every accepted pair is uniform over those still allowed.
        chosen, taken = [], set(excluded_indices)
        while len(chosen) < size:
            index = rng.randrange(space)
            if index not in taken:
                taken.add(index)
                chosen.append(index)
    return [(low + index // count, low + index % count) for index in chosen]


def multiplication_lines(pairs, n: int) -> list[str]:
    """`multiplication_example(a, b, n)` for every (a, b) in `pairs`, vectorized (several times faster)."""
    _check_digits(n)
    pairs = list(pairs)
    for a, b in pairs:
        _check_operand("a", a, n)
        _check_operand("b", b, n)
    return _encoded_lines(pairs, n).decode("ascii").split("\n")[:-1]


def multiplication_training_set(n: int, size: int, seed: int, *, exclude_published: bool = True,
                                exclude=()) -> list[str]:
    """`size` distinct lines for n × n multiplication (the paper used 808,000), none from the test sets."""
    pairs = multiplication_pairs(n, size, seed, exclude_published=exclude_published, exclude=exclude)
    return _encoded_lines(pairs, n).decode("ascii").split("\n")[:-1]


def write_multiplication_training_set(path: str | os.PathLike, n: int, size: int, seed: int, *,
                                      exclude_published: bool = True, exclude=()) -> Path:
    """Write `multiplication_training_set(...)`, one line each, atomically (a temporary file renamed)."""
    path = Path(path)
    pairs = multiplication_pairs(n, size, seed, exclude_published=exclude_published, exclude=exclude)
    # fsynced before the rename: the command reuses the file where it exists, so a truncated one must never be
    # renamed into place; a failure leaves no temporary behind
    write_atomic(path, (_encoded_lines(pairs[start:start + _CHUNK], n) for start in range(0, len(pairs), _CHUNK)))
    return path


_CHUNK = 16384  # lines formatted at once: bounds the temporary digit arrays to a few tens of MB


def _encoded_lines(pairs, n: int) -> bytes:
    """The lines of `pairs` (checked n-digit operands) as ASCII, each ended by a newline."""
    if n > _LARGEST_VECTORIZED:
        return "".join(multiplication_example(a, b, n) + "\n" for a, b in pairs).encode("ascii")
    layout = _line_layout(n)
    return b"".join(_format_chunk(pairs[start:start + _CHUNK], n, layout) for start in range(0, len(pairs), _CHUNK))


# Every number of an n x n line has a fixed width, so all lines share one layout: a template (the line of
# any pair) in which each digit position belongs to digit k of the i-th number. Filling those positions
# from integer arrays formats a whole chunk of lines at once. int64 holds the product for n <= 9.
_LARGEST_VECTORIZED = 9


@functools.lru_cache(maxsize=None)
def _line_layout(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    low = _operand_range(n)[0]
    template = np.frombuffer(multiplication_example(low, low, n).encode("ascii"), dtype=np.uint8)
    slots = np.flatnonzero((template >= ord("0")) & (template <= ord("9")))
    widths = [n, n]  # a, b, then each partial product and (between the first and the last) its sum
    for j in range(n):
        widths += [n + 1 + j] * (2 if 0 < j < n - 1 else 1)
    widths.append(2 * n)
    assert sum(widths) == len(slots), "the line format and its layout disagree"
    number = np.repeat(np.arange(len(widths)), widths)
    place = np.concatenate([10 ** np.arange(width, dtype=np.int64) for width in widths])  # least significant first
    return template, slots, number, place


def _format_chunk(pairs, n: int, layout) -> bytes:
    template, slots, number, place = layout
    a = np.fromiter((a for a, _ in pairs), dtype=np.int64, count=len(pairs))
    b = np.fromiter((b for _, b in pairs), dtype=np.int64, count=len(pairs))
    shift = 10 ** np.arange(n, dtype=np.int64)
    partials = a[:, None] * (b[:, None] // shift % 10) * shift
    sums = np.cumsum(partials, axis=1)
    numbers = [a, b]
    for j in range(n):
        numbers += [partials[:, j], sums[:, j]] if 0 < j < n - 1 else [partials[:, j]]
    numbers.append(a * b)
    values = np.stack(numbers, axis=1)
    lines = np.empty((len(pairs), len(template) + 1), dtype=np.uint8)
    lines[:, :-1] = template
    lines[:, -1] = ord("\n")
    lines[:, slots] = values[:, number] // place % 10 + ord("0")
    return lines.tobytes()


def _reversed_digits(value: int, width: int) -> str:
    """`value` zero-padded to `width` digits, least significant first, digits separated by spaces."""
    return " ".join(str(value).zfill(width)[::-1])


def _operand_range(n: int) -> tuple[int, int]:
    """n-digit numbers: no leading zero (as in the published sets), except that 0 is a 1-digit number."""
    return (0 if n == 1 else 10 ** (n - 1)), 10 ** n


def _check_digits(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of digits n must be a positive integer, got {n!r}")


def _check_operand(name: str, value, n: int) -> None:
    low, high = _operand_range(n)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise ValueError(f"{name}={value!r} is not a {n}-digit number (expected {low} <= {name} < {high})")
