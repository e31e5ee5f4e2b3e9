"""Cached decoding against re-running the whole sequence; batching; sampling; stopping."""
import numpy as np
import pytest
import torch

import kpro
from kpro.generation import check_decoding, generate, select_next_token
from conftest import tiny_config
from test_internalize_evaluation import ScriptedModel


def uncached_greedy(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_greedy_equals_recomputing_everything(make_model, dtype):
    # Equal here since no two best logits are within rounding of each other (see the test below)
    model = make_model(seed=7, dtype=dtype)
    ids = torch.randint(3, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = uncached_greedy(model, ids, 20)
    assert torch.equal(kpro.generate(model, ids, 20, eos_token_id=[]), expected)


def test_fp32_cached_logits_equal_the_full_forwards_up_to_rounding(make_model):
    """docs/model.md said fp32 cached decoding gives exactly the tokens of re-running the full sequence; the two
    paths round differently (here about 1e-6 of the largest logit apart, not bitwise equal), so two best logits
    closer than that may be ordered differently. The documented bound, with some margin."""
    model = make_model(seed=7, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = kpro.generate(model, ids, 20, eos_token_id=[])
        full = model(out)
        cache = kpro.KVCache(model.config, 3, out.shape[1], torch.float32)
        cached = torch.cat([model(out[:, :6], cache=cache)] +
                           [model(out[:, t:t + 1], cache=cache) for t in range(6, out.shape[1])], dim=1)
    assert (full - cached).abs().max() <= 4e-6 * full.abs().max()


def test_batched_prompts_of_different_lengths_equal_one_by_one(make_model):
    model = make_model(seed=8)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 1, 9, 3)]
    ids, mask = kpro.pad_left(prompts, pad_id=0)
    batched = kpro.generate(model, ids, 12, attention_mask=mask, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = kpro.generate(model, torch.tensor([prompt]), 12, eos_token_id=[])
        assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()
        assert batched[row, :ids.shape[1]].tolist() == ids[row].tolist()


def test_rows_stop_at_eos_and_are_padded(make_model):
    model = make_model(seed=9)
    ids = torch.randint(3, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    free = kpro.generate(model, ids, 10, eos_token_id=[])
    stop = int(free[0, 4 + 2])  # make row 0's third new token the eos
    assert stop not in free[0, 4:6].tolist()
    out = kpro.generate(model, ids, 10, eos_token_id=stop, pad_token_id=0)
    assert out[0, 4:7].tolist() == free[0, 4:7].tolist()
    assert (out[0, 7:] == 0).all()
    if stop not in free[1, 4:].tolist():
        assert out[1].tolist() == free[1].tolist()
    single = kpro.generate(model, ids[:1], 10, eos_token_id=stop)
    assert single.shape[1] == 4 + 3  # decoding ends once every row stopped
    pad = 5 if stop != 5 else 6  # no pad_token_id given: the config's, before the eos
    configured = kpro.generate(make_model(seed=9, pad_token_id=pad), ids, 10, eos_token_id=stop)
    assert configured[0, :7].tolist() == out[0, :7].tolist() and (configured[0, 7:] == pad).all()


def test_stop_after_the_second_eos(make_model):
    model = make_model(seed=9)
    ids = torch.randint(3, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    free = kpro.generate(model, ids, 12, eos_token_id=[])[0, 4:].tolist()
    token = max(set(free), key=free.count)  # a token the model emits at least twice, used as "eos"
    positions = [i for i, t in enumerate(free) if t == token]
    if len(positions) < 2:
        pytest.skip("greedy continuation repeats no token")
    out = kpro.generate(model, ids, 12, eos_token_id=token, stop_after_eos=2)[0, 4:].tolist()
    assert out == free[:positions[1] + 1]
    with pytest.raises(ValueError, match="stop_after_eos"):
        kpro.generate(model, ids, 3, stop_after_eos=0)



def test_stop_after_eos_beyond_int64_is_refused_before_the_prefill(make_model, monkeypatch):
    """The eos tokens are counted in int64: a stop_after_eos of 2**63 .. 2**64 - 1 wrapped negative in the
    comparison (every row stopped after its first token), and 2**64 raised an OverflowError after the prefill."""
    model = make_model(seed=3)
    ids = torch.tensor([[5, 6, 7]])
    free = kpro.generate(model, ids, 3, eos_token_id=[])
    assert torch.equal(kpro.generate(model, ids, 3, eos_token_id=[], stop_after_eos=2**63 - 1), free)

    def no_prefill(*args, **kwargs):
        raise AssertionError("the prefill ran before the argument was refused")
    monkeypatch.setattr(model, "hidden_states", no_prefill)
    for value in (2**63, 2**64 - 1, 2**64, np.uint64(2**63)):
        with pytest.raises(ValueError, match=rf"stop_after_eos must be at most 2\*\*63 - 1 .*, got {value}"):
            kpro.generate(model, ids, 3, eos_token_id=[], stop_after_eos=value)

def test_sampling_is_reproducible_and_topk1_is_greedy(make_model):
    model = make_model(seed=10)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    draw = lambda seed, **kw: kpro.generate(model, ids, 15, temperature=1.0, eos_token_id=[],
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    greedy = kpro.generate(model, ids, 15, eos_token_id=[])
    assert torch.equal(draw(5, top_k=1), greedy)
    assert torch.equal(draw(6, top_p=1e-9), greedy)
    big = torch.tensor([[300.0, 299.0, -5.0]] * 4)  # at temperature 1e-38, 300 / 1e-38 alone is inf in fp32
    assert select_next_token(big, 1e-38, generator=torch.Generator().manual_seed(0)).tolist() == [0] * 4
    for tiny in (1e-300, 5e-324):  # 0 in float32: the best token's 0 / 0 was NaN, and multinomial refused
        assert select_next_token(big, tiny, generator=torch.Generator().manual_seed(0)).tolist() == [0] * 4


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_non_finite_logits_are_refused_not_decoded(make_model, temperature):
    """argmax takes NaN for the best logit: greedy decoding returned the NaN row's token ids as if they were
    answers; sampling died in torch.multinomial's check, which names no row and no cause."""
    model = make_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # every row's logit of token 5
    ids = torch.randint(3, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the model's logits are not finite \(NaN or infinity\) in rows \[0, 1\] "
                                         r"at generated token 1"):
        kpro.generate(model, ids, 3, temperature=temperature,
                      generator=torch.Generator().manual_seed(0) if temperature else None)



def test_a_finished_rows_non_finite_logits_do_not_stop_sampling(make_model):
    """A finished row is fed the pad token and its tokens are discarded; its logits (NaN here: the pad's embedding
    is NaN) still reached torch.multinomial when sampling, whose own check raised ("probability tensor contains
    either `inf`, `nan` or element < 0"). Greedy decoding never minded."""
    model = make_model(seed=3)
    pad = 9
    with torch.no_grad():
        model.embed_tokens.weight[pad] = float("nan")  # only a finished row reads it
    ids = torch.tensor([[5, 6, 7], [8, 10, 11]])
    free = kpro.generate(model, ids, 6, eos_token_id=[])
    eos = int(free[0, 3])  # row 0's first new token: row 0 finishes at once, row 1 goes on
    assert eos not in free[1, 3:].tolist() and eos != pad
    greedy = kpro.generate(model, ids, 6, eos_token_id=eos, pad_token_id=pad)
    assert greedy[0, 4:].tolist() == [pad] * 5 and greedy[1].tolist() == free[1].tolist()
    sampled = kpro.generate(model, ids, 6, eos_token_id=eos, pad_token_id=pad, temperature=1.0, top_k=1,
                            generator=torch.Generator().manual_seed(0))  # top_k=1: the greedy tokens, sampled
    assert torch.equal(sampled, greedy)

def test_numpy_and_tensor_numbers_are_taken_for_sampling_arguments(make_model):
    import numpy as np
    model = make_model(seed=10)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    draw = lambda **kw: kpro.generate(model, ids, generator=torch.Generator().manual_seed(0), eos_token_id=[], **kw)
    want = draw(max_new_tokens=6, temperature=0.5, top_k=4, top_p=0.9, stop_after_eos=2)
    assert torch.equal(draw(max_new_tokens=np.int64(6), temperature=np.float32(0.5), top_k=torch.tensor(4),
                            top_p=np.float64(0.9), stop_after_eos=np.int32(2)), want)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    picks = select_next_token(logits, 1.0, top_k=2, generator=gen)
    assert set(picks.tolist()) == {0, 1}
    probs = logits[0].softmax(0)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two only
    picks = select_next_token(logits, 1.0, top_p=0.8, generator=gen)
    assert set(picks.tolist()) == {0, 1}
    share = (picks == 0).float().mean()
    assert abs(share - probs[0] / probs[:2].sum()) < 0.05
    # Two equal tokens of 0.5 each and top_p=0.5: the first ranked holds top_p already, so the second is dropped.
    tied = torch.tensor([[1.5, 1.5]]).repeat(200, 1)
    first = torch.sort(tied.double(), dim=-1, descending=True).indices[:, 0]
    assert torch.equal(select_next_token(tied, 1.0, top_p=0.5, generator=gen), first)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=5, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=5, temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(max_new_tokens=5, temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(max_new_tokens=5, pad_token_id=-1), r"pad_token_id -1 is outside the vocabulary \[0, "),
    (dict(max_new_tokens=5, top_p=0.9), "top_k and top_p restrict sampling, but temperature 0 decodes greedily"),
    (dict(max_new_tokens=5, top_k=5), "top_k and top_p restrict sampling"),
    # accepted and ignored before, while top_k and top_p were refused (and the CLI's --seed)
    (dict(max_new_tokens=5, generator=torch.Generator().manual_seed(0)),
     "a generator draws samples, but temperature 0 decodes greedily: give a temperature above 0 to sample, or "
     "leave generator out"),
    (dict(max_new_tokens=5, eos_token_id=[3, 10_000]), r"eos_token_id 10000 is outside the vocabulary"),
    (dict(max_new_tokens=5, top_k=0), "top_k"),
    (dict(max_new_tokens=5, top_p=1.5), "top_p"),
    # 0 keeps no token: torch.multinomial failed later, naming no argument (mutation round 10)
    (dict(max_new_tokens=5, temperature=1.0, top_p=0.0), r"top_p must be a number in \(0, 1\], got 0.0"),
    (dict(max_new_tokens=200), "max_position_embeddings"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens=5, temperature=1.0, top_k=True), "top_k must be a positive integer, got True"),
    (dict(max_new_tokens=5, temperature=1.0, top_k=2.0), "top_k must be a positive integer, got 2.0"),
    (dict(max_new_tokens=5, temperature=1.0, top_p=True), r"top_p must be a number in \(0, 1\], got True"),
    (dict(max_new_tokens=5, temperature=1.0, top_p="0.9"), r"top_p must be a number in \(0, 1\], got '0.9'"),
    (dict(max_new_tokens=5, temperature=1.0, top_p=torch.tensor([0.9, 0.5])), "top_p must be a number"),
    (dict(max_new_tokens=5, stop_after_eos=True), "stop_after_eos must be a positive integer, got True"),
])
def test_bad_generation_arguments(make_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kpro.generate(make_model(), torch.ones(1, 3, dtype=torch.long), **kwargs)


def test_generate_and_save_name_a_module_that_is_not_a_llama(make_model, tmp_path):
    model = make_model()
    kpro.lora.add_adapters(model, ["a"], rank=2)
    with pytest.raises(TypeError, match=r"generate\(\) takes a kpro.Llama, got AdaptedModel \(a LoRA-adapted model: "
                                        r"`with kpro.lora.active\(tuned.model, 'a'\)"):
        kpro.generate(kpro.lora.AdaptedModel(model, "a"), torch.ones(1, 3, dtype=torch.long), 2)
    with pytest.raises(TypeError, match=r"save_pretrained\(\) takes a kpro.Llama, got Linear"):
        kpro.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "ck")


def test_a_cache_made_for_another_model_is_named(make_model):
    model, ids = make_model(), torch.ones(1, 3, dtype=torch.long)
    for change in (dict(num_hidden_layers=model.config.num_hidden_layers + 1), dict(num_key_value_heads=1)):
        other = model.config.replace(**change)
        with pytest.raises(ValueError, match=r"cache was made for \d+ layers of \d+ key/value heads of dim \d+; this model"):
            model(ids, cache=kpro.KVCache(other, 1, 8, next(model.parameters()).dtype))


@pytest.mark.parametrize("batch_size, max_len, dtype, message", [
    (2, -1, torch.float32, "max_len must be a positive integer, got -1"),  # torch.zeros' "Dimension size" before
    (2, 2.5, torch.float32, "max_len must be a positive integer, got 2.5"),
    (0, 8, torch.float32, "batch_size must be a positive integer, got 0"),  # accepted, refused at the forward
    (True, 8, torch.float32, "batch_size must be a positive integer, got True"),
    (2, 8, torch.int64, "dtype must be a floating-point torch.dtype"),  # accepted: int64 keys
    (2, 8, "float32", "dtype must be a floating-point torch.dtype"),
])
def test_a_cache_that_cannot_hold_keys_is_refused_by_its_argument(make_model, batch_size, max_len, dtype, message):
    with pytest.raises(ValueError, match=f"KVCache: {message}"):
        kpro.KVCache(make_model().config, batch_size, max_len, dtype)


def test_a_cache_of_another_dtype_is_named_before_anything_is_written(make_model):
    model = make_model(dtype=torch.float32)
    ids = torch.ones(2, 3, dtype=torch.long)
    cache = kpro.KVCache(model.config, 2, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="cache holds torch.bfloat16 keys on cpu, and this forward computes torch.float32"):
        model(ids, cache=cache)  # the shared q/k/v dtype check, after layer 0 wrote rounded keys, before
    assert cache.length == 0 and not any(k.any() for k in cache.keys)
    with torch.autocast("cpu", torch.bfloat16):  # an evaluation inside a training step's autocast
        assert kpro.model.activation_dtype(model) == torch.bfloat16
        out = kpro.generate(model, ids, 3)  # a q/k/v dtype error before: the cache was fp32
    assert out.shape == (2, 6)


def test_a_cache_in_grad_mode_gives_the_full_forwards_gradients(make_model):
    """Written in place, the cache broke the backward of a chunked forward ("modified by an inplace
    operation"); where autograd records the writes they go out of place."""
    model = make_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    cache = kpro.KVCache(model.config, 2, 12, next(model.parameters()).dtype)
    chunked = torch.cat((model(ids[:, :3], cache=cache), model(ids[:, 3:], cache=cache)), 1)
    grads = torch.autograd.grad(chunked.square().sum(), list(model.parameters()))
    full = model(ids)
    torch.testing.assert_close(chunked, full)
    for got, want in zip(grads, torch.autograd.grad(full.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(got, want)


def test_a_refused_call_leaves_the_cache_as_it_was(make_model):
    """A call refused for its token ids marked the empty cache as holding padding, and every later call
    without a mask was refused for padding that was not there."""
    model = make_model()
    cache = kpro.KVCache(model.config, 2, 8, next(model.parameters()).dtype)
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[1, 2], [3, 999]]), torch.tensor([[0, 1], [1, 1]]), cache=cache)
    assert cache.length == 0 and not cache.padded
    model(torch.tensor([[1, 2], [3, 4]]), cache=cache)


def test_decode_refuses_a_right_padded_mask_and_the_prefills_full_logits(make_model):
    """decode (what Bitune continues with) went on after the padding of a right-padded row, and the prefill's
    [B, T, V] logits died in a broadcast error."""
    model = make_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    for mask, message in ((torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), r"rows \[0\] end in padding"),
                          (torch.ones(2, 5, dtype=torch.long), r"logits must be the last position's \[B=2, V\]")):
        cache = kpro.KVCache(model.config, 2, 12, next(model.parameters()).dtype)
        with torch.no_grad():
            logits = model(ids, mask, cache=cache)
        with pytest.raises(ValueError, match=message):
            kpro.generation.decode(model, cache, logits[:, -1] if "padding" in message else logits, mask, 3)
    with pytest.raises(TypeError, match=r"decode needs the prefill's attention_mask \[B, cache.length=5\] \(1 = real "
                                        r"token; torch.ones for an unpadded prompt\), got NoneType"):
        kpro.generation.decode(model, cache, logits[:, -1], None, 3)  # an AttributeError on None.dim before
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator \(torch.Generator\(\).manual_seed\(seed\)\) "
                                        r"or None, got 0"):  # multinomial's own TypeError named no argument
        kpro.generate(model, ids, 2, temperature=1.0, generator=0)


