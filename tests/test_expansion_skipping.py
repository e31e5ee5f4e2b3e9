"""kpro.train_only: freezing, frozen-block gradient skipping and recomputation, measured and compared with
plain eager PyTorch (the same model with requires_grad_(False) on the frozen parameters)."""
import copy

import pytest
import torch

import kpro
from kpro.expansion import saved_activation_bytes
from kpro.train import causal_lm_loss
from conftest import relative_error, tiny_config


def expanded_model(num_blocks=4, num_new=2, position="interleave", seed=0, **overrides):
    """An expanded fp32 model whose new blocks are no longer identities (as after some training)."""
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config(num_hidden_layers=num_blocks, **overrides))
    new_ids = kpro.expand(model, num_new, position=position)
    with torch.no_grad():
        for i in new_ids:
            model.layers[i].self_attn.o_proj.weight.normal_(0, 0.1)
            model.layers[i].mlp.down_proj.weight.normal_(0, 0.1)
    return model, new_ids


def frozen_by_hand(model, block_ids):
    """The baseline: plain eager PyTorch, frozen parameters marked requires_grad=False, nothing else."""
    baseline = copy.deepcopy(model)
    baseline.requires_grad_(False)
    for i in block_ids:
        baseline.layers[i].requires_grad_(True)
    return baseline


def batch(cfg, seed=0, shape=(2, 13)):
    ids = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def loss_and_grads(model, ids, mask=None):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model(ids, attention_mask=mask), ids)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [False, True], ids=["skipping", "recompute"])
@pytest.mark.parametrize("position", ["interleave", "top", "bottom"])
def test_trainable_gradients_equal_the_eager_baseline(position, recompute):
    model, new_ids = expanded_model(position=position)
    ids, mask = batch(model.config)
    baseline = frozen_by_hand(model, new_ids)
    full = copy.deepcopy(model)  # every parameter training: the new blocks' gradients do not depend on freezing
    plan = kpro.train_only(model, new_ids, recompute_frozen=recompute)
    assert plan.trainable == tuple(new_ids)
    loss, grads = loss_and_grads(model, ids, mask)
    base_loss, base_grads = loss_and_grads(baseline, ids, mask)
    _, full_grads = loss_and_grads(full, ids, mask)
    assert torch.equal(loss, base_loss)
    assert set(grads) == set(base_grads) == {n for n, _ in model.named_parameters()
                                             if n.startswith(tuple(f"layers.{i}." for i in new_ids))}
    for name, grad in grads.items():
        assert relative_error(grad, base_grads[name]) <= 1e-6, name
        assert relative_error(grad, full_grads[name]) <= 1e-6, name
        assert grad.abs().sum() > 0, name


def test_skipping_and_recompute_give_the_same_loss_and_gradients():
    model, new_ids = expanded_model(num_blocks=6, num_new=3)
    ids, mask = batch(model.config, seed=3)
    results = []
    for recompute in (False, True, False):  # and switching back
        kpro.train_only(model, new_ids, recompute_frozen=recompute)
        results.append(loss_and_grads(model, ids, mask))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert grads.keys() == results[0][1].keys()
        for name in grads:
            assert relative_error(grads[name], results[0][1][name]) <= 1e-6, name


def test_recompute_under_autocast_and_forced_backend_matches_skipping():
    """The backward re-runs frozen blocks outside the forward's autocast and backend blocks: it must
    restore both, or the recomputed activations (and gradients) would differ."""
    model, new_ids = expanded_model()
    ids, mask = batch(model.config)
    seen = []
    model.layers[3].register_forward_pre_hook(
        lambda *_: seen.append((kpro.ops.requested_backend("rms_norm"), torch.is_autocast_enabled("cpu"))))
    results = {}
    for recompute in (False, True):
        kpro.train_only(model, new_ids, recompute_frozen=recompute)
        model.zero_grad(set_to_none=True)
        with kpro.ops.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model(ids, attention_mask=mask), ids)
        loss.backward()
        results[recompute] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert seen == [("torch", True)] * 3  # skipping: forward once; recompute: forward, and again in backward
    assert torch.equal(results[True][0], results[False][0])
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name


def test_blocks_below_the_lowest_trainable_build_no_graph():
    model, new_ids = expanded_model(position="top")  # trainable: 4, 5; below: 0-3
    plan = kpro.train_only(model, new_ids)
    assert plan.no_graph == (0, 1, 2, 3) and plan.input_grad_only == ()
    grad_enabled = {}
    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda module, args, i=i: grad_enabled.__setitem__(i, torch.is_grad_enabled()))
    ids, _ = batch(model.config)
    loss_and_grads(model, ids)
    assert grad_enabled == {0: False, 1: False, 2: False, 3: False, 4: True, 5: True}


