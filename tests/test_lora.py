"""kpro.lora: the LoRA formula, named adapters chosen per call or per token segment, merge/unmerge."""
import math
import numpy as np
import pytest
import torch
from torch import nn

import kpro
from kpro import lora
from conftest import tiny_config


def layer(seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 7, bias=False).double()
    wrapped = lora.LoRALinear(base, ["a", "b"], rank=3, alpha=6.0)
    with torch.no_grad():
        for adapter in wrapped.adapters.values():
            adapter.lora_B.weight.normal_()
    return wrapped


def test_formula_per_adapter():
    lin = layer()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for name in ("a", "b"):
        A, B = lin.adapters[name].lora_A.weight, lin.adapters[name].lora_B.weight
        expected = x @ lin.weight.T + (6.0 / 3) * (x @ A.T) @ B.T
        torch.testing.assert_close(lin(x, name), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)  # no adapter asked for, none active: the base


def test_fresh_adapter_is_the_identity_and_only_adapters_train():
    base = nn.Linear(12, 7, bias=False)
    x = torch.randn(3, 12)
    expected = base(x)
    lin = lora.LoRALinear(base, ["a"], rank=4, alpha=1.0)
    assert torch.equal(lin(x, "a"), expected)
    assert not lin.weight.requires_grad and lin.a.lora_A.weight.requires_grad
    assert lin.a.lora_A.weight.abs().sum() > 0 and lin.a.lora_B.weight.abs().sum() == 0


def test_segments_apply_each_adapter_to_its_tokens():
    lin = layer()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    out = lin(x, [(0, 3, "a"), (3, 5, "b"), (5, 8, "a"), (8, 9, None)])
    torch.testing.assert_close(out[:, :3], lin(x[:, :3], "a"))
    torch.testing.assert_close(out[:, 3:5], lin(x[:, 3:5], "b"))
    torch.testing.assert_close(out[:, 5:8], lin(x[:, 5:8], "a"))
    torch.testing.assert_close(out[:, 8:], lin(x[:, 8:]))


def test_segments_that_do_not_tile_the_sequence_and_unknown_adapters_are_refused():
    lin = layer()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for segments in ([(0, 2, "a"), (3, 5, "b")], [(0, 3, "a"), (2, 5, "b")], [(0, 3, "a"), (3, 9, "b")],
                     [(1, 5, "a")], [(0, 4, "a")], [(0, 3, "a"), (3, 2, "b"), (2, 5, "a")]):
        with pytest.raises(ValueError, match=r"do not tile the sequence of 5 tokens: .* from 0 to 5"):
            lin(x, segments)
    with pytest.raises(ValueError, match=r"no adapter named 'zz' \(this layer's adapters: a, b\)"):
        lin(x, "zz")
    with pytest.raises(ValueError, match=r"no adapter named 'zz'"):
        lin(x, [(0, 2, "a"), (2, 5, "zz")])
    torch.testing.assert_close(lin(x, [(0, 0, "b"), (0, 5, "a")]), lin(x, "a"))  # an empty segment is harmless
    for segments in ((0, 5, "a"), ["a"], [(0, 5)], 3):  # "cannot unpack non-iterable int" and the like before
        with pytest.raises(ValueError, match=r"adapter must be an adapter's name, None, or a list of \(start, end, "
                                             r"adapter\) token segments; got"):
            lin(x, segments)


def test_segment_bounds_that_are_not_integers_or_an_input_without_tokens_are_named():
    """Float bounds passed the tiling check (2.0 == 2) and failed slicing with a TypeError naming no segment; a
    1-D input with segments failed with an IndexError."""
    lin = layer()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for segments in ([(0, 2.0, "a"), (2.0, 5, "b")], [(0, torch.tensor(5), "a")], [(False, 5, "a")]):
        with pytest.raises(ValueError, match=r"token segments .* need integer bounds \(Python ints\)"):
            lin(x, segments)
    torch.testing.assert_close(lin(x, [(np.int64(0), np.int64(5), "a")]), lin(x, "a"))  # NumPy ints index
    with pytest.raises(ValueError, match=r"token segments need an input with a token dimension \(\[\.\.\., tokens, "
                                         r"12\]\), got one of shape \[12\]"):
        lin(x[0, 0], [(0, 12, "a")])