def test_a_model_whose_blocks_differ_from_its_config_is_named_before_generating(make_model):
    """A block appended by hand (the config left at 2) failed in generate with a bare IndexError."""
    import copy
    model = make_model()
    model.layers.append(copy.deepcopy(model.layers[-1]))
    with pytest.raises(ValueError, match=r"the model has 3 blocks and its config 2: after changing the blocks, set "
                                         r"model.config = model.config.replace\(num_hidden_layers=3\)"):
        kpro.generate(model, torch.tensor([[5, 6]]), 2)


def test_a_padded_cache_needs_its_mask_on_every_later_call(make_model):
    model = make_model()
    ids, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    cache = kpro.KVCache(model.config, 2, 8, torch.float64)
    model(ids, mask, cache=cache)
    new = torch.tensor([[4], [4]])
    with pytest.raises(ValueError, match=r"the cache holds padding .* pass the attention_mask \[B, 4\]"):
        model(new, cache=cache)  # attended to the cached padding before
    full = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
    alone = model(torch.tensor([[5, 6, 4]]))[0, -1]
    torch.testing.assert_close(model(new, full, cache=cache)[0, -1], alone)


def test_a_refused_call_does_not_mark_the_cache_padded(make_model):
    """A call with a padded mask refused after the mask's check (its position_ids here) marked the empty
    cache padded, and the next valid call without a mask was refused for padding it never held."""
    model = make_model()
    ids, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    cache = kpro.KVCache(model.config, 2, 8, torch.float64)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(ids, mask, cache=cache, position_ids=torch.arange(3.0))
    assert (cache.length, cache.padded) == (0, False)
    rows = torch.tensor([[5, 6, 4], [7, 8, 9]])
    torch.testing.assert_close(model(rows, cache=cache), model(rows))


