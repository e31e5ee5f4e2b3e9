"""kpro.expand: where new blocks go, identity at init, the published LLaMA Pro rule, and what is refused."""
import pytest
import torch

import kpro
from kpro.expansion import expansion_layout, new_block_indices
from kpro.train import adamw, causal_lm_loss


@pytest.mark.parametrize("n, p, expected", [
    (32, 8, [4, 9, 14, 19, 24, 29, 34, 39]),  # LLaMA Pro: LLaMA-2-7B, 32 -> 40 blocks
    (4, 2, [2, 5]),
    (4, 4, [1, 3, 5, 7]),
    (6, 3, [2, 5, 8]),
    (4, 1, [4]),
    (1, 1, [1]),
])
def test_interleave_indices(n, p, expected):
    assert new_block_indices(n, p) == expected
    assert new_block_indices(n, p, "interleave") == expected


def test_top_and_bottom_indices():
    assert new_block_indices(4, 3, "top") == [4, 5, 6]
    assert new_block_indices(4, 3, "bottom") == [0, 1, 2]
    assert new_block_indices(3, 5, "top") == [3, 4, 5, 6, 7]  # P need not divide N here


@pytest.mark.parametrize("num_blocks", [0, -4, True, 4.0, "4"])
def test_a_bad_number_of_original_blocks_is_refused(num_blocks):
    """0 or -4 original blocks gave no new block, or copies of block -1; 4.0 and "4" failed inside range()."""
    for position in ("interleave", "top", "bottom"):
        with pytest.raises(ValueError, match=f"the number of original blocks must be a positive integer, got "
                                             f"{num_blocks!r}"):
            expansion_layout(num_blocks, 2, position)


def test_layout_names_the_copied_block():
    assert expansion_layout(4, 2) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    assert expansion_layout(2, 2, "top") == [(0, False), (1, False), (1, True), (1, True)]
    assert expansion_layout(2, 2, "bottom") == [(0, True), (0, True), (0, False), (1, False)]