def test_merge_and_unmerge():
    lin = layer()
    x = torch.randn(4, 12, dtype=torch.float64)
    with_adapter, base = lin(x, "a"), lin.weight.clone()
    lin.merge("a")
    torch.testing.assert_close(lin(x, "a"), with_adapter)  # merged: not added twice
    torch.testing.assert_close(x @ lin.weight.T, with_adapter)
    with pytest.raises(ValueError, match="merged already"):
        lin.merge("b")
    lin.unmerge()
    torch.testing.assert_close(lin.weight, base, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no adapter is merged"):
        lin.unmerge()


def test_a_merged_layer_refuses_other_adapters_instead_of_adding_twice():
    lin = layer()
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    with_a = lin(x, "a")
    lin.merge("a")
    torch.testing.assert_close(lin(x, [(0, 4, "a"), (4, 9, "a")]), with_a)  # its own segments: W already holds it
    torch.testing.assert_close(lin(x), with_a)  # nothing asked for: the merged weight
    with pytest.raises(ValueError, match="adapter 'a' is merged into the weight; unmerge.* adapter.s. b"):
        lin(x, "b")
    with pytest.raises(ValueError, match="adapter 'a' is merged"):
        lin(x, [(0, 4, "a"), (4, 9, "b")])
    with pytest.raises(ValueError, match="adapter 'c' does not exist"):
        layer().merge("c")


def test_adapters_of_a_half_precision_model_are_kept_in_fp32():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    lin = lora.LoRALinear(base, ["a"], rank=2, alpha=2.0)
    assert lin.a.lora_A.weight.dtype == lin.a.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        lin.a.lora_B.weight.normal_()
    x = torch.randn(5, 16).to(torch.bfloat16)
    out = lin(x, "a")
    assert out.dtype == torch.bfloat16
    A, B = lin.a.lora_A.weight.double(), lin.a.lora_B.weight.double()
    expected = x.double() @ base.weight.double().T + (x.double() @ A.T) @ B.T
    assert (out.double() - expected).abs().max() <= 2e-2 * expected.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x.float(), "a").dtype == torch.bfloat16


def test_add_adapters_to_a_model_and_activate():
    model = kpro.Llama(tiny_config())
    ids = torch.randint(0, 67, (2, 6))
    before = model(ids)
    wrapped = lora.add_adapters(model, ["x", "y"], rank=2, seed=0)
    assert len(wrapped) == 7 * 2 and "layers.1.mlp.down_proj" in wrapped
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in names if ".lora_" in n} and len(names) == 7 * 2 * 2 * 2
    assert "layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # base names unchanged
    with torch.no_grad():
        model.layers[0].mlp.up_proj.y.lora_B.weight.fill_(0.5)
    torch.testing.assert_close(model(ids), before)
    with lora.active(model, "x"):
        torch.testing.assert_close(model(ids), before)  # x is still fresh
    with lora.active(model, "y"):
        assert not torch.allclose(model(ids), before)
    torch.testing.assert_close(model(ids), before)  # the context restored the base
    with lora.active(model, "y"):
        with_y = model(ids)
        with lora.active(model, "x"):
            torch.testing.assert_close(model(ids), before)
        torch.testing.assert_close(model(ids), with_y)  # the inner context restored the outer adapter
    with lora.active(model, None):
        with lora.active(model, "x"):
            pass
        lora.refuse_idle_adapters(model, "evaluate")  # the outer context's base, asked for, is restored too
    with pytest.raises(ValueError, match="none is active or merged"):
        lora.refuse_idle_adapters(model, "evaluate")  # and, outside every context, not asked for
    with pytest.raises(ValueError, match="adapter 'z' does not exist"):
        with lora.active(model, "z"):
            pass


def test_bad_arguments():
    for rank in (0, True, 2.0):
        with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
            lora.LoRALinear(nn.Linear(4, 4, bias=False), ["a"], rank=rank, alpha=1.0)
    for alpha in (float("nan"), float("inf"), "8", True):
        with pytest.raises(ValueError, match="LoRA alpha must be a finite number"):
            lora.LoRALinear(nn.Linear(4, 4, bias=False), ["a"], rank=2, alpha=alpha)
    with pytest.raises(ValueError, match="bias-free"):
        lora.LoRALinear(nn.Linear(4, 4), ["a"], rank=2, alpha=1.0)
    # NumPy numbers are numbers ("LoRA rank must be a positive integer, got np.int64(2)" before)
    layer = lora.LoRALinear(nn.Linear(4, 4, bias=False), ["a"], rank=np.int64(2), alpha=np.float32(8))
    assert (layer.rank, layer.alpha, layer.scale) == (2, 8.0, 4.0) and type(layer.rank) is int
    assert type(layer.alpha) is float
    for rank in (np.int64(0), np.float64(2)):
        with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
            lora.LoRALinear(nn.Linear(4, 4, bias=False), ["a"], rank=rank, alpha=1.0)
    for alpha in (np.float32("nan"), np.int64(0), np.bool_(True)):
        with pytest.raises(ValueError, match="LoRA alpha must be a finite number"):
            lora.LoRALinear(nn.Linear(4, 4, bias=False), ["a"], rank=2, alpha=alpha)
    with pytest.raises(ValueError, match="taken"):
        lora.LoRALinear(nn.Linear(4, 4, bias=False), ["weight"], rank=2, alpha=1.0)
    with pytest.raises(ValueError, match="no linear layer"):
        lora.add_adapters(kpro.Llama(tiny_config()), ["a"], targets=("nope",))


def test_adding_adapters_to_an_adapted_model_names_the_ones_it_has():
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, ["x", "y"], rank=2)
    with pytest.raises(ValueError, match=r"the model has LoRA adapters already \(x, y\).*load the model again"):
        lora.add_adapters(model, ["z"])


