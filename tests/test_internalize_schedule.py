"""RemovalSchedule: counts at hand-computed steps, the switch to removing everything, the offset distribution."""
import math

import pytest
import torch

from kpro.internalize import MAX_OFFSET, REMOVE_ALL, RemovalSchedule, step_generator


@pytest.mark.parametrize("steps_per_epoch, per_epoch, expected", [
    # k = round(100 / 8) = round(12.5) = 12 (half to even): one more token every 12 steps.
    (100, 8, {0: 0, 11: 0, 12: 1, 23: 1, 24: 2, 99: 8, 100: 8, 1199: 99, 1200: 100}),
    (1000, 8, {0: 0, 124: 0, 125: 1, 999: 7, 1000: 8, 2000: 16}),   # k = 125
    (10, 3, {2: 0, 3: 1, 9: 3, 10: 3, 30: 10}),                     # k = round(3.33) = 3
    (7, 2, {3: 0, 4: 1, 7: 1, 8: 2}),                               # k = round(3.5) = 4
    (5, 9, {0: 0, 1: 1, 2: 2, 50: 50}),                             # k = round(0.56) = 1
])
def test_scheduled_counts(steps_per_epoch, per_epoch, expected):
    schedule = RemovalSchedule(steps_per_epoch, per_epoch)
    assert {step: schedule.scheduled(step) for step in expected} == expected


def test_everything_is_removed_once_the_count_passes_the_threshold():
    schedule = RemovalSchedule(100, 8, remove_all_after=2)  # k = 12
    assert [schedule.scheduled(s) for s in (0, 12, 24, 35)] == [0, 1, 2, 2]
    assert schedule.scheduled(36) == REMOVE_ALL == math.inf and schedule.scheduled(10_000) == REMOVE_ALL
    at_zero = RemovalSchedule(100, 8, remove_all_after=0)
    assert at_zero.scheduled(11) == 0 and at_zero.scheduled(12) == REMOVE_ALL
    assert RemovalSchedule(100, 8).scheduled(10**9) == 10**9 // 12
    counts = schedule.removal_counts(36, 5, seed=0)
    assert counts.dtype == torch.long and (counts == torch.iinfo(torch.long).max).all()


def test_increases_at_marks_the_steps_where_the_count_goes_up():
    schedule = RemovalSchedule(100, 8, remove_all_after=1)
    assert [s for s in range(60) if schedule.increases_at(s)] == [12, 24]


def folded_geometric(lam):
    """The SPEC's P(o) = (1 - e^-λ) e^-λo for o = 0..99, the remaining mass added to o = 99."""
    p = [(1 - math.exp(-lam)) * math.exp(-lam * o) for o in range(MAX_OFFSET + 1)]
    p[-1] += 1 - sum(p)
    return torch.tensor(p, dtype=torch.float64)


@pytest.mark.parametrize("lam", [4.0, 0.5, 0.05])
def test_offset_frequencies_follow_the_formula(lam):
    # λ = 0.05 puts e^-4.95 = 0.7% on o = 99 (where normalising the truncated series would put 0.03%),
    # λ = 0.5 spreads over ~30 values, λ = 4 is the default (98.2% zeros).
    n = 400_000
    schedule = RemovalSchedule(100, 8, smoothing_lambda=lam)
    offsets = schedule.sample_offsets(n, torch.Generator().manual_seed(1234))
    assert offsets.dtype == torch.long and offsets.shape == (n,)
    assert 0 <= int(offsets.min()) and int(offsets.max()) <= MAX_OFFSET
    p = folded_geometric(lam)
    counts = torch.bincount(offsets, minlength=MAX_OFFSET + 1).double()
    # Each count is Binomial(n, p): allow 5 standard deviations (+1 for bins of probability ~0).
    tolerance = 5 * (n * p * (1 - p)).sqrt() + 1
    assert ((counts - n * p).abs() <= tolerance).all(), (counts - n * p).abs().max()
    assert torch.allclose(schedule.offset_probabilities(), p, rtol=1e-12, atol=1e-15)


