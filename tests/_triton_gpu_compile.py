"""Compile kpro's Triton kernels for NVIDIA GPUs without one: `python tests/_triton_gpu_compile.py [arch ...]`.

Triton's interpreter (what the CPU tests run) neither compiles kernels nor knows GPU resource limits, so
a kernel can pass every CPU test and still fail on a GPU: a construct the compiler refuses, or tiles that
need more shared memory than the device has. This script compiles each kernel, in the configurations the
launchers choose (`tile_config`, the RMSNorm/SwiGLU block rules), for the targets given (default sm_80 and
sm_90) and prints one JSON line per compilation: shared memory, and registers and spill stores per
thread from ptxas where it reports them. Run it with TRITON_INTERPRET unset (tests/test_triton_gpu_compile.py
does, in a subprocess).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kpro.ops.triton_kernels import attention, bitune_attention, rms_norm, swiglu  # noqa: E402
from kpro.ops.triton_kernels._launch import warps_for  # noqa: E402
from kpro.ops.triton_kernels.attention_tiles import padded_head_dim, tile_config  # noqa: E402

# Per-block shared memory an SM offers a kernel (opt-in maximum): A100, H100.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Integer (not pointer) parameters whose names are capitalised like pointers.
INTEGER_PARAMS = {"B", "H", "HKV", "GROUP", "Tq", "Tk", "T", "Tp", "Ta"}
FLOAT_PARAMS = {"scale", "scale2", "eps"}
FP32_POINTERS = {"RSTD", "DW_PARTIAL", "DKM", "DVM", "ALPHA_K", "ALPHA_V"}
INT_POINTERS = {"PREFIX": "i32", "PLEN": "i32", "ALEN": "i32", "KEY_OK": "i8", "KEY_WINDOW": "i32"}


def signature(kernel, data_type: str, constexprs: dict) -> dict:
    """Triton types of a kernel's parameters, by kpro's naming: capitalised names are pointers (to the
    data dtype unless listed above), the others 32-bit integers, scales and eps fp32."""
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FLOAT_PARAMS:
            types[name] = "fp32"
        elif name[0].isupper() and name not in INTEGER_PARAMS:
            pointee = "fp32" if name in FP32_POINTERS or name.startswith(("LSE", "DELTA")) else data_type
            types[name] = "*" + INT_POINTERS.get(name, pointee)
        else:
            types[name] = "i32"
    return types


def compile_for(arch: int, kernel, data_type: str, constexprs: dict, warps: int, stages: int) -> dict:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, data_type, constexprs),
                                        constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    result = {"shared": compiled.metadata.shared, "limit": SHARED_LIMIT[arch]}
    result.update(ptxas_report(compiled.asm["ptx"], arch))
    return result


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill stores per thread, from the first ptxas (Triton's two, then the system's) that
    reads this PTX version; empty if none does."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    candidates = [bundled / "ptxas", bundled / "ptxas-blackwell", shutil.which("ptxas")]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        arch_flag = f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}"
        for ptxas in candidates:
            if ptxas is None or not Path(ptxas).is_file():
                continue
            done = subprocess.run([str(ptxas), "-v", arch_flag, str(source), "-o", os.devnull],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                registers = re.findall(r"Used (\d+) registers", done.stderr)
                spills = re.findall(r"(\d+) bytes spill stores", done.stderr)
                return {"registers": int(registers[-1]) if registers else None,
                        "spill_stores": int(spills[-1]) if spills else None}
    return {}


def cases(arch: int):
    """(name, kernel, data type, constexprs, warps, stages) for every configuration a launch can choose."""
    attention_kernels = {"forward": attention._forward_kernel, "dkdv": attention._dkdv_kernel, "dq": attention._dq_kernel}
    bitune_kernels = {"forward": bitune_attention._forward_kernel, "dkdv": bitune_attention._dkdv_kernel,
                      "dq": bitune_attention._dq_kernel}
    masks = [dict(CAUSAL=True, HAS_PREFIX=True, HAS_KEY_MASK=True), dict(CAUSAL=False, HAS_PREFIX=False, HAS_KEY_MASK=False)]
    for dtype, head_dim, mask in ((torch.bfloat16, 64, masks[0]), (torch.bfloat16, 128, masks[1]),
                                  (torch.float32, 128, masks[0]), (torch.bfloat16, 256, masks[0])):
        for kind in ("forward", "dkdv", "dq"):
            block_m, block_n, warps, stages = tile_config(kind, head_dim, dtype, arch)
            tiles = dict(HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n)
            yield (f"attention.{kind} {TYPE[dtype]} d{head_dim} causal={mask['CAUSAL']}", attention_kernels[kind],
                   TYPE[dtype], {**tiles, **mask}, warps, stages)
            if head_dim <= 128:
                yield (f"bitune_attention.{kind} {TYPE[dtype]} d{head_dim}", bitune_kernels[kind], TYPE[dtype], tiles,
                       warps, stages)
    yield ("attention.delta bf16 d128", attention._delta_kernel, "bf16",
           dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64), 4, 1)
    # Rows up to MAX_BLOCK wide in one block; wider rows loop over MAX_BLOCK-wide column blocks.
    for block, one_block in ((4096, True), (rms_norm.MAX_BLOCK, True), (rms_norm.MAX_BLOCK, False)):
        yield (f"rms_norm.forward bf16 block {block} one_block={one_block}", rms_norm._forward_kernel, "bf16",
               dict(BLOCK=block, ONE_BLOCK=one_block), warps_for(block), 1)
        for weight_grad in (True, False):
            yield (f"rms_norm.backward bf16 block {block} one_block={one_block} dW={weight_grad}",
                   rms_norm._backward_kernel, "bf16", dict(BLOCK=block, ONE_BLOCK=one_block, WEIGHT_GRAD=weight_grad),
                   warps_for(block), 1)
    yield "swiglu.forward bf16", swiglu._forward_kernel, "bf16", dict(BLOCK=swiglu.BLOCK_MAX), 4, 1
    yield "swiglu.backward bf16", swiglu._backward_kernel, "bf16", dict(BLOCK=swiglu.BLOCK_MAX), 4, 1


def main(archs: list[int]) -> None:
    for arch in archs:
        for name, kernel, data_type, constexprs, warps, stages in cases(arch):
            record = {"arch": arch, "kernel": name, "warps": warps, "stages": stages,
                      "tiles": {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}}
            try:
                record.update(compile_for(arch, kernel, data_type, constexprs, warps, stages))
            except Exception as err:  # reported, not raised: the test lists every failure at once
                record["error"] = f"{type(err).__name__}: {str(err)[-600:]}"
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    main([int(a) for a in sys.argv[1:]] or [80, 90])