def test_active_refuses_an_adapter_some_layers_lack_without_switching_any():
    """The layers were switched one by one while checking: a name the later layers lack left the earlier
    ones running it in every plain forward after the error."""
    model = kpro.Llama(tiny_config())
    ids = torch.randint(0, 67, (2, 6))
    lora.add_adapters(model, ["x"], rank=2, seed=0)
    before = model(ids)
    first = model.layers[0].self_attn.q_proj
    first.add_adapter("z")
    with torch.no_grad():
        first.z.lora_B.weight.fill_(0.5)
    with pytest.raises(ValueError, match=r"adapter 'z' does not exist in 13 of the 14 LoRA layers \(first: "
                                         r"layers.0.self_attn.k_proj, whose adapters are \['x'\]\)"):
        with lora.active(model, "z"):
            pass
    assert [layer.active for layer in lora.lora_layers(model)] == [None] * 14
    torch.testing.assert_close(model(ids), before)


def test_unmerge_restores_the_base_weight_after_the_adapter_changed_and_a_merged_adapter_is_frozen():
    """unmerge() recomputed the delta from the adapter's current values: an adapter loaded or trained while
    merged left the base weight off by the difference. A merged adapter got no gradient, silently."""
    lin = layer()
    x = torch.randn(4, 12, dtype=torch.float64)
    base = lin.weight.clone()
    lin.merge("a")
    assert not lin.a.lora_A.weight.requires_grad and not lin.a.lora_B.weight.requires_grad
    assert lin.b.lora_B.weight.requires_grad  # the other adapter is untouched
    with_a = lin(x)
    with torch.no_grad():
        lin.a.lora_B.weight.add_(1.0)  # e.g. adapters loaded into the merged model
    with pytest.raises(ValueError, match="adapter 'a' was changed after it was merged into the weight.*merge.. it again"):
        lin(x)
    lin.unmerge()
    torch.testing.assert_close(lin.weight, base, rtol=0, atol=1e-12)
    assert lin.a.lora_A.weight.requires_grad and lin.a.lora_B.weight.requires_grad
    lin.merge("a")  # merged again: the new values
    assert not torch.allclose(lin(x), with_a)
    A, B = lin.a.lora_A.weight, lin.a.lora_B.weight
    torch.testing.assert_close(lin(x), x @ base.T + 2.0 * (x @ A.T) @ B.T)
    lin.unmerge()
    torch.testing.assert_close(lin.weight, base, rtol=0, atol=1e-12)


def test_add_adapters_refuses_a_string_for_names_or_targets():
    """A string is a sequence of its letters: add_adapters(model, "lora") made adapters l, o, r and a."""
    model = kpro.Llama(tiny_config())
    with pytest.raises(TypeError, match=r"add_adapters takes a list of names, got the string 'lora': pass \['lora'\]"):
        lora.add_adapters(model, "lora")
    with pytest.raises(TypeError, match=r"list of targets, got the string 'q_proj'"):
        lora.add_adapters(model, ["a"], targets="q_proj")
    assert not lora.lora_layers(model)


def test_a_seed_out_of_the_generators_range_is_named_before_any_layer_is_wrapped():
    """seed=2**64 failed with "Overflow when unpacking long long"; seed=-1 was taken silently (drawing what
    2**64 - 1 draws), where the CLI and Batches refuse it."""
    model = kpro.Llama(tiny_config())
    for seed in (-1, 2 ** 63, 2 ** 64, 2.0, True):
        with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*63 - 1 \(or None: the global "
                                             r"RNG\), got"):
            lora.add_adapters(model, ["a"], seed=seed)
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    lora.add_adapters(model, ["a"], seed=np.int64(2 ** 63 - 1))


def test_targets_that_match_nothing_are_named_and_the_model_is_left_as_it_was():
    """A misspelt target ("v_prj") or one outside model.layers ("lm_head") beside a good one was dropped
    without a word: those layers got no adapter and never trained."""
    model = kpro.Llama(tiny_config())
    with pytest.raises(ValueError, match=r"targets \['v_prj', 'lm_head'\] match no linear layer under model.layers "
                                         r"\(matched: \['q_proj'\]\)"):
        lora.add_adapters(model, ["a"], targets=["q_proj", "v_prj", "lm_head"])
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_active_names_a_model_without_lora_layers():
    """An adapter asked of a plain model ran the base model silently."""
    model = kpro.Llama(tiny_config())
    with pytest.raises(ValueError, match="adapter 'a' asked for, but the model has no LoRA layers"):
        with lora.active(model, "a"):
            pass
    with lora.active(model, None):  # the base model, as asked
        model(torch.randint(0, 67, (1, 4)))


@pytest.mark.parametrize("names", [["bad-name"], ["a", "a"], [1], ["a", None]])
def test_refused_adapter_names_leave_the_model_as_it_was(names):
    """A refused name froze the first layer's weight on its way out, and [1] was an AttributeError."""
    model = kpro.Llama(tiny_config())
    with pytest.raises(ValueError, match="adapter names must be distinct Python identifiers"):
        lora.add_adapters(model, names)
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    base = nn.Linear(4, 3, bias=False)
    with pytest.raises(ValueError, match="is taken or not an identifier"):
        lora.LoRALinear(base, names, rank=2, alpha=1.0)
    assert base.weight.requires_grad


def test_add_adapters_takes_names_from_a_generator_once():
    """Each layer iterated `names` again: a generator gave its adapters to the first layer only."""
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, (name for name in ("a", "b")))
    assert all(list(layer.adapters) == ["a", "b"] for layer in lora.lora_layers(model))


