"""The readers and checks of kpro/ops/report.py on small synthetic compiler output, so that the GPU compile
test (tests/test_triton_gpu_compile.py) is shown able to fail. No compilation here: fast, no GPU backend."""
import os
import subprocess
import sys

import pytest
import torch

from kpro.ops import report

# A kernel with an outer loop (BB0_1) around an inner loop (BB0_2) that issues tensor-core ops and
# prefetches with cp.async, then a forward branch (not a loop) and a scalar epilogue.
PTX = """\
.visible .entry kernel(
)
{
\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\tld.global.b16 %rs1, [%rd2];
$L__BB0_1:
\tmov.u32 %r5, 0;
$L__BB0_2:
\tcp.async.cg.shared.global [ %r6 + 0 ], [ %rd3 + 0 ], 0x10, %r7;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 { %r8, %r9, %r10, %r11 }, [ %r12 + 0 ];
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1, %f2, %f3, %f4 }, { %r8, %r9, %r10, %r11 }, { %r13, %r14 }, { %f1, %f2, %f3, %f4 };
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f5, %f6, %f7, %f8 }, { %r8, %r9, %r10, %r11 }, { %r13, %r14 }, { %f5, %f6, %f7, %f8 };
\tst.shared.v2.b32 [%r15], { %r16, %r17 };
\tld.shared.b32 %r18, [%r15];
\t// ld.shared.b32 %r99, [%r15];  a comment, not an instruction
\t@%p2 bra $L__BB0_2;
\t@%p3 bra $L__BB0_4;
\tst.global.b16 [%rd4], %rs1;
$L__BB0_4:
\t@%p4 bra.uni $L__BB0_1;
\tret;
}
"""

TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
    %0 = tt.dot %a, %b, %c : tensor<64x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * tensor<64x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<64x64xf32, #mma>
    %1 = tt.dot %d, %e, %f, inputPrecision = ieee : tensor<32x32xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<32x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<32x32xf32, #blocked>
    %2 = ttng.warp_group_dot %g, %h, %i {isAsync = true} : !ttg.memdesc<64x64xbf16, #shared, #smem> * !ttg.memdesc<64x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma1>
    %3:3 = ttng.warp_group_dot_wait %2, %g, %h {pendings = 0 : i32} : tensor<64x64xf32, #mma1>
