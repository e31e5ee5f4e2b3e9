"""The fused Bitune dual pass against three explicit-mask attention calls plus an explicit mix (float64),
forward and every gradient, alpha_k and alpha_v included."""
import sys

import pytest
import torch

from kpro import ops
from kpro.ops.backend import interpreter_bf16_problem
from conftest import backend_devices, relative_error
from test_ops_attention import plain_attention

NAMES = ("o_prompt", "o_answer", "dq_p", "dk_p", "dv_p", "dq_a", "dk_a", "dv_a", "dalpha_k", "dalpha_v")


def three_calls(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, prompt_lens, answer_lens, mixed=None, scale=None):
    """Stream 0 causal and stream 1 bidirectional over their own valid keys; the answer over the valid
    mixed prompt keys (`mixed` = (K_mix, V_mix) in place of the mix, to take their gradients) and causally
    over its own; padded query rows zeroed. Scores times `scale` (D ** -0.5 by default)."""
    tp, ta = q_p.shape[2], q_a.shape[1]
    p_ok = torch.arange(tp)[None, :] < prompt_lens[:, None]
    a_ok = torch.arange(ta)[None, :] < answer_lens[:, None]
    causal = torch.ones(tp, tp, dtype=torch.bool).tril()
    o0 = plain_attention(q_p[0], k_p[0], v_p[0], causal[None] & p_ok[:, None, :] & p_ok[:, :, None], scale)
    o1 = plain_attention(q_p[1], k_p[1], v_p[1], p_ok[:, None, :] & p_ok[:, :, None], scale)
    k_mix = (1 - alpha_k) * k_p[0] + alpha_k * k_p[1]
    v_mix = (1 - alpha_v) * v_p[0] + alpha_v * v_p[1]
    if mixed is not None:
        k_mix, v_mix = mixed
    answer_mask = torch.cat((p_ok[:, None, :].expand(-1, ta, -1),
                             torch.ones(ta, ta, dtype=torch.bool).tril()[None] & a_ok[:, None, :]), -1) & a_ok[:, :, None]
    o_a = plain_attention(q_a, torch.cat((k_mix, k_a), 1), torch.cat((v_mix, v_a), 1), answer_mask, scale)
    return torch.stack((o0, o1)), o_a


CASES = {  # name: (B, Tp, Ta, H, Hkv, D, prompt_lens, answer_lens)
    "gqa_mixed_lengths": (2, 19, 23, 4, 2, 32, [19, 7], [23, 11]),
    "prompt_of_length_one": (3, 17, 13, 2, 2, 64, [0, 17, 9], [3, 13, 1]),
    "mqa_d128": (2, 9, 6, 2, 1, 128, [9, 4], [6, 6]),
    "all_prompts_length_one": (2, 0, 7, 2, 1, 32, [0, 0], [7, 3]),
}


def make(case, dtype, device, seed=0):
    batch, tp, ta, h, hkv, d, plen, alen = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    tensors = [r(2, batch, tp, h, d), r(2, batch, tp, hkv, d), r(2, batch, tp, hkv, d), r(batch, ta, h, d),
               r(batch, ta, hkv, d), r(batch, ta, hkv, d)]
    tensors = [t.to(dtype) for t in tensors] + [torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)]
    douts = (r(2, batch, tp, h, d), r(batch, ta, h, d))
    return tensors, douts, torch.tensor(plen), torch.tensor(alen)


def run(fn, tensors, douts, lens, device, alpha_dtype):
    tensors = [t.detach().clone().to(device).requires_grad_() for t in tensors[:6]] + \
              [t.detach().clone().to(device, alpha_dtype).requires_grad_() for t in tensors[6:]]
    o_p, o_a = fn(*tensors, *(x.to(device) for x in lens))
    ((o_p * douts[0].to(device, o_p.dtype)).sum() + (o_a * douts[1].to(device, o_a.dtype)).sum()).backward()
    return [o_p, o_a] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


