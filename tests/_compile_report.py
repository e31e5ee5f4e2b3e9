"""`python -m kpro.ops.report` for tests/test_triton_gpu_compile.py, started in the background as soon as
pytest knows that test will run (conftest.py), so that minutes of single-threaded compiling overlap with
the CPU tests before it instead of adding to them. It leaves the tests one core (on 2 cores, one compiler
process)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
COMMAND = [sys.executable, "-m", "kpro.ops.report", "--arch", "80", "--arch", "90", "--json", "--workers", str(WORKERS)]
_running: tuple[subprocess.Popen, object, object] | None = None


def start() -> None:
    global _running
    if _running is not None:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    _running = subprocess.Popen(COMMAND, stdout=out, stderr=err, text=True, env=env), out, err


def result(timeout: float = 1200) -> tuple[int, str, str]:
    """(return code, stdout, stderr) of the report, started now if it was not already."""
    start()
    process, out, err = _running
    process.wait(timeout=timeout)
    out.seek(0)
    err.seek(0)
    return process.returncode, out.read(), err.read()


def stop() -> None:
    """End a report still running (its test did not get to it: -x, Ctrl-C) and drop its output."""
    global _running
    if _running is not None:
        process, out, err = _running
        if process.poll() is None:
            process.kill()
            process.wait()
        out.close()
        err.close()
        _running = None