def test_token_ids_of_numpy_and_tensor_integers_are_taken_and_others_refused(make_model):
    model, ids = make_model(), torch.ones(1, 3, dtype=torch.long)
    want = kpro.generate(model, ids, 4, eos_token_id=[5], pad_token_id=2)
    assert torch.equal(kpro.generate(model, ids, 4, eos_token_id=torch.tensor(5), pad_token_id=np.int64(2)), want)
    for eos in ("5", [5.0], True, 5.5):  # 5.5 raised "'float' object is not iterable"
        with pytest.raises(TypeError, match="eos_token_id must be a token id or a list of them"):
            kpro.generate(model, ids, 4, eos_token_id=eos)
    for pad, message in ((0.5, "pad_token_id must be a token id"), ([1, 2], "pad_token_id must be one token id")):
        with pytest.raises(TypeError, match=message):
            kpro.generate(model, ids, 4, eos_token_id=5, pad_token_id=pad)


def test_right_padded_prompts_are_refused(make_model):
    model = make_model()
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"rows \[0\] end in padding: generate needs left-padded prompts"):
        kpro.generate(model, ids, 2, attention_mask=mask)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[1, 2, 2]]), r"generate: attention_mask must hold 1 \(real token\) and 0 \(padding\) only"),
    (torch.tensor([[-1e9, 0.0, 0.0]]), r"generate: attention_mask is torch.float32; .*1 = real token.*additive == 0"),
    (torch.ones(1, 4, dtype=torch.long), r"generate: attention_mask must be \[B, T\] = \[1, 3\], got \[1, 4\]"),
])
def test_a_bad_mask_gets_the_models_message_not_a_padding_one(make_model, mask, message):
    """A 2 or an additive mask was reported as prompts that "end in padding"; the model's check says what is wrong."""
    with pytest.raises(ValueError, match=message):
        kpro.generate(make_model(), torch.tensor([[5, 6, 7]]), 2, attention_mask=mask)


