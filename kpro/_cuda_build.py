"""Compile the CUDA C++ kernels in csrc/ into one shared library with nvcc.

The kernels expose plain C entry points (pointers, sizes, a stream) and include no torch headers, so
they compile on any machine with nvcc, GPU or not. This module imports nothing but the standard
library: setup.py loads it by path at install time, kpro loads it at run time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

LIBRARY_NAME = "libkpro_cuda.so"
ARCHITECTURES = ("80", "90")  # machine code (SASS) for A100 and H100/H200
PTX_ARCHITECTURE = "90"  # and PTX, which the driver compiles for newer GPUs (sm_100 and on) at load time
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo")
# The targets' compiles side by side, one thread a core: the same library (so not in the digest) in about half the
# time on 2 cores, where it is part of every install.
PARALLEL_FLAGS = ("--threads", "0")


NVCC_SEARCH = "$CUDA_HOME, $CUDA_PATH, PATH and /usr/local/cuda"  # find_nvcc's order, for messages


def find_nvcc() -> str | None:
    """torch's cpp_extension order: PATH before /usr/local/cuda, so a toolkit put first on PATH is the one used."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


def cuda_sources(csrc: Path) -> list[Path]:
    return sorted(csrc.glob("*.cu"))


def sources_digest(csrc: Path) -> str:
    """Hash of every source and header, and of the flags: a library built from other sources is stale."""
    digest = hashlib.sha256(" ".join(NVCC_FLAGS + gencode_flags()).encode())
    for path in sorted(list(csrc.glob("*.cu")) + list(csrc.glob("*.cuh")) + list(csrc.glob("*.h"))):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def gencode_flags() -> tuple[str, ...]:
    """SASS for each of ARCHITECTURES plus PTX for PTX_ARCHITECTURE: without PTX, the library would load on
    no GPU newer than the newest SASS."""
    sass = tuple(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES)
    return sass + (f"-gencode=arch=compute_{PTX_ARCHITECTURE},code=compute_{PTX_ARCHITECTURE}",)


def build_library(csrc: Path, out_dir: Path, nvcc: str | None = None, verbose: bool = True) -> Path:
    """Compile csrc/*.cu into out_dir/libkpro_cuda.so (written atomically) and record its digest."""
    if not csrc.is_dir():
        raise FileNotFoundError(f"{csrc} is missing: no CUDA sources to compile (build from a git checkout "
                                "or an sdist that holds csrc/)")
    sources = cuda_sources(csrc)
    if not sources:
        raise FileNotFoundError(f"no .cu sources in {csrc}")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError(f"nvcc not found (looked in {NVCC_SEARCH})")
    # Taken before nvcc reads the sources and checked after: a source saved during the compile (an editor, a
    # git pull) must not stamp the old kernels as current
    digest = sources_digest(csrc)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    tmp = out_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
    command = [nvcc, *NVCC_FLAGS, *PARALLEL_FLAGS, *gencode_flags(), *map(str, sources), "-o", str(tmp)]
    if verbose:
        print("kpro: compiling CUDA kernels:", " ".join(command), flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        if sources_digest(csrc) != digest:
            raise RuntimeError(f"{csrc} changed while nvcc compiled it, so its library was discarded: build again")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    (out_dir / (LIBRARY_NAME + ".digest")).write_text(digest + "\n")
    return target


BUILD_MODES = {"0": "never compile", "1": "compile or fail", "auto": "compile when nvcc is found; the default"}


def build_mode(environ=os.environ) -> str:
    """$KPRO_CUDA_BUILD for setup.py: 0, 1 or auto (also when unset or empty); another spelling is refused
    rather than read as auto (`off` would compile, `true` would not insist)."""
    mode = environ.get("KPRO_CUDA_BUILD") or "auto"
    if mode not in BUILD_MODES:
        accepted = ", ".join(f"{value} ({meaning})" for value, meaning in BUILD_MODES.items())
        raise ValueError(f"KPRO_CUDA_BUILD={mode!r} is not a build mode; accepted: {accepted}")
    return mode


def build_for_install(csrc: Path, out_dir: Path, mode: str, nvcc: str | None = None) -> Path | None:
    """setup.py's build into out_dir (pip's build/lib/kpro/_lib, reused across builds of a tree): afterwards
    out_dir holds a library only if this call compiled it from csrc. A library left by an earlier build would
    otherwise ship in the wheel, where the installed kpro loads it without a digest check.
    mode "0": never compile; "1": a failure (missing sources included) raises; "auto": a failure is reported
    and leaves no library."""
    for name in (LIBRARY_NAME, LIBRARY_NAME + ".digest"):
        (out_dir / name).unlink(missing_ok=True)
    if mode == "0":
        return None
    try:
        return build_library(csrc, out_dir, nvcc)
    except (FileNotFoundError, RuntimeError) as err:
        if mode == "1":
            raise
        print(f"kpro: CUDA kernels not built ({err}); the torch and triton backends remain.", file=sys.stderr)
        return None
