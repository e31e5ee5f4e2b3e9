"""Independent training runs of an act side by side, one CPU thread each.

The demo's models are so small that a second thread speeds a run up little, while two runs side by side
take the time of one on two cores. `run_jobs` runs each job (a module-level function and its keyword
arguments) in a worker process of its own, at most `workers` at a time, and returns their results in
order. A job seeds everything it uses and runs on one thread, so its result is the same whether it runs
in a worker or in this process (`workers=1`): the parallelism changes the wall time, never the numbers. A
worker keeps the memory its steps free for the next ones (`keep_freed_memory`).
A job that fails ends the other jobs at once rather than after their training, and so does a worker that dies
(killed by the system for lack of memory, say): BrokenProcessPool, saying so. Ctrl-C lets each job that
trains stop after its step with a checkpoint, as `kpro.train.fit` does in one process, so that a rerun resumes
it (a second Ctrl-C, more than a second later, quits at once); SIGTERM, a scheduler's notice, does the same, each
job's line naming it (a second SIGTERM changes nothing). A worker whose parent process is gone (killed, say) ends
itself within a second rather than train on for nobody.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import torch

from .._signals import STOP_SIGNALS, notice_taken, relay_notices_from, sigterm_as_ctrl_c, start_resource_tracker
from .._spawn import spawn_imports_main
from ..errors import StoppedAndSaid


def default_workers() -> int:
    """Two on a machine with two or more cores (the demo's target), else one; KPRO_DEMO_WORKERS overrides."""
    value = os.environ.get("KPRO_DEMO_WORKERS")
    if value:
        if not (value.isascii() and value.isdigit()) or int(value) < 1:  # isdigit alone passes '²' and '٣'
            raise ValueError(f"KPRO_DEMO_WORKERS must be a positive integer, got {value!r}")
        return int(value)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_jobs(jobs: list[tuple[Callable, dict]], workers: int | None = None, *,
             progress: Callable[[], None] | None = None, poll_seconds: float = 10.0) -> list:
    """[fn(**kwargs) for fn, kwargs in jobs], each on one thread, up to `workers` processes at once.

    `progress()`, if given, is called every `poll_seconds` while the jobs run, to report on them from what they
    write to disk (from a thread of its own where they run in this process, `workers=1`)."""
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (or None: default_workers()), got {workers!r}")
    if workers == 1 or len(jobs) <= 1:
        with _reporting(progress, poll_seconds):
            return [_one_thread(fn, kwargs) for fn, kwargs in jobs]
    context = multiprocessing.get_context("spawn")  # no forked torch state; works the same on every OS
    start_resource_tracker()  # before the pool starts it, hung up with the terminal
    # Flags in shared memory, not Events: Event.set() waits for every worker sleeping on it to acknowledge, and a
    # worker that was killed never does (the parent hung for ever). A flag is set and read with no lock.
    # `interrupted`: 0, or the stop's signal, which the workers' lines name (a SIGTERM reaches them as SIGINT)
    stop, interrupted, pids = context.RawValue("b", 0), context.RawValue("b", 0), context.SimpleQueue()
    takes_ctrl_c = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # not where it is ignored on purpose
    with sigterm_as_ctrl_c(), \
            concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_end_with,
                                                   initargs=(os.getpid(), stop, interrupted, pids)) as pool:
        futures = [pool.submit(_in_worker, fn, kwargs, takes_ctrl_c) for fn, kwargs in jobs]
        # The pool notices a worker's death by watching the workers it knew of when its manager thread last woke,
        # and each submit wakes it before starting the worker that submit adds: the last one started could die
        # unnoticed (the demo hung). A no-op submitted once every worker has started wakes it to watch them all.
        pool.submit(int)
        try:
            while True:  # wakes at the first failure, whichever job it is, or every poll to report progress
                done, pending = concurrent.futures.wait(futures, poll_seconds if progress is not None else None,
                                                        concurrent.futures.FIRST_EXCEPTION)
                failed = [future for future in done if future.exception() is not None]
                if failed:
                    try:
                        failed[0].result()  # raises its error now, not after the jobs before it in the list end
                    except BrokenProcessPool as broken:
                        raise BrokenProcessPool(
                            "a worker process of the demo died (killed, most often by the system for lack of "
                            "memory) while running a job; the other jobs are ended. Run the same command again: "
                            "the runs resume from their last checkpoints (KPRO_DEMO_WORKERS=1 runs one job at a "
                            "time, with less memory)" + _startup_advice(futures)) from broken
                if not pending:
                    return [future.result() for future in futures]
                if progress is not None:
                    progress()
        except BaseException as error:
            try:
                if isinstance(error, KeyboardInterrupt):
                    _save_and_stop(futures, interrupted, pids)  # a second Ctrl-C while the jobs save ends the wait
            finally:
                stop.value = 1  # the other jobs' workers exit now, so leaving the pool does not wait out their training
                for future in futures:
                    future.cancel()
            if isinstance(error, KeyboardInterrupt) and _each_stop_said(futures):
                raise StoppedAndSaid from None  # the command adds no bare "interrupted" to the jobs' lines
            raise


