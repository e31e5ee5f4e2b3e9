"""kpro.Llama against a deliberately naive float64 LLaMA written here (explicit loops, one row at a time)."""
import math

import numpy as np
import pytest
import torch

import kpro
from kpro.checkpoint import hf_tensors
from conftest import relative_error, tiny_config


def naive_inv_freq(cfg: dict) -> list[float]:
    dim, theta = cfg["head_dim"], cfg["rope_theta"]
    inv = [1.0 / theta ** (2 * i / dim) for i in range(dim // 2)]
    scaling = cfg.get("rope_scaling")
    if scaling and scaling["rope_type"] == "linear":
        inv = [f / scaling["factor"] for f in inv]
    elif scaling and scaling["rope_type"] == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        ctx = scaling["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < ctx / high:
                out.append(f)
            elif wavelen > ctx / low:
                out.append(f / factor)
            else:
                smooth = (ctx / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = out
    return inv


def naive_forward_row(w: dict, cfg: dict, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] for one unpadded sequence."""
    n_heads, n_kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, T = cfg["rms_norm_eps"], len(tokens)
    inv_freq = naive_inv_freq(cfg)

    def norm(x, weight):
        return torch.stack([row / math.sqrt(float((row * row).mean()) + eps) * weight for row in x])

    def rope(vec, pos):  # vec [hd]
        out = vec.clone()
        for i, f in enumerate(inv_freq):
            c, s = math.cos(pos * f), math.sin(pos * f)
            a, b = vec[i], vec[i + hd // 2]
            out[i], out[i + hd // 2] = a * c - b * s, b * c + a * s
        return out

    x = torch.stack([w["model.embed_tokens.weight"][t] for t in tokens])
    for layer in range(cfg["num_hidden_layers"]):
        p = lambda name: w[f"model.layers.{layer}.{name}.weight"]
        h = norm(x, p("input_layernorm"))
        q = torch.einsum("td,od->to", h, p("self_attn.q_proj")).view(T, n_heads, hd)
        k = torch.einsum("td,od->to", h, p("self_attn.k_proj")).view(T, n_kv, hd)
        v = torch.einsum("td,od->to", h, p("self_attn.v_proj")).view(T, n_kv, hd)
        attn = torch.zeros(T, n_heads, hd, dtype=torch.float64)
        for head in range(n_heads):
            kv_head = head // (n_heads // n_kv)
            for i in range(T):
                qi = rope(q[i, head], i)
                scores = torch.tensor([float(qi @ rope(k[j, kv_head], j)) / math.sqrt(hd) for j in range(i + 1)],
                                      dtype=torch.float64)
                probs = torch.exp(scores - scores.max())
                probs = probs / probs.sum()
                attn[i, head] = sum(probs[j] * v[j, kv_head] for j in range(i + 1))
        x = x + torch.einsum("to,do->td", attn.reshape(T, n_heads * hd), p("self_attn.o_proj"))
        h = norm(x, p("post_attention_layernorm"))
        gate = torch.einsum("td,fd->tf", h, p("mlp.gate_proj"))
        up = torch.einsum("td,fd->tf", h, p("mlp.up_proj"))
        x = x + torch.einsum("tf,df->td", gate / (1 + torch.exp(-gate)) * up, p("mlp.down_proj"))
    head_weight = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return torch.einsum("td,vd->tv", norm(x, w["model.norm.weight"]), head_weight)


def naive_logits(model: kpro.Llama, input_ids, attention_mask=None) -> torch.Tensor:
    """Run each row alone with its padding stripped; padding positions are left as NaN."""
    weights = {name: t.detach().double() for name, t in hf_tensors(model).items()}
    cfg = model.config.to_hf()
    out = torch.full((*input_ids.shape, cfg["vocab_size"]), float("nan"), dtype=torch.float64)
    for b, row in enumerate(input_ids.tolist()):
        real = [i for i in range(len(row)) if attention_mask is None or attention_mask[b, i]]
        out[b, real] = naive_forward_row(weights, cfg, [row[i] for i in real])
    return out


VARIANTS = {
    "mha": dict(num_key_value_heads=6),
    "gqa": dict(),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim_not_hidden_over_heads": dict(head_dim=12),
    "llama3_rope": dict(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "linear_rope": dict(rope_scaling={"type": "linear", "factor": 2.5}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_naive_reference(make_model, variant):
    model = make_model(seed=3, **VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    out = model(ids)
    ref = naive_logits(model, ids)
    assert out.dtype == torch.float64 and not out.isnan().any()
    assert relative_error(out, ref) < 1e-10


def test_left_padded_batch_matches_unpadded_rows(make_model):
    model = make_model(seed=4)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 1, 5)]
    ids, mask = kpro.pad_left(rows, pad_id=0)
    out = model(ids, attention_mask=mask)
    ref = naive_logits(model, ids, mask)
    real = mask.bool()
    assert not out[real].isnan().any()
    assert relative_error(out[real], ref[real]) < 1e-10
    for b, row in enumerate(rows):  # and the padded row equals the same row run alone
        alone = model(torch.tensor([row]))[0]
        assert relative_error(out[b, real[b]], alone) < 1e-12


def test_llama3_scaling_changes_low_frequencies_only():
    base = tiny_config(rope_theta=10000.0, head_dim=64)
    scaled = base.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    plain, llama3 = kpro.rope.rope_frequencies(base), kpro.rope.rope_frequencies(scaled)
    assert torch.equal(plain[:4], llama3[:4])  # high frequencies untouched
    assert torch.allclose(llama3[-1], plain[-1] / 8)  # lowest divided by the factor
    assert torch.allclose(llama3, torch.tensor(naive_inv_freq(scaled.to_hf()), dtype=torch.float64), rtol=1e-14)


def test_rope_frequencies_stay_float64_after_dtype_change(make_model):
    model = make_model(dtype=torch.bfloat16)
    assert model.rope.inv_freq.dtype == torch.float64
    assert torch.equal(model.rope.inv_freq, kpro.rope.rope_frequencies(model.config))


def test_tied_embeddings_share_one_parameter(make_model):
    model = make_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_backward_reaches_every_parameter(make_model):
    model = make_model(dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    model(ids).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad, message", [
    (lambda m: m(torch.zeros(2, 3)), "integer tensor"),
    (lambda m: m(torch.zeros(3, dtype=torch.long)), "integer tensor"),
    # a list or an array (an AttributeError on .dim() before): named, as kpro.generate names it
    (lambda m: m([[1, 5, 9]]), r"input_ids must be an integer tensor \[B, T\], got list"),
    (lambda m: m.hidden_states([[1, 5, 9]]), r"input_ids must be an integer tensor \[B, T\], got list"),
    (lambda m: m(np.array([[1, 5, 9]])), r"integer tensor \[B, T\], got ndarray"),
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), r"input_ids is empty \(\[B=1, T=0\]\)"),
    (lambda m: m(torch.zeros(0, 3, dtype=torch.long)), r"input_ids is empty \(\[B=0, T=3\]\)"),
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), position_ids=torch.arange(3.0)[None]),
     "position_ids must be an integer tensor .int64 or int32., got torch.float32"),
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), position_ids=torch.ones(2, 3, dtype=torch.bool)), "got torch.bool"),
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), position_ids=torch.arange(4).expand(2, 4)),
     r"position_ids must be \[B=2, T=3\] or \[1, 3\], got \(2, 4\)"),
    (lambda m: m(torch.tensor([[1, 999]])), "outside"),
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "attention_mask must be"),
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.full((2, 3), 2)), "1 .real token. and 0"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0.5, 1, 1]])),
     r"float32; it must be bool or 0/1 integers.*`mask = \(additive == 0\)`"),
])
def test_bad_inputs_are_named(make_model, bad, message):
    with pytest.raises(ValueError, match=message):
        bad(make_model())



def test_the_model_runs_under_fake_tensors_and_make_fx(make_model):
    """The token-id check read values outside torch.compile only: the forward under FakeTensorMode (a memory
    estimate without memory) and make_fx(tracing_mode="fake") failed with a data-dependent error. It reads
    values only where there are some; in eager mode ids outside the vocabulary are still refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    model = make_model(dtype=torch.float32)
    ids, mask = torch.randint(0, model.config.vocab_size, (2, 5)), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = model(ids, attention_mask=mask)
        logits.sum().backward()
    assert logits.shape == (2, 5, model.config.vocab_size) and logits.dtype == torch.float32
    graph = make_fx(lambda i, m: model(i, attention_mask=m), tracing_mode="fake", _allow_non_fake_inputs=True)(ids, mask)
    assert torch.equal(graph(ids, mask), model(ids, attention_mask=mask))
    with pytest.raises(ValueError, match="outside"):
        model(torch.full((2, 5), model.config.vocab_size))


def test_position_ids_of_one_row_or_one_dimension_apply_to_every_row(make_model):
    model = make_model(dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    shifted = torch.arange(3, 8)
    want = model(ids, position_ids=shifted.expand(2, 5))
    assert torch.equal(model(ids, position_ids=shifted), want) and torch.equal(model(ids, position_ids=shifted[None]), want)
    assert not torch.allclose(model(ids), want)  # the positions do reach the model


def test_the_pad_tokens_embedding_starts_at_zero_and_gets_no_gradient_as_in_transformers(make_model):
    # transformers' LLaMA gives its embedding padding_idx=pad_token_id; where the pad id is a real token too
    # (SmolLM2-1.7B-Instruct's pad is its eos), a loss over it must not move that row.
    model = make_model(pad_token_id=2)
    assert not model.embed_tokens.weight[2].any() and model.embed_tokens.weight[3].any()
    with torch.no_grad():
        model.embed_tokens.weight[2].normal_()  # a trained checkpoint's row
    ids = torch.tensor([[1, 9, 2, 14, 2, 30]])
    model(ids)[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum().backward()
    assert not model.embed_tokens.weight.grad[2].any() and model.embed_tokens.weight.grad[9].any()
    assert model.lm_head.weight.grad[2].any()  # the head's row for it learns
    assert make_model().embed_tokens.padding_idx is None  # no pad id: every row learns


def test_a_config_does_not_change_in_place_and_a_new_one_is_applied():
    """model.config = model.config.replace(rope_theta=...) was saved and never run (the RoPE table and the
    norms' eps were built once); a field set in place took effect only after the next .to()."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with pytest.raises(AttributeError, match=r"a LlamaConfig does not change in place \(rope_theta\): make a new one "
                                             r"with config.replace\(rope_theta=...\)"):
        model.config.rope_theta = 500000.0
    changed = model.config.replace(rope_theta=500000.0, rms_norm_eps=0.5)
    fresh = kpro.Llama(changed)
    fresh.load_state_dict(model.state_dict())
    model.config = changed
    assert torch.equal(model(ids), fresh(ids))  # as a model built with it
    assert all(norm.eps == 0.5 for norm in model.modules() if isinstance(norm, kpro.model.RMSNorm))
    for changes, message in ((dict(num_hidden_layers=3), "num_hidden_layers 3, the model has 2 blocks"),
                             (dict(intermediate_size=8), "block 0: intermediate_size 8, the block's MLP has")):
        with pytest.raises(ValueError, match="the new config does not fit the model's modules: " + message):
            model.config = model.config.replace(**changes)
    assert model.config is changed
    model.config = changed.replace(pad_token_id=0)
    assert model.embed_tokens.padding_idx == 0  # as a model built with it (the pad row gets no gradient)
    scaled = kpro.Llama(tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(TypeError, match="a LlamaConfig's rope_scaling does not change in place"):
        scaled.config.rope_scaling["factor"] = 8.0  # saved with the model, and not run, before
    with pytest.raises(TypeError, match="a LlamaConfig's rope_scaling does not change in place"):
        scaled.config.rope_scaling.__init__(factor=8.0)  # dict.__init__ updates in place
    assert dict(scaled.config.rope_scaling) == {"rope_type": "linear", "factor": 2.0}


def test_a_whole_model_pickle_of_an_older_kpro_loads():
    """Older kpro kept the config as a plain attribute, now a property over `_config`."""
    import dataclasses
    import pickle
    model = kpro.Llama(tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    state = dict(model.__dict__)
    config = object.__new__(kpro.LlamaConfig)  # as an older kpro made it: plain attributes, a plain dict
    config.__dict__.update({field.name: getattr(model.config, field.name) for field in dataclasses.fields(config)},
                           rope_scaling=dict(model.config.rope_scaling))
    state["config"] = config
    del state["_config"]
    old = kpro.Llama.__new__(kpro.Llama)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    ids = torch.randint(0, 50, (1, 4))
    assert again.config == model.config and torch.equal(again(ids), model(ids))
    assert again.rope.cfg is again.config  # rebuilt, so that it does not change in place
    with pytest.raises(TypeError, match="does not change in place"):
        again.config.rope_scaling["factor"] = 8.0
    path = __import__("tempfile").mktemp()
    torch.save({"scaling": again.config.rope_scaling}, path)  # a callback's state holding it
    assert torch.load(path, weights_only=True) == {"scaling": {"rope_type": "linear", "factor": 2.0}}


def test_a_model_takes_a_config_object_only():
    """Llama(dict) failed with "'dict' object has no attribute 'vocab_size'"."""
    for wrong in (tiny_config().to_hf(), "config.json"):
        with pytest.raises(TypeError, match="Llama takes a kpro.LlamaConfig, got .*: read a config.json or its dict "
                                            "with kpro.LlamaConfig.from_hf"):
            kpro.Llama(wrong)


def test_positions_from_a_left_padded_mask_count_real_tokens_only():
    """A row's positions start at its first real token (0 on its pads), in the prefill and in a decoding step
    after it: RoPE is relative, so whole-row shifts do not show in the logits, and only this pins them."""
    from kpro.model import positions_from_mask
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 0, 5, "cpu").tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    step = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # a decoding step after that prefill
    assert positions_from_mask(step, 5, 1, "cpu").tolist() == [[3], [5]]


@pytest.mark.parametrize("part", ["lm_head", "embed_tokens", "layers.1"])
def test_matrices_of_several_dtypes_are_named_by_the_forward_and_generate(make_model, part):
    """A bfloat16 model given a float32 head (or embedding, or block) failed inside torch with "expected m1 and m2
    to have the same dtype", naming no module; norms of another dtype run, as does any mix under autocast."""
    model = make_model(dtype=torch.bfloat16)
    model.get_submodule(part).float()
    ids = torch.tensor([[1, 5, 9, 3]])
    message = (r"the model's matrices are of several dtypes \((embed_tokens.weight|layers.0.self_attn.q_proj.weight) "
               r"\w+, (lm_head|layers.0.self_attn.q_proj|layers.1.self_attn.q_proj).weight \w+\), and its forward "
               r"computes in one: convert them to one")
    calls = [lambda: model(ids), lambda: kpro.generate(model, ids, 2)]
    if part != "lm_head":  # the blocks' output needs no head
        calls.append(lambda: model.hidden_states(ids))
    for call in calls:
        with pytest.raises(ValueError, match=message) as refused:
            call()
        assert f"{part}." in str(refused.value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(ids).isfinite().all() and kpro.generate(model, ids, 2).shape == (1, 6)
    model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, kpro.model.RMSNorm):
            module.float()
    assert model(ids).isfinite().all() and kpro.generate(model, ids, 2).shape == (1, 6)


def test_rope_keeps_the_rotated_tensors_dtype_and_attention_gets_one_dtype_under_autocast(make_model, monkeypatch):
    """apply_rope returns the rotated tensor's dtype, not the promoted one of its float32 tables: under autocast q, k
    and v reach attention in one dtype, the autocast's, as its kernels (and the KV cache, made in activation_dtype)
    expect. Nothing failed without it on the CPU, whose attention takes float32 q, k beside bfloat16 v."""
    q = torch.randn(1, 3, 2, 8, dtype=torch.bfloat16)
    cos, sin = kpro.rope.RotaryEmbedding(make_model().config)(torch.arange(3)[None], torch.float32)
    assert kpro.rope.apply_rope(q, cos, sin).dtype == torch.bfloat16
    model = make_model(dtype=torch.float32)
    seen, attention = [], kpro.ops.attention
    monkeypatch.setattr(kpro.ops, "attention", lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype))
                        or attention(q, k, v, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 5, 9, 3]]))
    assert seen and set(seen) == {(torch.bfloat16,) * 3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_tables_are_the_float64_cos_and_sin_rounded_once(make_model, dtype):
    """The rope tables are cos and sin of float64 angles, rounded once to the model's dtype: a bfloat16 angle at
    position 1000 is off by up to 2 radians, which the float64 models of the logits tests cannot see."""
    config = make_model().config
    positions = torch.arange(0, 4096, 7)[None]
    cos, sin = kpro.rope.RotaryEmbedding(config)(positions, dtype)
    inv = torch.tensor([1.0 / config.rope_theta ** (2 * i / config.head_dim) for i in range(config.head_dim // 2)],
                       dtype=torch.float64)
    angles = positions[..., None].double() * inv
    angles = torch.cat((angles, angles), -1)
    assert cos.dtype == sin.dtype == dtype
    assert torch.equal(cos, angles.cos().to(dtype)) and torch.equal(sin, angles.sin().to(dtype))


def test_a_scalar_type_error_on_mixed_matrices_is_named(make_model):
    """On the CPU every mixed-dtype failure of the forward is torch's "expected m1 and m2 to have the same dtype";
    other kernels (CUDA's, some of torch's ops) say "expected scalar type Float but found BFloat16": the head
    raises it here in their place, and the error names the matrices all the same."""
    model = make_model(dtype=torch.bfloat16)
    model.lm_head.float()

    def head(x):
        raise RuntimeError("expected scalar type Float but found BFloat16")

    model.lm_head.forward = head
    with pytest.raises(ValueError, match=r"the model's matrices are of several dtypes \(embed_tokens.weight bfloat16, "
                                         r"lm_head.weight float32\)"):
        model(torch.tensor([[1, 5, 9, 3]]))


def test_lora_adapters_in_float32_beside_a_bfloat16_base_are_not_mixed_matrices(make_model):
    """kpro keeps LoRA adapters in float32 beside any base: the mixed-matrices check counted them, so generate
    refused every adapted bfloat16 model, and a float32 head beside such adapters was named as an adapter."""
    model = make_model(dtype=torch.bfloat16)
    kpro.lora.add_adapters(model, ["a"], rank=2, seed=0)
    ids = torch.tensor([[1, 5, 9, 3]])
    with kpro.lora.active(model, "a"):
        assert kpro.generate(model, ids, 2).shape == (1, 6) and model(ids).dtype == torch.bfloat16
        model.lm_head.float()
        for call in (lambda: model(ids), lambda: kpro.generate(model, ids, 2)):
            with pytest.raises(ValueError, match=r"several dtypes \(embed_tokens.weight bfloat16, lm_head.weight "
                                                 r"float32\)"):
                call()

