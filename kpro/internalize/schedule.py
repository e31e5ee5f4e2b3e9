"""How many CoT tokens to remove at each training step, and the smoothing offsets.

The schedule holds no state: the count is a function of the global step, and the offsets of a step come
from a generator seeded by (seed, step). A run resumed at step s therefore removes exactly what an
uninterrupted run removes at step s, with nothing to save but the step.
"""
from __future__ import annotations

import hashlib
import math
import operator

import torch

REMOVE_ALL = math.inf  # `scheduled(step)` once the whole CoT is removed
MAX_OFFSET = 99        # offsets are 0 ... MAX_OFFSET; the tail of the distribution is folded onto it


class RemovalSchedule:
    """Δ = `remove_per_epoch` CoT tokens removed per epoch: one more every k = round(steps_per_epoch / Δ) steps.

    `scheduled(step)` = ⌊step / k⌋, or REMOVE_ALL once that count passes `remove_all_after` (more than
    `remove_all_after` tokens scheduled; the reference's `--remove_all_when_remove_beyond X` is
    `remove_all_after=X-1`). Each training example removes `scheduled + o` tokens, o drawn from
    P(o) = (1 − e^−λ)·e^−λo for o = 0 … 98 and the remaining mass e^−99λ on o = 99, with
    λ = `smoothing_lambda` (λ = inf: no smoothing, o = 0). k uses Python's round (half to even), as the
    reference does.
    """

    def __init__(self, steps_per_epoch: int, remove_per_epoch: float = 8, smoothing_lambda: float = 4.0,
                 remove_all_after: int | None = None):
        _check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        if not _is_real(remove_per_epoch) or not 0 < remove_per_epoch < math.inf:
            raise ValueError(f"remove_per_epoch must be a positive finite number, got {remove_per_epoch!r}")
        if not _is_real(smoothing_lambda) or not smoothing_lambda > 0:
            raise ValueError(f"smoothing_lambda must be > 0 (math.inf turns smoothing off), got {smoothing_lambda!r}")
        if remove_all_after is not None:
            _check_int("remove_all_after", remove_all_after, minimum=0)
        steps_per_token = round(steps_per_epoch / remove_per_epoch)
        if steps_per_token < 1:
            raise ValueError(f"remove_per_epoch={remove_per_epoch} with steps_per_epoch={steps_per_epoch} would remove "
                             f"more than one token per step (round({steps_per_epoch} / {remove_per_epoch}) = 0); "
                             f"remove_per_epoch must be below {2 * steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch
        self.remove_per_epoch = float(remove_per_epoch)  # 2 and 2.0 are one schedule (a run resumes either way)
        self.smoothing_lambda = float(smoothing_lambda)
        self.remove_all_after = remove_all_after
        self.steps_per_token = steps_per_token
        self._cumulative = _offset_cdf(self.smoothing_lambda)

    def __repr__(self) -> str:
        return (f"RemovalSchedule(steps_per_epoch={self.steps_per_epoch}, remove_per_epoch={self.remove_per_epoch}, "
                f"smoothing_lambda={self.smoothing_lambda}, remove_all_after={self.remove_all_after})")

    def scheduled(self, step: int) -> int | float:
        """CoT tokens to remove at global step `step` (from 0): an int, or REMOVE_ALL."""
        _check_int("step", step, minimum=0)
        count = step // self.steps_per_token
        if self.remove_all_after is not None and count > self.remove_all_after:
            return REMOVE_ALL
        return count

    def increases_at(self, step: int) -> bool:
        """Whether step `step` removes more than the step before (where the loop re-creates its optimizer)."""
        return step > 0 and self.scheduled(step) != self.scheduled(step - 1)

    def offset_probabilities(self) -> torch.Tensor:
        """P(o) for o = 0 … MAX_OFFSET, float64."""
        return torch.diff(self._cumulative, prepend=torch.zeros(1, dtype=torch.float64))

    def sample_offsets(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` smoothing offsets, int64 [n] on the CPU, drawn from `generator` (torch's default if None)."""
        _check_int("n", n, minimum=0)
        if self.smoothing_lambda == math.inf:
            return torch.zeros(n, dtype=torch.long)
        uniform = torch.rand(n, dtype=torch.float64, generator=generator)
        # Inverse CDF: o is the number of cumulative probabilities at or below u.
        return torch.searchsorted(self._cumulative, uniform, right=True)

    def removal_counts(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Tokens each example of the step's batch removes, int64 [batch_size]: `scheduled + offset`.

        The offsets are drawn from `step_generator(seed, step)`, so they are the same whenever the step is
        replayed. Under REMOVE_ALL every count is the int64 maximum (at least any CoT's length).
        """
        _check_int("batch_size", batch_size, minimum=0)
        scheduled = self.scheduled(step)
        if scheduled == REMOVE_ALL:
            return torch.full((batch_size,), torch.iinfo(torch.long).max, dtype=torch.long)
        return scheduled + self.sample_offsets(batch_size, step_generator(seed, step))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, step), unrelated for different pairs."""
    _check_int("seed", seed)
    _check_int("step", step, minimum=0)
    digest = hashlib.blake2b(f"kpro.internalize/{seed}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid seed


def _offset_cdf(smoothing_lambda: float) -> torch.Tensor:
    """P(O <= o) = 1 − e^−λ(o+1) for o < MAX_OFFSET, and 1 at MAX_OFFSET (the folded tail)."""
    o = torch.arange(MAX_OFFSET + 1, dtype=torch.float64)
    cumulative = -torch.expm1(-smoothing_lambda * (o + 1))
    cumulative[-1] = 1.0
    return cumulative


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_int(name: str, value, minimum: int | None = None) -> None:
    try:
        operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r} (bool)")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