def fused(backend, **kwargs):
    def fn(*args):
        with ops.backend(backend):
            return ops.bitune_attention(*args, **kwargs)
    return fn


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:3])
@pytest.mark.parametrize("case", CASES)
def test_fp32_equals_three_calls_and_a_mix(backend, device, case):
    tensors, douts, *lens = make(case, torch.float32, "cpu")
    ref = run(three_calls, [t.double() for t in tensors], douts, lens, "cpu", torch.float64)
    got = run(fused(backend), tensors, douts, lens, device, torch.float32)
    for name, out, expected in zip(NAMES, got, ref):
        assert out.shape == expected.shape, name
        assert relative_error(out, expected, floor=1e-3) <= 1e-4, name


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:3])
@pytest.mark.parametrize("case", ["gqa_mixed_lengths", "prompt_of_length_one"])
def test_a_given_scale_equals_three_calls_and_a_mix(backend, device, case):
    """scale=0.37, not D ** -0.5 (0.177 or 0.125 here), for both outputs and every gradient, dα included: a
    scale checked and then dropped for the default passed every other test, all of which use the default."""
    tensors, douts, *lens = make(case, torch.float32, "cpu", seed=2)
    ref = run(lambda *args: three_calls(*args, scale=0.37), [t.double() for t in tensors], douts, lens, "cpu",
              torch.float64)
    got = run(fused(backend, scale=0.37), tensors, douts, lens, device, torch.float32)
    for name, out, expected in zip(NAMES, got, ref):
        assert relative_error(out, expected, floor=1e-3) <= 1e-4, name


# dα_k, dα_v in half precision: within this fraction of their rounding scale (dalpha_rounding_scale). The largest
# errors of Triton's (interpreter, both load paths) over 4 cases and 8 seeds: 0.64% of it in bf16, 0.075% in
# fp16; plain PyTorch's, 1.6% and 0.14%. The bf16 factor leaves 3x over Triton's; fp16's stays at its
# earlier 5e-3, which the torch backend's GPU gradients were held to (nothing here measures those).
DALPHA_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[1:3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["gqa_mixed_lengths", "prompt_of_length_one"])
def test_half_precision_within_twice_plain_pytorch(backend, device, dtype, case):
    """Every tensor within twice plain PyTorch's error, but dα_k and dα_v: each is one sum of thousands of
    products (K_bidir − K_causal)·dK_mix that cancel, so a half-precision dK_mix leaves it an error of about
    the unit roundoff times their norm, ‖(K_bidir − K_causal)·dK_mix‖₂, whatever its own size. Against
    another implementation's single scalar that is a coin toss: plain PyTorch's dα_k on one CPU was off
    by 2%, on another much less, and an H200's SDPA gradients failed the test by that. They are held to
    DALPHA_TOLERANCE times that norm instead. Seed 8: there every dα is at least 35% of its norm, so the
    bound is at most 6% of the value (at seed 1, gqa_mixed_lengths' dα_v was 1.2% of it: 0 passed)."""
    tensors, douts, *lens = make(case, dtype, "cpu", seed=8)
    ref = run(three_calls, [t.double() for t in tensors], douts, lens, "cpu", torch.float64)
    plain = run(three_calls, tensors, douts, lens, "cpu", torch.float32)
    got = run(fused(backend), tensors, douts, lens, device, torch.float32)
    scale = dalpha_rounding_scale(tensors, douts, lens)
    for name, out, base, expected in zip(NAMES, got, plain, ref):
        if name in scale:
            assert abs(float(expected)) > 0.3 * scale[name], name  # a value the bound can tell from 0
            assert abs(float(out) - float(expected)) <= DALPHA_TOLERANCE[dtype] * scale[name], name
        else:
            assert relative_error(out, expected) <= 2 * relative_error(base, expected), name