@pytest.mark.parametrize("recompute", [False, True], ids=["skipping", "recompute"])
def test_embeddings_unfrozen_after_train_only_get_their_gradient(recompute):
    """Training new token rows after expansion: the blocks below the lowest trainable one must then carry
    the gradient down to the embeddings instead of running without a graph."""
    model, new_ids = expanded_model(position="top")  # trainable: 4, 5; below: 0-3
    kpro.train_only(model, new_ids, recompute_frozen=recompute)
    model.embed_tokens.weight.requires_grad_(True)
    baseline = frozen_by_hand(model, new_ids)
    baseline.embed_tokens.weight.requires_grad_(True)
    ids, mask = batch(model.config)
    loss, grads = loss_and_grads(model, ids, mask)
    base_loss, base_grads = loss_and_grads(baseline, ids, mask)
    assert torch.equal(loss, base_loss) and set(grads) == set(base_grads)
    assert base_grads["embed_tokens.weight"].abs().sum() > 0
    for name, grad in grads.items():
        assert relative_error(grad, base_grads[name]) <= 1e-6, name


def test_blocks_below_the_lowest_trainable_are_recomputed_when_unfrozen_embeddings_need_their_gradient():
    """They kept every activation under recompute_frozen=True as without it (a plain call), where the blocks above
    the lowest trainable one keep their input only; the gradients are the same either way."""
    saved = {}
    for recompute in (False, True):
        model, new_ids = expanded_model(position="top")  # trainable: 4, 5; below: 0-3
        kpro.train_only(model, new_ids, recompute_frozen=recompute)
        model.embed_tokens.weight.requires_grad_(True)
        ids, _ = batch(model.config)
        saved[recompute], _ = saved_activation_bytes(lambda: causal_lm_loss(model(ids), ids), model.parameters())
    everything_but_inputs = saved[False] - saved[True]
    block_input = ids.numel() * model.config.hidden_size * 4
    assert everything_but_inputs >= 4 * 6 * block_input, saved  # four blocks below, each saving far more than x


def test_blocks_added_or_removed_after_train_only_are_named_at_the_next_forward():
    """A bare "zip() argument 2 is shorter than argument 1" before."""
    model, new_ids = expanded_model(position="top")
    kpro.train_only(model, new_ids)
    ids, _ = batch(model.config)
    model.layers.append(copy.deepcopy(model.layers[0]))
    with pytest.raises(ValueError, match=r"the model has 7 blocks, but its train_only plan \(block_runners\) covers 6: "
                                         r"call kpro.train_only again"):
        model(ids)
    del model.layers[-1]
    del model.layers[-1]
    with pytest.raises(ValueError, match="the model has 5 blocks, but its train_only plan"):
        model(ids)


def test_frozen_parameters_get_no_gradient_and_recompute_reruns_each_frozen_block_once():
    model, new_ids = expanded_model(num_blocks=4, num_new=2)  # blocks 0 1 [2] 3 4 [5]
    plan = kpro.train_only(model, new_ids, recompute_frozen=True)
    assert (plan.no_graph, plan.input_grad_only, plan.recompute_frozen) == ((0, 1), (3, 4), True)
    calls = {i: 0 for i in range(6)}
    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids, mask = batch(model.config)
    _, grads = loss_and_grads(model, ids, mask)
    assert calls == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 1}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(dict(model.named_parameters())[n].grad is None for n in frozen)
    assert all(name.startswith(("layers.2.", "layers.5.")) for name in grads)


# ------------------------------------------------------------------------------------ saved activations

def saved_bytes(model, ids):
    nbytes, loss = saved_activation_bytes(lambda: causal_lm_loss(model(ids), ids), model.parameters())
    loss.backward()  # the graph must be usable as measured
    return nbytes


def test_saved_bytes_take_the_model_itself_and_refuse_other_excludes():
    """exclude=model died in 'not iterable', exclude=model.state_dict() in an AttributeError on str."""
    model = kpro.Llama(tiny_config())
    ids = torch.randint(3, 60, (2, 7))
    assert saved_activation_bytes(lambda: causal_lm_loss(model(ids), ids), model)[0] == saved_bytes(model, ids)
    with pytest.raises(TypeError, match="exclude takes tensors \\(model.parameters\\(\\)\\), got str items"):
        saved_activation_bytes(lambda: model(ids), model.state_dict())


