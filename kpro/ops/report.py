"""What kpro's Triton kernels become on an NVIDIA GPU, predicted without one:
`python -m kpro.ops.report --arch 90 [--arch 80] [--json] [--candidates] [--unspecialised] [--only NAME]`.

Triton compiles a kernel for the arguments of each launch: pointers, strides and integers divisible by
16 are marked `tt.divisibility=16` (so loads can be vectorised and copied asynchronously) and integers
equal to 1 become the constant 1. A kernel compiled without those facts is not the kernel that runs.
So this report runs kpro's own launchers (the Python functions of kpro/ops/triton_kernels/ that call
`kernel[grid](...)`) on CPU tensors of realistic shapes, records each launch instead of running it, lets
Triton's own launch code specialise the arguments, and compiles the result for sm_80 (A100) and sm_90a
(H100) exactly once per distinct (kernel, signature, constants, attributes, warps, stages).

What each number of a record predicts:
- shared (bytes): shared memory a block needs. Above the device's per-block limit the launch fails
  (OutOfResources); it also bounds how many blocks an SM holds.
- registers, spill stores/loads (bytes per thread, from the ptxas log of the compilation, run with
  the flags Triton uses): spills go to local memory, which costs bandwidth in the inner loop.
- blocks/SM and what limits it (registers: 64K per SM, allocated per warp in units of 256; shared
  memory: A100 164 KiB, H100 228 KiB per SM, 1 KiB reserved per block; 2048 threads; 32 blocks):
  how many programs one SM runs at once to hide latency.
- dots: how each `tl.dot` was lowered (from the TTGIR): wgmma (Hopper warp-group tensor cores), mma
  (mma.sync, Ampere tensor cores) or fma (no tensor cores: an order of magnitude slower).
- global load/store widths (bytes per instruction: 16 is `ld.global.v4.b32`, 2 a scalar bf16) and
  cp.async sizes: narrow accesses multiply the instruction count of a memory-bound loop.
- pipelined: the loop copies its next tiles with cp.async or TMA (`cp.async.bulk.tensor`) while it
  computes the current ones, instead of waiting for each load.
- loops: for each innermost loop of the PTX (found by its backward branch) that issues tensor-core
  instructions (else the largest innermost loop), the instructions of one iteration: tensor-core ops,
  ld.shared / st.shared, ldmatrix / stmatrix, cp.async, TMA copies, global loads. Static counts: a
  branch inside the body may skip some.
- specialisation: which integer and pointer arguments Triton marked divisible by 16 and which became
  the constant 1 at this launch (`--unspecialised` compiles without both, as a compile that ignores the
  launch would, for comparison only).

Compiler figures, not timings. TRITON_INTERPRET must be unset (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from types import SimpleNamespace
from typing import Callable, Iterator
from unittest import mock

import torch

from ..cli_args import positive_int


# --------------------------------------------------------------------------------------------------
# Targets and occupancy
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    arch: int
    name: str
    shared_per_block: int  # opt-in maximum a block may use
    shared_per_sm: int
    sms: int  # multiprocessors, for launchers that size their grid by the device
    tensor_core: str  # how a half-precision dot should be lowered


TARGETS = {
    80: Target(80, "sm_80 (A100)", shared_per_block=166_912, shared_per_sm=167_936, sms=108, tensor_core="mma"),
    90: Target(90, "sm_90a (H100)", shared_per_block=232_448, shared_per_sm=233_472, sms=132, tensor_core="wgmma"),
}
REGISTERS_PER_SM = 65_536
REGISTER_GRANULE = 256  # registers are allocated per warp, in units of 256
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SHARED_RESERVED_PER_BLOCK = 1024  # the CUDA runtime's own shared memory per block (sm_80 and later)


def blocks_per_sm(registers: int, shared: int, warps: int, target: Target) -> tuple[int, str]:
    """(resident blocks per SM, the resource that limits it)."""
    warp_registers = math.ceil(registers * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
    limits = {
        "registers": REGISTERS_PER_SM // (warp_registers * warps),
        "shared": target.shared_per_sm // (shared + SHARED_RESERVED_PER_BLOCK),
        "threads": THREADS_PER_SM // (32 * warps),
        "blocks": BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# --------------------------------------------------------------------------------------------------
# Reading the compiler's output
# --------------------------------------------------------------------------------------------------

INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)")
LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
CP_ASYNC_SIZE = re.compile(r"\],\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]")


def ptxas_figures(log: str) -> dict:
    """Registers and spill bytes per thread from a `ptxas -v` log."""
    registers = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(registers[-1]) if registers else None,
            "spill_stores": int(spills[-1][0]) if spills else None,
            "spill_loads": int(spills[-1][1]) if spills else None}


def dot_lowering(ttgir: str) -> dict[str, int]:
    """How many `tl.dot`s (after inlining and pipelining) became wgmma, mma or fma, from the TTGIR."""
    layouts = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.M))
    counts = Counter()
    for line in ttgir.splitlines():
        if re.search(r"= ttng\.warp_group_dot ", line):
            counts["wgmma"] += 1
        elif found := re.search(r"= tt\.dot .*-> tensor<[^,>]+, (#\w+)>", line):
            layout = layouts.get(found[1], found[1])
            counts["fma" if "nvidia_mma" not in layout else
                   "wgmma" if "versionMajor = 3" in layout else "mma"] += 1
    return dict(counts)


# PTX opcode prefix -> the kind of instruction the report counts (first match wins).
CATEGORIES = (("wgmma.mma_async", "tensor_core"), ("mma.sync", "tensor_core"), ("cp.async.bulk.tensor", "tma"),
              ("cp.async.ca.", "cp_async"), ("cp.async.cg.", "cp_async"), ("ldmatrix", "ldmatrix"),
              ("stmatrix", "stmatrix"), ("ld.shared", "ld_shared"), ("st.shared", "st_shared"),
              ("ld.global", "ld_global"), ("st.global", "st_global"))


def category(opcode: str) -> str | None:
    return next((name for prefix, name in CATEGORIES if opcode.startswith(prefix)), None)


def access_bytes(opcode: str) -> int:
    """Bytes moved by one ld/st: `ld.global.v4.b32` 16, `ld.global.b16` 2."""
    lanes = next((n for n in (8, 4, 2) if f".v{n}." in opcode + "."), 1)
    bits = re.search(r"\.[bfus](\d+)$", opcode)
    return lanes * int(bits[1]) // 8 if bits else 0


def instructions(ptx: str) -> list[tuple[int, str, str]]:
    """(line index, opcode, line) of every PTX instruction."""
    found = []
    for index, line in enumerate(ptx.splitlines()):
        match = INSTRUCTION.match(line)
        if match and not line.lstrip().startswith("//"):
            found.append((index, match[1], line))
    return found


def loops(ptx: str) -> list[tuple[int, int]]:
    """(first, last) line of each loop: a label and the last branch back to it."""
    labels, ends = {}, {}
    for index, line in enumerate(ptx.splitlines()):
        if label := LABEL.match(line):
            labels[label[1]] = index
        elif (branch := BRANCH.search(line)) and branch[1] in labels:  # a label seen before: a loop
            ends[labels[branch[1]]] = index
    return sorted(ends.items())


def innermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]


def loop_counts(body: list[tuple[int, str, str]]) -> dict:
    """Instruction counts of one loop body."""
    counts = Counter(category(opcode) for _, opcode, _ in body)
    counts.pop(None, None)
    return {"instructions": len(body), **{key: counts[key] for key in (
        "tensor_core", "ld_shared", "st_shared", "ldmatrix", "stmatrix", "cp_async", "tma", "ld_global")}}


def hot_loops(ptx: str) -> list[dict]:
    """The innermost loops that issue tensor-core instructions, or else the largest innermost loop."""
    listing = instructions(ptx)
    measured = []
    for first, last in innermost(loops(ptx)):
        body = [entry for entry in listing if first <= entry[0] <= last]
        measured.append({"ptx_lines": [first + 1, last + 1], **loop_counts(body)})
    with_tensor_cores = [loop for loop in measured if loop["tensor_core"]]
    return with_tensor_cores or sorted(measured, key=lambda loop: -loop["instructions"])[:1]


def memory_access(ptx: str) -> dict:
    """Widths of global loads and stores, sizes of cp.async copies, TMA copies, and whether a loop
    prefetches with cp.async or TMA."""
    listing = instructions(ptx)
    widths = {"ld_global": Counter(), "st_global": Counter(), "cp_async": Counter()}
    tma = 0
    for _, opcode, line in listing:
        kind = category(opcode)
        if kind in ("ld_global", "st_global"):
            widths[kind][access_bytes(opcode)] += 1
        elif kind == "cp_async":
            size = CP_ASYNC_SIZE.search(line)
            widths[kind][int(size[1], 0) if size else 0] += 1
        elif kind == "tma":
            tma += 1
    in_loops = [entry for first, last in loops(ptx) for entry in listing if first <= entry[0] <= last]
    pipelined = any(category(opcode) in ("cp_async", "tma") for _, opcode, _ in in_loops)
    return {"global_load_bytes": dict(sorted(widths["ld_global"].items(), reverse=True)),
            "global_store_bytes": dict(sorted(widths["st_global"].items(), reverse=True)),
            "cp_async_bytes": dict(sorted(widths["cp_async"].items(), reverse=True)),
            "tma": tma, "pipelined": pipelined,
            "tensor_core_instructions": sum(category(opcode) == "tensor_core" for _, opcode, _ in listing)}


# --------------------------------------------------------------------------------------------------
# Capturing kpro's launches
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict
    case: str
    dtype: torch.dtype


# Choices a launcher makes inline from the tensor's device, where the report cannot ask it about a GPU:
# kernel -> (constexpr, value on the CPU, value on a GPU). attention.row_deltas picks the delta kernel's
# BLOCK_M as `16 if out.device.type != "cuda" else 64`.
INLINE_DEVICE_CHOICES = {"attention.delta": ("BLOCK_M", 16, 64)}


def kernel_name(kernel) -> str:
    """`attention._forward_kernel` -> "attention.forward"."""
    module = kernel.fn.__module__.rpartition(".")[2]
    return f"{module}.{kernel.fn.__name__.strip('_').removesuffix('_kernel')}"


class Recorder:
    """The launches made while it is active, each labelled with the case that made it."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.case, self.dtype = "", None

    def record(self, kernel, args: tuple, kwargs: dict):
        self.launches.append(Launch(kernel, args, kwargs, self.case, self.dtype))


