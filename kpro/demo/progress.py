"""An act's progress line while its runs train, read from the metrics files they write.

The runs train in worker processes (`kpro.demo.parallel`), or in this one behind a silenced `fit`, so the act
reads how far each has got from the last line of its `metrics.jsonl` and reports every group of runs (those of
a group train one after another, or side by side, and their steps add up) with the time left at this session's
pace. Redrawn in place on a terminal; elsewhere a line at most every LOG_LINE_SECONDS.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..train.progress import StatusLine, format_duration, last_logged_step
from .parallel import default_workers, run_jobs

LOG_LINE_SECONDS = 60  # off a terminal, at most a line a minute


class RunsProgress:
    def __init__(self, groups: dict[str, tuple[list[Path], int]], stream=None, side_by_side: bool = True):
        """`groups`: a name -> (the metrics files of its runs, the steps they train in all); `side_by_side`:
        whether the groups train at once (a worker each), else they take turns."""
        self.groups, self.side_by_side = groups, side_by_side
        self.line = StatusLine(sys.stderr if stream is None else stream)  # progress: stdout has the act's story
        self.start, self.first = time.perf_counter(), self.steps()  # a resumed run's steps are not this session's
        self.logged: float | None = None

    def steps(self) -> tuple[int, ...]:
        return tuple(sum(last_logged_step(path) for path in paths) for paths, _ in self.groups.values())

    def report(self) -> None:
        now = time.perf_counter()
        elapsed, steps = now - self.start, self.steps()
        # A run restarted or resumed drops the lines its last session logged past its checkpoint: from there on
        # the steps count as this session's (else the line had no estimate for as long as they were ahead).
        self.first = tuple(map(min, self.first, steps))
        totals = [total for _, total in self.groups.values()]
        milestone = self.logged is None or now - self.logged >= LOG_LINE_SECONDS
        if milestone:
            self.logged = now
        counts = ", ".join(f"{name} {done:,}/{total:,}" + (" steps" if i == 0 else "")
                           for i, (name, done, total) in enumerate(zip(self.groups, steps, totals)))
        left = self.left(elapsed, steps, totals)
        estimate = "time left not known yet" if left is None else f"about {format_duration(left)} left"
        self.line.show(f"  training: {counts}; {format_duration(elapsed)} elapsed, {estimate}", milestone=milestone)

    def left(self, elapsed: float, steps: tuple[int, ...], totals: list[int]) -> float | None:
        """Seconds left: the slowest group's at its own pace where the groups train side by side, else (they take
        turns, or one has not started) all the steps left at the pace of those done; None before any step. (A
        group's own pace, taken over the session's time, counted the first group's turn in the second's.)"""
        rest = [max(total - done, 0) for done, total in zip(steps, totals)]
        done = [now - first for now, first in zip(steps, self.first)]
        if self.side_by_side and all(r == 0 or d > 0 for r, d in zip(rest, done)):
            return max((elapsed * r / d if r else 0.0) for r, d in zip(rest, done))
        return elapsed * sum(rest) / sum(done) if sum(done) > 0 else None

    def close(self) -> None:
        self.line.close()


def run_jobs_reporting(jobs: list, workers: int | None, groups: dict[str, tuple[list[Path], int]]) -> list:
    """`run_jobs(jobs, workers)` with a `RunsProgress` line over `groups` while they train."""
    side_by_side = (default_workers() if workers is None else workers) >= len(groups)
    progress = RunsProgress(groups, side_by_side=side_by_side)
    try:
        return run_jobs(jobs, workers, progress=progress.report)
    finally:
        progress.close()
