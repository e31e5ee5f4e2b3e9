"""Every Triton kernel, compiled for sm_90a and sm_80 (there a case of each kind: tests/_compile_report.py) as
its launches specialise it (divisibility by 16, integers equal to 1 made constant), fits the GPU and takes
the fast path: checked without a GPU by `python -m kpro.ops.report` (the CPU tests run Triton's interpreter,
which compiles nothing).

Fails on: a compile error; shared memory above the per-block limit (A100 166,912 B, H100 232,448 B); a
register spill in a half-precision forward kernel (attention, Bitune, RMSNorm, SwiGLU forward), in a
half-precision dK/dV kernel at head dim 64 or 128 on sm_90a, or in a half-precision RMSNorm backward on rows
one block holds in 16-byte vectors; a half-precision matmul not lowered to tensor
cores (wgmma or mma.sync on sm_90a, mma on sm_80; fp32 is exempt: kpro's fp32 attention uses
input_precision="ieee", which is FMA by design); a launch that leaves FMA contraction to Triton's default,
which changes in Triton 3.10.
The checks themselves are in kpro/ops/report.py (CHECKS) and are shown to fail in tests/test_ops_report.py.
"""
import json

import pytest
import torch

import _compile_report
from kpro.ops import report
from kpro.ops.triton_kernels import attention_tiles as tiles


@pytest.fixture(scope="module")
def records() -> list[dict]:
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    returncode, stdout, stderr = _compile_report.result()  # started at collection (conftest.py)
    assert returncode == 0, stderr[-3000:]
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_every_kernel_and_case_is_compiled_for_both_targets(records):
    every_case = {case.name for case in report.standard_cases()}
    sm80_cases = {name for name in every_case if any(text in name for text in _compile_report.SM80_CASES)}
    assert len(sm80_cases) == 18  # each entry matches: 7 attention cases, 7 RMSNorm, 2 SwiGLU, 2 cross-entropy
    for arch, cases in ((90, every_case), (80, sm80_cases)):
        mine = [r for r in records if r["arch"] == arch]
        kernels = {r["kernel"] for r in mine}
        assert {"attention.forward", "attention.delta", "attention.dkdv", "attention.dq", "bitune_attention.forward",
                "bitune_attention.dkdv", "bitune_attention.dq", "rms_norm.forward", "rms_norm.backward",
                "swiglu.forward", "swiglu.backward", "rms_norm.weight_grad", "linear_cross_entropy.forward",
                "linear_cross_entropy.grad_logits", "linear_cross_entropy.softmax_grad"} <= kernels
        assert {case for r in mine for case in r["cases"]} == cases


def test_the_launch_specialisation_is_applied(records):
    """Aligned launches mark every pointer and stride divisible by 16; the unaligned cases lose some, and
    a GQA group of 1 becomes the constant 1, as at a real launch."""
    def spec(kernel, case):
        return next(r["specialisation"] for r in records if r["arch"] == 90 and r["kernel"] == kernel
                    and case in r["cases"])

    aligned = spec("attention.forward", "attention bf16 d128 causal aligned")
    assert {"Q", "K", "V", "O", "sq_t", "sk_t", "Tq", "Tk", "H"} <= set(aligned["divisible_by_16"])
    unaligned = spec("attention.forward", "attention bf16 d128 causal unaligned")
    assert unaligned["constexpr_1"] == ["GROUP"] and {"Tq", "Tk"} <= set(unaligned["neither"])
    packed = spec("swiglu.forward", "swiglu bf16 width 11005 packed")
    assert {"U", "n_cols"} <= set(packed["neither"])


def test_a_hugging_face_layout_is_compiled_on_pointer_loads_with_its_own_dkdv_tiles(records):
    """transformers' [B, H, T, D] tensors transposed are what kpro.integrations.hf passes: TMA cannot read
    them, and no case compiled that path on sm_90a, whose dK/dV spilled at the TMA path's tiles."""
    for head_dim, mask in ((64, "causal+padding"), (128, "causal")):
        case = f"attention bf16 d{head_dim} {mask} heads-major"
        mine = {r["kernel"]: r for r in records if r["arch"] == 90 and case in r["cases"]
                and r["kernel"] in ("attention.forward", "attention.dkdv", "attention.dq")}
        assert len(mine) == 3 and not any(r["constexprs"]["USE_TMA"] for r in mine.values())
        rows = tiles.default_tile_config("dkdv", head_dim, torch.bfloat16, 90, path="pointer")[0]
        assert mine["attention.dkdv"]["constexprs"]["BLOCK_M"] == rows


@pytest.mark.parametrize("check", report.CHECKS, ids=lambda check: check.__name__)
def test_compiled_kernels_pass(records, check):
    failed = report.problems(records, [check])
    assert not failed, f"{len(failed)} compilations fail {check.__name__}:\n" + "\n".join(failed)
