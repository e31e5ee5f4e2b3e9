"""The structure of the Triton attention kernels (issue 19): the choice between TMA descriptors and
pointer loads, the tile configurations, the program order, the Bitune mix kernel and its ordered dα sum,
and every path against float64 references in the interpreter: TMA and pointer loads, GPU-shaped tiles
(128x64, 128x128, tall dK/dV tiles) forced onto small odd shapes. cuda-marked cases run the GPU sizes."""
import pytest
import torch
import triton
import triton.language as tl

from kpro import ops
from kpro.ops.triton_kernels import attention as triton_attention
from kpro.ops.triton_kernels import attention_tiles as tiles
from kpro.ops.triton_kernels import bitune_attention as triton_bitune
from conftest import CUDA, relative_error
from test_ops_attention import make_case, plain_attention, run, vectorized_mask, with_backend
from test_ops_bitune_attention import (DALPHA_TOLERANCE, NAMES, dalpha_rounding_scale, fused, make as make_bitune,
                                      run as run_bitune, three_calls)

DEVICE = "cuda" if CUDA else "cpu"
BF16 = torch.bfloat16


# ------------------------------------------------------------------------------ the load path

def aligned(*shape, dtype=BF16):
    return torch.zeros(shape, dtype=dtype)


def test_tma_needs_hopper_half_precision_a_power_of_two_head_and_aligned_tensors():
    q, k = aligned(2, 7, 4, 64), aligned(2, 7, 2, 64)
    assert tiles.load_path(90, 64, BF16, (q, k)) == "tma"
    assert tiles.load_path(100, 64, torch.float16, (q.half(), k.half())) == "tma"
    assert tiles.load_path(80, 64, BF16, (q, k)) == "pointer"  # A100: no TMA
    assert tiles.load_path(None, 64, BF16, (q, k)) == "pointer"  # the interpreter, unless forced
    assert tiles.load_path(90, 64, torch.float32, (q.float(), k.float())) == "pointer"  # the exact path
    assert tiles.load_path(90, 96, BF16, (aligned(2, 7, 4, 96),)) == "pointer"  # not a power of two
    assert tiles.load_path(90, 256, BF16, (aligned(2, 7, 4, 256),)) == "pointer"


def test_unaligned_or_broadcast_tensors_take_pointer_loads():
    flat = aligned(2 * 7 * 4 * 64 + 1)
    shifted = flat[1:].view(2, 7, 4, 64)  # its address 2 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16 and tiles.load_path(90, 64, BF16, (shifted,)) == "pointer"
    odd_rows = aligned(2, 7, 4, 68)[..., :64]  # rows of 136 bytes
    assert tiles.load_path(90, 64, BF16, (odd_rows,)) == "pointer"
    broadcast = aligned(1, 1, 4, 64).expand(2, 7, 4, 64)  # stride 0
    assert tiles.load_path(90, 64, BF16, (broadcast,)) == "pointer"
    packed = aligned(2, 7, 3, 4, 64)[:, :, 1]  # q of a packed QKV tensor: strided, but aligned
    assert tiles.load_path(90, 64, BF16, (packed,)) == "tma"
    heads_major = aligned(2, 4, 7, 64).transpose(1, 2)  # [B, H, T, D] memory: a batch row's heads are apart
    assert tiles.load_path(90, 64, BF16, (heads_major,)) == "pointer"


def test_forcing_a_path_still_respects_what_tma_can_read():
    q = aligned(2, 7, 4, 64)
    with tiles.forced_load_path("tma"):
        assert tiles.load_path(None, 64, BF16, (q,)) == "tma"
        assert tiles.load_path(None, 64, BF16, (aligned(2, 7, 4, 68)[..., :64],)) == "pointer"
        with tiles.forced_load_path("pointer"):
            assert tiles.load_path(90, 64, BF16, (q,)) == "pointer"
        assert tiles.load_path(None, 64, BF16, (q,)) == "tma"
    assert tiles.load_path(None, 64, BF16, (q,)) == "pointer"
    with pytest.raises(ValueError, match="unknown load path"):
        with tiles.forced_load_path("cp.async"):
            pass


# ------------------------------------------------------------------------------ tile configurations