"""


def test_loops_are_found_by_their_backward_branches():
    lines = PTX.splitlines()
    spans = report.loops(PTX)
    assert [(lines[a], lines[b].strip()) for a, b in spans] == [
        ("$L__BB0_1:", "@%p4 bra.uni $L__BB0_1;"), ("$L__BB0_2:", "@%p2 bra $L__BB0_2;")]
    assert report.innermost(spans) == [spans[1]]  # the forward branch to BB0_4 is no loop


def test_the_hot_loop_counts_one_iteration():
    (loop,) = report.hot_loops(PTX)
    assert {key: loop[key] for key in report.LOOP_COLUMNS} == {
        "tensor_core": 2, "ld_shared": 1, "st_shared": 1, "ldmatrix": 1, "stmatrix": 0, "cp_async": 1, "tma": 0,
        "ld_global": 0}


def test_without_tensor_cores_the_largest_innermost_loop_is_reported():
    ptx = PTX.replace("mma.sync", "fma.rn")
    (loop,) = report.hot_loops(ptx)
    assert loop["tensor_core"] == 0 and loop["ldmatrix"] == 1


def test_the_table_counts_the_tma_copies_of_the_hot_loop():
    """On sm_90a the attention loops load their tiles with TMA: the table's loop column showed no copy and no
    global load in them."""
    tma = "cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r6], [%rd3, {%r7, %r8}], [%r9];"
    ptx = PTX.replace("cp.async.cg.shared.global [ %r6 + 0 ], [ %rd3 + 0 ], 0x10, %r7;", tma)
    assert report.main_loop({"loops": report.hot_loops(ptx)}) == "2/1/1/1/0/0/1/0"
    assert report.COLUMNS[-1] == "loop tc/lds/sts/ldm/stm/cp/tma/ldg"


def test_memory_access_widths_and_pipelining():
    access = report.memory_access(PTX)
    assert access["global_load_bytes"] == {16: 1, 2: 1}
    assert access["global_store_bytes"] == {2: 1}
    assert access["cp_async_bytes"] == {16: 1}
    assert access["pipelined"] and access["tma"] == 0 and access["tensor_core_instructions"] == 2
    unpipelined = report.memory_access(PTX.replace("cp.async.cg.shared.global", "ld.global.v4.b32"))
    assert not unpipelined["pipelined"] and unpipelined["global_load_bytes"] == {16: 2, 2: 1}
    assert report.access_bytes("ld.global.L1::evict_last.v2.b32") == 8
    assert report.access_bytes("st.shared.v4.b32") == 16


def test_dot_lowering_reads_each_dot_of_the_ttgir():
    assert report.dot_lowering(TTGIR) == {"mma": 1, "fma": 1, "wgmma": 1}


def test_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "    0 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert report.ptxas_figures(log) == {"registers": 255, "spill_stores": 24, "spill_loads": 28}
    assert report.ptxas_figures("") == {"registers": None, "spill_stores": None, "spill_loads": None}


@pytest.mark.parametrize("registers, shared, warps, arch, expected", [
    (255, 0, 8, 90, (1, "registers")),           # 256 x 32 x 8 = all 64K registers
    (128, 0, 4, 90, (4, "registers")),           # 16K registers a block
    (130, 0, 4, 90, (3, "registers")),           # 130 x 32 rounds up to 4352 a warp
    (32, 65_536, 4, 90, (3, "shared")),          # 3 x (64 KiB + 1 KiB) <= 228 KiB
    (32, 65_536, 4, 80, (2, "shared")),          # A100: 164 KiB
    (16, 0, 16, 90, (4, "threads")),             # 512 threads a block
    (16, 0, 1, 90, (32, "blocks")),
])
def test_occupancy(registers, shared, warps, arch, expected):
    assert report.blocks_per_sm(registers, shared, warps, report.TARGETS[arch]) == expected


def record(**changes):
    good = {"arch": 90, "target": "sm_90a (H100)", "toolchain": "triton 3.9.0, ptxas 13.4",
            "kernel": "attention.forward", "dtype": "bf16", "cases": ["c"],
            "constexprs": {"HEAD_DIM": 128, "BLOCK_M": 128, "BLOCK_N": 32}, "num_warps": 8, "num_stages": 2,
            "enable_fp_fusion": True, "shared": 65_536, "shared_limit": 232_448, "registers": 190,
            "spill_stores": 0, "spill_loads": 0, "dots": {"wgmma": 4}, "tensor_core_instructions": 40}
    return {**good, **changes}


NORM_BACKWARD = {"kernel": "rms_norm.backward", "constexprs": {"BLOCK": 16384, "ONE_BLOCK": True, "WEIGHT_GRAD": True},
                 "specialisation": {"divisible_by_16": ["X", "n_cols"]}, "dots": {}}


@pytest.mark.parametrize("check, bad, fine", [
    (report.compile_error, {"error": "CompilationError: boom"}, {}),
    (report.compile_error, {"registers": None}, {}),
    (report.shared_over_limit, {"shared": 232_449}, {"shared": 232_448}),
    (report.forward_spill, {"spill_stores": 8}, {"spill_stores": 8, "kernel": "attention.dkdv"}),
    (report.forward_spill, {"spill_stores": 8, "dtype": "fp16", "kernel": "rms_norm.forward"},
     {"spill_stores": 8, "dtype": "fp32"}),
    (report.hopper_dkdv_spill, {"spill_stores": 8, "kernel": "bitune_attention.dkdv_answer"},
     {"spill_stores": 8, "kernel": "bitune_attention.dkdv_answer", "arch": 80}),
    (report.hopper_dkdv_spill, {"spill_stores": 4, "kernel": "attention.dkdv", "dtype": "fp16"},
     {"spill_stores": 4, "kernel": "attention.dkdv", "constexprs": {"HEAD_DIM": 256, "BLOCK_M": 16}}),
    (report.hopper_dkdv_spill, {"spill_stores": 4, "kernel": "bitune_attention.dkdv"},
     {"spill_stores": 4, "kernel": "bitune_attention.dkdv", "dtype": "fp32"}),
    (report.norm_backward_spill, NORM_BACKWARD | {"spill_stores": 4}, NORM_BACKWARD | {"spill_stores": 0}),
    (report.norm_backward_spill, NORM_BACKWARD | {"spill_stores": 4}, NORM_BACKWARD | {"spill_stores": 4, "dtype": "fp32"}),
    (report.norm_backward_spill, NORM_BACKWARD | {"spill_stores": 4, "dtype": "fp16"},
     NORM_BACKWARD | {"spill_stores": 4, "specialisation": {"divisible_by_16": ["X"]}}),  # scalar loads
    (report.norm_backward_spill, NORM_BACKWARD | {"spill_stores": 4, "arch": 80},
     NORM_BACKWARD | {"spill_stores": 4, "constexprs": {"BLOCK": 16384, "ONE_BLOCK": False}}),  # the column loop
    (report.not_tensor_cores, {"dots": {"wgmma": 2, "fma": 2}}, {"dots": {"fma": 4}, "dtype": "fp32"}),
    (report.not_tensor_cores, {"dots": {"fma": 2}}, {"dots": {"wgmma": 2, "mma": 2}}),
    (report.not_tensor_cores, {"dots": {"wgmma": 4}, "tensor_core_instructions": 0}, {"dots": {}}),
    (report.not_tensor_cores, {"arch": 80, "dots": {"wgmma": 4}}, {"arch": 80, "dots": {"mma": 4}}),
    (report.fp_fusion_by_default, {"enable_fp_fusion": None}, {}),
    (report.fp_fusion_by_default, {"enable_fp_fusion": False}, {"kernel": "rms_norm.forward"}),
])
def test_each_check_fails_a_bad_record_and_passes_a_good_one(check, bad, fine):
    assert check(record(**bad))
    assert check(record(**fine)) is None
    assert report.problems([record(**fine)], [check]) == []


def test_a_spilling_dkdv_tile_a_gpu_timed_fastest_passes_the_spill_check(monkeypatch):
    """The H200-measured winners (tuned_tiles.json) outrank the compiler's spill rule, for plain attention
    only, at exactly the winning tiles, warps and stages."""
    from kpro.ops.triton_kernels import attention_tiles

    winner = [64, 128, 8, 2]
    key = attention_tiles.tuned_key("dkdv", 128, torch.bfloat16, 90)
    monkeypatch.setattr(attention_tiles, "tuned_table", lambda: {key: winner})
    spilling = record(kernel="attention.dkdv", spill_stores=96,
                      constexprs={"HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 128, "USE_TMA": True})
    assert report.hopper_dkdv_spill(spilling) is None
    assert report.hopper_dkdv_spill({**spilling, "num_stages": 3})  # not the measured configuration
    # the winners were timed on TMA loads: pointer loads keep the defaults (attention_tiles.tile_config)
    assert report.hopper_dkdv_spill({**spilling, "constexprs": {**spilling["constexprs"], "USE_TMA": False}})
    assert report.hopper_dkdv_spill({**spilling, "kernel": "bitune_attention.dkdv"})  # Bitune takes no winners
    assert report.hopper_dkdv_spill({**spilling, "dtype": "fp16"})  # no fp16 winner in this table
    monkeypatch.setattr(attention_tiles, "tuned_table", lambda: {})
    assert report.hopper_dkdv_spill(spilling)


def launch_specialisations(cases: str) -> list[str]:
    """`arch kernel constexpr_1` of every launch the report records for the standard cases whose name starts
    with `cases`, in a process without TRITON_INTERPRET (under it the launchers would run the kernels)."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    code = f"""