def dalpha_rounding_scale(tensors, douts, lens):
    """{"dalpha_k": ‖(K_bidir − K_causal)·dK_mix‖₂, "dalpha_v": the same for V}, in float64."""
    t = [x.detach().double() for x in tensors]
    mixed = [((1 - alpha) * x[0] + alpha * x[1]).requires_grad_() for x, alpha in ((t[1], t[6]), (t[2], t[7]))]
    o_p, o_a = three_calls(*t, *lens, mixed=mixed)
    ((o_p * douts[0]).sum() + (o_a * douts[1]).sum()).backward()
    return {f"dalpha_{c}": float(((x[1] - x[0]) * m.grad).norm()) for c, x, m in zip("kv", (t[1], t[2]), mixed)}


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:2])
def test_zero_mix_weights_make_the_answer_see_the_causal_cache(backend, device):
    """alpha = 0: the answer attends exactly to stream 0's keys and values (what plain causal decoding sees)."""
    tensors, douts, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    tensors[6], tensors[7] = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    tensors[1][1].normal_()  # the bidirectional cache now differs wildly; with alpha = 0 it must not matter
    got = run(fused(backend), tensors, douts, (plen, alen), device, torch.float32)
    q_a, k_a, v_a = tensors[3:6]
    keys, values = torch.cat((tensors[1][0], k_a), 1), torch.cat((tensors[2][0], v_a), 1)
    key_ok = torch.cat((torch.arange(19)[None] < plen[:, None], torch.arange(23)[None] < alen[:, None]), 1)
    with ops.backend("torch"):
        expected = ops.attention(q_a, keys, values, causal=True, attention_mask=key_ok)
    expected = expected * (torch.arange(23)[None] < alen[:, None])[..., None, None]
    assert relative_error(got[1], expected) <= 1e-5


@pytest.mark.parametrize("bad, message", [
    (lambda a: (a[0][0], *a[1:]), "q_p must be"),
    (lambda a: (*a[:3], a[3][:1], *a[4:]), "answer stream"),
    (lambda a: (*a[:6], torch.tensor([0.3]), *a[7:]), "alpha_k must be a 0-dim"),
    (lambda a: (*a[:8], torch.tensor([1.0, 2.0]), a[9]), "prompt_lens must be an integer"),
    # a bool "valid" vector read as lengths 0 and 1: every answer row past the first dropped, silently
    (lambda a: (*a[:9], torch.tensor([True, True])), r"answer_lens must be an integer tensor \[B=2\] of lengths, "
                                                     r"got torch.bool \[2\]"),
    (lambda a: (*a[:3], a[3][:, :0], a[4][:, :0], a[5][:, :0], *a[6:]), "at least one position"),
])
def test_bad_inputs(bad, message):
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        ops.bitune_attention(*bad(tensors + [plen, alen]))


@pytest.mark.parametrize("index, name", list(enumerate(("q_p", "k_p", "v_p", "q_a", "k_a", "v_a", "alpha_k", "alpha_v",
                                                           "prompt_lens", "answer_lens"))))
@pytest.mark.parametrize("kind", ["none", "numpy"])
def test_arguments_that_are_not_tensors_are_refused_by_name(index, name, kind):
    """A None stream failed with an AttributeError in autocast_inputs or the shape checks, and a NumPy one with
    a dtype/device message that named no argument."""
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    args = tensors + [plen, alen]
    args[index] = None if kind == "none" else args[index].numpy()
    got = "NoneType" if kind == "none" else "ndarray"
    with pytest.raises(ValueError, match=f"bitune_attention: {name} must be a tensor, got {got}"):
        ops.bitune_attention(*args)


def test_streams_of_another_dtype_or_device_are_named():
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    args = tensors + [plen, alen]
    args[4] = args[4].double()
    with pytest.raises(ValueError, match=r"bitune_attention: q_p, k_p, v_p, q_a, k_a, v_a must share dtype and "
                                         r"device; q_p is torch.float32 on cpu, k_a torch.float64 on cpu$"):
        ops.bitune_attention(*args)
    args[4], args[5] = tensors[4].to("meta"), tensors[5].to("meta")
    with pytest.raises(ValueError, match=r"q_p is torch.float32 on cpu, k_a torch.float32 on meta, "
                                         r"v_a torch.float32 on meta$"):
        ops.bitune_attention(*args)