def block_only_saved_bytes(block, cfg, ids_shape, frozen):
    """What one block alone saves, its input requiring grad (cos/sin shared, so left out)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*ids_shape, cfg.hidden_size, generator=generator).requires_grad_()
    cos, sin = kpro.model.RotaryEmbedding(cfg)(torch.arange(ids_shape[1])[None], x.dtype)
    block.requires_grad_(not frozen)
    nbytes, _ = saved_activation_bytes(lambda: block(x, cos, sin), list(block.parameters()) + [cos, sin])
    return nbytes


def test_saved_bytes_accounting_is_exact():
    """Each frozen block above the lowest trainable one adds exactly its input-gradient needs (skipping), or
    exactly one [B, T, hidden] input (recompute); blocks below it add nothing."""
    shape = (2, 16)
    measured = {}
    for extra in (0, 2):  # two more frozen blocks above the trainable one, and two more below it
        torch.manual_seed(0)
        model = kpro.Llama(tiny_config(num_hidden_layers=4 + 2 * extra))
        ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
        trainable = 1 + extra
        for recompute in (False, True):
            kpro.train_only(model, [trainable], recompute_frozen=recompute)
            measured[extra, recompute] = saved_bytes(model, ids)
    cfg = tiny_config()
    per_frozen_block = block_only_saved_bytes(kpro.model.Block(cfg), cfg, shape, frozen=True)
    block_input = 2 * 16 * cfg.hidden_size * 4
    assert measured[2, False] - measured[0, False] == 2 * per_frozen_block
    assert measured[2, True] - measured[0, True] == 2 * block_input
    # What one frozen block keeps for dX, and nothing else: x and rstd (norm 1), q, k, v, out and the
    # log-sum-exp (attention), h and rstd (norm 2), gate and up (SwiGLU); no input of any frozen projection.
    b, t, d, f, kv = 2, 16, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    expected = 4 * (b * t * d + b * t + b * t * d + 2 * b * t * kv + b * t * d + b * t * cfg.num_attention_heads
                    + b * t * d + b * t + 2 * b * t * f)
    assert per_frozen_block == expected


def test_recompute_saves_at_least_30_percent_less_than_the_eager_baseline():
    """LLaMA Pro's geometry (32 blocks + 8 interleaved) at a tiny width: a measured property, in bytes."""
    model, new_ids = expanded_model(num_blocks=32, num_new=8, hidden_size=32, intermediate_size=88,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    ids, _ = batch(model.config, shape=(1, 16))
    eager = saved_bytes(frozen_by_hand(model, new_ids), ids)
    kpro.train_only(model, new_ids)
    skipping = saved_bytes(model, ids)
    kpro.train_only(model, new_ids, recompute_frozen=True)
    recompute = saved_bytes(model, ids)
    assert skipping <= eager  # kpro's ops already save only what dX needs (the rest: see the benchmarks)
    assert recompute <= 0.7 * eager, (recompute, eager)


# ---------------------------------------------------------------------------------- modes and errors

def test_all_blocks_or_none_is_full_training():
    model, new_ids = expanded_model()
    kpro.train_only(model, new_ids, recompute_frozen=True)
    for ids in (None, range(len(model.layers))):
        plan = kpro.train_only(model, ids)
        assert plan.full_training and model.block_runners is None
        assert all(p.requires_grad for p in model.parameters())
        kpro.train_only(model, new_ids)


def test_train_only_leaves_inference_unchanged():
    model, new_ids = expanded_model()
    ids, mask = batch(model.config)
    with torch.no_grad():
        before = model(ids, attention_mask=mask)
    generated = kpro.generate(model, ids[1:, 4:], 5)
    for recompute in (False, True):
        kpro.train_only(model, new_ids, recompute_frozen=recompute)
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask), before)
        assert torch.equal(kpro.generate(model, ids[1:, 4:], 5), generated)


def test_a_frozen_block_made_trainable_behind_train_only_is_an_error():
    model, new_ids = expanded_model()
    kpro.train_only(model, new_ids, recompute_frozen=True)
    model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    ids, _ = batch(model.config)
    with pytest.raises(RuntimeError, match=r"trainable parameter again \(layers\.0\.mlp\.up_proj\.weight\)"):
        model(ids)


@pytest.mark.parametrize("ids, error, message", [
    ([6], ValueError, "block index 6 is out of range: the model has 6 blocks"),
    ([-1], ValueError, "block index -1 is out of range"),
    ([], ValueError, "no block to train"),
    (3, TypeError, "collection of block indices"),
    ([1.0], TypeError, "must be integers"),
])
def test_bad_block_ids_are_refused(ids, error, message):
    model, _ = expanded_model()
    with pytest.raises(error, match=message):
        kpro.train_only(model, ids)
    assert model.block_runners is None and all(p.requires_grad for p in model.parameters())