def test_no_smoothing_gives_zero_offsets():
    schedule = RemovalSchedule(100, 8, smoothing_lambda=math.inf)
    assert torch.equal(schedule.sample_offsets(1000), torch.zeros(1000, dtype=torch.long))
    assert torch.equal(schedule.removal_counts(50, 4, seed=3), torch.full((4,), 4))


def test_counts_are_a_function_of_seed_and_step_only():
    schedule = RemovalSchedule(10, 8, smoothing_lambda=0.3)
    sequential = [schedule.removal_counts(step, 64, seed=7) for step in range(30)]
    torch.manual_seed(99)  # the global RNG plays no part
    resumed = [schedule.removal_counts(step, 64, seed=7) for step in range(15, 30)]
    assert all(torch.equal(a, b) for a, b in zip(sequential[15:], resumed))
    assert not torch.equal(schedule.removal_counts(3, 64, seed=7), schedule.removal_counts(3, 64, seed=8))
    assert not torch.equal(sequential[3] - 3, sequential[4] - 4)  # another step, other offsets (k = 1)
    assert all((c >= schedule.scheduled(s)).all() for s, c in enumerate(sequential))
    seeds = [step_generator(seed, step).initial_seed() for seed, step in [(1, 2), (1, 2), (2, 1), (1, 3)]]
    assert seeds[0] == seeds[1] and len(set(seeds)) == 3
    # pairs whose digits run together (1, 23) and (12, 3): their keys must not (mutation round 10)
    pairs = [(1, 23), (12, 3), (11, 1), (1, 11), (0, 0)]
    assert len({step_generator(seed, step).initial_seed() for seed, step in pairs}) == len(pairs)
    assert len({tuple(torch.rand(4, generator=step_generator(seed, step)).tolist()) for seed, step in pairs}) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps_per_epoch=0), "steps_per_epoch must be an integer >= 1"),
    (dict(steps_per_epoch=10.5), "steps_per_epoch must be an integer"),
    (dict(steps_per_epoch=True), r"steps_per_epoch must be an integer, got True \(bool\)"),
    (dict(steps_per_epoch=100, remove_per_epoch=0), "remove_per_epoch must be a positive finite number"),
    (dict(steps_per_epoch=100, remove_per_epoch=math.inf), "remove_per_epoch must be a positive finite number"),
    (dict(steps_per_epoch=100, remove_per_epoch=math.nan), "remove_per_epoch must be a positive finite number"),
    (dict(steps_per_epoch=4, remove_per_epoch=8), r"round\(4 / 8\) = 0\); remove_per_epoch must be below 8"),
    (dict(steps_per_epoch=100, smoothing_lambda=0), "smoothing_lambda must be > 0"),
    (dict(steps_per_epoch=100, smoothing_lambda=-1.0), "smoothing_lambda must be > 0"),
    (dict(steps_per_epoch=100, smoothing_lambda=math.nan), "smoothing_lambda must be > 0"),
    (dict(steps_per_epoch=100, remove_all_after=-1), "remove_all_after must be an integer >= 0"),
    (dict(steps_per_epoch=100, remove_all_after=2.0), "remove_all_after must be an integer"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RemovalSchedule(**kwargs)


def test_bad_steps_and_sizes_are_named():
    schedule = RemovalSchedule(100)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        schedule.scheduled(-1)
    with pytest.raises(ValueError, match=r"step must be an integer, got 1\.0 \(float\)"):
        schedule.scheduled(1.0)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        schedule.sample_offsets(-2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 0"):
        schedule.removal_counts(0, -1, seed=0)
    with pytest.raises(ValueError, match=r"seed must be an integer, got 'a' \(str\)"):
        schedule.removal_counts(0, 3, seed="a")
    assert RemovalSchedule(7, 4).steps_per_token == 2 and RemovalSchedule(4, 7).steps_per_token == 1