def test_fake_and_meta_tensors_take_the_checks_as_assertions():
    """The lengths' and mixing weights' ranges and the reference's NaN scan were read outside torch.compile
    only: under FakeTensorMode and make_fx(tracing_mode="fake") they failed with a data-dependent error, on
    meta tensors in .tolist(). There the range checks are assertions now, as under torch.compile, which a
    traced graph keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    args = [t.float() for t in tensors] + [plen, alen]
    with FakeTensorMode() as mode:
        fake = ops.bitune_attention(*(mode.from_tensor(t) for t in args))
    meta = ops.bitune_attention(*(t.to("meta") for t in args))
    assert [o.shape for o in fake] == [o.shape for o in meta] == [args[0].shape, args[3].shape]
    assert all(o.is_meta for o in meta)
    graph = make_fx(lambda *a: ops.bitune_attention(*a), tracing_mode="fake")(*args)
    assert all(torch.equal(a, b) for a, b in zip(graph(*args), ops.bitune_attention(*args)))
    with pytest.raises(RuntimeError, match=r"bitune_attention: prompt_lens must lie in \[0, Tp=19\]"):
        graph(*args[:8], torch.tensor([20, 7]), alen)


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:2])
@pytest.mark.parametrize("index, value, message", [
    (8, [20, 7], r"prompt_lens must lie in \[0, Tp=19\], got \[20, 7\]"),
    (8, [-1, 7], r"prompt_lens must lie in \[0, Tp=19\], got \[-1, 7\]"),
    (9, [24, 11], r"answer_lens must lie in \[1, Ta=23\].*got \[24, 11\]"),
    (9, [23, 0], r"answer_lens must lie in \[1, Ta=23\].*got \[23, 0\]"),
    (6, 1.5, r"alpha_k must lie in \[0, 1\], got 1.5"),
    (7, -0.1, r"alpha_v must lie in \[0, 1\], got -0.1"),
])
def test_lengths_and_mixing_weights_out_of_range_are_refused(backend, device, index, value, message):
    """The kernels would clamp lengths past the streams and mix with any α silently."""
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    args = [t.to(device) for t in tensors[:6]] + [t.float().to(device) for t in tensors[6:]]
    args += [plen.to(device), alen.to(device)]
    args[index] = torch.tensor(value, dtype=args[index].dtype, device=device)
    with ops.backend(backend), pytest.raises(ValueError, match="bitune_attention: " + message):
        ops.bitune_attention(*args)


def non_finite_paths():
    """(backend, device, load path, dtype): torch, then Triton's pointer loads in fp32 and its TMA descriptors
    (half precision only; forced in the interpreter) in fp16."""
    torch_param, triton_param = backend_devices("bitune_attention")[:2]
    return [pytest.param(*torch_param.values, "pointer", torch.float32, id=torch_param.id),
            pytest.param(*triton_param.values, "pointer", torch.float32, id=triton_param.id, marks=triton_param.marks),
            pytest.param(*triton_param.values, "tma", torch.float16, id=triton_param.id + "-tma",
                         marks=triton_param.marks)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy meeting the NaNs
@pytest.mark.parametrize("backend, device, path, dtype", non_finite_paths())
def test_non_finite_padded_positions_do_not_reach_the_outputs_or_gradients(backend, device, path, dtype,
                                                                           monkeypatch):
    """No stream sees a prompt position past prompt_lens, and padded query rows get zeros: a NaN or infinity
    there must leave the outputs and every gradient, dα_k and dα_v included, as they are with a finite value
    there. (A NaN in a padded query row gave the torch backend NaN dK, dV and dα: its scores' softmax backward
    carried 0 · NaN. On the TMA path a row with prompt_lens 0 read its position 0, as a descriptor holds at
    least one row, and a NaN there gave NaN dα_k, dα_v.)"""
    from kpro.ops.triton_kernels.attention_tiles import forced_load_path

    # gqa_mixed_lengths (row 1: prompt 7/19, answer 11/23) and a row 2 without a prompt: 0/19, answer 5/23
    monkeypatch.setitem(CASES, "non_finite", (3, 19, 23, 4, 2, 32, [19, 7, 0], [23, 11, 5]))
    tensors, douts, plen, alen = make("non_finite", dtype, "cpu")
    tensors[6], tensors[7] = torch.tensor(0.3), torch.tensor(0.8)
    bad = [t.clone() for t in tensors]  # k_p, v_p: the bidirectional stream's entries at padded positions of row 1
    bad[1][1, 1, 10, 0, 3], bad[2][1, 1, 12, 1, 5], bad[2][1, 1, 9, 0, 0] = float("nan"), float("inf"), -float("inf")
    # and queries: the padded rows of both prompt streams, and of the answer stream
    bad[0][0, 1, 8, 2, 1], bad[0][1, 1, 15, 0, 0], bad[3][1, 20, 3, 7] = float("nan"), float("inf"), float("nan")
    # row 2, position 0 (past its prompt): keys and values of both streams
    bad[1][1, 2, 0, 1, 4], bad[1][0, 2, 0, 0, 2], bad[2][0, 2, 0, 1, 6] = float("nan"), float("inf"), float("nan")
    with forced_load_path(path):
        clean = run(fused(backend), tensors, douts, (plen, alen), device, torch.float32)
        got = run(fused(backend), bad, douts, (plen, alen), device, torch.float32)
    for name, out, expected in zip(NAMES, got, clean):
        torch.testing.assert_close(out, expected, msg=name)


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:2])
def test_scale_must_be_a_finite_number_above_zero(backend, device):
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    args = [t.to(device) for t in tensors[:6]] + [t.float().to(device) for t in tensors[6:]] + [plen, alen]
    with ops.backend(backend):
        for bad in (0.0, -1.0, float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match=r"bitune_attention: scale must be a finite number > 0"):
                ops.bitune_attention(*args, scale=bad)
        with pytest.raises(ValueError, match=r"bitune_attention: scale requires grad"):
            ops.bitune_attention(*args, scale=torch.tensor(0.2, requires_grad=True))


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:3])
def test_autocast_casts_the_streams_as_attention_does(backend, device):
    """Under bf16 autocast, fp32 streams (and an fp32 query beside bf16 keys) are cast first: every backend
    returns bf16, bit-equal to the call with bf16 inputs. Before, Triton ran them in fp32 and the torch
    backend's output depended on the device's autocast rules."""
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    streams = [t.to(device) for t in tensors[:6]]
    rest = [t.float().to(device) for t in tensors[6:]] + [plen.to(device), alen.to(device)]
    with ops.backend(backend):
        want = ops.bitune_attention(*(t.bfloat16() for t in streams), *rest)
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            got = ops.bitune_attention(*streams[:4], streams[4].bfloat16(), streams[5], *rest)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[1:2])  # the op's one kernel backend: Triton
def test_opcheck_registration(backend, device, monkeypatch):
    """The custom ops' fake and real outputs agree, and their autograd registration holds up (GQA, padded
    prompts and answers, at the smallest such shape: opcheck runs the op many times in the interpreter)."""
    monkeypatch.setitem(CASES, "opcheck", (2, 5, 4, 2, 1, 16, [5, 2], [4, 1]))
    tensors, _, plen, alen = make("opcheck", torch.float32, "cpu")
    args = [t.to(device, torch.float32).requires_grad_() for t in tensors] + [plen.to(device), alen.to(device)]
    torch.library.opcheck(torch.ops.kpro.bitune_attention_forward.default, (*args, 16 ** -0.5, backend))


@pytest.mark.cuda
def test_mixing_weights_on_another_device_are_refused():
    tensors, _, plen, alen = make("gqa_mixed_lengths", torch.float32, "cpu")
    args = [t.cuda() for t in tensors[:6]] + [tensors[6].float(), tensors[7].float().cuda(), plen.cuda(), alen.cuda()]
    with pytest.raises(ValueError, match="alpha_k is on cpu"):
        ops.bitune_attention(*args)


# ---------------------------------------------------------------- eager path (autograd.Function) vs custom op

EAGER_CASES = {  # name: (B, Tp, Ta, H, Hkv, D, prompt_lens, answer_lens); a NaN in the "nan" case
    "gqa_padded": (2, 5, 7, 4, 2, 16, [5, 2], [7, 3]),
    "prompt_of_length_one": (2, 3, 5, 2, 1, 16, [0, 3], [1, 5]),
    "nan": (1, 5, 3, 2, 1, 16, [4], [3]),
}


def eager_case(name, dtype, seed=3):
    batch, tp, ta, h, hkv, d, plen, alen = EAGER_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    streams = [r(2, batch, tp, h, d), r(2, batch, tp, hkv, d), r(2, batch, tp, hkv, d), r(batch, ta, h, d),
               r(batch, ta, hkv, d), r(batch, ta, hkv, d)]
    if name == "nan":
        streams[3][0, 1, 1, 2], streams[1][1, 0, 2, 0, 5] = float("nan"), float("nan")
    return streams, [torch.tensor(0.3), torch.tensor(0.8)], (r(2, batch, tp, h, d), r(batch, ta, h, d)), \
        [torch.tensor(plen), torch.tensor(alen)]


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_prompt_cache_mix_is_the_one_the_op_reads(backend, device, dtype):
    """mixed_prompt_cache (what Bitune.generate puts in its decoding cache) is the mix of the backend the op
    selects, bit for bit: the Triton kernel's fused multiply-add x0 + α·(x1 − x0) rounds otherwise than
    mix_kv's (1 − α)·x0 + α·x1 in some entries, and the first generated token reads the op's."""
    from kpro.ops.bitune_attention import mix_kv, mixed_prompt_cache
    from test_ops_rms_norm import bits

    if dtype == torch.bfloat16 and device == "cpu" and backend != "torch" and interpreter_bf16_problem():
        pytest.skip(interpreter_bf16_problem())
    gen = torch.Generator().manual_seed(0)
    k_p, v_p = (torch.randn(2, 3, 37, 2, 64, generator=gen).mul(scale).to(device, dtype) for scale in (1, 30))
    q_a = torch.randn(3, 5, 4, 64, generator=gen).to(device, dtype)
    for alpha_k, alpha_v in ((0.3137, 0.7071), (1e-3, 0.999), (0.0, 1.0)):
        a_k, a_v = (torch.tensor(a, device=device) for a in (alpha_k, alpha_v))
        with ops.backend(backend):
            k_mix, v_mix = mixed_prompt_cache(k_p, v_p, a_k, a_v, q_a)
        if backend == "torch":
            expected = mix_kv(k_p[0], k_p[1], a_k), mix_kv(v_p[0], v_p[1], a_v)
        else:
            from kpro.ops.triton_kernels.bitune_mix import mixed_cache
            expected = mixed_cache(k_p.contiguous(), v_p.contiguous(), a_k, a_v)
        assert k_mix.dtype == dtype and torch.equal(bits(k_mix), bits(expected[0]))
        assert torch.equal(bits(v_mix), bits(expected[1]))


def test_eager_calls_skip_the_custom_op_and_tracing_takes_it(monkeypatch):
    """Eager Triton calls run the kernels through BituneAttentionFunction, without the custom op's dispatch;
    torch.compile and fake tensors get the registered custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    streams, alphas, douts, lens = eager_case("gqa_padded", torch.float32)
    leaves = [t.requires_grad_() for t in streams + alphas]
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def call(*args, check_values=True):
        with ops.backend("triton"):
            return ops.bitune_attention(*args, check_values=check_values)

    compiled = torch.compile(call, backend=record, fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled(*leaves, *lens), call(*leaves, *lens)))
    assert "kpro.bitune_attention_forward" in graphs[0].code and "BituneAttentionFunction" not in graphs[0].code

    calls, real = [], torch.ops.kpro.bitune_attention_forward
    monkeypatch.setattr(torch.ops.kpro, "bitune_attention_forward", lambda *args: calls.append(args) or real(*args))
    o_p, o_a = call(*leaves, *lens)
    torch.autograd.backward((o_p, o_a), douts)
    assert calls == [] and type(o_a.grad_fn).__name__ == "BituneAttentionFunctionBackward"
    with FakeTensorMode() as mode:
        fake = call(*(mode.from_tensor(t) for t in leaves + lens))  # its value checks become assertions
    assert len(calls) == 1 and fake[1].shape == o_a.shape


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy meeting the NaN
@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[1:2])  # the op's one kernel backend: Triton
@pytest.mark.parametrize("case, dtype", [  # each case in one dtype, the NaN in both (interpreter time: CI)
    ("gqa_padded", torch.bfloat16), ("prompt_of_length_one", torch.float32), ("nan", torch.float32),
    ("nan", torch.bfloat16)], ids=str)