from kpro.ops import report
for arch in (80, 90):
    cases = [case for case in report.standard_cases() if case.name.startswith({cases!r})]
    for launch in report.capture(cases, report.TARGETS[arch]):
        summary = report.specialisation_summary(report.specialise(launch, report.TARGETS[arch]))
        print(arch, report.kernel_name(launch.kernel), ",".join(summary["constexpr_1"]) or "-")
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_the_cross_entropy_forward_is_compiled_with_its_vocabulary_loop():
    """At a training batch's row count each program of the fused loss's forward loops over several vocabulary
    tiles; at 64 rows it took one, and Triton compiled the loop bound as the constant 1."""
    launches = launch_specialisations("linear_cross_entropy")
    forward = [line for line in launches if " linear_cross_entropy.forward " in line]
    assert len(forward) == 4 and not [line for line in forward if "tiles_per_split" in line], launches


@pytest.mark.parametrize("constexprs, expected", [
    ({"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 16, "BLOCK_N": 128, "CAUSAL": True}, "16x128, 8w, 2s"),
    ({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "EVEN_D": True}, "128x128x64, 8w, 2s"),
    ({"BLOCK_V": 2048}, "2048, 8w, 2s"),
    ({"BLOCK": 4096, "ONE_BLOCK": True}, "4096, 8w, 2s")])
def test_the_tiles_column_names_every_block_size_of_the_launch(constexprs, expected):
    """The cross-entropy kernels' tiles read "128" and "" (only BLOCK_M, BLOCK_N and BLOCK were looked for);
    an attention kernel's BLOCK_D only pads HEAD_DIM and stays out."""
    assert report.tiles({"constexprs": constexprs, "num_warps": 8, "num_stages": 2}) == expected


def test_only_refuses_a_text_no_case_name_contains(monkeypatch, capsys):
    """A misspelt --only was an empty report: 0 compilations, 0 problems, exit status 0."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for only in (["--only", "rmsnorm"], ["--only", "rms_norm", "--only", "rmsnorm"]):  # each TEXT must match
        with pytest.raises(SystemExit) as exit_:
            report.main([*only, "--workers", "1"])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert "--only 'rmsnorm': no case name contains it" in error and "rms_norm bf16 width 4096" in error


def test_ctrl_c_ends_the_report_with_one_line(monkeypatch, capsys):
    """Ctrl-C printed Python's 28-line KeyboardInterrupt traceback, where the kpro commands say `interrupted`."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "report", interrupted)
    assert report.main(["--only", "rms_norm", "--workers", "1"]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")