@pytest.mark.parametrize("name", ["active", "merged", "weight", "forward"])
def test_an_adapter_name_that_is_an_attribute_of_the_layer_is_refused(name):
    """An adapter named "active" was registered, then replaced by None: nothing trained."""
    model = kpro.Llama(tiny_config())
    with pytest.raises(ValueError, match=f"adapter name '{name}' is taken or not an identifier"):
        lora.add_adapters(model, [name])
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_merge_under_autocast_is_undone_by_unmerge_outside_it():
    """merge() computed its delta under autocast in bf16 and unmerge() outside it in fp32: the fp32 base came
    back off by about 3e-3 in every entry."""
    torch.manual_seed(0)
    lin = lora.LoRALinear(nn.Linear(24, 16, bias=False), ["a"], rank=4, alpha=8.0)
    with torch.no_grad():
        lin.a.lora_B.weight.normal_(std=0.5)
    base = lin.weight.detach().clone()
    delta = (lin.a.lora_B.weight.double() @ lin.a.lora_A.weight.double()) * lin.scale
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin.merge("a")
    assert ((lin.weight.double() - base.double()) - delta).abs().max() < 1e-6 * delta.abs().max()
    lin.unmerge()
    assert (lin.weight - base).abs().max() < 1e-6 * base.abs().max()


def test_a_bf16_weight_is_merged_with_one_rounding():
    torch.manual_seed(0)
    lin = lora.LoRALinear(nn.Linear(64, 48, bias=False).to(torch.bfloat16), ["a"], rank=4, alpha=8.0)
    with torch.no_grad():
        lin.a.lora_B.weight.normal_(std=0.1)
    base = lin.weight.detach().clone()
    delta = (lin.a.lora_B.weight @ lin.a.lora_A.weight) * lin.scale  # fp32 adapters
    lin.merge("a")
    assert torch.equal(lin.weight, (base.float() + delta).to(torch.bfloat16))  # not base + delta rounded first
    lin.unmerge()
    assert torch.equal(lin.weight, ((base.float() + delta).to(torch.bfloat16).float() - delta).to(torch.bfloat16))


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_adapters_stay_fp32_and_unrounded_when_the_model_is_cast_after_they_were_added(cast):
    """model.to(torch.bfloat16) after add_adapters turned the fp32 adapters into bf16 ones, where AdamW's small
    updates round away (the docs promise fp32 adapters for a half-precision model)."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, ["a"], rank=2, seed=0)
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for p in params.values():
            p.normal_()
            p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in params.items()}
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model.to(dtype) if cast == "to" else getattr(model, cast)()
    assert model.embed_tokens.weight.dtype == dtype
    after = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for name, (value, grad) in before.items():
        assert after[name].dtype == after[name].grad.dtype == torch.float32, name
        assert torch.equal(after[name], value) and torch.equal(after[name].grad, grad), name  # not rounded on the way
    model.double()  # wider than fp32: the adapters follow
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_a_parametrized_adapter_factor_stays_fp32_when_the_model_is_cast():
    """dtype_kept set .data on lora_A.weight, which under torch.nn.utils.parametrize is a computed tensor: the
    parameter behind it (parametrizations.weight.original) went to fp16 with the model, lora_B stayed fp32, and
    the next forward with the adapter failed on the mixed dtypes. The original is kept now, unrounded."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, ["a"], rank=2, seed=0)
    layer = model.layers[0].self_attn.q_proj
    torch.nn.utils.parametrize.register_parametrization(layer.a.lora_A, "weight", Scale())
    original = layer.a.lora_A.parametrizations.weight.original
    with torch.no_grad():
        original.normal_()
        layer.a.lora_B.weight.normal_()
    original.grad = torch.randn_like(original)
    before = original.detach().clone(), original.grad.clone()
    model.half()
    original = layer.a.lora_A.parametrizations.weight.original
    assert original.dtype == original.grad.dtype == layer.a.lora_B.weight.dtype == torch.float32
    assert torch.equal(original, before[0]) and torch.equal(original.grad, before[1])  # not rounded on the way
    with lora.active(model, "a"):
        assert model(torch.tensor([[3, 4, 5]])).dtype == torch.float16


def test_a_copy_of_a_merged_model_runs_and_refuses_as_the_original():
    """copy.deepcopy of a merged layer refused to run ("changed after it was merged"): the copy's version
    counters start afresh."""
    import copy
    import io
    lin = layer()
    x = torch.randn(3, 12, dtype=torch.float64)
    lin.merge("a")
    expected = lin(x)
    buffer = io.BytesIO()
    torch.save(lin, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(lin), torch.load(buffer, weights_only=False)):
        assert torch.equal(twin(x), expected)
        twin.unmerge()
        torch.testing.assert_close(twin.weight, layer().weight, rtol=0, atol=1e-12)
    with torch.no_grad():
        lin.a.lora_A.weight.add_(1.0)  # changed while merged: the original refuses, and so does its copy
    for refusing in (lin, copy.deepcopy(lin)):
        with pytest.raises(ValueError, match="adapter 'a' was changed after it was merged"):
            refusing(x)
    lin.to(torch.float64)  # a conversion is not a change, and not a way around the refusal
    with pytest.raises(ValueError, match="adapter 'a' was changed after it was merged"):
        lin(x)
    fresh = layer()
    fresh.merge("a")
    fresh.to(torch.float32)
    fresh(x.float())