def on_gpu(launch: Launch) -> Launch:
    """The launch with the GPU value of INLINE_DEVICE_CHOICES in place of the CPU one."""
    name, cpu, gpu = INLINE_DEVICE_CHOICES.get(kernel_name(launch.kernel), (None, None, None))
    if name is not None:
        if launch.kwargs.get(name) != cpu:
            raise RuntimeError(f"{kernel_name(launch.kernel)} was launched with {name}={launch.kwargs.get(name)}, "
                               f"not the CPU value {cpu}: update INLINE_DEVICE_CHOICES in {__name__}")
        launch.kwargs[name] = gpu
    return launch


@contextlib.contextmanager
def launches_on(target: Target) -> Iterator[Recorder]:
    """Within the block, launchers run on CPU tensors as they would on `target`: each `kernel[grid](...)`
    is recorded (kernel, args, keyword args) and not run, and the launchers' questions about the device
    (compute capability, multiprocessor count) get the target's answers."""
    from triton.runtime.jit import JITFunction

    from .triton_kernels import _launch, attention, bitune_attention, linear_cross_entropy, rms_norm

    recorder = Recorder()

    def run(kernel, *args, grid, warmup, **kwargs):  # stands in for JITFunction.run: record, do not launch
        recorder.record(kernel, args, kwargs)

    def device_arch(device):  # the attention launchers' tiles and load path follow from it
        return target.arch

    def program_count(t, work_items):
        return _launch.program_count(SimpleNamespace(device=torch.device("cuda")), work_items)

    cross_entropy_tiles = linear_cross_entropy.tile_config

    def cross_entropy_tile_config(device, dtype):
        return cross_entropy_tiles(torch.device("cuda"), dtype)

    softmax_grad_config = linear_cross_entropy.softmax_grad_config

    gpu = SimpleNamespace(multi_processor_count=target.sms, major=target.arch // 10, minor=target.arch % 10)
    with contextlib.ExitStack() as stack:
        for patch in (mock.patch.object(JITFunction, "run", run),
                      mock.patch("torch.cuda.get_device_capability", lambda *_: divmod(target.arch, 10)),
                      mock.patch("torch.cuda.get_device_properties", lambda *_: gpu),
                      mock.patch.object(attention, "device_arch", device_arch),
                      mock.patch.object(bitune_attention, "device_arch", device_arch),
                      mock.patch.object(rms_norm, "program_count", program_count),
                      mock.patch.object(linear_cross_entropy, "program_count", program_count),
                      mock.patch.object(linear_cross_entropy, "tile_config", cross_entropy_tile_config),
                      mock.patch.object(linear_cross_entropy, "softmax_grad_config",
                                        lambda device: softmax_grad_config(torch.device("cuda")))):
            stack.enter_context(patch)
        yield recorder
    recorder.launches[:] = map(on_gpu, recorder.launches)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    run: Callable[[], None]  # calls kpro's launchers


def capture(cases: list[Case], target: Target) -> list[Launch]:
    with launches_on(target) as recorder:
        for case in cases:
            recorder.case, recorder.dtype = case.name, case.dtype
            case.run()
    return recorder.launches


# --------------------------------------------------------------------------------------------------
# The cases: kernels and configurations a launch can choose
# --------------------------------------------------------------------------------------------------

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MASKS = {"none": (False, False, False), "causal": (True, False, False), "causal+padding": (True, False, True),
         "causal+prefix+padding": (True, True, True)}
LAYOUTS = ("aligned", "unaligned", "heads-major")


def attention_case(dtype, head_dim: int, mask: str, layout: str = "aligned") -> Case:
    """Training shapes: batch 2, 1024 tokens, 32 query and 8 key/value heads, contiguous ("aligned", as
    kpro.Llama passes them). "unaligned": 1000 tokens, 12 heads without GQA (GROUP is 1), q, k, v strided views
    of one packed QKV tensor. "heads-major": the aligned shapes as [B, H, T, D] tensors transposed to
    [B, T, H, D], as a Hugging Face model passes them (kpro.integrations.hf): TMA cannot read them on sm_90,
    and the launch takes pointer loads."""
    causal, prefix, padding = MASKS[mask]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")

    def run():
        from .triton_kernels import attention
        batch, seq = 2, 1000 if layout == "unaligned" else 1024
        if layout == "aligned":
            q = torch.empty(batch, seq, 32, head_dim, dtype=dtype)
            k, v = (torch.empty(batch, seq, 8, head_dim, dtype=dtype) for _ in range(2))
        elif layout == "heads-major":
            q, k, v = (torch.empty(batch, heads, seq, head_dim, dtype=dtype).transpose(1, 2) for heads in (32, 8, 8))
        else:
            q, k, v = torch.empty(batch, seq, 3, 12, head_dim, dtype=dtype).unbind(2)
        prefix_lens = torch.tensor([seq // 4, seq // 2]) if prefix else None
        key_mask = torch.ones(batch, seq, dtype=torch.bool) if padding else None
        if padding:
            key_mask[0, :seq // 8] = False  # left padding
        out, lse2 = attention.forward(q, k, v, causal, prefix_lens, key_mask, head_dim ** -0.5)
        attention.backward(torch.empty_like(out), q, k, v, out, lse2, causal, prefix_lens, key_mask, head_dim ** -0.5)

    return Case(f"attention {TYPE_NAMES[dtype]} d{head_dim} {mask} {layout}", dtype, run)


def bitune_case(dtype, head_dim: int, aligned: bool = True) -> Case:
    """The dual pass of SPEC.md's benchmark: batch 8, prompt 512, answer 256, 32 / 8 heads. Unaligned:
    prompt 500, answer 250, 12 heads without GQA."""
    def run():
        from .triton_kernels import bitune_attention
        batch, tp, ta, heads, kv_heads = (8, 512, 256, 32, 8) if aligned else (8, 500, 250, 12, 12)
        q_p = torch.empty(2, batch, tp, heads, head_dim, dtype=dtype)
        k_p, v_p = (torch.empty(2, batch, tp, kv_heads, head_dim, dtype=dtype) for _ in range(2))
        q_a = torch.empty(batch, ta, heads, head_dim, dtype=dtype)
        k_a, v_a = (torch.empty(batch, ta, kv_heads, head_dim, dtype=dtype) for _ in range(2))
        alpha_k, alpha_v = torch.tensor(0.5), torch.tensor(0.5)
        prompt_lens, answer_lens = torch.full((batch,), tp), torch.full((batch,), ta)
        scale = head_dim ** -0.5
        o_p, o_a, lse_p, lse_a = bitune_attention.forward(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v,
                                                          prompt_lens, answer_lens, scale)
        bitune_attention.backward(torch.empty_like(o_p), torch.empty_like(o_a), q_p, k_p, v_p, q_a, k_a, v_a,
                                  alpha_k, alpha_v, prompt_lens, answer_lens, o_p, o_a, lse_p, lse_a, scale)

    return Case(f"bitune_attention {TYPE_NAMES[dtype]} d{head_dim} {'aligned' if aligned else 'unaligned'}", dtype, run)


def rms_norm_case(width: int, dtype=torch.bfloat16) -> Case:
    """8192 rows (batch x tokens) of `width`; forward, backward with and without the weight gradient.
    Rows wider than rms_norm.MAX_BLOCK loop over column blocks; a width not a multiple of 16 is unaligned."""
    def run():
        from .triton_kernels import rms_norm
        x, weight = torch.empty(8192, width, dtype=dtype), torch.empty(width, dtype=dtype)
        y, rstd = rms_norm.forward(x, weight, 1e-6)
        for weight_grad in (True, False):
            rms_norm.backward(torch.empty_like(y), x, weight, rstd, weight_grad)

    return Case(f"rms_norm {TYPE_NAMES[dtype]} width {width}", dtype, run)


def swiglu_case(width: int, packed: bool, dtype=torch.bfloat16) -> Case:
    """8192 rows of `width` features; separate gate and up, or the packed [.., 2 * width] layout (with
    an odd width, the up half starts at an unaligned address)."""
    def run():
        from .triton_kernels import swiglu
        if packed:
            gate_up = torch.empty(8192, 2 * width, dtype=dtype)
            y = swiglu.packed_forward(gate_up)
            swiglu.packed_backward(torch.empty_like(y), gate_up)
        else:
            gate, up = torch.empty(8192, width, dtype=dtype), torch.empty(8192, width, dtype=dtype)
            y = swiglu.forward(gate, up)
            swiglu.backward(torch.empty_like(y), gate, up)

    return Case(f"swiglu {TYPE_NAMES[dtype]} width {width} {'packed' if packed else 'separate'}", dtype, run)


def linear_cross_entropy_case(vocab: int, dim: int, dtype=torch.bfloat16) -> Case:
    """The forward of the fused loss over 8192 rows and its backward (trainable head) over 64. The forward
    splits the vocabulary among as many programs as the GPU holds, so its row count decides how many
    vocabulary tiles a program loops over (`tiles_per_split`): with as few rows as 64 each program takes one,
    and Triton compiles that 1 as a constant, without the loop a training batch runs. The backward's launch
    specialises alike at 64 rows and at 8192 (row counts divisible by 16, one vocabulary slice at these
    vocabularies), and its matmuls run here on the CPU, so its rows stay few; so do those of the gradients
    computed in the forward (forward_with_grads), whose row kernel takes no row count at all. A vocabulary
    not a multiple of 16 is unaligned (widths are: every LLaMA's hidden size is a multiple of 64)."""
    def run():
        from .triton_kernels import linear_cross_entropy
        hidden, weight = torch.randn(8192, dim, dtype=dtype), torch.randn(vocab, dim, dtype=dtype)
        labels = torch.randint(0, vocab, (8192,))
        linear_cross_entropy.forward(hidden, weight, labels, -100)
        linear_cross_entropy.backward(torch.ones(64), hidden[:64], weight, labels[:64], torch.zeros(64, 2), -100, True,
                                      True)
        linear_cross_entropy.forward_with_grads(hidden[:64], weight, labels[:64], -100, True, True)

    return Case(f"linear_cross_entropy {TYPE_NAMES[dtype]} vocab {vocab} d{dim}", dtype, run)


def standard_cases() -> list[Case]:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        attention_case(bf16, 64, "causal+prefix+padding"),
        attention_case(bf16, 64, "causal+prefix+padding", "unaligned"),
        attention_case(bf16, 64, "causal+padding"),  # kpro.Llama's own call at SmolLM2's and Llama 3.2's head dim
        attention_case(bf16, 64, "causal+padding", "heads-major"), attention_case(bf16, 128, "causal", "heads-major"),
        attention_case(bf16, 96, "causal+prefix+padding"),  # a head dim not a power of two: pointer loads, padded dims
        attention_case(bf16, 128, "none"), attention_case(bf16, 128, "causal"),
        attention_case(bf16, 128, "causal", "unaligned"), attention_case(fp16, 128, "causal"),
        attention_case(fp32, 64, "causal"), attention_case(fp32, 128, "causal+prefix+padding"),
        attention_case(bf16, 256, "causal+prefix+padding"),
        bitune_case(bf16, 64), bitune_case(bf16, 64, False), bitune_case(bf16, 128), bitune_case(bf16, 128, False),
        bitune_case(fp16, 128), bitune_case(fp32, 128), bitune_case(bf16, 256),
        rms_norm_case(576), rms_norm_case(2048, torch.float32), rms_norm_case(4096), rms_norm_case(8192),
        rms_norm_case(16384), rms_norm_case(32768), rms_norm_case(5000),
        swiglu_case(11008, packed=False), swiglu_case(11005, packed=True),
        linear_cross_entropy_case(1024, 4096), linear_cross_entropy_case(1031, 4096),
    ]


def candidate_cases(arch: int) -> list[Case]:
    """Every autotuning candidate of the bf16 d64 / d128 attention kernels, each forced on the launchers
    (plain attention and the Bitune dual pass share the tiles)."""
    from .triton_kernels.attention_tiles import KERNELS, candidate_configs, forced_tiles

    def forced(case: Case, kind: str, config) -> Case:
        def run():
            with forced_tiles(kind, config):
                case.run()
        return Case(f"{case.name}, {kind} tiles {config[0]}x{config[1]}/{config[2]}w/{config[3]}s", case.dtype, run)

    cases = []
    for head_dim, mask in ((64, "causal+prefix+padding"), (128, "causal")):
        for kind in KERNELS:
            for config in candidate_configs(kind, head_dim, torch.bfloat16, arch):
                cases += [forced(attention_case(torch.bfloat16, head_dim, mask), kind, config),
                          forced(bitune_case(torch.bfloat16, head_dim), kind, config)]
    return cases


# --------------------------------------------------------------------------------------------------
# Specialising as Triton does at launch, and compiling
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """One distinct compilation: everything triton.compile needs, hashable and picklable."""
    arch: int
    module: str
    kernel: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple


def specialise(launch: Launch, target: Target, unspecialised: bool = False) -> Job:
    """The Job Triton's JITFunction.run would compile for this launch: its binder turns each argument
    into a type and a specialisation key (`specialize_impl`, honouring do_not_specialize), and
    `_pack_args` turns those into the signature, constants and attributes (`backend.parse_attr`)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    if not hasattr(kernel, "_pack_args"):
        import triton
        raise RuntimeError(f"triton {triton.__version__}: JITFunction has no _pack_args (written for 3.6 to 3.9)")
    backend = make_backend(gpu_target(target))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.kwargs), bound, specialization,
                                                             options)
    if unspecialised:  # as a compile that ignores the launch: no attributes, no integer constant 1
        for key in [key for key in constexprs if not kernel.params[key[0]].is_constexpr]:
            signature[kernel.params[key[0]].name] = "i32"
            del constexprs[key]
        attrs = {}
    options = {name: value for name, value in launch.kwargs.items() if name in parsed.__dict__}
    options.update(num_warps=parsed.num_warps, num_stages=parsed.num_stages)  # Triton's defaults made explicit
    attrs = sorted((key, json.dumps(value)) for key, value in attrs.items())  # hashable
    return Job(target.arch, kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()),
               tuple(sorted(constexprs.items())), tuple(attrs), tuple(sorted(options.items())))


def toolchain(arch: int) -> str:
    """The Triton and ptxas versions a compilation for `arch` uses (figures change between them)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    release = re.search(r"release ([\d.]+)", get_ptxas_version(arch))
    return f"triton {triton.__version__}, ptxas {release[1] if release else '?'}"


def gpu_target(target: Target):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", target.arch, 32)


def specialisation_summary(job: Job) -> dict:
    """Which pointer and integer arguments got divisibility 16, became the constant 1, or neither."""
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    declared = {param.name for param in kernel.params if param.is_constexpr}
    names = [param.name for param in kernel.params]
    divisible = {names[key[0]] for key, value in job.attrs if "tt.divisibility" in value}
    constant = {names[key[0]]: value for key, value in job.constexprs}
    summary = {"divisible_by_16": [], "constexpr_1": [], "neither": []}
    for name, kind in job.signature:
        if name in declared:
            continue
        if kind == "constexpr":
            summary["constexpr_1" if constant[name] == 1 else "neither"].append(name)
        elif kind.startswith("*") or kind in ("i32", "i64", "u64"):
            summary["divisible_by_16" if name in divisible else "neither"].append(name)
    return summary


def compile_job(job: Job) -> dict:
    """Compile one Job (in a worker process) and measure it; errors are returned, not raised."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    target = TARGETS[job.arch]
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    started = time.perf_counter()
    log = io.StringIO()
    try:
        # ptxas -v runs inside triton.compile with Triton's own flags; its log is printed when asked for,
        # and only when ptxas runs, so the cache is bypassed.
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(
                ASTSource(kernel, dict(job.signature), dict(job.constexprs),
                          {key: json.loads(value) for key, value in job.attrs}),
                target=gpu_target(target), options=dict(job.options))
    except Exception as err:  # every failure is listed in the report
        return {"error": f"{type(err).__name__}: {str(err)[-1500:]}",
                "compile_seconds": round(time.perf_counter() - started, 2)}
    figures = {"shared": compiled.metadata.shared, **ptxas_figures(log.getvalue())}
    warps = dict(job.options)["num_warps"]
    if figures["registers"] is not None:
        figures["blocks_per_sm"], figures["occupancy_limit"] = blocks_per_sm(figures["registers"], figures["shared"],
                                                                             warps, target)
    figures["dots"] = dot_lowering(compiled.asm["ttgir"])
    figures.update(memory_access(compiled.asm["ptx"]))
    figures["loops"] = hot_loops(compiled.asm["ptx"])
    figures["compile_seconds"] = round(time.perf_counter() - started, 2)
    return figures


def compile_all(jobs: list[Job], workers: int) -> dict[Job, dict]:
    if workers <= 1:
        return {job: compile_job(job) for job in jobs}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return dict(zip(jobs, pool.map(compile_job, jobs)))


# --------------------------------------------------------------------------------------------------
# Checks (tests/test_triton_gpu_compile.py runs them on every record)
# --------------------------------------------------------------------------------------------------

FORWARD_KERNELS = ("attention.forward", "bitune_attention.forward", "rms_norm.forward", "swiglu.forward",
                   "linear_cross_entropy.forward")
DKDV_KERNELS = ("attention.dkdv", "bitune_attention.dkdv", "bitune_attention.dkdv_answer")
HALF_PRECISION = ("bf16", "fp16")


def where(record: dict) -> str:
    return f"{record['target']} {record['kernel']} [{record['cases'][0]}]"


def compile_error(record: dict) -> str | None:
    if "error" in record:
        return f"{where(record)}: does not compile: {record['error']}"
    if record.get("registers") is None or record.get("spill_stores") is None:
        return f"{where(record)}: no register figures in the ptxas log"
    return None


def shared_over_limit(record: dict) -> str | None:
    if "error" not in record and record["shared"] > record["shared_limit"]:
        return f"{where(record)}: {record['shared']:,} B of shared memory > {record['shared_limit']:,} B a block"
    return None


def spills(record: dict) -> str:
    return (f"{where(record)}: spills {record['spill_stores']} B stores / {record['spill_loads']} B loads "
            f"({record['registers']} registers, tiles {tiles(record)}, {record['toolchain']})")


def forward_spill(record: dict) -> str | None:
    """A forward kernel in half precision that spills registers (the training hot path)."""
    if ("error" not in record and record["kernel"] in FORWARD_KERNELS and record["dtype"] in HALF_PRECISION
            and record.get("spill_stores")):
        return spills(record)
    return None


def hopper_dkdv_spill(record: dict) -> str | None:
    """A half-precision dK/dV kernel on sm_90a at a head dim up to 128 that spills registers: its tiles are
    chosen not to, per Triton version (attention_tiles.default_tile_config). d256 is exempt (it spills at
    every tile that keeps its dots on warp-group MMA), and so are tiles a GPU timed as the fastest
    (`measured_winner`): the timing outranks the compiler's figures (an H200 under Triton 3.6 ran dK/dV 25%
    faster at 64x128 than at the 16x128 that does not spill)."""
    if ("error" not in record and record["arch"] >= 90 and record["kernel"] in DKDV_KERNELS
            and record["dtype"] in HALF_PRECISION and record["constexprs"].get("HEAD_DIM", 0) <= 128
            and record.get("spill_stores") and not measured_winner(record)):
        return spills(record)
    return None


def norm_backward_spill(record: dict) -> str | None:
    """A half-precision RMSNorm backward that holds each row in one block, read in 16-byte vectors (the launch
    marks the width divisible by 16), and spills registers: a thread holds a row's slice, its weight (where the
    next row is prefetched) and its dW partial, and the kernel is written for them to fit (session 40: width
    16,384 spilled 164-176 B before). Scalar-load widths and the column loop of wider rows are not checked."""
    if ("error" not in record and record["kernel"] == "rms_norm.backward" and record["dtype"] in HALF_PRECISION
            and record["constexprs"].get("ONE_BLOCK") and "n_cols" in record["specialisation"]["divisible_by_16"]
            and record.get("spill_stores")):
        return spills(record)
    return None


def measured_winner(record: dict) -> bool:
    """Whether a plain-attention record's tiles are the winner the launcher read from tuned_tiles.json for
    the installed Triton (the table the report's launches were captured with), on the load path the winners
    were timed on (TMA on sm_90: attention_tiles.tile_config)."""
    from .triton_kernels import attention_tiles

    kind = record["kernel"].removeprefix("attention.")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if kind == record["kernel"] or kind not in attention_tiles.KERNELS or record["dtype"] not in dtypes:
        return False
    constexprs = record["constexprs"]
    if record["arch"] >= 90 and not constexprs.get("USE_TMA"):
        return False
    key = attention_tiles.tuned_key(kind, constexprs.get("HEAD_DIM"), dtypes[record["dtype"]], record["arch"])
    chosen = [constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N"), record["num_warps"], record["num_stages"]]
    return attention_tiles.tuned_table().get(key) == chosen


def not_tensor_cores(record: dict) -> str | None:
    """A half-precision matmul not lowered to tensor cores: wgmma or mma.sync on sm_90a (mma.sync is what
    tiles too small for a warp group get: slower than wgmma, but tensor cores), mma on sm_80. fp32 is exempt:
    kpro's fp32 attention uses input_precision="ieee", FMA by design."""
    if "error" in record or record["dtype"] not in HALF_PRECISION or not record["dots"]:
        return None
    wanted = TARGETS[record["arch"]].tensor_core
    other = {kind: count for kind, count in record["dots"].items() if kind not in (wanted, "mma")}
    if other or not record["tensor_core_instructions"]:
        return (f"{where(record)}: dots lowered to {record['dots']} with {record['tensor_core_instructions']} "
                f"tensor-core instructions in the PTX, wanted {wanted} (tiles {tiles(record)})")
    return None


def fp_fusion_by_default(record: dict) -> str | None:
    """A launch that leaves FMA contraction to Triton's default, which is on up to 3.9 and off from 3.10: its
    speed and rounding would change with the Triton version (kpro's launches pass _launch.FMA)."""
    if record.get("enable_fp_fusion") is not True:
        return (f"{where(record)}: launched without enable_fp_fusion=True, so Triton's default decides FMA "
                "contraction (on up to 3.9, off from 3.10); pass **FMA from triton_kernels/_launch.py")
    return None


CHECKS = (compile_error, shared_over_limit, forward_spill, hopper_dkdv_spill, norm_backward_spill, not_tensor_cores,
          fp_fusion_by_default)


def problems(records: list[dict], checks=CHECKS) -> list[str]:
    return [message for record in records for check in checks if (message := check(record))]


# --------------------------------------------------------------------------------------------------
# Records and output
# --------------------------------------------------------------------------------------------------

def record(job: Job, launches: list[Launch], figures: dict) -> dict:
    target = TARGETS[job.arch]
    first = launches[0]
    values = dict(job.constexprs)
    constexprs = {param.name: values[(param.num,)] for param in first.kernel.params if param.is_constexpr}
    options = dict(job.options)
    return {"arch": job.arch, "target": target.name, "toolchain": toolchain(job.arch),
            "kernel": kernel_name(first.kernel), "dtype": TYPE_NAMES.get(first.dtype, str(first.dtype)),
            "cases": list(dict.fromkeys(launch.case for launch in launches)), "constexprs": constexprs,
            "num_warps": options["num_warps"], "num_stages": options["num_stages"],
            "enable_fp_fusion": options.get("enable_fp_fusion"),
            "specialisation": specialisation_summary(job), "shared_limit": target.shared_per_block, **figures}


def report(archs: list[int], cases_for: Callable[[int], list[Case]], workers: int,
           unspecialised: bool = False) -> list[dict]:
    by_job: dict[Job, list[Launch]] = {}
    for arch in archs:
        for launch in capture(cases_for(arch), TARGETS[arch]):
            by_job.setdefault(specialise(launch, TARGETS[arch], unspecialised), []).append(launch)
    figures = compile_all(list(by_job), workers)
    return [record(job, launches, figures[job]) for job, launches in by_job.items()]


def flags(record: dict) -> str:
    """The boolean constexprs that are on (CAUSAL, HAS_KEY_MASK, ONE_BLOCK, WEIGHT_GRAD, ...)."""
    return ",".join(name for name, value in record["constexprs"].items() if value is True) or "-"


def tiles(record: dict) -> str:
    """Every block size the launch used, in the kernel's argument order (the cross-entropy's BLOCK_N x BLOCK_V x
    BLOCK_D), but an attention kernel's BLOCK_D, which only pads HEAD_DIM to a power of two."""
    constexprs = record["constexprs"]
    block = [value for name, value in constexprs.items() if name.startswith("BLOCK") and type(value) is int
             and not (name == "BLOCK_D" and "HEAD_DIM" in constexprs)]
    return "x".join(map(str, block)) + f", {record['num_warps']}w, {record['num_stages']}s"


def widths(histogram: dict) -> str:
    return " ".join(f"{size}B×{count}" for size, count in histogram.items()) or "-"


LOOP_COLUMNS = ("tensor_core", "ld_shared", "st_shared", "ldmatrix", "stmatrix", "cp_async", "tma", "ld_global")


def main_loop(record: dict) -> str:
    """The LOOP_COLUMNS counts of the loop with the most tensor-core instructions (else the largest)."""
    if not record.get("loops"):
        return "-"
    loop = max(record["loops"], key=lambda loop: (loop["tensor_core"], loop["instructions"]))
    return "/".join(str(loop[key]) for key in LOOP_COLUMNS)


COLUMNS = ("kernel", "cases", "flags", "tiles", "div16", "=1", "shared KiB", "regs", "spill B", "blocks/SM", "dots",
           "global ld", "cp.async", "pipelined", "loop tc/lds/sts/ldm/stm/cp/tma/ldg")


def table_row(record: dict) -> list[str]:
    """The COLUMNS of one record."""
    spec = record["specialisation"]
    cases = record["cases"][0] + (f" (+{len(record['cases']) - 1})" if len(record["cases"]) > 1 else "")
    row = [record["kernel"], cases, flags(record), tiles(record),
           f"{len(spec['divisible_by_16'])}/{sum(map(len, spec.values()))}", ",".join(spec["constexpr_1"]) or "-"]
    if "error" in record:
        return row + [f"ERROR {record['error'].splitlines()[0][:80]}"] + [""] * (len(COLUMNS) - len(row) - 1)
    copies = widths(record["cp_async_bytes"]) + (f" tma×{record['tma']}" if record["tma"] else "")
    return row + [f"{record['shared'] / 1024:.0f}", str(record["registers"]), str(record["spill_stores"]),
                  f"{record.get('blocks_per_sm')} ({record.get('occupancy_limit')})",
                  " ".join(f"{count} {kind}" for kind, count in sorted(record["dots"].items())) or "-",
                  widths(record["global_load_bytes"]), copies, "yes" if record["pipelined"] else "no",
                  main_loop(record)]


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(record)) + " |" for record in records]
    return "\n".join(lines)


