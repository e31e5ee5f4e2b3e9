"""Every Triton kernel compiles for sm_80 and sm_90, in the tiles its launcher picks, within the shared memory
of an A100 / H100 — checked without a GPU (the CPU tests run Triton's interpreter, which compiles nothing)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_triton_gpu_compile.py")


def test_every_kernel_compiles_for_ampere_and_hopper_within_shared_memory():
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "80", "90"], capture_output=True, text=True, env=env,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) >= 2 * 30  # both targets, every kernel configuration
    failed = [f"sm_{r['arch']} {r['kernel']}: {r['error']}" for r in records if "error" in r]
    assert not failed, "\n".join(failed)
    too_big = [f"sm_{r['arch']} {r['kernel']}: {r['shared']} B of shared memory > {r['limit']}"
               for r in records if r["shared"] > r["limit"]]
    assert not too_big, "\n".join(too_big)