@pytest.mark.parametrize("assign", [False, True])
def test_a_merged_state_dict_loads_into_a_model_merged_the_same_way(assign):
    """The docs' reload (a fresh model, adapters added and merged, then the merged model's state_dict) made the
    next forward refuse ("changed after it was merged ... unmerge() and merge() it again"), and following that
    advice counted the update twice: W+2Δ. The load now records the merge from the loaded adapter."""
    torch.manual_seed(0)
    source = kpro.Llama(tiny_config()).double()
    lora.add_adapters(source, ["a"], rank=2, alpha=4.0, seed=0)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    ids = torch.randint(0, 67, (2, 6))
    with lora.active(source, None):
        base = source(ids)
    with lora.active(source, "a"):
        adapted = source(ids)
    for lin in lora.lora_layers(source):
        lin.merge("a")
    state = source.state_dict()
    target = kpro.Llama(tiny_config()).double()  # other base weights and adapters: all are loaded
    lora.add_adapters(target, ["a"], rank=2, alpha=4.0, seed=1)
    for lin in lora.lora_layers(target):
        lin.merge("a")
    target.load_state_dict(state, assign=assign)
    torch.testing.assert_close(target(ids), adapted)
    assert not any(p.requires_grad for lin in lora.lora_layers(target) for p in lin.a.parameters())  # still merged
    for lin in lora.lora_layers(target):
        lin.unmerge()
    with lora.active(target, None):
        torch.testing.assert_close(target(ids), base)  # the loaded base, not W - Δ_fresh
    with lora.active(target, "a"):
        torch.testing.assert_close(target(ids), adapted)


def test_a_merged_weight_changed_in_place_is_refused_without_advising_a_double_count():
    """Only the adapter's changes were watched: a merged weight changed in place (loaded alone, or stepped) ran,
    and unmerge() subtracted the old update from it. Now the forward and unmerge() refuse, and the message does
    not send to unmerge() and merge() (which would count an update twice); loading the weight with its adapter
    records the merge anew."""
    import copy
    lin = layer()
    x = torch.randn(3, 12, dtype=torch.float64)
    lin.merge("a")
    merged = {name: t.clone() for name, t in lin.state_dict().items()}
    expected = lin(x)
    with torch.no_grad():
        lin.weight.add_(1.0)
    for call in (lambda: lin(x), lin.unmerge, lambda: copy.deepcopy(lin)(x)):  # a copy refuses as the original
        with pytest.raises(ValueError, match=r"the weight, with adapter 'a' merged into it, was changed in place") as e:
            call()
        assert "merge() it again" not in str(e.value)
    lin.load_state_dict({"weight": merged["weight"], "merged_adapter": merged["merged_adapter"]},
                        strict=False)  # a merged weight alone: which update it holds is unknown
    with pytest.raises(ValueError, match="the weight, with adapter 'a' merged into it, was changed in place"):
        lin(x)
    lin.load_state_dict(merged)  # with its adapter: the merge is recorded from the loaded values
    torch.testing.assert_close(lin(x), expected)
    lin.unmerge()
    torch.testing.assert_close(lin.weight, layer().weight, rtol=0, atol=1e-12)
    lin.merge("a")
    with torch.no_grad():
        lin.a.lora_B.weight.add_(1.0)  # the adapter alone changed: the weight holds the old update, as recorded
    with pytest.raises(ValueError, match="adapter 'a' was changed after it was merged.*unmerge.. and merge.. it again"):
        lin(x)
    lin.unmerge()
    torch.testing.assert_close(lin.weight, layer().weight, rtol=0, atol=1e-12)


def test_the_base_asked_of_a_merged_model_is_refused_not_run_with_the_adapter():
    """With an adapter merged, `lora.active(model, None)` (the base model only) and a (start, end, None) segment
    ran with the merged adapter; another adapter was refused, the base was not."""
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, ["a"], rank=2, seed=0)
    for lin in lora.lora_layers(model):
        lin.merge("a")
    ids = torch.randint(0, 67, (2, 6))
    with pytest.raises(ValueError, match=r"adapter 'a' is merged into the weight; unmerge\(\) it before running the "
                                         r"base model \(lora.active\(model, None\), or a segment's adapter None\)"):
        with lora.active(model, None):
            model(ids)
    model(ids)  # a plain forward, nothing asked for: the merged model
    lin = layer()
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    lin.merge("a")
    with pytest.raises(ValueError, match=r"unmerge\(\) it before running the base model"):
        lin(x, [(0, 4, "a"), (4, 9, None)])
    with pytest.raises(ValueError, match=r"before running adapter\(s\) b and the base model"):
        lin(x, [(0, 4, None), (4, 9, "b")])
    lin.unmerge()
    lin(x, [(0, 4, "a"), (4, 9, None)])