def human_report(records: list[dict]) -> str:
    parts = []
    for arch in dict.fromkeys(record["arch"] for record in records):
        mine = [record for record in records if record["arch"] == arch]
        target = TARGETS[arch]
        parts.append(f"## {target.name}: {len(mine)} compilations ({mine[0]['toolchain']}), shared memory limit "
                     f"{target.shared_per_block:,} B a block; compiler figures, not timings\n\n"
                     f"{markdown_table(mine)}\n")
    failed = problems(records)
    parts.append(f"Checks (tests/test_triton_gpu_compile.py): {len(failed)} problems\n" +
                 "".join(f"- {message}\n" for message in failed))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpro.ops.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS),
                        help="compute capability to compile for (repeatable; default 90)")
    parser.add_argument("--json", action="store_true", help="one JSON object per compilation")
    parser.add_argument("--candidates", action="store_true",
                        help="also every autotuning candidate of the bf16 d64/d128 attention kernels")
    parser.add_argument("--unspecialised", action="store_true",
                        help="compile without the launch's divisibility and constant-1 facts (comparison only)")
    parser.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                        help="compiler processes (default: up to 4)")
    parser.add_argument("--only", metavar="TEXT", action="append",
                        help="only the cases whose name contains TEXT, e.g. rms_norm (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    started = time.perf_counter()

    archs = args.arch or [90]

    def all_cases(arch: int) -> list[Case]:
        return standard_cases() + (candidate_cases(arch) if args.candidates else [])

    def cases_for(arch: int) -> list[Case]:
        return [case for case in all_cases(arch) if not args.only or any(text in case.name for text in args.only)]

    names = {case.name for arch in archs for case in all_cases(arch)}
    unmatched = [text for text in args.only or [] if not any(text in name for name in names)]
    if unmatched:
        parser.error(f"--only {', '.join(map(repr, unmatched))}: no case name contains it; the cases are "
                     + "; ".join(case.name for case in standard_cases())
                     + ("" if args.candidates else " (--candidates adds their autotuning candidates)"))
    try:
        records = report(archs, cases_for, args.workers, args.unspecialised)
    except KeyboardInterrupt:  # Ctrl-C: one line, as the kpro commands say it, not a traceback
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        for entry in records:
            print(json.dumps(entry), flush=True)
    else:
        print(human_report(records))
        print(f"{len(records)} compilations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Through the package, so that worker processes find these functions under their module's name.
    from kpro.ops.report import main as report_main
    sys.exit(report_main())