def test_eager_path_is_bit_identical_to_the_custom_op(backend, device, dtype, case, monkeypatch):
    """Both outputs and all eight gradients, dα_k and dα_v included; then a loss on the answer alone (o_p's
    gradient zeros) with the mixing weights and the prompt streams frozen and a strided incoming gradient;
    and the tensors saved for the backward: bit for bit the custom op's, on odd shapes, NaN included."""
    from test_ops_rms_norm import bits

    streams, alphas, (do_p, do_a), lens = eager_case(case, dtype)
    lens = [x.to(device) for x in lens]
    strided = torch.cat((do_a, do_a), -1).to(device)[..., ::2]  # equal to do_a, not contiguous
    runs = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(sys.modules["kpro.ops.bitune_attention"], "eager_fast_path", lambda *tensors: False)
        saved, results = [], []
        for answer_only in (False, True):
            leaves = [t.to(device).clone().requires_grad_(not answer_only or 3 <= i < 6)
                      for i, t in enumerate(streams + alphas)]
            with ops.backend(backend), torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t) or t, lambda t: t):
                o_p, o_a = ops.bitune_attention(*leaves, *lens)
            assert ("BituneAttentionFunction" in type(o_a.grad_fn).__name__) == eager
            if answer_only:
                o_a.backward(strided)
            else:
                torch.autograd.backward((o_p, o_a), (do_p.to(device), do_a.to(device)))
            results += [o_p, o_a] + [t.grad for t in leaves if t.requires_grad]
            assert all((t.grad is None) != t.requires_grad for t in leaves)
        runs.append((results, saved))
    (fast, fast_saved), (op, op_saved) = runs
    assert len(fast) == len(op) == 10 + 5
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(fast, op))
    if case == "nan":
        assert fast[0].isnan().any() and not fast[0].isnan().all()  # the bidir stream and the answer see it
    assert [(t.shape, t.dtype) for t in fast_saved] == [(t.shape, t.dtype) for t in op_saved]
    assert all(torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)
               for a, b in zip(fast_saved, op_saved))