def test_block_sizes_carry_the_architecture_and_unpack_as_four():
    block_m, block_n, warps, stages = chosen = tiles.block_sizes("forward", None, 64, BF16)
    assert (block_m, block_n, warps, stages) == (16, 16, 4, 1) and chosen.arch is None


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_candidates_start_with_the_default_and_offer_wide_key_tiles(arch, head_dim):
    for kind in tiles.KERNELS:
        candidates = tiles.candidate_configs(kind, head_dim, BF16, arch)
        assert candidates[0] == tiles.default_tile_config(kind, head_dim, BF16, arch)
        assert len(candidates) == len(set(candidates)) > 1
        assert all(len(config) == 4 and config[2] in (4, 8) for config in candidates)
    forward = tiles.candidate_configs("forward", head_dim, BF16, arch)
    if arch >= 90:
        assert (128, 64, 8, 3) in forward and (128, 128, 8, 2) in forward
    assert tiles.candidate_configs("dkdv", head_dim, torch.float32, arch) == [
        tiles.default_tile_config("dkdv", head_dim, torch.float32, arch)]


def test_hopper_backward_tiles_are_tall_in_keys():
    for head_dim in (64, 128):
        block_m, block_n, warps, _ = tiles.default_tile_config("dkdv", head_dim, BF16, 90)
        assert block_n == 128 and block_m <= 64 and warps == 8


@pytest.mark.parametrize("compiler, rows", [((3, 9), {64: 64, 128: 32}), ((3, 10), {64: 64, 128: 32}),
                                            ((4, 0), {64: 64, 128: 32}), ((3, 8), {64: 32, 128: 16}),
                                            ((3, 6), {64: 32, 128: 16})])
def test_hopper_dkdv_takes_fewer_queries_a_step_before_triton_3_9(compiler, rows):
    """Triton 3.6 spills at the dK/dV tiles 3.9 compiles cleanly (RESULTS.md): before 3.9 they are halved."""
    for head_dim, block_m in rows.items():
        assert tiles.default_tile_config("dkdv", head_dim, BF16, 90, compiler) == (block_m, 128, 8, 2)
        for kind in ("forward", "dq"):  # only dK/dV depends on the version
            assert (tiles.default_tile_config(kind, head_dim, BF16, 90, compiler)
                    == tiles.default_tile_config(kind, head_dim, BF16, 90, (3, 9)))
        # sm_80: the same queries; at d64 one pipeline stage before 3.9 (two spilled, 124-144 B in the Bitune pass)
        stages = 1 if head_dim == 64 and compiler < (3, 9) else 2
        assert tiles.default_tile_config("dkdv", head_dim, BF16, 80, compiler) == (
            tiles.default_tile_config("dkdv", head_dim, BF16, 80, (3, 9))[:3] + (stages,))
        # and sm_80 dQ at d64 32 keys a step before 3.9 (the Bitune dQ spilled 40 B a thread at 64)
        keys = 32 if head_dim == 64 and compiler < (3, 9) else 64
        assert tiles.default_tile_config("dq", head_dim, BF16, 80, compiler) == (
            tiles.default_tile_config("dq", head_dim, BF16, 80, (3, 9))[:1] + (keys, 8, 2))
    installed = tiles.triton_version()  # the default
    assert (tiles.default_tile_config("dkdv", 64, BF16, 90)
            == tiles.default_tile_config("dkdv", 64, BF16, 90, installed))


@pytest.mark.parametrize("compiler", [(3, 6), (3, 9)])
def test_hopper_dkdv_on_pointer_loads_takes_half_the_queries_a_step(compiler):
    """sm_90a dK/dV on pointer loads (a Hugging Face model's transposed [B, H, T, D] tensors) spilled under
    Triton 3.9 at the TMA path's tiles: 16 B a thread at d128 with grouped-query heads, 44 B at d64 and d128
    with a padding mask (RESULTS.md). The forward, dQ and sm_80 tiles do not depend on the path."""
    for head_dim, rows in ((64, 32), (128, 16)):
        assert tiles.default_tile_config("dkdv", head_dim, BF16, 90, (3, 9), path="pointer") == (rows, 128, 8, 2)
        for arch in (80, 90):
            for kind in ("forward", "dq") if arch == 90 else tiles.KERNELS:
                assert (tiles.default_tile_config(kind, head_dim, BF16, arch, compiler, path="pointer")
                        == tiles.default_tile_config(kind, head_dim, BF16, arch, compiler))
    with pytest.raises(ValueError, match="unknown load path 'cp.async'"):
        tiles.default_tile_config("dkdv", 64, BF16, 90, path="cp.async")


