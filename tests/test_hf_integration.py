"""kpro.integrations.hf: kpro's ops inside transformers LLaMA, Mistral and Qwen2 models. Logits and gradients
equal to the stock model's within fp32 rounding (left padding, GQA), the kernels really used (Triton in its CPU
interpreter), greedy generation, HF Trainer steps with the stock losses, torch.compile, the masks transformers
and callers pass (converted or refused by name), unsupported models refused with nothing changed, and
train_only's frozen-block gradient skipping with kpro's accounting. `import kpro` never imports any of it."""
import copy
import inspect
import subprocess
import sys
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
kpro_hf = pytest.importorskip("kpro.integrations.hf")

import kpro  # noqa: E402
from kpro.expansion import saved_activation_bytes  # noqa: E402

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_stock(family="llama", layers=3, seed=0, **overrides):
    """A small model with GQA (8 query heads, 2 key/value heads, head dim 16) and random norm weights."""
    config_class, model_class, extra = FAMILIES[family]
    fields = dict(vocab_size=101, hidden_size=128, intermediate_size=200, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  use_cache=False, attn_implementation="sdpa", **extra)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def patched_copy(stock, **options):
    model = copy.deepcopy(stock)
    summary = kpro_hf.apply(model, **options)
    return model, summary


def left_padded(batch=3, length=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_import_kpro_never_imports_transformers():
    """Neither `import kpro` nor importing every other module of kpro (and touching its lazy names) brings in
    transformers; importing kpro.integrations.hf does (the check would see it)."""
    code = ("import importlib, pkgutil, sys, kpro\n"
            "assert 'transformers' not in sys.modules and 'kpro.integrations' not in sys.modules\n"
            "skip = lambda name: name.startswith(('kpro.integrations', 'kpro.__main__'))\n"
            "names = [m.name for m in pkgutil.walk_packages(kpro.__path__, 'kpro.', onerror=print) if not skip(m.name)]\n"
            "[importlib.import_module(name) for name in names]; [getattr(kpro, name) for name in kpro.__all__]\n"
            "assert len(names) > 30, names\n"
            "found = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or skip(m) and m != 'kpro.integrations')\n"
            "assert not found, found[:5]\n"
            "import kpro.integrations.hf\n"
            "assert 'transformers' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kpro_integrations_hf_after_a_plain_import_kpro():
    """SPEC.md's spelling, `import kpro` then `kpro.integrations.hf.apply(model)`, imports the bridge (and
    transformers) on first use; touching `kpro.integrations` alone imports neither, and a misspelt bridge is an
    AttributeError naming it."""
    code = ("import sys, kpro\n"
            "kpro.integrations\n"
            "assert 'transformers' not in sys.modules and 'kpro.integrations.hf' not in sys.modules\n"
            "assert callable(kpro.integrations.hf.apply) and 'transformers' in sys.modules\n"
            "try:\n    kpro.integrations.hff\nexcept AttributeError as err:\n    assert \"'hff'\" in str(err), err\n"
            "else:\n    raise SystemExit('kpro.integrations.hff did not raise')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_gradients_equal_stock_with_left_padding_and_gqa(family):
    stock = make_stock(family)
    model, summary = patched_copy(stock)
    assert (summary.rms_norms, summary.mlps, summary.attention_layers) == (7, 3, 3)
    assert summary.attention_before == "sdpa" and model.config._attn_implementation == "kpro"
    assert "7 RMSNorm -> kpro.ops.rms_norm" in str(summary)
    ids, mask, labels = left_padded()
    want = stock(input_ids=ids, attention_mask=mask, labels=labels)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()  # padding positions are not compared: kpro gives zeros where nothing is visible
    assert rel(got.logits[real], want.logits[real]) < 1e-6
    assert abs(got.loss.item() - want.loss.item()) < 1e-6
    want.loss.backward()
    got.loss.backward()
    reference = grads(stock)
    assert grads(model).keys() == reference.keys()
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-5, name


def test_the_kernels_are_kpros():
    """The patched model on kpro's Triton kernels (in the CPU interpreter here, on the GPU there)."""
    stock = make_stock(layers=1, hidden_size=64, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2)
    model, _ = patched_copy(stock)
    ids, mask, labels = left_padded(batch=2, length=9)
    want = stock(input_ids=ids, attention_mask=mask, labels=labels)
    with kpro.ops.backend("triton"):
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
        got.loss.backward()
    want.loss.backward()
    assert rel(got.logits[mask.bool()], want.logits[mask.bool()]) < 1e-5
    reference = grads(stock)
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-4, name


class LowRank(torch.nn.Module):
    """A LoRA-style adapter replacing a projection: base(x) + B(A(x))."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base, self.a = base, torch.nn.Linear(base.in_features, rank, bias=False)
        self.b = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def test_projections_replaced_after_apply_are_called():
    """apply's MLP forward calls the layer's gate/up/down modules, so adapters put in their place later work."""
    stock = make_stock(layers=2)
    model, _ = patched_copy(stock)
    for m in (stock, model):
        torch.manual_seed(5)
        for layer in m.model.layers:
            layer.mlp.up_proj, layer.mlp.down_proj = LowRank(layer.mlp.up_proj), LowRank(layer.mlp.down_proj)
    ids, mask, _ = left_padded()
    got, want = model(input_ids=ids, attention_mask=mask).logits, stock(input_ids=ids, attention_mask=mask).logits
    assert rel(got[mask.bool()], want[mask.bool()]) < 1e-6
    assert rel(got[mask.bool()], patched_copy(make_stock(layers=2))[0](input_ids=ids, attention_mask=mask)
               .logits[mask.bool()]) > 1e-3  # the adapters change the output: they were called


def test_greedy_generation_with_a_cache_equals_stock():
    stock = make_stock(use_cache=True)
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_from_pretrained_takes_attn_implementation_kpro(tmp_path):
    stock = make_stock()
    stock.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="kpro")
    assert loaded.config._attn_implementation == "kpro"
    ids, mask, _ = left_padded()
    assert rel(loaded(input_ids=ids, attention_mask=mask).logits[mask.bool()],
               stock(input_ids=ids, attention_mask=mask).logits[mask.bool()]) < 1e-6


def test_hf_trainer_steps_give_the_stock_losses(tmp_path):
    pytest.importorskip("accelerate")
    ids, mask, labels = left_padded(batch=8, length=16, seed=3)
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]

    def train(model, out):
        args = transformers.TrainingArguments(out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                                              logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    stock = make_stock()
    model, _ = patched_copy(stock)
    want = train(stock, tmp_path / "stock")
    got = train(model, tmp_path / "kpro")
    assert len(got) == 4 and got == pytest.approx(want, rel=1e-5)


def test_torch_compile_of_the_patched_model():
    torch._dynamo.reset()
    stock = make_stock(layers=2)
    model, _ = patched_copy(stock)
    compiled = torch.compile(model, fullgraph=True)
    ids, mask, labels = left_padded()
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    want = stock(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(got.logits[mask.bool()], want.logits[mask.bool()]) < 1e-5
    got.loss.backward()
    want.loss.backward()
    reference = grads(stock)
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-4, name


# ------------------------------------------------------------------------------------------------- masks

def four_d(mask, length, additive=False, hidden=torch.finfo(torch.float32).min):
    """transformers' 4-D form of causal attention over a 2-D padding mask: [B, 1, T, T]."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, hidden)


@pytest.mark.parametrize("additive, hidden", [(False, None), (True, torch.finfo(torch.float32).min),
                                              (True, -float("inf")), (True, -1e9), (True, -1e4)],
                         ids=["bool", "additive-min", "additive-inf", "additive-1e9", "additive-1e4"])
def test_a_4d_causal_padding_mask_is_converted(additive, hidden):
    stock = make_stock()
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded()
    want = stock(input_ids=ids, attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=four_d(mask, ids.shape[1], additive, hidden)).logits
    assert rel(got[mask.bool()], want[mask.bool()]) < 1e-6


def test_masks_kpro_cannot_take_are_refused_by_name():
    stock = make_stock(layers=1)
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded()
    t = ids.shape[1]
    biased = four_d(mask, t, additive=True)
    biased[..., 3] += 0.5  # an ALiBi-like bias where keys are visible
    shallow = four_d(mask, t, additive=True, hidden=-50.0)  # softmax weight e^-50 > 0: a bias, not hidden
    prefix = four_d(mask, t)
    prefix[:, :, :4, :4] = mask.bool()[:, None, None, :4]  # a prefix that sees itself both ways
    cases = [(biased, "values other than 0 and a large negative"), (shallow, "values other than 0 and a large negative"), (prefix, "not causal attention over a key-padding"),
             (four_d(mask, t).expand(-1, 8, -1, -1).clone().index_fill_(1, torch.tensor([3]), False),
              "differs by head"), (four_d(mask, t).long(), "boolean or floating point")]
    for bad, message in cases:
        with pytest.raises((NotImplementedError, ValueError), match=message):
            model(input_ids=ids, attention_mask=bad)
    additive_2d = (1.0 - mask.float()) * torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="additive float mask"):
        kpro_hf.key_padding_mask(additive_2d, 3, t, t, True)
    for call in (model, model.model):  # transformers would make it boolean first: real tokens hidden, padding seen
        with pytest.raises(ValueError, match="additive float mask"):
            call(input_ids=ids, attention_mask=additive_2d)
    with pytest.raises(ValueError, match="additive float mask"):
        model(ids, additive_2d)  # given by position
    with pytest.raises(NotImplementedError, match="no attention weights"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    wide = torch.cat((torch.zeros_like(mask[:, :2]), mask), 1)  # the stock model read its first columns, silently
    for use_cache in (True, False):  # without a cache the error blamed a static cache
        with pytest.raises(ValueError, match=rf"the attention mask has {t + 2} columns for {t} tokens"):
            model(input_ids=ids, attention_mask=wide, use_cache=use_cache)
    static = transformers.StaticCache(config=model.config, max_cache_len=2 * t)
    with pytest.raises(NotImplementedError, match="a static cache puts them elsewhere"):
        cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(input_ids=ids, use_cache=True, **{cache_argument: static})  # the prefill: no tensor offset yet
    packed = torch.cat([torch.arange(6), torch.arange(t - 6)]).expand(3, -1)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=packed)
    q = k = v = torch.randn(1, 8, 4, 16)
    with pytest.raises(NotImplementedError, match="no dropout"):
        kpro_hf.attention_forward(model.model.layers[0].self_attn, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        kpro_hf.attention_forward(model.model.layers[0].self_attn, q, k, v, None, softcap=30.0)


def test_a_sliding_window_is_taken_only_where_it_changes_nothing():
    stock = make_stock("mistral", sliding_window=16)
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded(length=14)
    assert rel(model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
               stock(input_ids=ids, attention_mask=mask).logits[mask.bool()]) < 1e-6
    long_ids = torch.randint(3, 101, (1, 20))
    with pytest.raises(NotImplementedError, match="20 keys exceed this layer's window of 16"):
        model(input_ids=long_ids)
    # the window counts the query's own key: with 16 keys every query sees all, with 17 the last misses the first
    assert rel(model(input_ids=long_ids[:, :16]).logits, stock(input_ids=long_ids[:, :16]).logits) < 1e-6
    with pytest.raises(NotImplementedError, match="17 keys exceed this layer's window of 16"):
        model(input_ids=long_ids[:, :17])


def test_unsupported_models_are_refused_and_left_unchanged():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(kpro_hf.UnsupportedModelError, match="GPT2LMHeadModel \\(model_type 'gpt2'\\)"):
        kpro_hf.apply(gpt2)
    with pytest.raises(kpro_hf.UnsupportedModelError, match="not a transformers PreTrainedModel"):
        kpro_hf.apply(kpro.Llama(kpro.LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=24,
                                                  num_hidden_layers=1, num_attention_heads=2)))

    class Wrapper(torch.nn.Module):  # forwards .config, as wrappers of a model do
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config
    with pytest.raises(kpro_hf.UnsupportedModelError, match="got Wrapper, not a transformers PreTrainedModel, with "
                                                            "the config of a llama model: a wrapper around one?"):
        kpro_hf.apply(Wrapper(make_stock(layers=1)))
    gelu = make_stock(layers=1, hidden_act="gelu")
    with pytest.raises(kpro_hf.UnsupportedModelError, match="MLP uses 'gelu'"):
        kpro_hf.apply(gelu)
    assert not any("forward" in vars(m) for m in gelu.modules()) and gelu.config._attn_implementation == "sdpa"
    summary = kpro_hf.apply(gelu, mlp=False)  # the rest still can
    assert (summary.rms_norms, summary.mlps, summary.attention_layers) == (3, 0, 1)
    bidirectional = make_stock(layers=1)
    bidirectional.config.is_causal = False  # an encoder's attention: every query sees every key
    with pytest.raises(kpro_hf.UnsupportedModelError, match=r"configured bidirectional \(is_causal=False\)"):
        kpro_hf.apply(bidirectional)
    assert not any("forward" in vars(m) for m in bidirectional.modules())
    assert bidirectional.config._attn_implementation == "sdpa"
    bidirectional.set_attn_implementation("kpro")  # without apply: the bidirectional mask it asks for is refused
    with pytest.raises(NotImplementedError, match="this model asks for bidirectional masks"):
        bidirectional(input_ids=torch.randint(3, 101, (1, 6)))


@pytest.mark.parametrize("padded", [False, True])
def test_a_layer_set_bidirectional_after_apply_is_refused_not_guessed(padded):
    """`self_attn.is_causal = False` on a layer (LLM2Vec-style encoders): stock sdpa made it bidirectional only where
    no mask was given, stock eager never, and kpro followed the flag, so with a padding mask its logits differed from
    both, silently. Refused now, mask or not."""
    model = make_stock(layers=2)
    kpro_hf.apply(model)
    ids = torch.randint(3, 101, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    model(input_ids=ids, attention_mask=mask if padded else None)  # causal: runs
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(NotImplementedError, match=r"asks for bidirectional attention \(is_causal=False, set on "
                                                  r"the layer\)"):
        model(input_ids=ids, attention_mask=mask if padded else None)


# -------------------------------------------------------------------------------------------- train_only

@pytest.mark.parametrize("recompute", [False, True], ids=["input-grad-only", "recompute"])
def test_train_only_gradients_and_plan_match_kpros(recompute):
    stock = make_stock(layers=5)
    stock.requires_grad_(False)
    for i in (2, 4):
        stock.model.layers[i].requires_grad_(True)  # the baseline: plain eager with frozen parameters
    model, _ = patched_copy(stock)
    plan = kpro_hf.train_only(model, [4, 2], recompute_frozen=recompute)
    own = kpro.train_only(kpro.Llama(kpro.LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=24,
                                                      num_hidden_layers=5, num_attention_heads=2)), [2, 4],
                          recompute_frozen=recompute)
    assert plan == own and plan.no_graph == (0, 1) and plan.input_grad_only == (3,)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in stock.named_parameters() if p.requires_grad}
    ids, mask, labels = left_padded()
    want = stock(input_ids=ids, attention_mask=mask, labels=labels)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(got.loss.item() - want.loss.item()) < 1e-6
    got.loss.backward()
    want.loss.backward()
    reference = grads(stock)
    assert grads(model).keys() == reference.keys() and all(n.startswith(("model.layers.2.", "model.layers.4."))
                                                           for n in reference)
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-5, name

    params = list(model.parameters())
    saved, out = saved_activation_bytes(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss, params)
    stock_saved, _ = saved_activation_bytes(lambda: stock(input_ids=ids, attention_mask=mask, labels=labels).loss,
                                            list(stock.parameters()))
    assert saved < stock_saved * (0.8 if recompute else 1.0), (saved, stock_saved)

    kpro_hf.train_only(model, None)  # back to full training, the layers' own forwards
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    kpro_hf.train_only(model, [4, 2])
    every = kpro_hf.train_only(model, range(5))  # as kpro.train_only: every layer is full training, head and all
    assert every.trainable == tuple(range(5)) and all(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(layer) for layer in model.model.layers)


@pytest.mark.parametrize("recompute", [False, True], ids=["skipping", "recompute"])
def test_train_only_carries_the_gradient_to_embeddings_unfrozen_after_it(recompute):
    stock = make_stock(layers=4)
    stock.requires_grad_(False)
    for parameter in (*stock.model.layers[3].parameters(), stock.model.embed_tokens.weight):
        parameter.requires_grad_(True)
    model, _ = patched_copy(stock)
    plan = kpro_hf.train_only(model, [3], recompute_frozen=recompute)
    assert plan.no_graph == (0, 1, 2)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids, mask, labels = left_padded()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    stock(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = grads(stock)
    assert grads(model).keys() == reference.keys() and reference["model.embed_tokens.weight"].abs().sum() > 0
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-5, name


def test_train_only_refuses_a_layer_unfrozen_behind_its_back():
    model, _ = patched_copy(make_stock(layers=3))
    kpro_hf.train_only(model, [2])
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    ids, mask, labels = left_padded()
    with pytest.raises(RuntimeError, match="call kpro.integrations.hf.train_only again"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.raises(ValueError, match="block index 3 is out of range"):
        kpro_hf.train_only(model, [3])


def test_train_only_checks_frozen_layers_above_the_lowest_trainable_one_too():
    """The default mode ran those layers with the class's forward, unchecked: unfreezing one went unnoticed."""
    model, _ = patched_copy(make_stock(layers=4))
    kpro_hf.train_only(model, [1])
    model.model.layers[2].mlp.up_proj.weight.requires_grad_(True)
    ids, mask, labels = left_padded()
    # named in the model: every layer has an mlp.up_proj
    with pytest.raises(RuntimeError, match=r"trainable parameter again \(model\.layers\.2\.mlp\.up_proj\.weight\)"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.raises(TypeError, match="recompute_frozen must be True or False, got 'False'"):
        kpro_hf.train_only(model, [1], recompute_frozen="False")


def test_train_only_drops_the_gradients_of_the_layers_it_freezes():
    """Gradients left by full training (zero_grad(set_to_none=False)) let an optimizer built before
    train_only move the frozen layers."""
    model, _ = patched_copy(make_stock(layers=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids, mask, labels = left_padded()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    kpro_hf.train_only(model, [2])
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.model.layers[2].mlp.up_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- how HF users run it

@pytest.mark.parametrize("x_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_rms_norm_gives_the_stock_output_dtype(x_dtype, weight_dtype):
    """transformers' LlamaRMSNorm returns weight * x.to(input dtype): float32 for bf16 activations and an fp32
    weight (a model loaded in fp32, run on bf16 inputs), not the input's dtype."""
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(8).to(weight_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 8).to(x_dtype)
    want, got = norm(x), kpro_hf.rms_norm_forward(norm, x)
    assert got.dtype == want.dtype and torch.allclose(got.float(), want.float(), atol=2e-2)


def test_bf16_autocast_gives_the_stock_attention():
    """Under autocast transformers' RoPE hands over float32 queries and keys (bf16 projections times float32
    cos/sin) with bf16 values: kpro's attention refused the mix, raw, where SDPA casts all three to bf16."""
    stock = make_stock(layers=2)
    ids, mask, labels = left_padded()
    real = mask.bool()
    attention_only, _ = patched_copy(stock, rms_norm=False, mlp=False)
    model, _ = patched_copy(stock)
    with torch.autocast("cpu", torch.bfloat16):
        want = stock(input_ids=ids, attention_mask=mask, labels=labels)
        alone = attention_only(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert alone.dtype == want.logits.dtype == torch.bfloat16 and torch.equal(alone[real], want.logits[real])
    assert rel(got.logits[real], want.logits[real]) < 1e-2 and abs(got.loss.item() - want.loss.item()) < 1e-3
    got.loss.backward()
    want.loss.backward()
    reference = grads(stock)
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 3e-2, name


def test_packed_position_ids_are_refused_under_torch_compile_too():
    """Without a mask, transformers masks packed documents under torch.compile as well; the check was skipped
    there, and kpro attended across the documents (logits 0.6 away from the stock model's). The 2-D mask's
    check was skipped there too."""
    torch._dynamo.reset()
    model, _ = patched_copy(make_stock(layers=1))
    q, k = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16)
    attention = torch.compile(kpro_hf.attention_forward, fullgraph=True)
    layer = model.model.layers[0].self_attn
    assert attention(layer, q, k, k, None, position_ids=torch.arange(10).expand(2, -1))[0].shape == (2, 10, 8, 16)
    packed = torch.cat([torch.arange(4), torch.arange(6)]).expand(2, -1)
    with pytest.raises(RuntimeError, match="packed sequences"):
        attention(layer, q, k, k, None, position_ids=packed)
    # A 2-D mask of other values than 0 and 1 too (an additive one hid the real tokens and showed the padding).
    mask = torch.ones(2, 10)
    mask[0, :3] = 0
    padding = torch.compile(kpro_hf.key_padding_mask, fullgraph=True)
    assert torch.equal(padding(mask, 2, 10, 10, True), mask.bool())
    with pytest.raises(RuntimeError, match="additive float mask"):
        padding((1.0 - mask) * torch.finfo(torch.float32).min, 2, 10, 10, True)



def test_a_patched_model_runs_under_fake_tensors():
    """The checks of the 2-D mask and of packed positions read values outside torch.compile only: a patched
    model's forward under FakeTensorMode (a memory estimate) failed with a data-dependent error, with a mask
    or without. With fake tensors they are assertions, as under torch.compile; on real ones, errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, _ = patched_copy(make_stock(layers=1))
    ids, mask, _ = left_padded()
    for attention_mask in (mask, None):
        with FakeTensorMode(allow_non_fake_inputs=True):
            logits = model(ids, attention_mask=attention_mask).logits
            logits.sum().backward()
        assert logits.shape == (*ids.shape, 101)
    with pytest.raises(ValueError, match="additive float mask"):
        model(ids, attention_mask=mask * 2)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=torch.cat([torch.arange(4), torch.arange(10)]).expand(3, -1))


def test_a_patched_model_saved_whole_loads_again(tmp_path):
    """torch.save of the model object pickled apply's and train_only's forwards as bound methods, looked up by
    name on load: the model saved, and loading it raised AttributeError 'LlamaMLP' object has no attribute."""
    stock = make_stock(layers=3)
    model, _ = patched_copy(stock)
    kpro_hf.train_only(model, [1], recompute_frozen=True)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert [getattr(layer, "_kpro_runner", None) for layer in loaded.model.layers] == ["run_without_graph_or_recomputed", None, "run_recomputed"]
    ids, mask, labels = left_padded()
    assert rel(loaded(input_ids=ids, attention_mask=mask).logits[mask.bool()],
               stock(input_ids=ids, attention_mask=mask).logits[mask.bool()]) < 1e-6
    loaded(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert grads(loaded).keys() == {n for n, p in loaded.named_parameters() if n.startswith("model.layers.1.")}


class CountingLinear(torch.nn.Linear):
    runs = 0

    def forward(self, x):
        CountingLinear.runs += 1
        return super().forward(x)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_train_only_recompute_with_gradient_checkpointing(reentrant):
    """transformers' checkpointing already recomputes a layer: recompute_frozen ran it inside its own backward a
    third time, and with use_reentrant=True died in torch.autograd.grad ('incompatible with .grad()')."""
    stock = make_stock(layers=3)
    stock.requires_grad_(False)
    stock.model.layers[1].requires_grad_(True)
    model, _ = patched_copy(stock)
    kpro_hf.train_only(model, [1], recompute_frozen=True)
    gate = model.model.layers[2].mlp.gate_proj
    counting = CountingLinear(gate.in_features, gate.out_features, bias=False).requires_grad_(False)
    counting.load_state_dict(gate.state_dict())
    model.model.layers[2].mlp.gate_proj = counting
    for m in (stock, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
    ids, mask, labels = left_padded()
    CountingLinear.runs = 0
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert CountingLinear.runs == 2  # the forward and one recomputation
    stock(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = grads(stock)
    assert grads(model).keys() == reference.keys()
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-5, name


def test_train_only_recompute_replays_the_forwards_dropout():
    """recompute_frozen ran a frozen layer again with fresh dropout masks: with attention_dropout=0.5 (the stock
    sdpa attention kept) the gradients were ~50% away from the stock model's with the same parameters frozen.
    The forward's RNG state is now replayed, and the one after the backward is the stock model's."""
    stock = make_stock(layers=3, attention_dropout=0.5).train()
    stock.requires_grad_(False)
    stock.model.layers[0].requires_grad_(True)
    model, _ = patched_copy(stock, attention=False)  # kpro attention has no dropout: keep sdpa's
    kpro_hf.train_only(model, [0], recompute_frozen=True)
    ids, mask, labels = left_padded()
    after = []
    for m in (stock, model):
        torch.manual_seed(123)
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        after.append(torch.get_rng_state())
    assert torch.equal(*after)
    reference = grads(stock)
    assert grads(model).keys() == reference.keys()
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "float64"])
def test_train_only_recompute_compiles_without_graph_breaks(dtype):
    """torch.compile(fullgraph=True) failed to trace a frozen layer recomputed above the trained one (the backward
    of the autograd.Function swapped the forced backends and called torch.autograd.grad); under torch.compile the
    layer is checkpointed (non-reentrant) instead, with the gradients of the stock model with the same layers
    frozen. With the `kernels` package installed, transformers' attention sets a global in its forward, which
    Dynamo refuses inside a checkpoint (transformers' own gradient checkpointing fails alike) unless told that
    the backward may skip it (docs/huggingface.md)."""
    torch._dynamo.reset()
    stock = make_stock(layers=3).to(dtype)
    stock.requires_grad_(False)
    stock.model.layers[1].requires_grad_(True)
    model, _ = patched_copy(stock)
    kpro_hf.train_only(model, [1], recompute_frozen=True)
    assert [getattr(layer, "_kpro_runner", None) for layer in model.model.layers] == ["run_without_graph_or_recomputed", None,
                                                                                   "run_recomputed"]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask, labels = left_padded()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    want = stock(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.loss.dtype == want.loss.dtype
    assert abs(got.loss.item() - want.loss.item()) < 1e-6
    got.loss.backward()
    want.loss.backward()
    reference = grads(stock)
    assert grads(model).keys() == reference.keys() and all(n.startswith("model.layers.1.") for n in reference)
    for name, g in grads(model).items():
        assert rel(g, reference[name]) < 1e-5, name  # transformers' loss is fp32 for float64 models too


def test_compiled_and_accelerate_dispatched_models_are_refused_by_name(tmp_path):
    """apply on torch.compile's wrapper said model_type 'llama' was not one of llama, mistral, qwen2; on a model
    accelerate offloads, it replaced the forwards accelerate's hooks wrap ('rms_norm: weight on meta')."""
    stock = make_stock(layers=2)
    with pytest.raises(kpro_hf.UnsupportedModelError, match="OptimizedModule around LlamaForCausalLM: call "
                                                            "kpro_hf.apply .* before torch.compile"):
        kpro_hf.apply(torch.compile(stock))
    pytest.importorskip("accelerate")
    stock.save_pretrained(tmp_path / "stock")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock", device_map=device_map,
                                                                  offload_folder=tmp_path / "offload")
    for call in (kpro_hf.apply, lambda m: kpro_hf.train_only(m, [1])):
        with pytest.raises(kpro_hf.UnsupportedModelError, match="model.layers.0.* is dispatched by accelerate"):
            call(offloaded)
    assert offloaded.config._attn_implementation == "sdpa" and all(p.requires_grad for p in offloaded.parameters())
    ids, mask, _ = left_padded()
    assert rel(offloaded(input_ids=ids, attention_mask=mask).logits[mask.bool()],
               stock(input_ids=ids, attention_mask=mask).logits[mask.bool()]) < 1e-6


def test_output_attentions_after_switching_away_from_kpro_and_integer_masks_of_other_values():
    """apply's input check refused output_attentions even after set_attn_implementation('eager'), whose own
    message it sent the user to; an integer mask of segment ids (packing) or additive values was read as 0/1."""
    stock = make_stock(layers=1)
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded()
    for bad in (torch.tensor([[1] * 7 + [2] * 7] * 3), (mask - 1) * 10_000):
        with pytest.raises(ValueError, match="holds other values \\(an additive float mask, or segment ids\\?\\)"):
            model(input_ids=ids, attention_mask=bad)
    model.set_attn_implementation("eager")
    stock.set_attn_implementation("eager")
    got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    want = stock(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == 1 and rel(got[0], want[0]) < 1e-6


def test_recompute_frozen_warns_where_a_training_cache_leaves_it_nothing_to_do():
    """With use_cache on (transformers' default), training runs each layer with a cache, and the recomputation
    fell back to a plain run: the memory saving was lost silently (the gradients were right)."""
    model, _ = patched_copy(make_stock(layers=3, use_cache=True))
    kpro_hf.train_only(model, [1], recompute_frozen=True)
    model.train()
    ids, mask, labels = left_padded()
    kpro_hf._warn_cache_in_training.cache_clear()
    with pytest.warns(UserWarning, match="recomputes nothing while the model builds a KV cache in training"):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


def test_a_query_that_sees_no_key_but_whose_own_key_is_seen_is_refused():
    """A 4-D mask hiding every key from a query whose own key later queries see (not padding: its token is read)
    was taken, the query computed as an ordinary causal one, and the next layer's logits were 16-21% away from
    stock sdpa's. Padding queries that see nothing (their own key hidden from all) are still taken."""
    stock = make_stock(layers=2)
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded()
    t = ids.shape[1]
    for query in (0, 5):
        blind = four_d(torch.ones(3, t, dtype=torch.long), t)
        blind[1, :, query] = False  # query `query` of row 1 sees nothing; its key stays visible to the later ones
        for form in (blind, four_d(torch.ones(3, t, dtype=torch.long), t, additive=True).masked_fill(~blind, -1e9)):
            with pytest.raises(NotImplementedError, match=f"query {query} of row 1 sees no key"):
                model(input_ids=ids, attention_mask=form)
    padded = four_d(mask, t) & mask.bool()[:, None, :, None]  # left padding queries see nothing either
    assert rel(model(input_ids=ids, attention_mask=padded).logits[mask.bool()],
               stock(input_ids=ids, attention_mask=mask).logits[mask.bool()]) < 1e-6


def test_masks_and_models_the_audit_found_taken_wrongly_or_refused_wrongly():
    """attn_implementation="kpro" ran any model, a chunked-attention Llama4 computed with a plain causal mask
    (0.53 away); the mask transformers builds on a GPU (padding queries unmasked to see every key) was refused;
    a [1, 1, T, T] mask was refused; output_attentions=True without apply gave empty attentions; packed
    position_ids were read (a device sync) in every layer and advised a mask of ones, which attends across
    the documents."""
    stock = make_stock(layers=2)
    model, _ = patched_copy(stock)
    ids, mask, _ = left_padded()
    t, real = ids.shape[1], mask.bool()
    want = stock(input_ids=ids, attention_mask=mask).logits
    on_gpu = four_d(mask, t, additive=True)
    on_gpu[(on_gpu < 0).all(dim=-1)] = 0  # transformers' _unmask_unattended on CUDA: a query seeing no key sees all
    assert bool((on_gpu[0, 0, 0] == 0).all())  # the first query of row 0, padding, sees every key
    assert rel(model(input_ids=ids, attention_mask=on_gpu).logits[real], want[real]) < 1e-6
    # Not every query that sees nothing the last one sees is padding: a document mask is refused (a first rule
    # read the real keys off the last query and took it, 0.49 away); a query-masked right padding is taken.
    documents = four_d(torch.ones(3, t, dtype=torch.long), t)
    documents[..., 5:, :5] = False
    with pytest.raises(NotImplementedError, match="not causal attention over a key-padding"):
        model(input_ids=ids, attention_mask=documents)
    # Nor is every query seeing every key: a bidirectional mask (an encoder's, all True or all 0) was read as
    # padding queries unmasked and computed causal (0.35 away), as was a real query given every key.
    first_sees_all = four_d(torch.ones(3, t, dtype=torch.long), t)
    first_sees_all[:, :, 0] = True
    for bidirectional in (torch.ones(3, 1, t, t, dtype=torch.bool), torch.zeros(3, 1, t, t), first_sees_all):
        with pytest.raises(NotImplementedError, match="not causal attention over a key-padding"):
            model(input_ids=ids, attention_mask=bidirectional)
    right = torch.ones(3, t, dtype=torch.long)
    right[0, 9:] = 0
    both = four_d(right, t) & right.bool()[:, None, :, None]  # padding queries see nothing either
    assert rel(model(input_ids=ids, attention_mask=both).logits[right.bool()],
               stock(input_ids=ids, attention_mask=right).logits[right.bool()]) < 1e-6
    with torch.inference_mode():  # position_ids are inference tensors, which keep no version counter
        assert rel(model(input_ids=ids).logits, stock(input_ids=ids).logits) < 1e-6
    whole = torch.ones(3, t, dtype=torch.long)
    broadcast = four_d(whole[:1], t)
    assert broadcast.shape == (1, 1, t, t)
    assert rel(model(input_ids=ids, attention_mask=broadcast).logits,
               stock(input_ids=ids, attention_mask=whole).logits) < 1e-6

    config = transformers.Llama4TextConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=4, num_local_experts=2,
        num_experts_per_tok=1, max_position_embeddings=64, attn_implementation="sdpa")
    llama4 = transformers.Llama4ForCausalLM(config)
    llama4.set_attn_implementation("kpro")
    with pytest.raises(kpro_hf.UnsupportedModelError, match="supports model_type llama, mistral, qwen2; got "
                                                            "Llama4TextAttention of model_type 'llama4_text'"):
        llama4(input_ids=ids % 61)

    loaded = copy.deepcopy(stock)
    loaded.set_attn_implementation("kpro")  # as from_pretrained(..., attn_implementation="kpro"), no apply
    with pytest.raises(NotImplementedError, match="no attention weights"):
        loaded(input_ids=ids, attention_mask=mask, output_attentions=True)

    packed = torch.cat([torch.arange(6), torch.arange(t - 6)]).expand(3, -1)
    with pytest.raises(NotImplementedError, match="pad each document into a row of its own"):
        model(input_ids=ids, position_ids=packed)
    positions = torch.arange(t).expand(3, -1)
    reads = []
    diff = torch.Tensor.diff

    def counted(self, *args, **kwargs):
        reads.append(self)
        return diff(self, *args, **kwargs)
    with mock.patch.object(torch.Tensor, "diff", counted):
        model(input_ids=ids, position_ids=positions)
    assert len(reads) == 1  # once per forward, not per layer


def test_the_mask_function_reads_the_keys_from_kv_offset():
    """transformers' own padding_mask_function reads padding_mask[b, kv_idx] with kv_idx = kv_offset + j (a
    sliding-window cache keeps only the last keys); the first kv_length columns were read instead."""
    from transformers.masking_utils import padding_mask_function

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 1]])
    got = kpro_hf.attention_mask(batch_size=2, q_length=1, kv_length=3, q_offset=4, kv_offset=2, attention_mask=mask)
    reference = padding_mask_function(mask)
    expected = torch.tensor([[bool(reference(b, 0, 4, 2 + j)) for j in range(3)] for b in range(2)])
    assert torch.equal(got, expected)  # [[T, T, T], [T, F, T]]


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("tq", [1, 2])
def test_a_4d_causal_padding_mask_of_a_decoding_step_gives_its_padding_mask(tq, additive):
    """A 4-D mask [B, 1, Tq, Tk] with Tq < Tk (new tokens after cached ones, the queries at the end): each
    query's own key is key Tk - Tq + q. Taken as key q, an unpadded row's last query seemed to 'see a key
    causality hides' and the row came back with no real key at all."""
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    batch, tk = padding.shape
    keys, queries = torch.arange(tk), torch.arange(tq) + (tk - tq)
    allowed = padding.bool()[:, None, None, :] & (keys[None, :] <= queries[:, None])[None, None]  # [B, 1, Tq, Tk]
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min) if additive else allowed
    assert torch.equal(kpro_hf.key_padding_mask(mask, batch, tq, tk, causal=True), padding.bool())