@pytest.mark.parametrize("ids, message", [
    (torch.ones(1, 0, dtype=torch.long), r"input_ids is empty \(\[B=1, T=0\]\)"),
    (torch.ones(0, 3, dtype=torch.long), r"input_ids is empty \(\[B=0, T=3\]\)"),
    (torch.tensor([5, 6, 7]), r"input_ids must be an integer tensor \[B, T\] of prompts \(one prompt's ids: "
                              r"torch.tensor\(\[ids\]\)\), got \(3,\)"),
    (torch.ones(1, 3), r"input_ids must be an integer tensor \[B, T\].*torch.float32"),
    ([[5, 6, 7]], r"input_ids must be an integer tensor \[B, T\].*got list"),
    ([5, 6, 7], r"\(one prompt's ids: torch.tensor\(\[ids\]\)\), got list"),  # the hint was ids[None]: a list's error
])
def test_empty_one_dimensional_or_float_prompts_are_named(make_model, ids, message):
    with pytest.raises(ValueError, match=message):
        kpro.generate(make_model(), ids, 2)


def test_a_model_adapted_in_place_with_no_adapter_active_is_refused(make_model):
    """generate ran the base model of a model adapted in place (Bitune(model), a LoRA tune) with no error,
    where every evaluation refuses it: a tuned model's output checked this way was the base model's."""
    from kpro import lora
    model = make_model()
    ids = torch.tensor([[1, 5, 6]])
    base = kpro.generate(model, ids, 4)
    lora.add_adapters(model, ["a"], rank=2, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    with pytest.raises(ValueError, match=r"generate: the model has LoRA adapters \(a\) and none is active"):
        kpro.generate(model, ids, 4)
    with kpro.lora.active(model, None):  # the base, asked for
        assert torch.equal(kpro.generate(model, ids, 4), base)
    with kpro.lora.active(model, "a"):
        kpro.generate(model, ids, 4)
    with pytest.raises(TypeError, match="got Bitune .a Bitune: its own bt.generate"):
        kpro.generate(kpro.Bitune(make_model()), ids, 4)


def test_prompts_on_another_device_than_the_model_are_named(make_model):
    """The cache was made on the prompts' device, and the error blamed its dtype and KVCache."""
    model = make_model().to("meta")
    with pytest.raises(ValueError, match=r"input_ids are on cpu and the model on meta: move the prompts"):
        kpro.generate(model, torch.tensor([[1, 5, 6]]), 4)


def test_decode_refuses_a_cache_too_small_and_a_mask_not_covering_it_before_the_first_step(make_model):
    """decode wrote tokens into a cache too small for max_new_tokens, then raised the model's "cache holds 6
    positions; 6 used, 1 more asked" (max_new_tokens unnamed, the cache changed); a mask narrower than the cache
    was refused at the second step only, for the mask it had extended itself ([1, 5] vs [1, 4])."""
    model = make_model()
    ids = torch.tensor([[5, 17, 33, 9]])
    for max_len, width, message in (
            (6, 4, r"max_new_tokens=8 needs 7 free cache positions \(every new token but the last is fed back\), and "
                   r"the cache has 2: cache.max_len=6, cache.length=4; make the KVCache with max_len >= 11, or ask "
                   r"for at most 3 tokens"),
            (20, 3, r"attention_mask must be the prefill's \[B, cache.length\] = \[1, 4\] \(1 = real token\), "
                    r"got \[1, 3\]")):
        cache = kpro.KVCache(model.config, 1, max_len, next(model.parameters()).dtype)
        with torch.no_grad():
            logits = model(ids, cache=cache)[:, -1]
        keys = cache.keys[0].clone()
        with pytest.raises(ValueError, match=message):
            kpro.generation.decode(model, cache, logits, torch.ones(1, width, dtype=torch.long), 8, eos_token_id=[])
        assert cache.length == 4 and torch.equal(cache.keys[0], keys)
    # exactly enough room: 7 fed back after the prefill's 4
    cache = kpro.KVCache(model.config, 1, 11, next(model.parameters()).dtype)
    with torch.no_grad():
        logits = model(ids, cache=cache)[:, -1]
    new = kpro.generation.decode(model, cache, logits, torch.ones(1, 4, dtype=torch.long), 8, eos_token_id=[])
    assert torch.equal(new, kpro.generate(model, ids, 8, eos_token_id=[])[:, 4:])


def test_an_all_ones_mask_does_not_mark_the_cache_padded(make_model):
    """A mask of ones holds no padding: the next call may leave the mask out, as after no mask at all (the other
    cache tests' masks hold zeros)."""
    model = make_model()
    rows = torch.tensor([[5, 6, 4], [7, 8, 9]])
    cache = kpro.KVCache(model.config, 2, 8, torch.float64)
    model(rows, torch.ones_like(rows), cache=cache)
    assert not cache.padded
    new = torch.tensor([[3], [10]])
    torch.testing.assert_close(model(new, cache=cache)[:, -1], model(torch.cat((rows, new), 1))[:, -1])


def test_a_model_adapted_in_place_with_no_adapter_active_is_refused_with_advice_generate_takes(make_model):
    """generate's refusal advised passing an AdaptedModel or a Bitune, both of which generate refuses (it takes a
    Llama): the advice is now the context manager, and following it decodes with the adapter."""
    from kpro import lora
    model = make_model()
    lora.add_adapters(model, ["a", "b"])
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.a.lora_B.weight.normal_()
    ids = torch.tensor([[1, 5, 9]])
    with pytest.raises(ValueError, match=r"generate: the model has LoRA adapters \(a, b\) and none is active or "
                                         r"merged, so it would run as its base model: call it under `with "
                                         r"kpro\.lora\.active\(model, 'a'\):`"):
        kpro.generate(model, ids, 4)
    with lora.active(model, "a"):
        adapted = kpro.generate(model, ids, 4)
    with lora.active(model, None):
        base = kpro.generate(model, ids, 4)
    assert adapted.shape == base.shape == (1, 7)
    logits = {name: None for name in ("a", None)}
    for name in logits:
        with lora.active(model, name), torch.no_grad():
            logits[name] = model(ids)
    assert not torch.allclose(logits["a"], logits[None])  # the adapter is what the advice switches on


def test_the_pad_default_is_the_first_eos_id():
    """Without a pad id (argument or config), a finished row is filled with the first eos id, as transformers'
    GenerationMixin (`pad_token_tensor = eos_token_tensor[0]`); the last one was taken silently."""
    config = tiny_config(eos_token_id=[5, 7], pad_token_id=None)
    assert check_decoding(config, 4)[4:6] == ([5, 7], 5)
    assert check_decoding(config, 4, eos_token_id=[9, 7])[5] == 9
    # Through generate: row 0 stops at its first token (eos 7), row 1 writes on; row 0 is padded with 5.
    model = ScriptedModel({(3,): [7, 8, 8], (4,): [8, 8, 8]}, vocab_size=32, filler=8)
    model.config = tiny_config(vocab_size=32, max_position_embeddings=512, eos_token_id=[5, 7], pad_token_id=None)
    out = generate(model, torch.tensor([[3], [4]]), 3)
    assert out.tolist() == [[3, 7, 5, 5], [4, 8, 8, 8]]