@pytest.mark.parametrize("compiler", [(3, 6), (3, 9)])
def test_fp32_tiles_are_those_that_compile_without_spills(compiler):
    """At 32x32 with 4 warps, sm_90a's fp32 kernels spilled: dK/dV 788 B a thread at d64, the forward 1,600 B and
    dQ 1,288 B at d128 (RESULTS.md). sm_80 dK/dV at d64 spills less at 32 queries than at 16 under Triton 3.9 (12 B,
    20 B), and keeps 32 there; under 3.6, 836 B at 32 and none at 16."""
    for head_dim in (16, 32, 64, 96, 128, 256):
        wide = head_dim > 64
        assert tiles.default_tile_config("dkdv", head_dim, torch.float32, 90, compiler) == (16, 32, 4, 1)
        assert tiles.default_tile_config("forward", head_dim, torch.float32, 90, compiler) == (
            (16, 16, 4, 1) if wide else (32, 32, 8, 1))
        assert tiles.default_tile_config("dq", head_dim, torch.float32, 90, compiler) == (
            (32, 16, 4, 1) if wide else (32, 32, 8, 1))
        assert tiles.default_tile_config("dkdv", head_dim, torch.float32, 80, compiler) == (
            (16 if wide or compiler < (3, 9) else 32), 32, 4, 1)
        for kind in ("forward", "dq"):
            assert tiles.default_tile_config(kind, head_dim, torch.float32, 80, compiler) == (32, 32, 4, 1)


def test_tuned_winners_stand_for_the_load_path_that_timed_them(monkeypatch):
    """The sweep's contiguous tensors take TMA on sm_90: its winners are not the pointer path's tiles there."""
    key = tiles.tuned_key("dkdv", 128, BF16, 90)
    monkeypatch.setattr(tiles, "tuned_table", lambda: {key: [64, 64, 8, 2], tiles.tuned_key("dkdv", 128, BF16, 80):
                                                       [32, 64, 8, 2]})
    assert tiles.tile_config("dkdv", 128, BF16, 90) == (64, 64, 8, 2)
    assert tiles.tile_config("dkdv", 128, BF16, 90, path="pointer") == tiles.default_tile_config(
        "dkdv", 128, BF16, 90, path="pointer")
    assert tiles.tile_config("dkdv", 128, BF16, 80, path="pointer") == (32, 64, 8, 2)  # sm_80 timed pointer loads


def test_tuned_winners_stand_only_for_the_triton_that_timed_them(monkeypatch):
    installed = tiles.triton_version()
    other = (installed[0], installed[1] + 1)
    here, there = (tiles.tuned_key("dkdv", 128, BF16, 90, version) for version in (installed, other))
    assert here != there and "triton" in here
    monkeypatch.setattr(tiles, "tuned_table", lambda: {there: [64, 64, 8, 2]})
    assert tiles.tile_config("dkdv", 128, BF16, 90) == tiles.default_tile_config("dkdv", 128, BF16, 90)
    monkeypatch.setattr(tiles, "tuned_table", lambda: {here: [64, 64, 8, 2]})
    assert tiles.tile_config("dkdv", 128, BF16, 90) == (64, 64, 8, 2)


