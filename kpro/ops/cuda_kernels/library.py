"""Finding, building and loading libkpro_cuda.so, and calling its C entry points.

Where the library comes from, in order:
1. in a source tree (csrc/ beside kpro/): kpro/_lib/libkpro_cuda.so if it was built from the current
   sources (its digest matches), else a copy built on first use with nvcc into ~/.cache/kpro
   ($KPRO_CACHE_DIR), so editing csrc/ never runs stale kernels;
2. in an installed wheel: kpro/_lib/libkpro_cuda.so as installed.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ... import _cuda_build
from ..errors import BackendError

PACKAGE_LIB_DIR = Path(__file__).resolve().parents[2] / "_lib"
CSRC = Path(__file__).resolve().parents[3] / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_i64, _ptr, _int, _float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "kpro_rms_norm_forward": [_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _float, _ptr],
    "kpro_rms_norm_backward": [_int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr],
    "kpro_swiglu_forward": [_int, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr],
    "kpro_swiglu_backward": [_int, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr],
}

_loaded: dict = {}


def _built_from(library: Path, digest: str) -> bool:
    """Whether library exists, stamped (its .digest) as built from the sources of this digest."""
    stamp = library.with_name(library.name + ".digest")
    return library.is_file() and stamp.is_file() and stamp.read_text().strip() == digest


def library_path() -> Path:
    """The library to load, building it first when the source tree has no current build."""
    packaged = PACKAGE_LIB_DIR / _cuda_build.LIBRARY_NAME
    if _cuda_build.cuda_sources(CSRC):
        digest = _cuda_build.sources_digest(CSRC)
        if _built_from(packaged, digest):
            return packaged
        cache = Path(os.environ.get("KPRO_CACHE_DIR", Path.home() / ".cache" / "kpro")) / f"cuda-{digest}"
        built = cache / _cuda_build.LIBRARY_NAME
        # The cached library's stamp is checked too: sources saved between this digest and nvcc's read of them
        # leave other kernels in this folder
        if not _built_from(built, digest):
            if packaged.is_file() and _cuda_build.find_nvcc() is None:  # say why the packaged one was not taken
                stamped = packaged.with_name(packaged.name + ".digest").is_file()
                why = "was built from other sources than csrc/" if stamped else "has no .digest"
                raise FileNotFoundError(
                    f"{packaged} {why}, so it was skipped, and it cannot be rebuilt here: nvcc not found (looked in "
                    f"{_cuda_build.NVCC_SEARCH}); install the CUDA toolkit, or rebuild it where nvcc exists "
                    "(`pip install -e .`) and copy kpro/_lib/ whole (the library and its .digest)")
            _cuda_build.build_library(CSRC, cache)
        return built
    if packaged.is_file():
        return packaged
    raise FileNotFoundError("kpro's CUDA library is not built (install with nvcc present, or run from a source tree)")


def _load() -> ctypes.CDLL:
    if "lib" not in _loaded:
        try:
            lib = ctypes.CDLL(str(library_path()))
            for name, argtypes in SIGNATURES.items():
                getattr(lib, name).argtypes = argtypes
                getattr(lib, name).restype = ctypes.c_int
            lib.kpro_error_string.argtypes, lib.kpro_error_string.restype = [ctypes.c_int], ctypes.c_char_p
            _loaded["lib"], _loaded["problem"] = lib, None
        except (OSError, FileNotFoundError, RuntimeError, AttributeError) as err:
            _loaded["lib"], _loaded["problem"] = None, f"the CUDA library cannot be loaded: {err}"
    return _loaded["lib"]


@torch.compiler.assume_constant_result
def library_problem() -> str | None:
    """Why the CUDA kernels cannot be used, or None when they can."""
    _load()
    return _loaded["problem"]


def call(name: str, *args) -> None:
    """Call a C entry point and turn a CUDA error code into an exception naming the kernel."""
    lib = _load()
    if lib is None:
        raise BackendError(_loaded["problem"])
    code = getattr(lib, name)(*args)
    if code != 0:
        raise RuntimeError(f"{name} failed: CUDA error {code} ({lib.kpro_error_string(code).decode()})")


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise BackendError(f"the CUDA kernels take float32, bfloat16 or float16, got {t.dtype}") from None


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
