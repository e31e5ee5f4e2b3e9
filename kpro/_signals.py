"""SIGTERM taken as Ctrl-C, for the commands that save on Ctrl-C (every `python -m kpro` command, the demo's pool,
tokenize's)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, NoReturn

# The notices of a stop that saves: Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP (POSIX)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
NOTICES = STOP_SIGNALS[1:]  # taken as Ctrl-C by sigterm_as_ctrl_c

# In the sigterm_as_ctrl_c block now running (None outside one): the notice taken, the stop under way (its signal
# number), or False before one
_stopping: int | bool | None = None
# In a worker process whose parent relays its stop as SIGINT (the demo's pool): reads the notice the parent took
# (0 for a Ctrl-C), so that the worker's line names the stop (set by relay_notices_from)
_relayed_notice: Callable[[], int] | None = None


@contextlib.contextmanager
def sigterm_as_ctrl_c(ignore_after_stop: bool = False):
    """SIGTERM (a scheduler's notice before it kills the job: timeout, SLURM, Kubernetes) raises KeyboardInterrupt
    in the block, so that what Ctrl-C saves and cleans up is saved and cleaned up. Python's default would end the
    process at once, leaving its worker processes and temporary files. One notice, one KeyboardInterrupt: a SIGTERM
    arriving while the stop is under way (timeout sends it to the command and again to its group; a scheduler to each
    process of the job, in any order) is the same notice, and would otherwise interrupt the cleanup it asks for.
    SIGHUP (a closed terminal) is taken alike. `ignore_after_stop`: a block that ends in a stop leaves the notices
    ignored (a process that exits next: a notice arriving as it prints its line and exits ended it with status 143
    instead of 130), else the handlers are restored. Main thread only; a notice ignored on purpose (nohup) is left
    alone."""
    global _stopping
    taken = [signum for signum in NOTICES if signal.getsignal(signum) is not signal.SIG_IGN]
    if threading.current_thread() is not threading.main_thread() or not taken:
        yield
        return

    def handle(signum, frame):
        if not _stopping:
            stop_as_sigterm(signum)
    outer, _stopping = _stopping, False
    previous = {signum: signal.signal(signum, handle) for signum in taken}
    stopped = False
    try:
        yield
    except KeyboardInterrupt:  # a notice's, Ctrl-C's, or fit's stop after either
        stopped = True
        raise
    finally:
        try:  # setting a handler first runs those of signals already caught: one caught by now is taken here
            for signum, before in previous.items():
                if ignore_after_stop and (stopped or _stopping):
                    signal.signal(signum, signal.SIG_IGN)
                else:
                    signal.signal(signum, before if before is not None else signal.SIG_DFL)
        finally:
            _stopping = outer


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, which a process pool starts (spawned) in the command's process
    group, with SIGHUP blocked, as the pool's workers ignore it: a closed terminal's SIGHUP killed it, and the stop
    ended in its leak warning and KeyError tracebacks (it ignores SIGINT and SIGTERM itself). Blocked, not ignored,
    here while it starts (the mask is inherited through exec, and the tracker unblocks only SIGINT and SIGTERM): a
    SIGHUP arriving meanwhile waits, and this process takes it once it is unblocked."""
    from multiprocessing import resource_tracker

    if not hasattr(signal, "SIGHUP") or not hasattr(signal, "pthread_sigmask"):
        resource_tracker.ensure_running()
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def raise_if_stopping() -> None:
    """Raise the KeyboardInterrupt of a notice taken in the sigterm_as_ctrl_c block now running, where code between
    swallowed it (torch's import of numpy drops errors raised inside it, and the command ran on, the notice lost)."""
    if _stopping:
        raise KeyboardInterrupt


def stop_as_sigterm(signum: int = signal.SIGTERM) -> NoReturn:
    """Stop as a SIGTERM does in a sigterm_as_ctrl_c block: KeyboardInterrupt, and a SIGTERM arriving later in the
    block taken as the same notice. For a notice seen elsewhere first: worker processes ended by SIGTERM."""
    global _stopping
    if _stopping is not None:
        _stopping = signum
    raise KeyboardInterrupt


def notice_taken() -> int:
    """The signal number of the notice (SIGTERM, SIGHUP) the sigterm_as_ctrl_c block now running took, or 0 (none
    taken: a stop now is Ctrl-C's)."""
    return int(_stopping or 0)


def relay_notices_from(read: Callable[[], int]) -> None:
    """In a worker process to which its parent passes its stop on as SIGINT: `read()` gives the notice the parent
    took (0 for Ctrl-C), which `stop_name` names in place of Ctrl-C."""
    global _relayed_notice
    _relayed_notice = read


def stop_name(signum: int) -> str:
    """How a stop's line names the signal that asked for it: "Ctrl-C" for SIGINT, unless this process's SIGINT
    passes on a notice its parent took (a scheduler's SIGTERM to the demo), named then."""
    relayed = _relayed_notice() if signum == signal.SIGINT and _relayed_notice is not None else 0
    if relayed in NOTICES:
        signum = relayed
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
