"""`python -m kpro.ops.report` for tests/test_triton_gpu_compile.py, started in the background as soon as
pytest knows that test will run (conftest.py), so that minutes of compiling overlap the other tests
instead of adding to them.

Every standard case is compiled for sm_90a, the GPU kpro is measured on. sm_80 gets the cases where Ampere
can differ (its `mma.sync` lowering, pointer loads, tile tables and smaller shared memory), one case of each
kernel family and dtype class, and the head dim that is not a power of two (96: padded, its dimension masks
live). The others (the unaligned and fp16 twins; Bitune's fp32 and d256, whose tiles are plain attention's)
take the same code paths on Ampere, and would add 220 CPU-seconds to the 490 that this selection took before
the d96 case, which a 2-core CI cannot spare. `python -m kpro.ops.report --arch 80 --arch 90` compiles
everything for both.

The two targets compile in two processes side by side with the tests, each with half the cores (up to 4)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SM80_CASES = ("attention bf16 d64 causal+prefix+padding aligned", "attention bf16 d128 causal aligned",
              "attention bf16 d96 causal+prefix+padding aligned",  # a padded head dim: its masks differ
              "attention fp32 d128 causal+prefix+padding aligned",
              "attention bf16 d256 causal+prefix+padding aligned",
              "bitune_attention bf16 d64 aligned", "bitune_attention bf16 d128 aligned",
              "rms_norm", "swiglu", "linear_cross_entropy")
WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))  # compiler processes per target
REPORT = [sys.executable, "-m", "kpro.ops.report", "--json", "--workers", str(WORKERS)]
COMMANDS = ([*REPORT, "--arch", "90"],
            [*REPORT, "--arch", "80", *(arg for case in SM80_CASES for arg in ("--only", case))])
_running: list[tuple[subprocess.Popen, object, object]] = []


def start() -> None:
    if _running:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    for command in COMMANDS:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        _running.append((subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env), out, err))


def result(timeout: float = 1200) -> tuple[int, str, str]:
    """(the first non-zero return code or 0, both reports' stdout, their stderr), started now if not already."""
    start()
    codes, outs, errs = [], [], []
    for process, out, err in _running:
        process.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        codes.append(process.returncode)
        outs.append(out.read())
        errs.append(err.read())
    return next((code for code in codes if code), 0), "".join(outs), "".join(errs)


def stop() -> None:
    """End reports still running (their test did not get to them: -x, Ctrl-C) and drop their output."""
    for process, out, err in _running:
        if process.poll() is None:
            process.kill()
            process.wait()
        out.close()
        err.close()
    _running.clear()
