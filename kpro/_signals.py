"""SIGTERM taken as Ctrl-C, for the commands that save on Ctrl-C (the demo's pool, tokenize's)."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a scheduler's notice before it kills the job: timeout, SLURM, Kubernetes) raises KeyboardInterrupt
    in the block, so that what Ctrl-C saves and cleans up is saved and cleaned up. Python's default would end the
    process at once, leaving its worker processes and temporary files. Main thread only; left alone where SIGTERM
    is ignored on purpose."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def handle(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