class _NotStarted(KeyboardInterrupt):
    """A job that a worker took after Ctrl-C, ended before it started: it did nothing, and says nothing."""


def _each_stop_said(futures: list) -> bool:
    """Whether some job stopped, and every job that stopped after it started said so (fit's "interrupted: saved
    ...; run again to resume", a StoppedAndSaid)."""
    stopped = [future.exception() for future in futures if future.done() and not future.cancelled()
               and isinstance(future.exception(), KeyboardInterrupt)]
    stopped = [error for error in stopped if not isinstance(error, _NotStarted)]
    return bool(stopped) and all(isinstance(error, StoppedAndSaid) for error in stopped)


def _startup_advice(futures: list) -> str:
    """Where no job has finished and the workers import the caller's script again: the advice for a script that
    runs an act outside `if __name__ == "__main__":`, whose workers die starting (they run the script, which
    starts workers of its own or finds its output directory in use) and look killed from here."""
    if any(future.done() and not future.cancelled() and future.exception() is None for future in futures) or \
            not spawn_imports_main():
        return ""
    return ("; if the workers died starting: they import the main module again (spawned), so a script of one's own "
            "must call the act under `if __name__ == \"__main__\":`, or set KPRO_DEMO_WORKERS=1")


@contextlib.contextmanager
def _reporting(progress: Callable[[], None] | None, poll_seconds: float):
    """`progress()` every `poll_seconds` from a daemon thread while the block runs (jobs in this process)."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def report():
        while not done.wait(poll_seconds):
            progress()
    thread = threading.Thread(target=report, name="kpro-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _save_and_stop(futures: list, interrupted, pids) -> None:
    """After Ctrl-C: jobs not started yet end at their start (the pool hands a worker's next job over early, so
    cancelling misses some), and each running one gets SIGINT and is waited for, so that fit stops it after its
    step with a checkpoint. A terminal's Ctrl-C reached the workers already: fit takes this copy, milliseconds
    later, as the same press, and a second press here within a second is taken as the first one too.
    Elsewhere than POSIX, the console signals every process."""
    interrupted.value = notice_taken() or signal.SIGINT
    for future in futures:
        future.cancel()
    if os.name == "posix":
        while not pids.empty():
            try:
                os.kill(pids.get(), signal.SIGINT)  # an idle worker ignores it
            except ProcessLookupError:  # that worker has ended
                pass
    first = time.monotonic()
    while True:
        try:
            concurrent.futures.wait(futures)
            return
        except KeyboardInterrupt:
            if time.monotonic() - first > 1.0:
                raise


_INTERRUPTED = None  # in a worker: the pool's flag set at Ctrl-C (_end_with)


def _end_with(parent: int, stop, interrupted, pids) -> None:
    """Worker initializer: reports this worker's pid, then a daemon thread ends the worker within a second once
    `stop` is set or its parent process is gone. An idle worker ignores Ctrl-C: ended by it, it would break the pool, which then
    ends the other workers, saving or not. Every worker ignores SIGTERM, which a scheduler sends to the whole process
    group, for the same reason: the parent takes it as Ctrl-C and passes Ctrl-C on (fit takes SIGTERM itself while it
    trains)."""
    global _INTERRUPTED
    _INTERRUPTED = interrupted
    relay_notices_from(lambda: interrupted.value)  # fit's line names a SIGTERM the parent passed on as SIGINT
    keep_freed_memory()
    for signum in STOP_SIGNALS:  # SIGHUP too: a closed terminal's reaches the group, and the parent takes it
        signal.signal(signum, signal.SIG_IGN)
    pids.put(os.getpid())
    def watch():
        while not stop.value and os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, name="kpro-end-with-parent", daemon=True).start()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """In a worker: glibc keeps the memory a training step frees for the next step, rather than handing it back to
    the system to fault in again, zeroed, at every step (about 1,500 page faults and 3.5 ms of system time in the
    internalization act's 47-52 ms step on an AMD EPYC; about 5% of the act's time there, none measured on a Xeon:
    benchmarks/RESULTS.md). What is kept is at most the process's own peak: the workers are the demo's alone, and
    their numbers do not change. False where the C library is not glibc (nothing set)."""
    return set_malloc_thresholds(mmap=32 << 20, trim=256 << 20)  # 32 MiB: the largest mmap threshold glibc takes


def set_malloc_thresholds(mmap: int, trim: int) -> bool:
    """glibc's mmap and trim thresholds for this process, fixed (its adaptive ones no longer move); False where the C
    library is not glibc or refuses them (nothing set)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc (macOS; Windows takes no CDLL(None))
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap) and mallopt(_M_TRIM_THRESHOLD, trim))


def _in_worker(fn: Callable, kwargs: dict, takes_ctrl_c: bool):
    """A job in a worker process: Ctrl-C reaches it as it would in the parent (fit saves and stops); one that
    starts after Ctrl-C ends at once."""
    if takes_ctrl_c:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if _INTERRUPTED is not None and _INTERRUPTED.value:  # read after the handler is in: no press is lost
            raise _NotStarted
        return _one_thread(fn, kwargs)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _one_thread(fn: Callable, kwargs: dict):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(**kwargs)
    finally:
        torch.set_num_threads(threads)