def test_only_plain_attention_asks_for_the_tuned_winners(monkeypatch):
    """The sweep times plain attention: its winners must not reach the dual pass's kernels, which hold more
    per tile, until a sweep of theirs measures them (tuned=False there, the default elsewhere)."""
    asked = []

    def spy(module):
        def block_sizes(kind, arch, head_dim, dtype, tuned=True, path="tma"):
            asked.append((module, kind, tuned))
            return tiles.Tiles((16, 16, 4, 1))
        return block_sizes

    monkeypatch.setattr(triton_attention, "block_sizes", spy("attention"))
    monkeypatch.setattr(triton_bitune, "block_sizes", spy("bitune"))
    tensors, douts, *lens = make_bitune("gqa_mixed_lengths", torch.float32, "cpu")
    run_bitune(fused("triton"), tensors, douts, lens, "cpu", torch.float32)
    q, k, v = (torch.randn(1, 5, 2, 16, requires_grad=True) for _ in range(3))
    with ops.backend("triton"):
        ops.attention(q, k, v, causal=True).sum().backward()
    assert {(module, kind) for module, kind, _ in asked} == {(m, k) for m in ("attention", "bitune")
                                                             for k in tiles.KERNELS}
    assert all(tuned == (module == "attention") for module, _, tuned in asked)
    assert tiles.tile_config("dkdv", 128, BF16, 90, tuned=False) == tiles.default_tile_config("dkdv", 128, BF16, 90)


# ------------------------------------------------------------------------------ program order

@triton.jit
def _order_kernel(OUT, length, BLOCK: tl.constexpr, HEADS_FASTEST: tl.constexpr, DESCENDING: tl.constexpr):
    start, bh = tiles.tile_and_head(length, BLOCK, HEADS_FASTEST, DESCENDING)
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, start)
    tl.store(OUT + 2 * pid + 1, bh)