def test_a_target_layer_with_a_bias_is_named_before_any_layer_is_wrapped():
    """The bias was met inside the wrapping loop: the layers before it were wrapped and frozen already, the error
    named no layer, and a retry was refused as "has LoRA adapters already"."""
    class Block(nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=bias)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(False), Block(True)])

    model = Model()
    with pytest.raises(ValueError, match=r"1 target linear layer\(s\) have a bias \(first: layers.1.v_proj\); LoRA "
                                         r"wraps bias-free ones only"):
        lora.add_adapters(model, ["a"], rank=2, targets=["q_proj", "v_proj"])
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    assert lora.add_adapters(model, ["a"], rank=2, targets=["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]


class Scale(nn.Module):
    def forward(self, w):
        return w * 1.0


def test_a_parametrized_target_layer_is_named_before_any_layer_is_wrapped():
    """A parametrized weight (torch.nn.utils.parametrize) was met inside the wrapping loop: LoRALinear took the
    computed tensor and failed to freeze it with torch's "leaf variables" error, naming no layer; the layers
    before were wrapped already, nothing frozen, and a retry was refused as "has LoRA adapters already"."""
    model = kpro.Llama(tiny_config())
    layer = model.layers[1].self_attn.q_proj
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Scale())
    with pytest.raises(ValueError, match=r"1 target linear layer\(s\) have a parametrized weight \(first: "
                                         r"layers.1.self_attn.q_proj\).*remove_parametrizations"):
        lora.add_adapters(model, ["a"], rank=2, targets=["q_proj"])
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="LoRALinear wraps plain weights, and this layer's is parametrized"):
        lora.LoRALinear(layer, ["a"], rank=2, alpha=1.0)
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    assert len(lora.add_adapters(model, ["a"], rank=2, targets=["q_proj"])) == 2