@pytest.mark.parametrize("position, num_new", [("interleave", 2), ("interleave", 4), ("top", 3), ("bottom", 1)])
def test_identity_at_init(make_model, position, num_new):
    model = make_model(dtype=torch.float32, num_hidden_layers=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding exercises the masked attention path too
    before = model(ids), model(ids, attention_mask=mask)
    new_ids = kpro.expand(model, num_new, position=position)
    assert new_ids == new_block_indices(4, num_new, position)
    assert len(model.layers) == model.config.num_hidden_layers == 4 + num_new
    after = model(ids), model(ids, attention_mask=mask)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # exactly, not approximately


def test_expanded_model_generates_like_the_original(make_model):
    model = make_model(dtype=torch.float32, num_hidden_layers=2)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    before = kpro.generate(model, ids, 6)
    kpro.expand(model, 2)
    assert torch.equal(kpro.generate(model, ids, 6), before)  # the KV cache covers the new layers


def test_state_dict_follows_the_published_rule(make_model):
    """LLaMA Pro's rule, written out for N=4, P=2: blocks 0, 1, copy of 1, 2, 3, copy of 3; the copies
    with o_proj and down_proj zero; every other tensor unchanged."""
    model = make_model(dtype=torch.float32, num_hidden_layers=4)
    old = {name: t.clone() for name, t in model.state_dict().items()}
    kpro.expand(model, 2)
    new = model.state_dict()
    sources = {0: 0, 1: 1, 2: 1, 3: 2, 4: 3, 5: 3}
    assert {name for name in new if not name.startswith("layers.")} == {name for name in old if not name.startswith("layers.")}
    assert len(new) == len(old) + 2 * 9
    for name, tensor in new.items():
        if not name.startswith("layers."):
            assert torch.equal(tensor, old[name]), name
            continue
        _, index, rest = name.split(".", 2)
        source = old[f"layers.{sources[int(index)]}.{rest}"]
        if int(index) in (2, 5) and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert torch.equal(tensor, torch.zeros_like(source)), name
        else:
            assert torch.equal(tensor, source), name


def test_new_blocks_are_copies_not_shared(make_model):
    """Every tensor of a new block is its own storage, not only q_proj's: a shared k_proj or norm would train
    the source block too."""
    model = make_model(dtype=torch.float32, num_hidden_layers=2)
    kpro.expand(model, 1, position="top")
    new, source = model.layers[2], model.layers[1]
    assert new is not source
    new_tensors, source_tensors = dict(new.named_parameters()), dict(source.named_parameters())
    assert new_tensors.keys() == source_tensors.keys() and len(new_tensors) == 9
    for name, tensor in new_tensors.items():
        assert tensor.data_ptr() != source_tensors[name].data_ptr(), name


def test_new_blocks_are_trainable_even_when_their_source_was_frozen(make_model):
    model = make_model(dtype=torch.float32, num_hidden_layers=2)
    model.requires_grad_(False)
    model.layers[1].requires_grad_(True)  # frozen by hand: block 0 frozen, block 1 trainable
    new_ids = kpro.expand(model, 2, position="interleave")  # copies of blocks 0 and 1
    for i, block in enumerate(model.layers):
        trainable = {p.requires_grad for p in block.parameters()}
        assert trainable == {i in new_ids or i == 2}, (i, trainable)  # old block 1 is now layers.2
    assert not model.embed_tokens.weight.requires_grad


def test_only_new_blocks_change_after_optimizer_steps(make_model):
    model = make_model(dtype=torch.float32, num_hidden_layers=4)
    new_ids = kpro.expand(model, 2)
    kpro.train_only(model, new_ids)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = adamw(model, 1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=generator)
        causal_lm_loss(model(ids), ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        in_new_block = any(name.startswith(f"layers.{i}.") for i in new_ids)
        assert (not torch.equal(p, before[name])) == in_new_block, name


def test_config_of_the_caller_is_left_alone(make_model):
    model = make_model(dtype=torch.float32, num_hidden_layers=2)
    cfg = model.config
    kpro.expand(model, 2)
    assert cfg.num_hidden_layers == 2 and model.config.num_hidden_layers == 4


def test_a_huge_number_of_new_blocks_is_refused_before_the_layout_is_built():
    """expand --blocks 99999999999999 --position top built a layout list of that length: a MemoryError traceback."""
    for position in ("top", "bottom"):
        with pytest.raises(ValueError, match=r"99999999999999 new blocks are more than 1024 times the model's 2 blocks "
                                             r"\(2048 at most\): check the number of new blocks"):
            expansion_layout(2, 99_999_999_999_999, position)
    assert len(expansion_layout(2, 2048, "top")) == 2050  # the bound itself is taken


@pytest.mark.parametrize("num_new, position, message", [
    (0, "interleave", "positive integer"),
    (-2, "top", "positive integer"),
    (1.0, "top", "positive integer"),
    (True, "top", "positive integer"),
    (3, "interleave", "3 does not"),
    (2, "middle", "unknown expansion position 'middle'"),
    (4097, "top", "4097 new blocks are more than 1024 times the model's 4 blocks"),
])
def test_bad_expansions_are_refused(make_model, num_new, position, message):
    model = make_model(dtype=torch.float32, num_hidden_layers=4)
    with pytest.raises(ValueError, match=message):
        kpro.expand(model, num_new, position=position)
    assert len(model.layers) == 4


def test_expanding_a_model_in_training_is_refused(make_model):
    model = make_model(dtype=torch.float32, num_hidden_layers=2)
    kpro.train_only(model, [1])
    with pytest.raises(ValueError, match="train_only mode"):
        kpro.expand(model, 1)
    kpro.train_only(model, None)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    model(ids).sum().backward()
    with pytest.raises(ValueError, match="hold gradients"):
        kpro.expand(model, 1)
    model.zero_grad(set_to_none=True)
    assert kpro.expand(model, 1) == [2]


def test_expanding_a_model_with_adapters_is_refused(make_model):
    model = make_model(dtype=torch.float32, num_hidden_layers=2)
    kpro.lora.add_adapters(model, ["causal"])
    with pytest.raises(ValueError, match="LoRALinear, not nn.Linear"):
        kpro.expand(model, 1)
    with pytest.raises(TypeError, match="kpro.Llama"):
        kpro.expand(torch.nn.Linear(2, 2), 1)