@pytest.mark.parametrize("heads_fastest, descending", [(False, False), (True, True), (True, False)])
def test_every_tile_of_every_head_gets_one_program_heaviest_first(heads_fastest, descending):
    length, block, heads = 37, 16, 3
    tiles_per_head = 3
    out = torch.full((tiles_per_head * heads, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(tiles_per_head * heads,)](out, length, BLOCK=block, HEADS_FASTEST=heads_fastest,
                                             DESCENDING=descending)
    pairs = [tuple(row) for row in out.tolist()]
    assert sorted(pairs) == sorted((t * block, h) for t in range(tiles_per_head) for h in range(heads))
    starts = [start for start, _ in pairs]
    if heads_fastest:  # whole rounds of tiles over every head, the causal-heaviest first
        expected = sorted(starts, reverse=descending)
        assert starts == expected and [h for _, h in pairs[:heads]] == list(range(heads))
    else:  # the tiles of one head together
        assert [h for _, h in pairs] == sorted(h for _, h in pairs)


# ------------------------------------------------------------------------------ GPU tiles in the interpreter

# Tiles a GPU launch takes, forced onto the interpreter's small shapes: wide key tiles (128x64, 128x128),
# tall dK/dV tiles (128 keys, 16 or 32 queries a step), and tiles wider than the sequences.
TILE_SETS = {
    "hopper_d128": {"forward": (128, 64), "dkdv": (32, 128), "dq": (128, 64)},
    "wide_keys": {"forward": (128, 128), "dkdv": (16, 128), "dq": (128, 128)},
    "mixed_small": {"forward": (32, 64), "dkdv": (64, 32), "dq": (64, 16)},
}


@pytest.fixture
def forced_interpreter_tiles(monkeypatch):
    """Make the launchers take the given (BLOCK_M, BLOCK_N) per kernel, as on a GPU."""
    def force(tile_set):
        def block_sizes(kind, arch, head_dim, dtype, tuned=True, path="tma"):
            return tiles.Tiles((*tile_set[kind], 4, 1))
        monkeypatch.setattr(triton_attention, "block_sizes", block_sizes)
        monkeypatch.setattr(triton_bitune, "block_sizes", block_sizes)
    return force


ATTENTION_CASES = ["causal_gqa", "prefix", "key_mask_with_holes", "left_padding", "a_row_without_real_keys",
                   "decode_tq_lt_tk", "full_mha", "one_token"]


def check_attention(case, dtype, path, seed=3):
    ins, dout, mask, kwargs = make_case(case, dtype, DEVICE, seed=seed)
    ref = run(lambda q, k, v: plain_attention(q, k, v, mask), [t.double() for t in ins], dout.double())
    with tiles.forced_load_path(path):
        got = run(with_backend("triton", **kwargs), ins, dout)
    if dtype == torch.float32:
        for name, out, expected in zip(("out", "dq", "dk", "dv"), got, ref):
            assert relative_error(out, expected, floor=1e-3) <= 1e-4, name
        return
    plain = run(lambda q, k, v: plain_attention(q, k, v, mask), ins, dout)
    for name, out, base, expected in zip(("out", "dq", "dk", "dv"), got, plain, ref):  # the floor: dq of one key is 0
        assert out.dtype == dtype
        assert relative_error(out, expected, floor=1e-3) <= 2 * relative_error(base, expected, floor=1e-3), name


@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_tma_and_pointer_paths_match_float64(case, path):
    check_attention(case, BF16, path)


@pytest.mark.parametrize("tile_set", TILE_SETS)
@pytest.mark.parametrize("case", ["causal_gqa", "prefix", "key_mask_with_holes", "decode_tq_lt_tk"])
def test_gpu_tiles_on_small_odd_shapes(forced_interpreter_tiles, tile_set, case):
    forced_interpreter_tiles(TILE_SETS[tile_set])
    check_attention(case, torch.float32, "pointer")
    check_attention(case, BF16, "tma", seed=4)


def test_nan_in_a_key_reaches_only_the_rows_that_see_it_through_tma():
    ins, _, _, kwargs = make_case("causal_gqa", BF16, DEVICE)
    ins[1][0, 10, 0, 3] = float("nan")
    with ops.backend("triton"), tiles.forced_load_path("tma"):
        out = ops.attention(*ins, **kwargs)
    nan_rows = out[0, :, :2].isnan().any(-1).any(-1).cpu()
    assert nan_rows[10:].all() and not nan_rows[:10].any()
    assert not out[1].isnan().any()


# ------------------------------------------------------------------------------ Bitune: mix, paths, tiles

def interpreter_rounds_fma_twice() -> bool:
    """Whether Triton's CPU interpreter computes tl.fma as a product, then a sum, rounding twice (Triton 3.6's; later
    ones call a true fma, `fma_fp32` of its C++ module). A compiled kernel on a GPU rounds once."""
    if CUDA:
        return False
    from triton._C.libtriton import interpreter
    return not hasattr(interpreter, "fma_fp32")


def test_the_mix_kernel_is_one_fused_multiply_add_in_fp32():
    from kpro.ops.triton_kernels.bitune_mix import mixed_cache

    gen = torch.Generator().manual_seed(5)
    k_p = torch.randn(2, 3, 5, 2, 24, generator=gen).to(BF16).to(DEVICE)
    v_p = torch.randn(2, 3, 5, 2, 24, generator=gen).to(BF16).to(DEVICE)
    alpha_k, alpha_v = torch.tensor(0.3, device=DEVICE), torch.tensor(0.85, device=DEVICE)
    k_mix, v_mix = mixed_cache(k_p, v_p, alpha_k, alpha_v)
    for mixed, cache, alpha in ((k_mix, k_p, alpha_k), (v_mix, v_p, alpha_v)):
        x0, x1 = cache[0].float(), cache[1].float()
        # The kernel's arithmetic exactly: x1 − x0 in fp32, then α·(x1 − x0) + x0 rounded once to fp32 (α·d, a
        # product of two fp32 numbers, is exact in float64), then stored as bf16. A mix computed in bf16 steps
        # was within the old 4e-3 relative bound (up to 326 ulp off in some entries); no entry may differ.
        expected = (alpha.double() * (x1 - x0).double() + x0.double()).float().to(BF16)
        if interpreter_rounds_fma_twice():  # the interpreter's emulation of tl.fma, not the kernel's arithmetic
            expected = (alpha.float() * (x1 - x0) + x0).to(BF16)
        assert mixed.dtype == BF16 and mixed.shape == cache.shape[1:]
        assert torch.equal(mixed.cpu(), expected.cpu()) and not mixed.isnan().any()


def test_the_dalpha_sum_adds_partials_in_a_fixed_order():
    from kpro.ops.triton_kernels.bitune_mix import SUM_BLOCK, ordered_sum

    partials = torch.randn(2 * SUM_BLOCK + 37, 2, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    total = ordered_sum(partials)
    assert torch.equal(total, ordered_sum(partials.clone()))  # the same bits, every run
    assert relative_error(total, partials.double().sum(0)) <= 1e-6


BITUNE_CASES = ["gqa_mixed_lengths", "prompt_of_length_one", "mqa_d128", "all_prompts_length_one"]


def check_bitune(case, dtype, path, seed=7):
    tensors, douts, *lens = make_bitune(case, dtype, "cpu", seed=seed)
    ref = run_bitune(three_calls, [t.double() for t in tensors], douts, lens, "cpu", torch.float64)
    with tiles.forced_load_path(path):
        got = run_bitune(fused("triton"), tensors, douts, lens, DEVICE, torch.float32)
    if dtype == torch.float32:
        for name, out, expected in zip(NAMES, got, ref):
            assert relative_error(out, expected, floor=1e-3) <= 1e-4, name
        return got
    plain = run_bitune(three_calls, tensors, douts, lens, "cpu", torch.float32)
    for name, out, base, expected in zip(NAMES[:-2], got, plain, ref):
        assert relative_error(out, expected, floor=1e-3) <= 2 * relative_error(base, expected, floor=1e-3), name
    # dα against its rounding scale ‖(K_bidir − K_causal)·dK_mix‖₂, as test_ops_bitune_attention holds it: a
    # bound of 2**-8 times the sum of the terms' magnitudes was 7%-215% of the value, and dα 7% low on the TMA
    # path passed; this one is 1.2%-5.8% of it in these cases, 33% for prompt_of_length_one's dα_v at seed 7
    # (6% of its norm), and 0 where there is no prompt (all_prompts_length_one: dα exactly 0)
    scale = dalpha_rounding_scale(tensors, douts, lens)
    for name, out, expected in zip(NAMES[-2:], got[-2:], ref[-2:]):
        assert abs(float(out) - float(expected)) <= DALPHA_TOLERANCE[dtype] * scale[name], name  # NaN fails too
    return got


def mix_terms(tensors, douts, lens):
    """Σ|dK_mix ∘ (K_bidir − K_causal)| and the same for V, in float64: the scale of the sums dα_k, dα_v,
    which cancel (a relative error of the sum itself is ill-conditioned; plain bf16 PyTorch's is luck)."""
    t = [x.double() for x in tensors]
    k_mix = ((1 - t[6]) * t[1][0] + t[6] * t[1][1]).requires_grad_()
    v_mix = ((1 - t[7]) * t[2][0] + t[7] * t[2][1]).requires_grad_()
    _, o_a = three_calls(*t, *lens, mixed=(k_mix, v_mix))
    (o_a * douts[1]).sum().backward()
    return [float((mix.grad * (cache[1] - cache[0])).abs().sum()) for mix, cache in ((k_mix, t[1]), (v_mix, t[2]))]


@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("case", BITUNE_CASES)
def test_bitune_tma_and_pointer_paths_match_float64(case, path):
    check_bitune(case, BF16, path)


@pytest.mark.parametrize("tile_set", TILE_SETS)
@pytest.mark.parametrize("case", ["gqa_mixed_lengths", "prompt_of_length_one"])
def test_bitune_gpu_tiles_on_small_odd_shapes(forced_interpreter_tiles, tile_set, case):
    forced_interpreter_tiles(TILE_SETS[tile_set])
    check_bitune(case, torch.float32, "pointer")
    check_bitune(case, BF16, "tma", seed=8)


@(pytest.mark.cuda if CUDA else (lambda test: test))  # on a GPU, the GPU suite's `-m cuda` stage runs it too
def test_bitune_backward_is_deterministic():
    first = check_bitune("gqa_mixed_lengths", torch.float32, "pointer")
    second = check_bitune("gqa_mixed_lengths", torch.float32, "pointer")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ GPU sizes (cuda only)

@pytest.mark.cuda
@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("case", ["causal_long_gqa", "prefix_ends_mid_tile", "left_padding_long"])
def test_gpu_paths_at_gpu_sizes(case, path):
    ins, dout, mask, kwargs = make_case(case, BF16, "cuda", seed=9)
    ref = run(lambda q, k, v: plain_attention(q, k, v, mask), [t.double() for t in ins], dout.double())
    plain = run(lambda q, k, v: plain_attention(q, k, v, mask), ins, dout)
    with tiles.forced_load_path(path):
        got = run(with_backend("triton", **kwargs), ins, dout)
    for name, out, base, expected in zip(("out", "dq", "dk", "dv"), got, plain, ref):
        assert relative_error(out, expected) <= 2 * relative_error(base, expected), name


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["tma", "pointer"])
def test_gpu_attention_repeats_bit_for_bit(path):
    """docs/ops.md's determinism on the GPU: no kernel uses atomics (a GQA group's dK/dV summed in order in one
    program), so the same inputs give the same bits on every run, forward and backward."""
    ins, dout, mask, kwargs = make_case("causal_long_gqa", BF16, "cuda", seed=10)
    with tiles.forced_load_path(path):
        first = run(with_backend("triton", **kwargs), ins, dout)
        second = run(with_backend("triton", **kwargs), ins, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.cuda
@pytest.mark.parametrize("kind", tiles.KERNELS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_candidate_tile_at_gpu_sizes(kind, head_dim):
    """Each autotuning candidate computes the same attention as the float64 reference (long causal rows,
    GQA, a prefix ending mid-tile)."""
    major, minor = torch.cuda.get_device_capability()
    gen = torch.Generator().manual_seed(10)
    q, k, v, dout = (torch.randn(2, 777, h, head_dim, generator=gen, dtype=torch.float64) for h in (8, 2, 2, 8))
    prefix = torch.tensor([333, 700])
    mask = vectorized_mask(2, 777, 777, True, prefix)
    ref = run(lambda *t: plain_attention(*t, mask), [q, k, v], dout)
    ins = [t.to(BF16).cuda() for t in (q, k, v)]
    plain = run(lambda *t: plain_attention(*t, mask.cuda()), ins, dout.cuda())
    for config in tiles.candidate_configs(kind, head_dim, BF16, 10 * major + minor):
        with tiles.forced_tiles(kind, config):
            got = run(with_backend("triton", causal=True, prefix_lens=prefix.cuda()), ins, dout.cuda())
        for name, out, base, expected in zip(("out", "dq", "dk", "dv"), got, plain, ref):
            assert relative_error(out, expected) <= 2 * relative_error(base, expected), (config, name)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["tma", "pointer"])
def test_bitune_at_the_benchmark_size(path):
    """Batch 8, prompt 512, answer 256, d128 (the SPEC's benchmark), mixed lengths, against float64."""
    gen = torch.Generator().manual_seed(11)
    batch, tp, ta, heads, kv_heads, dim = 8, 512, 256, 8, 2, 128
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    tensors = [r(2, batch, tp, heads, dim), r(2, batch, tp, kv_heads, dim), r(2, batch, tp, kv_heads, dim),
               r(batch, ta, heads, dim), r(batch, ta, kv_heads, dim), r(batch, ta, kv_heads, dim)]
    tensors = [t.to(BF16) for t in tensors] + [torch.tensor(0.3, dtype=torch.float64),
                                                torch.tensor(0.7, dtype=torch.float64)]
    douts = (r(2, batch, tp, heads, dim), r(batch, ta, heads, dim))
    lens = (torch.tensor([512, 500, 1, 0, 333, 129, 511, 64]), torch.tensor([256, 1, 255, 200, 128, 7, 90, 256]))
    ref = run_bitune(three_calls, [t.double() for t in tensors], douts, lens, "cpu", torch.float64)
    plain = run_bitune(three_calls, tensors, douts, lens, "cpu", torch.float32)
    with tiles.forced_load_path(path):
        got = run_bitune(fused("triton"), tensors, douts, lens, "cuda", torch.float32)
    for name, out, base, expected in zip(NAMES[:-2], got, plain, ref):
        assert relative_error(out, expected) <= 2 * relative_error(base, expected), name
    for name, out, expected, terms in zip(NAMES[-2:], got[-2:], ref[-2:], mix_terms(tensors, douts, lens)):
        assert abs(float(out) - float(expected)) <= 2**-8 * terms, name