def test_numpy_and_tensor_integers_are_block_indices():
    """Indices often come from numpy or torch (`torch.nonzero`, `np.arange`): integers of any kind count,
    bools do not."""
    expected, _ = expanded_model()
    kpro.train_only(expected, [1, 3])
    ids = [torch.tensor(1), torch.tensor(3, dtype=torch.int32)]
    np = pytest.importorskip("numpy")
    for given in (ids, torch.tensor([1, 3]), [np.int64(1), np.int32(3)], np.array([3, 1])):
        model, _ = expanded_model()
        kpro.train_only(model, given)
        assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in expected.parameters()]
    for bad in ([torch.tensor(True)], [np.bool_(True)], [torch.tensor(1.0)]):
        with pytest.raises(TypeError, match="block indices must be integers"):
            kpro.train_only(expanded_model()[0], bad)


def test_train_only_drops_the_gradients_of_the_parameters_it_freezes():
    """Gradients kept from full training (zero_grad(set_to_none=False), or a step in progress) stayed on the
    frozen parameters: an optimizer built before train_only then moved the frozen blocks (decay, moments)."""
    model, new_ids = expanded_model()
    ids, mask = batch(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss_and_grads(model, ids, mask)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    kpro.train_only(model, new_ids)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    causal_lm_loss(model(ids, attention_mask=mask), ids).backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.layers[new_ids[0]].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("recompute", [False, True], ids=["skipping", "recompute"])
def test_unfreezing_a_frozen_block_above_the_lowest_trainable_one_is_an_error_too(recompute):
    """The docs promise it for every block train_only froze; the default mode ran those above L plainly."""
    model, new_ids = expanded_model()  # blocks 0 1 [2] 3 4 [5]
    kpro.train_only(model, new_ids, recompute_frozen=recompute)
    model.layers[3].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"trainable parameter again \(layers\.3\.mlp\.up_proj\.weight\)"):
        model(batch(model.config)[0])


def test_train_only_refuses_a_model_with_lora_adapters():
    """It trains whole blocks: on an adapted model it made the blocks' base weights trainable (and None
    every base weight), where add_adapters had left only the adapters."""
    model, new_ids = expanded_model()
    kpro.lora.add_adapters(model, ["a"], rank=2)
    for ids in (new_ids, None):
        with pytest.raises(ValueError, match=r"the model has LoRA adapters \(42 layers, first: layers.0.self_attn.q_proj\)"):
            kpro.train_only(model, ids)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    model, new_ids = expanded_model()
    kpro.train_only(model, new_ids)
    with pytest.raises(ValueError, match=r"in train_only mode .* kpro.train_only\(model, None\) before adding adapters"):
        kpro.lora.add_adapters(model, ["a"])


def test_a_bare_index_or_a_string_flag_is_refused():
    np = pytest.importorskip("numpy")
    model, _ = expanded_model()
    for bare in (np.int64(2), torch.tensor(2), b"\x02"):
        with pytest.raises(TypeError, match="block_ids must be a collection of block indices"):
            kpro.train_only(model, bare)
    for flag in ("False", None, 1):
        with pytest.raises(TypeError, match="recompute_frozen must be True or False"):
            kpro.train_only(model, [2], recompute_frozen=flag)
    assert model.block_runners is None and all(p.requires_grad for p in model.parameters())


def test_train_expanded_names_blocks_that_are_not_a_list(tmp_path):
    from kpro.expansion.posttrain import blocks_to_train
    assert blocks_to_train(tmp_path, (4, 9)) == [4, 9]
    for bad in (4, "4,9"):  # an int was a raw "'int' object is not iterable"; a string became ['4', ',', '9']
        with pytest.raises(TypeError, match=r"blocks must be a list of block indices, such as \[4, 9, 14\]"):
            blocks_to_train(tmp_path, bad)


def test_the_recomputation_restores_every_nested_backend_block(monkeypatch):
    """A frozen block recomputed in the backward runs under the backend blocks its forward ran under, nested
    ones included (keeping the innermost alone ran its RMSNorm under `auto`)."""
    from kpro.ops.backend import requested_backend

    monkeypatch.delenv("KPRO_BACKEND", raising=False)
    model, new_ids = expanded_model()
    ids, mask = batch(model.config)
    seen = []
    model.layers[3].register_forward_pre_hook(
        lambda *_: seen.append((requested_backend("rms_norm"), requested_backend("swiglu"))))
    kpro.train_only(model, new_ids, recompute_frozen=True)
    with kpro.ops.backend("torch"), kpro.ops.backend(swiglu="torch"):
        loss = causal_lm_loss(model(ids, attention_mask=mask), ids)
    loss.backward()
    assert seen == [("torch", "torch")] * 2  # the forward, and the recomputation in the backward