def test_a_failure_while_wrapping_leaves_the_model_as_it_was(monkeypatch):
    """Any other error in the wrapping loop (here the second layer's) puts back the layers wrapped before it,
    themselves, with their requires_grad flags, so that a retry can adapt the model."""
    model = kpro.Llama(tiny_config())
    originals = [block.self_attn.q_proj for block in model.layers]
    model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    real, made = lora.Adapter, []

    def fail_second(*args, **kwargs):  # the second layer's adapter
        if made:
            raise MemoryError("out of memory")
        made.append(real(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(lora, "Adapter", fail_second)
    with pytest.raises(MemoryError):
        lora.add_adapters(model, ["a"], rank=2, targets=["q_proj"])
    monkeypatch.undo()
    assert [block.self_attn.q_proj for block in model.layers] == originals and not lora.lora_layers(model)
    assert [name for name, p in model.named_parameters() if not p.requires_grad] == ["layers.0.self_attn.q_proj.weight"]
    assert len(lora.add_adapters(model, ["a"], rank=2, targets=["q_proj"])) == 2


def adapted_model(names=("a",), seed=0, alpha=4.0):
    """A float64 tiny model (drawn after torch.manual_seed(seed)) with rank-2 adapters `names` at `alpha`, each
    changing it (B not zero)."""
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config()).double()
    lora.add_adapters(model, list(names), rank=2, alpha=alpha, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    return model


def merged_into(model, name):
    for lin in lora.lora_layers(model):
        lin.merge(name)
    return model


@pytest.mark.parametrize("strict", [True, False])
def test_an_unmerged_state_dict_is_refused_by_a_merged_model_not_run_as_its_base(strict):
    """A state_dict carried no mark of the merge: an unmerged model's, loaded into a merged model, was taken as a
    merged one, and the model then silently ran its base."""
    source = adapted_model()
    ids = torch.randint(0, 67, (2, 6))
    with lora.active(source, "a"):
        adapted = source(ids)
    target = merged_into(adapted_model(seed=1), "a")
    with pytest.raises(RuntimeError, match=r"LoRA layer layers.0.self_attn.q_proj: the state_dict holds its weight "
                                           r"without a merge mark.*adapter 'a' is merged into this layer.*unmerge\(\)"):
        target.load_state_dict(source.state_dict(), strict=strict)
    with pytest.raises(ValueError, match="changed"):
        target(ids)  # what the refused load copied (the adapters) does not run either
    target = merged_into(adapted_model(seed=1), "a")
    for lin in lora.lora_layers(target):  # the way out the message gives
        lin.unmerge()
    target.load_state_dict(source.state_dict(), strict=strict)
    with lora.active(target, "a"):
        torch.testing.assert_close(target(ids), adapted)


@pytest.mark.parametrize("assign", [False, True])
def test_a_merged_state_dict_loaded_into_an_unmerged_model_is_taken_as_merged_not_counted_twice(assign):
    """Loaded into a fresh model with adapters (none merged), a merged model's state_dict gave the weight W+Δ
    beside the adapter: running the adapter added its update twice, silently. The merge mark makes the layer
    merged with the loaded adapter."""
    source = adapted_model()
    ids = torch.randint(0, 67, (2, 6))
    with lora.active(source, None):
        base = source(ids)
    with lora.active(source, "a"):
        adapted = source(ids)
    state = merged_into(source, "a").state_dict()
    target = adapted_model(seed=1)
    target.load_state_dict(state, assign=assign)
    assert [lin.merged for lin in lora.lora_layers(target)] == ["a"] * 14
    torch.testing.assert_close(target(ids), adapted)
    with lora.active(target, "a"):
        torch.testing.assert_close(target(ids), adapted)  # not W+2Δ
    assert not any(p.requires_grad for lin in lora.lora_layers(target) for p in lin.a.parameters())  # as merged
    assert target.state_dict().keys() == state.keys()
    for lin in lora.lora_layers(target):
        lin.unmerge()
    assert all(p.requires_grad for lin in lora.lora_layers(target) for p in lin.a.parameters())
    with lora.active(target, None):
        torch.testing.assert_close(target(ids), base)
    with lora.active(target, "a"):
        torch.testing.assert_close(target(ids), adapted)


def test_a_state_dict_without_the_merge_mark_loads_as_unmerged_and_is_refused_by_a_merged_model():
    """A state_dict without the mark (an older kpro's, or written by hand) is an unmerged one: it loads as
    before (strict, no missing key) into an unmerged model and is refused by a merged one, which took it as
    merged."""
    source = merged_into(adapted_model(), "a")
    ids = torch.randint(0, 67, (2, 6))
    unmarked = {k: v for k, v in source.state_dict().items() if not k.endswith(".merged_adapter")}
    target = merged_into(adapted_model(seed=1), "a")
    with pytest.raises(RuntimeError, match=r"LoRA layer layers.0.self_attn.q_proj: the state_dict holds its weight "
                                           r"without a merge mark"):
        target.load_state_dict(unmarked)
    plain = adapted_model(seed=1)
    plain.load_state_dict(unmarked, strict=True)
    assert all(lin.merged is None for lin in lora.lora_layers(plain))
    torch.testing.assert_close(plain(ids), source(ids))  # the weights as loaded, the base W+Δ run as it is


def test_a_state_dict_merged_with_another_adapter_is_refused_naming_both():
    """The merged adapter's name was not in the state_dict: one merged with 'b' loaded into a layer merged with
    'a' was recorded as W+Δ_a, silently."""
    state = merged_into(adapted_model(["a", "b"]), "b").state_dict()
    target = merged_into(adapted_model(["a", "b"], seed=1), "a")
    with pytest.raises(RuntimeError, match=r"LoRA layer layers.0.self_attn.q_proj: the state_dict has adapter 'b' "
                                           r"merged into the weight, this layer adapter 'a'"):
        target.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"LoRA layer layers.0.self_attn.q_proj: the state_dict has adapter 'b' "
                                           r"merged into the weight, and this layer has no adapter 'b' \(its "
                                           r"adapters: a\)"):
        adapted_model(["a"], seed=1).load_state_dict(state, strict=False)


def test_a_merge_mark_without_its_weight_and_adapter_or_holding_no_name_is_refused():
    state = merged_into(adapted_model(), "a").state_dict()
    lin = adapted_model(seed=1).layers[1].mlp.down_proj
    mine = {k.removeprefix("layers.1.mlp.down_proj."): v for k, v in state.items()
            if k.startswith("layers.1.mlp.down_proj.")}
    with pytest.raises(RuntimeError, match=r"the LoRA layer: the state_dict has adapter 'a' merged into the weight "
                                           r"but lacks a.lora_A.weight, a.lora_B.weight"):
        lin.load_state_dict({"weight": mine["weight"], "merged_adapter": mine["merged_adapter"]}, strict=False)
    with pytest.raises(RuntimeError, match=r"merged_adapter is not a merge mark .*got a torch.float32 tensor of "
                                           r"shape \[1\]"):
        lin.load_state_dict({**mine, "merged_adapter": torch.ones(1)})
    assert lin.merged is None
    lin.load_state_dict(mine)
    assert lin.merged == "a"


def test_the_merge_mark_is_in_a_merged_layers_state_dict_only():
    """Unmerged, a LoRA model's state_dict keys are as before the mark; merged, each layer adds the adapter's name
    (uint8 UTF-8 bytes), which the base fingerprint and a state_dict's copy take as they take a buffer."""
    from kpro import adapters
    model = adapted_model(["a", "bb"])
    keys = list(model.state_dict())
    assert not any("merged" in k for k in keys)
    lin = model.layers[0].self_attn.q_proj
    lin.merge("bb")
    assert lin.state_dict()["merged_adapter"].tolist() == list(b"bb")
    assert lin.state_dict()["merged_scale"].tolist() == list(b"2.0")
    assert [k for k in model.state_dict() if k not in keys] == ["layers.0.self_attn.q_proj.merged_adapter",
                                                                "layers.0.self_attn.q_proj.merged_scale"]
    assert not any("merged" in k for k in adapters._base_tensors(model))  # the base fingerprint's tensors
    lin.unmerge()
    assert list(model.state_dict()) == keys
    merged_into(model, "a")
    copied = {k: v.detach().clone() for k, v in model.state_dict().items()}  # as internalize keeps the best weights
    model.load_state_dict(copied)
    model(torch.randint(0, 67, (1, 4)))
    for taken in ("merged_adapter", "merged_scale"):
        with pytest.raises(ValueError, match=f"adapter name '{taken}' is taken"):
            lin.add_adapter(taken)


def adapted_at(alpha, seed=0, merge=True):
    """adapted_model's model at `alpha`, adapter "a" merged or not."""
    model = adapted_model(seed=seed, alpha=alpha)
    return merged_into(model, "a") if merge else model


@pytest.mark.parametrize("merged", [True, False])
def test_a_merged_state_dict_is_refused_by_adapters_of_another_scale(merged):
    """The mark held the adapter's name alone: a model built with another alpha loaded a merged state_dict without
    complaint and its unmerge() subtracted its own scale's update, giving another base (0.127 off at alpha 2 for
    8). Refused now, naming both scales, whether the loading layer is merged or not; at the same scale unmerge()
    gives the saved base; a mark written before the scale was recorded (none beside it) still loads."""
    torch.manual_seed(0)
    base = kpro.Llama(tiny_config()).double().state_dict()  # adapted_at(..., seed=0)'s base weights
    saved = adapted_at(8.0).state_dict()  # scale 4
    with pytest.raises(RuntimeError, match=r"LoRA layer layers\.0\.self_attn\.q_proj: the state_dict has adapter 'a' "
                                           r"merged into the weight at scale 4 \(alpha / rank\), this layer's scale "
                                           r"is 1 \(alpha 2, rank 2\)"):
        adapted_at(2.0, seed=1, merge=merged).load_state_dict(saved)
    same = adapted_at(8.0, seed=1, merge=merged)
    same.load_state_dict(saved)
    for layer in lora.lora_layers(same):
        layer.unmerge()
    got = same.state_dict()
    assert max((got[k] - base[k]).abs().max().item() for k in base) < 1e-12
    unrecorded = adapted_at(8.0, seed=1, merge=merged)
    unrecorded.load_state_dict({k: v for k, v in saved.items() if not k.endswith(".merged_scale")})
    assert all(layer.merged == "a" and layer.merged_scale.tolist() == list(b"4.0")
               for layer in lora.lora_layers(unrecorded))
    # a cast of the model, there and back, leaves the scale exact (as a float tensor, 1/3 became 0.33398 in bf16)
    third = adapted_at(2 / 3).to(torch.bfloat16).float()
    assert lora.lora_layers(third)[0].merged_scale.tolist() == list(repr(1 / 3).encode())
    for dtype in (torch.bfloat16, torch.float32):
        adapted_at(2 / 3, seed=1, merge=merged).to(dtype).load_state_dict(third.state_dict())
    with pytest.raises(RuntimeError, match=r"merged_scale is not a merge scale .*got a torch.float64 tensor"):
        adapted_at(8.0, seed=1, merge=merged).load_state_dict({**saved, "layers.0.self_attn.q_proj.merged_scale":
                                                               torch.tensor(4.0, dtype=torch.float64)})


def test_a_model_merged_under_inference_mode_takes_a_merged_state_dict_outside_it():
    """merge() inside torch.inference_mode() made the merge mark an inference tensor: a later load_state_dict
    outside inference mode failed copying into it ("Inplace update to inference tensor outside InferenceMode")."""
    model = adapted_model()
    ids = torch.randint(0, 67, (2, 6))
    with torch.inference_mode():
        merged_into(model, "a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    merged = model(ids)
    for lin in lora.lora_layers(model):
        lin.unmerge()
    with lora.active(model, "a"):
        torch.testing.assert_close(model(ids), merged)


def test_lora_a_is_drawn_within_the_kaiming_bound_of_its_input_size():
    """Only A != 0 and B == 0 were checked: an A drawn 16 times too small (bound 1/in instead of 1/sqrt(in))
    trains silently slower. nn.Linear and PEFT draw it with kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(in)."""
    torch.manual_seed(0)
    lin = lora.LoRALinear(nn.Linear(256, 32, bias=False), ["a"], rank=8, alpha=16)
    largest = lin.a.lora_A.weight.abs().max().item()
    assert 0.9 / math.sqrt(256) < largest <= 1 / math.sqrt(256)  # 2,048 draws: below 0.9 of the bound ~1e-90


# Mutation round 11: LO1 (lora.py:352 unmerge sets requires_grad True, not the flag saved at merge)
def test_unmerge_gives_a_frozen_factor_back_frozen():
    layer = lora.LoRALinear(nn.Linear(8, 6, bias=False), ["a"], rank=2, alpha=1.0)
    a, b = layer.adapters["a"].lora_A.weight, layer.adapters["a"].lora_B.weight
    a.requires_grad_(False)
    layer.merge("a")
    assert not a.requires_grad and not b.requires_grad
    layer.unmerge()
    assert (a.requires_grad, b.requires_grad) == (False, True)


# Mutation round 11: LO2 (lora.py:309 the merge record not re-watched after a conversion)
def test_a_merged_layer_converted_by_swapping_its_parameters_runs_and_unmerges_to_its_base():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # as FSDP2 and `torch.__future__` users convert
    try:
        torch.manual_seed(0)
        layer = lora.LoRALinear(nn.Linear(8, 6, bias=False), ["a"], rank=2, alpha=1.0)
        nn.init.normal_(layer.adapters["a"].lora_B.weight)
        base = layer.weight.detach().clone()
        x = torch.randn(3, 8, dtype=torch.float64)
        layer.merge("a")
        layer.to(torch.float64)
        merged = layer(x)  # a conversion is no change to the merged values
        layer.unmerge()
        torch.testing.assert_close(layer.weight, base.double())
        torch.testing.assert_close(merged, layer(x, "a"))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