def test_double_backward_raises_on_both_paths(monkeypatch):
    """The custom op has no double backward (its backward op has no autograd formula): create_graph gives
    gradients whose own backward raises. The eager path raises too, for dα as for the streams'."""
    streams, alphas, _, lens = eager_case("gqa_padded", torch.float32)
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(sys.modules["kpro.ops.bitune_attention"], "eager_fast_path", lambda *tensors: False)
        leaves = [t.clone().requires_grad_() for t in streams + alphas]
        with ops.backend("triton"):
            o_p, o_a = ops.bitune_attention(*leaves, *lens)
        assert ("BituneAttentionFunction" in type(o_a.grad_fn).__name__) == eager
        dq_a, dalpha_k = torch.autograd.grad(o_p.sum() + o_a.sum(), (leaves[3], leaves[6]), create_graph=True)
        assert dq_a.requires_grad and dalpha_k.requires_grad
        for grad in (dq_a, dalpha_k):
            with pytest.raises(RuntimeError, match="no double backward|no autograd formula"):
                grad.sum().backward(retain_graph=True)


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[:2])
def test_padded_query_rows_past_a_whole_key_tile_are_zero(backend, device, monkeypatch):
    """A padded query row (past prompt_lens or answer_lens) is zero. Unmasked key tiles (seen whole by every valid
    row) do not exclude padded rows, so the rule is the end's: it shows only where a query tile holds valid and
    padded rows beside such a key tile, lengths past one 16-key tile, which no case had."""
    monkeypatch.setitem(CASES, "long_padded", (2, 20, 40, 2, 1, 32, [18, 20], [25, 40]))
    tensors, douts, *lens = make("long_padded", torch.float32, "cpu")
    ref = run(three_calls, [t.double() for t in tensors], douts, lens, "cpu", torch.float64)
    got = run(fused(backend), tensors, douts, lens, device, torch.float32)
    assert got[0][:, 0, 18:].abs().max() == 0 and got[1][0, 25:].abs().max() == 0  # the padded rows themselves
    for name, out, expected in zip(NAMES, got, ref):
        assert relative_error(out, expected, floor=1e-3) <= 1e-4, name


