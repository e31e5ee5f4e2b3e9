"""SIGTERM taken as Ctrl-C, for the commands that save on Ctrl-C (the demo's pool, tokenize's)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import NoReturn

# In the sigterm_as_ctrl_c block now running (None outside one): whether a SIGTERM notice was taken, the stop under way
_stopping: bool | None = None


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a scheduler's notice before it kills the job: timeout, SLURM, Kubernetes) raises KeyboardInterrupt
    in the block, so that what Ctrl-C saves and cleans up is saved and cleaned up. Python's default would end the
    process at once, leaving its worker processes and temporary files. One notice, one KeyboardInterrupt: a SIGTERM
    arriving while the stop is under way (timeout sends it to the command and again to its group; a scheduler to each
    process of the job, in any order) is the same notice, and would otherwise interrupt the cleanup it asks for.
    Main thread only; left alone where SIGTERM is ignored on purpose."""
    global _stopping
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def handle(signum, frame):
        if not _stopping:
            stop_as_sigterm()
    outer, _stopping = _stopping, False
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        try:  # setting a handler first runs those of signals already caught: one caught by now is taken here
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        finally:
            _stopping = outer


def stop_as_sigterm() -> NoReturn:
    """Stop as a SIGTERM does in a sigterm_as_ctrl_c block: KeyboardInterrupt, and a SIGTERM arriving later in the
    block taken as the same notice. For a notice seen elsewhere first: worker processes ended by SIGTERM."""
    global _stopping
    if _stopping is not None:
        _stopping = True
    raise KeyboardInterrupt
