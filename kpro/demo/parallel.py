"""Independent training runs of an act side by side, one CPU thread each.

The demo's models are so small that a second thread speeds a run up little, while two runs side by side
take the time of one on two cores. `run_jobs` runs each job (a module-level function and its keyword
arguments) in a worker process of its own, at most `workers` at a time, and returns their results in
order. A job seeds everything it uses and runs on one thread, so its result is the same whether it runs
in a worker or in this process (`workers=1`): the parallelism changes the wall time, never the numbers.
A job that fails, or an interrupt, ends the other jobs at once rather than after their training; a worker
whose parent process is gone (killed, say) ends itself within a second rather than train on for nobody.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
from typing import Callable

import torch


def default_workers() -> int:
    """Two on a machine with two or more cores (the demo's target), else one; KPRO_DEMO_WORKERS overrides."""
    value = os.environ.get("KPRO_DEMO_WORKERS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"KPRO_DEMO_WORKERS must be a positive integer, got {value!r}")
        return int(value)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_jobs(jobs: list[tuple[Callable, dict]], workers: int | None = None, *,
             progress: Callable[[], None] | None = None, poll_seconds: float = 10.0) -> list:
    """[fn(**kwargs) for fn, kwargs in jobs], each on one thread, up to `workers` processes at once.

    `progress()`, if given, is called every `poll_seconds` while worker processes run, to report on them from
    what they write to disk (jobs run in this process, `workers=1`, get no such calls)."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(jobs) <= 1:
        return [_one_thread(fn, kwargs) for fn, kwargs in jobs]
    context = multiprocessing.get_context("spawn")  # no forked torch state; works the same on every OS
    stop = context.Event()
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                                initializer=_end_with, initargs=(os.getpid(), stop)) as pool:
        futures = [pool.submit(_one_thread, fn, kwargs) for fn, kwargs in jobs]
        try:
            while True:  # wakes at the first failure, whichever job it is, or every poll to report progress
                done, pending = concurrent.futures.wait(futures, poll_seconds if progress is not None else None,
                                                        concurrent.futures.FIRST_EXCEPTION)
                failed = [future for future in done if future.exception() is not None]
                if failed:
                    failed[0].result()  # raises its error now, not after the jobs before it in the list end
                if not pending:
                    return [future.result() for future in futures]
                if progress is not None:
                    progress()
        except BaseException:
            stop.set()  # the other jobs' workers exit now, so leaving the pool does not wait out their training
            for future in futures:
                future.cancel()
            raise


def _end_with(parent: int, stop) -> None:
    """Worker initializer: a daemon thread ends this worker once `stop` is set or its parent process is gone."""
    def watch():
        while not stop.wait(1.0) and os.getppid() == parent:
            pass
        os._exit(1)
    threading.Thread(target=watch, name="kpro-end-with-parent", daemon=True).start()


def _one_thread(fn: Callable, kwargs: dict):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(**kwargs)
    finally:
        torch.set_num_threads(threads)