# Prompt and answer lengths around the interpreter's 16-row tiles, with padded rows ending inside and at a tile:
# the dual pass's tile plans and padded-row rules meet every tile end (a padded row beside a whole key tile went
# unchecked until lengths past one tile).
BOUNDARY_LENGTHS = [(15, 17, [15, 14], [17, 1]), (16, 16, [16, 15], [16, 15]), (17, 33, [1, 17], [33, 17]),
                    (31, 18, [16, 31], [2, 18]), (33, 32, [33, 32], [31, 32])]


@pytest.mark.parametrize("backend, device", backend_devices("bitune_attention")[1:2])  # the Triton kernels
@pytest.mark.parametrize("tp, ta, plen, alen", BOUNDARY_LENGTHS, ids=[f"{p}x{a}" for p, a, *_ in BOUNDARY_LENGTHS])
def test_lengths_around_tile_ends(backend, device, tp, ta, plen, alen, monkeypatch):
    monkeypatch.setitem(CASES, "boundary", (2, tp, ta, 2, 1, 32, plen, alen))
    tensors, douts, *lens = make("boundary", torch.float32, "cpu", seed=tp * 100 + ta)
    ref = run(three_calls, [t.double() for t in tensors], douts, lens, "cpu", torch.float64)
    got = run(fused(backend), tensors, douts, lens, device, torch.float32)
    for name, out, expected in zip(NAMES, got, ref):
        assert relative_error(out, expected, floor=1e-3) <= 1e-4, name



def test_mixing_bf16_keys_and_values_rounds_once():
    """mix_kv and the prompt cache mix half-precision K/V in fp32 and round once: (1 - α)·x0 + α·x1 computed in
    bf16 rounded (1 - α), each product and the sum, and passed every reference test's tolerance."""
    from kpro.ops.bitune_attention import mix_kv, mixed_prompt_cache

    gen = torch.Generator().manual_seed(0)
    k_p, v_p = (torch.randn(2, 1, 4, 2, 8, generator=gen).to(torch.bfloat16) for _ in range(2))
    alpha_k, alpha_v = torch.tensor(0.3), torch.tensor(0.7)

    def expected(x, a):
        return ((1 - a.double()) * x[0].double() + a.double() * x[1].double()).float().to(torch.bfloat16)

    assert torch.equal(mix_kv(k_p[0], k_p[1], alpha_k), expected(k_p, alpha_k))
    with ops.backend("torch"):
        k_mix, v_mix = mixed_prompt_cache(k_p, v_p, alpha_k, alpha_v, torch.zeros(1, 1, 2, 8, dtype=torch.bfloat16))
    assert torch.equal(k_mix, expected(k_p, alpha_k)) and torch.equal(v_mix, expected(v_p, alpha_v))
