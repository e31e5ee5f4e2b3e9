"""kpro.train pieces on hand-written examples: packing, the prompt/answer collator, the resumable sampler,
the fp32 masked loss, parameter groups and learning-rate schedules."""
import collections
import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kpro
from kpro import train as kt
from kpro.train.data import content_digest

# ------------------------------------------------------------------------------------------- packing


def test_pack_documents_by_hand():
    rows = kt.pack_documents([[5, 6, 7], [8, 9]], seq_len=4, eos_id=2)
    assert rows.tolist() == [[5, 6, 7, 2], [2, 8, 9, 2]]  # stream 5 6 7 2 8 9 2; rows overlap by one
    rows = kt.pack_documents([[5, 6, 7], [8, 9]], seq_len=4, eos_id=2, bos_id=1)
    assert rows.tolist() == [[1, 5, 6, 7], [7, 2, 1, 8]]  # stream 1 5 6 7 2 1 8 9 2: the tail 9 2 is dropped


def test_packing_predicts_every_token_once():
    docs = [list(range(10, 10 + n)) for n in (1, 7, 3, 12, 5)]
    stream = [t for doc in docs for t in doc + [2]]
    rows = kt.pack_documents(docs, seq_len=6, eos_id=2)
    batch = kt.collate_packed(list(rows))
    targets = [t for row in batch["labels"].tolist() for t in row[1:]]  # what the shifted loss predicts
    assert targets == stream[1:1 + len(targets)]
    assert len(stream) - 1 - len(targets) < 6 - 1  # less than one row of the tail is left out
    assert (batch["input_ids"] != 0).all()  # no padding anywhere


def test_packing_errors():
    with pytest.raises(ValueError, match="seq_len"):
        kt.pack_documents([[1, 2]], seq_len=1, eos_id=2)
    with pytest.raises(ValueError, match="fewer than one row"):
        kt.pack_documents([[1, 2]], seq_len=8, eos_id=2)
    for docs, message in (([[5, 6], [7.9]], "document 1 holds torch.float32 values; token ids are integers"),
                          ([torch.tensor([True])], "document 0 holds torch.bool"),
                          ([[5], "12"], "document 1 is not a sequence of token ids")):
        with pytest.raises(TypeError, match=message):  # truncated to 7 (or taken as 1) before
            kt.pack_documents(docs, seq_len=3, eos_id=2)
    # One document's ids (tok.encode(text)) where a list of documents goes: each id was a document, an eos after it.
    for docs, index, token in (([10, 11, 12], 0, 10), ([[5, 6], torch.tensor(7)], 1, 7), ([[5], np.int64(8)], 1, 8)):
        with pytest.raises(TypeError, match=rf"document {index} is one token id \({token}\), not a document: pass "
                                            r"a list of documents \(one document's ids, tok.encode\(text\), as "
                                            r"\[ids\]\)"):
            kt.pack_documents(docs, seq_len=3, eos_id=2)
    for ids, message in ((dict(eos_id=None), "eos_id must be a token id"), (dict(eos_id=2.5), "eos_id must be"),
                         (dict(eos_id=2, bos_id=-1), "bos_id must be a token id")):
        with pytest.raises(ValueError, match=message):
            kt.pack_documents([[5, 6]], seq_len=3, **ids)
    assert kt.pack_documents([[5, 6]], seq_len=3, eos_id=np.int64(2)).tolist() == [[5, 6, 2]]  # numpy ids are ids


# ------------------------------------------------------------------------------------------ collator


def test_packed_labels_are_a_tensor_of_their_own():
    """labels were input_ids, one tensor: a callback masking labels in place (no loss on each bos) rewrote the
    inputs, -100 included, and the model was refused them."""
    rows = kt.pack_documents([[5, 6, 7], [8, 9]], seq_len=4, eos_id=2, bos_id=1)
    for batch in (kt.collate_packed(list(rows)), next(iter(kt.Batches(rows, 2, shuffle=False)))):
        assert torch.equal(batch["labels"], batch["input_ids"])
        batch["labels"][batch["labels"] == 1] = -100
        assert torch.equal(batch["input_ids"], rows[:2]) and (batch["labels"] == -100).any()


def test_collate_prompt_answer_by_hand():
    batch = kt.collate_prompt_answer([([1, 5, 6], [7, 8]), ([1, 9], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8], [1, 9, 4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8], [-100, -100, 4, -100, -100]]
    assert batch["prompt_lens"].tolist() == [3, 2]
    assert kt.count_loss_tokens(batch["labels"]).item() == 3


def test_collate_prompt_answer_errors():
    with pytest.raises(ValueError, match="example 1 has an empty answer"):
        kt.collate_prompt_answer([([1], [2]), ([1, 3], [])], pad_id=0)
    with pytest.raises(ValueError, match="example 0 has an empty prompt"):
        kt.collate_prompt_answer([([], [2])], pad_id=0)
    with pytest.raises(ValueError, match="no examples"):
        kt.collate_prompt_answer([], pad_id=0)
    for examples, error, message in (([([1.9, 2.2], [3.7])], TypeError, r"example 0 prompt\[0\] is 1.9"),
                                     ([("12", "34")], TypeError, "example 0 prompt must be a sequence of token ids"),
                                     ([([1], [-3])], ValueError, r"example 0 answer\[0\] = -3"),
                                     ([{"prompt": [1], "answer": [2]}], TypeError, "example 0 must be a .* pair, got a dict"),
                                     (torch.ones(2, 2, 3), TypeError, "takes a list of .* pairs, got a Tensor")):
        with pytest.raises(error, match=message):  # truncated, or text read as ids, before
            kt.collate_prompt_answer(examples, pad_id=0)
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        kt.collate_prompt_answer([([1], [2])], pad_id=None)


# ------------------------------------------------------------------------------------------- sampler


def _ids(batch):
    return batch["input_ids"][:, 0].tolist()


def test_batches_cover_each_epoch_and_reshuffle():
    rows = torch.arange(12)[:, None].repeat(1, 3)
    batches = kt.Batches(rows, 4, seed=7)
    it = iter(batches)
    epochs = [[i for _ in range(3) for i in _ids(next(it))] for _ in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = iter(kt.Batches(rows, 4, seed=7))
    assert [i for _ in range(3) for i in _ids(next(again))] == epochs[0]  # the order is a function of the seed
    other = iter(kt.Batches(rows, 4, seed=8))
    assert [i for _ in range(3) for i in _ids(next(other))] != epochs[0]
    assert len(kt.Batches(rows, 5)) == 2 and len(kt.Batches(rows, 5, drop_last=False)) == 3


def test_batches_resume_where_they_stopped():
    rows = torch.arange(10)[:, None].repeat(1, 2)
    reference = iter(kt.Batches(rows, 3, seed=1))
    expected = [_ids(next(reference)) for _ in range(8)]  # crosses two epoch boundaries (3 batches per epoch)
    first = kt.Batches(rows, 3, seed=1)
    it = iter(first)
    seen = [_ids(next(it)) for _ in range(4)]
    state = first.state_dict()
    second = kt.Batches(rows, 3, seed=1)
    second.load_state_dict(state)
    it = iter(second)
    assert seen + [_ids(next(it)) for _ in range(4)] == expected
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        kt.Batches(rows, 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="as many examples as the checkpoint's data \\(10\\), but other ones"):
        kt.Batches(rows + 1, 3, seed=1).load_state_dict(state)  # other data of the same size
    kt.Batches(rows.clone(), 3, seed=1).load_state_dict(state)  # equal content in another tensor is the same data
    with pytest.raises(ValueError, match=r"num_examples=10, these have num_examples=5: other data, or the same cut "
                                         r"into rows of another length \(seq_len\)"):
        kt.Batches(rows.reshape(5, 4), 3, seed=1).load_state_dict(state)  # train-expanded --seq-len changed, say


def test_batches_refuse_to_resume_with_another_drop_last():
    """A run saved with drop_last=True and resumed with False (or the reverse) was accepted, and from the next
    epoch on saw other batches than the uninterrupted run."""
    rows = torch.arange(10)[:, None].repeat(1, 2)  # batches of 4: 2 full ones and 2 examples left an epoch
    first = kt.Batches(rows, 4, seed=0, drop_last=True)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    with pytest.raises(ValueError, match=r"the checkpoint's data had drop_last=True, these have drop_last=False; "
                                         r"pass Batches\(\.\.\., drop_last=True\) to continue that run"):
        kt.Batches(rows, 4, seed=0, drop_last=False).load_state_dict(state)
    kt.Batches(rows, 4, seed=0, drop_last=True).load_state_dict(state)
    del state["drop_last"]  # a checkpoint written before drop_last was kept: unchecked
    kt.Batches(rows, 4, seed=0, drop_last=False).load_state_dict(state)


@pytest.mark.parametrize("examples, changed", [
    ([([1, 2], [3]), ([4], [5, 6])], [([1, 2], [3]), ([4, 5], [6])]),  # the same tokens, cut elsewhere
    ([("a 1", "2", "left")], [("a 1", "2", "right")]),
    ([{"ids": torch.tensor([1, 2])}], [{"ids": torch.tensor([1, 3])}]),
    ([np.array([1.0, 2.0])], [np.array([1.0, 2.5])]),
])
def test_the_content_digest_tells_other_examples_apart(examples, changed):
    assert content_digest(examples) == content_digest(copy.deepcopy(examples)) is not None
    assert content_digest(changed) != content_digest(examples)


def test_restart_takes_the_digest_of_the_examples_as_they_are_now():
    """Batches iterated once, its examples edited, then restarted for a new run: that run's checkpoints must
    record the new examples' digest (the old one survived every other test: mutation round 10), or a fresh
    Batches of the data it trained on is refused on resuming."""
    rows = [torch.arange(i, i + 4) for i in range(6)]
    data = kt.Batches(rows, 2, seed=0)
    next(iter(data))  # the digest is taken as iteration starts
    before = data.state_dict()["digest"]
    for row in rows:
        row.add_(1)
    data.restart()
    assert data.state_dict()["digest"] == kt.Batches(rows, 2, seed=0).state_dict()["digest"] != before


def test_examples_without_a_stable_content_are_not_checked():
    class Opaque:  # its repr would hold an address that changes from run to run
        pass

    state = kt.Batches([Opaque(), Opaque()], 1).state_dict()
    assert state["digest"] is None
    kt.Batches([Opaque(), Opaque()], 1).load_state_dict(state)
    del state["digest"]  # a checkpoint written before the digest was kept
    kt.Batches([[1], [2]], 1).load_state_dict(state)


@pytest.mark.parametrize("array", [np.array(["math", "easy"]), np.array([b"x"]), np.array([1, "a"], dtype=object)],
                         ids=["str", "bytes", "object"])
def test_examples_holding_numpy_arrays_torch_cannot_hold_are_not_checked(array):
    """The digest read NumPy arrays through torch.as_tensor, which raises TypeError on strings and objects:
    iterating the batches, and state_dict(), crashed instead of leaving such examples unchecked."""
    examples = [{"ids": [1, 2, 3], "tags": array} for _ in range(4)]
    batches = kt.Batches(examples, 2, collate=lambda chosen: {"input_ids": [e["ids"] for e in chosen]})
    assert next(iter(batches)) == {"input_ids": [[1, 2, 3], [1, 2, 3]]}
    assert batches.state_dict()["digest"] is None


def test_batches_errors():
    with pytest.raises(ValueError, match="batch_size"):
        kt.Batches(torch.zeros(4, 2), 0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        kt.Batches(torch.zeros(4, 2), 5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got True"):
        kt.Batches(torch.zeros(4, 2), True)
    with pytest.raises(TypeError, match="sequence of examples .*got a generator: pass list"):
        kt.Batches((row for row in torch.zeros(4, 2)), 2)
    with pytest.raises(ValueError, match="rows of one length, and these have 1 to 2 tokens: pack documents"):
        next(iter(kt.Batches([[5, 6], [7]], 2, shuffle=False)))


def test_batches_take_shuffle_and_drop_last_as_bools_only():
    """shuffle="False" (from a config or the command line) shuffled and drop_last="no" dropped, being truthy;
    a NumPy bool was kept in the state, which fit's checkpoint then refused."""
    rows = torch.arange(40).view(10, 4)
    for name in ("shuffle", "drop_last"):
        for value in ("False", "no", 0, None):
            with pytest.raises(TypeError, match=rf"^{name} must be True or False, got {re.escape(repr(value))}$"):
                kt.Batches(rows, 2, **{name: value})
    batches = kt.Batches(rows, 2, shuffle=np.False_, drop_last=np.True_)
    assert type(batches.shuffle) is bool and type(batches.drop_last) is bool
    state = batches.state_dict()
    assert type(state["shuffle"]) is bool and type(state["drop_last"]) is bool
    assert next(iter(batches))["input_ids"][:, 0].tolist() == [0, 4]


def test_read_jsonl_names_the_line_at_fault(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\n{"text": "b"}\n')
    assert kt.read_jsonl(path) == [(1, {"text": "a"}), (3, {"text": "b"})]
    for content, message in ((b'{"text": "a"}\n{"text": "\xff"}\n', r"data.jsonl:2: not UTF-8 \(invalid start byte at "
                                                                    "byte 11 of the line"),
                             (b'{"text": "a"}\n[1]\n', "data.jsonl:2: expected a JSON object"),
                             (b'{"text": \n', "data.jsonl:1: not valid JSON"), (b"\n\n", "holds no examples")):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            kt.read_jsonl(path)


# ---------------------------------------------------------------------------------------------- loss


def test_causal_lm_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 10], [-100, 7, -100, -100, -100]])
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
             for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert len(terms) == 4
    total = kt.causal_lm_loss(logits, labels, reduction="sum")
    torch.testing.assert_close(total, sum(terms), rtol=1e-12, atol=0)  # float64 logits: a float64 loss
    torch.testing.assert_close(kt.causal_lm_loss(logits, labels), sum(terms) / 4, rtol=1e-12, atol=0)
    assert torch.equal(kt.causal_lm_loss(logits, labels.int()), kt.causal_lm_loss(logits, labels))  # int32 refused before


def test_causal_lm_loss_is_fp32_for_bf16_logits():
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, 50) * 4).bfloat16()
    labels = torch.randint(0, 50, (3, 9))
    loss = kt.causal_lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten())
    assert abs(loss.item() - expected.item()) < 1e-5  # bf16 cross-entropy would be off by ~1e-2


def test_causal_lm_loss_keeps_float64_as_the_loss_from_hidden_does():
    """causal_lm_loss cast float64 logits to fp32, while causal_lm_loss_from_hidden (linear_cross_entropy) keeps
    float64: lm_loss gave a float64 model's loss in float64 on a kpro.Llama and in fp32 on any other model. Both
    compute in the wider of fp32 and the input's dtype now."""
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    for reduction in ("mean", "sum"):
        from_hidden = kt.causal_lm_loss_from_hidden(hidden, head, labels, reduction=reduction)
        from_logits = kt.causal_lm_loss(hidden @ head.T, labels, reduction=reduction)
        assert from_hidden.dtype == from_logits.dtype == torch.float64
        torch.testing.assert_close(from_logits, from_hidden, rtol=1e-12, atol=0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kt.causal_lm_loss((hidden @ head.T).to(dtype), labels).dtype == torch.float32


def test_labels_that_are_not_integers_are_refused():
    """Float labels were cast to int64 (3.7 read as token 3) by causal_lm_loss, silently; int32 ones are fine."""
    logits, hidden, head = torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(8, 6)
    for labels in (torch.full((2, 4), 3.7), torch.ones(2, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="labels must be an integer tensor"):
            kt.causal_lm_loss(logits, labels)
        with pytest.raises(ValueError, match="labels must be an integer tensor"):
            kt.causal_lm_loss_from_hidden(hidden, head, labels)
    labels = torch.randint(0, 8, (2, 4))
    assert torch.equal(kt.causal_lm_loss(logits, labels.int()), kt.causal_lm_loss(logits, labels))
    # Narrower integers: with uint8 labels the -100 that causal_lm_loss_from_hidden gives the last position wrapped to
    # 156, every row's last position trained towards token 156 (a vocabulary above 156), silently; int8 and int16
    # hold only part of a vocabulary. lm_loss, fit's default, takes that path on a Llama.
    for dtype in (torch.uint8, torch.int8, torch.int16):
        message = rf"labels must be an integer tensor of token ids \(or -100\), int64 or int32, got {dtype}"
        with pytest.raises(ValueError, match=message):
            kt.causal_lm_loss(logits, labels.to(dtype))
        with pytest.raises(ValueError, match=message):
            kt.causal_lm_loss_from_hidden(hidden, head, labels.to(dtype))
        with pytest.raises(ValueError, match=message):
            kt.count_loss_tokens(labels.to(dtype))


def test_batch_without_loss_tokens_is_an_error():
    labels = torch.tensor([[5, -100, -100], [-100, -100, -100]])  # position 0 is never a target
    with pytest.raises(ValueError, match="batch of 2 row.s. has no loss tokens"):
        kt.causal_lm_loss(torch.randn(2, 3, 8), labels)
    # A sum over none is 0 (with a gradient): a micro-batch may have none if the rest of its step has some.
    logits = torch.randn(2, 3, 8, requires_grad=True)
    total = kt.causal_lm_loss(logits, labels, reduction="sum")
    total.backward()
    assert total.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_lm_loss_returns_sum_and_count(make_model):
    model = make_model(dtype=torch.float32)
    batch = kt.collate_prompt_answer([([1, 5, 6], [7, 8]), ([1, 9], [4])], pad_id=0)
    out = kt.lm_loss(model, batch)
    assert out.count.item() == 3
    expected = kt.causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    torch.testing.assert_close(out.mean, expected)
    with pytest.raises(KeyError, match="labels"):
        kt.lm_loss(model, {"input_ids": batch["input_ids"]})



def test_lm_loss_runs_a_head_with_hooks_a_bias_or_a_forward_of_its_own_as_the_model_does(make_model):
    """lm_loss fuses lm_head.weight into the loss only for a plain bias-free nn.Linear without hooks: a hook on
    the head (soft-capping here), torch's global ones, or the bias of a head swapped in were dropped silently.
    Such a head now makes the logits, as model(ids) does, and the loss is that of the model's own logits."""
    model = make_model(tie_word_embeddings=False)
    batch = kt.collate_prompt_answer([([1, 5, 6, 9], [7, 8]), ([1, 9], [4, 3, 11])], pad_id=0)

    def expected():
        return kt.causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], reduction="sum")

    assert kt.loss.output_head_weight(model) is model.lm_head.weight  # plain: fused
    calls = []
    for register in (model.lm_head.register_forward_hook, torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda module, args, out: calls.append(1) or 3 * torch.tanh(out / 3)
                          if module is model.lm_head else None)
        try:
            assert kt.loss.output_head_weight(model) is None
            torch.testing.assert_close(kt.lm_loss(model, batch).total, expected())
            assert len(calls) == 2  # the loss's call and expected()'s
        finally:
            handle.remove()
        calls.clear()
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    torch.testing.assert_close(kt.lm_loss(model, batch).total, expected())
    handle.remove()

    old = model.lm_head
    model.lm_head = torch.nn.Linear(48, 67, bias=True, dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.copy_(torch.linspace(-4, 3, 67))
    torch.testing.assert_close(kt.lm_loss(model, batch).total, expected())
    model.lm_head = old
    old.forward = lambda x: torch.nn.functional.linear(x, old.weight) / 2  # a forward of its own
    assert kt.loss.output_head_weight(model) is None
    torch.testing.assert_close(kt.lm_loss(model, batch).total, expected())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # no input needs a gradient: ids
def test_lm_loss_takes_the_logits_where_a_hook_watches_the_model_or_a_wrapper(make_model):
    """A hook on the Llama itself (logit soft-capping) was run on the hidden states lm_loss asks for with
    head=False: the loss was of neither the model's logits nor its uncapped ones (6.17 against 4.68 and 6.91), and
    a backward hook saw the hidden states' gradient. Such a model now makes its logits, as model(ids) does."""
    model = make_model(tie_word_embeddings=False)
    batch = kt.collate_prompt_answer([([1, 5, 6, 9], [7, 8]), ([1, 9], [4, 3, 11])], pad_id=0)
    plain = kt.lm_loss(model, batch).total

    def expected():
        return kt.causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], reduction="sum")

    for handle in (model.register_forward_hook(lambda module, args, out: 3 * torch.tanh(out / 3)),
                   model.register_forward_pre_hook(lambda module, args: None)):
        try:
            assert kt.loss.output_head_weight(model) is None
            assert kt.loss.output_head_weight(torch.compile(model)) is None  # the Llama it wraps is watched
            torch.testing.assert_close(kt.lm_loss(model, batch).total, expected())
        finally:
            handle.remove()
    assert torch.equal(kt.lm_loss(model, batch).total, plain)
    seen = []
    handle = model.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    kt.lm_loss(model, batch).total.backward()
    handle.remove()
    assert seen == [batch["input_ids"].shape + (model.config.vocab_size,)]  # the logits', not the hidden states'
    compiled = torch.compile(model)
    handle = compiled.register_forward_hook(lambda module, args, out: out)  # on the wrapper: it sees the output too
    assert kt.loss.output_head_weight(compiled) is None
    handle.remove()
    assert kt.loss.output_head_weight(compiled) is model.lm_head.weight


def test_the_losses_trace_under_fake_and_meta_tensors_with_their_checks_kept(make_model):
    """The padding check and the mean's count of loss tokens read values outside torch.compile only: under
    FakeTensorMode (memory estimates) and make_fx(tracing_mode="fake") they failed with a data-dependent
    error, on a meta model in .tolist(). There they are assertions now, which a traced graph keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    model = make_model(dtype=torch.float32)
    batch = kt.collate_prompt_answer([([1, 5, 6], [7, 8]), ([1, 9], [4])], pad_id=0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        total, count = kt.lm_loss(model, batch)
        (total / count).backward()
        mean = kt.causal_lm_loss(model(batch["input_ids"]), batch["labels"])
    assert total.shape == mean.shape == () and total.dtype == mean.dtype == torch.float32
    meta = copy.deepcopy(model).to("meta")
    assert kt.lm_loss(meta, {k: v.to("meta") for k, v in batch.items()}).total.is_meta
    graph = make_fx(lambda logits, labels: kt.causal_lm_loss(logits, labels), tracing_mode="fake")(
        torch.randn(2, 3, 8), torch.tensor([[5, 1, 2], [-100, 3, -100]]))
    logits, labels = torch.randn(2, 3, 8), torch.tensor([[5, 1, 2], [-100, 3, -100]])
    assert torch.equal(graph(logits, labels), kt.causal_lm_loss(logits, labels))
    with pytest.raises(RuntimeError, match="has no loss tokens"):
        graph(logits, torch.full((2, 3), -100))
    torch._dynamo.reset()  # and torch.compile(fullgraph=True), where int(count) could not be traced
    torch.testing.assert_close(torch.compile(kt.causal_lm_loss, fullgraph=True)(logits, labels),
                               kt.causal_lm_loss(logits, labels))
    padded = make_fx(lambda b: kt.lm_loss(model, b).total, tracing_mode="fake", _allow_non_fake_inputs=True)(batch)
    on_pad = dict(batch, labels=batch["input_ids"].clone())  # the pads carry labels
    with pytest.raises(RuntimeError, match="marks as padding carry labels"):
        padded(on_pad)


# ------------------------------------------------------------------------------------ optimizer, lr


def test_param_groups_skip_decay_on_vectors_and_leave_frozen_out(make_model):
    model = make_model(dtype=torch.float32, tie_word_embeddings=True)
    model.layers[0].requires_grad_(False)
    model.extra_bias = torch.nn.Parameter(torch.zeros(3))
    groups = kt.param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "layers.1.mlp.up_proj.weight" in decay and "embed_tokens.weight" in decay
    assert no_decay == {"layers.1.input_layernorm.weight", "layers.1.post_attention_layernorm.weight", "norm.weight",
                        "extra_bias"}
    assert not any(n.startswith("layers.0.") for n in decay | no_decay)
    total = sum(len(g["params"]) for g in groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)  # the tied weight once


def test_the_default_loss_names_a_batch_that_is_not_a_mapping(make_model):
    model, ids = make_model(dtype=torch.float32), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match=r"lm_loss, fit's default loss, takes dict batches .* got Tensor: collate to dicts"):
        kt.lm_loss(model, ids)
    with pytest.raises(KeyError, match=r"lm_loss needs batch\['labels'\]; the batch has \['input_ids'\]"):
        kt.lm_loss(model, {"input_ids": ids})
    assert kt.lm_loss(model, collections.UserDict(input_ids=ids, labels=ids)).count == 8  # Hugging Face's BatchEncoding


def test_optimizer_errors(make_model):
    model = make_model(dtype=torch.float32)
    for lr in (0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning rate must be a positive finite number"):
            kt.adamw(model, lr)
    for weight_decay in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            kt.adamw(model, 1e-3, weight_decay=weight_decay)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        kt.adamw(model, 1e-3)


def test_adamw_keeps_numpy_eps_and_betas_as_python_floats(make_model, tmp_path):
    """adamw float()ed lr and weight_decay but kept a NumPy eps or betas in the param groups: checkpoints that no
    resume could load (np.float64: torch.load(weights_only=True) refused optimizer.pt), a first save that failed
    (np.float32 eps) or torch's 'betas must be either both floats or both Tensors' (np.float32 betas)."""
    model = make_model(dtype=torch.float32)
    for eps, betas in ((np.float32(1e-8), (np.float32(0.9), np.float32(0.99))),
                       (np.float64(1e-8), np.array([0.9, 0.99])), (np.float64(1e-8), [0.9, np.float64(0.99)])):
        optimizer = kt.adamw(model, 1e-3, eps=eps, betas=betas, fused=np.False_)
        for group in optimizer.param_groups:
            assert type(group["eps"]) is float and [type(b) for b in group["betas"]] == [float, float]
            assert group["eps"] == float(eps) and group["betas"] == tuple(float(b) for b in betas)
            assert group["fused"] is None and type(group["foreach"]) is bool
        directory = kt.save_checkpoint(tmp_path, 1, model, optimizer)
        kt.load_checkpoint(directory, model, kt.adamw(model, 1e-3, eps=float(eps), betas=tuple(map(float, betas))))
    for eps in (-1e-8, float("nan"), float("inf"), "1e-8", True, torch.tensor(1e-8)):
        with pytest.raises(ValueError, match=r"eps must be a positive finite number, got "):
            kt.adamw(model, 1e-3, eps=eps)
    for betas in ((0.9,), 0.9, (0.9, 1.0), (-0.1, 0.9), (0.9, float("nan")), ("0.9", 0.99), (True, 0.99)):
        with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\) \(beta1, beta2\), got "):
            kt.adamw(model, 1e-3, betas=betas)
    with pytest.raises(TypeError, match=r"fused must be True or False \(or None: fused on a GPU\), got 'no'"):
        kt.adamw(model, 1e-3, fused="no")


def test_adamw_refuses_float16_parameters(make_model):
    """AdamW's eps=1e-8 is 0 in float16: `train-expanded --dtype float16` always stopped at a NaN loss, its
    message suggesting a lower learning rate or clipping, neither of which could help. Nor could the eps it then
    suggested (1e-7 or more): AdamW keeps its second moment in float16, where (1 - beta2)·g² is 0 for most
    gradients, and such a weight's step is m / eps (a tiny model's loss 4.2 -> 67 in one step with eps 1e-6)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.zeros_like(p)
    torch.optim.AdamW([p], lr=1e-3, eps=1e-8, foreach=True).step()
    assert p.isnan().all()  # the step it would have taken: 0 / (sqrt(0) + 0)
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full_like(p, 1e-3)
    optimizer = torch.optim.AdamW([p], lr=1e-3, eps=1e-6, foreach=True)
    optimizer.step()
    assert (optimizer.state[p]["exp_avg_sq"] == 0).all() and (p.float().abs() > 0.05).all()  # 50x the lr, not ~1x
    model = make_model(dtype=torch.float16)
    for eps in (1e-8, 1e-6, 1e-4):
        for fused in (False, True):  # torch's fused kernel keeps the moments in float16 too
            with pytest.raises(ValueError, match=r"parameter embed_tokens.weight is float16, which AdamW cannot train: "
                                                 r"its second moment.*keep the weights in float32 .* or bfloat16$"):
                kt.adamw(model, 1e-3, eps=eps, fused=fused)
    from kpro.internalize.loop import adamw_every_parameter  # ICoT's optimizer, the same implementation choice
    with pytest.raises(ValueError, match=r"parameter embed_tokens.weight is float16, which AdamW cannot train"):
        adamw_every_parameter(model, 1e-3, 0.01)
    model.requires_grad_(False)
    model.norm.weight.data = model.norm.weight.data.float()
    model.norm.requires_grad_(True)
    kt.adamw(model, 1e-3)  # float16 weights frozen, a float32 one trained


def test_adamw_refuses_an_eps_of_0(make_model):
    """eps=0 was taken as "a finite number >= 0": a zero gradient (the embedding row of a token not in the batch)
    then divides 0 by 0, every such weight turned NaN at step 1, and fit saved them as a good checkpoint. So does an
    eps that the weights' dtype rounds to 0."""
    model = make_model(dtype=torch.float32)
    for eps in (0, 0.0, -0.0, np.float64(0)):
        with pytest.raises(ValueError, match=r"eps must be a positive finite number, got "):
            kt.adamw(model, 1e-3, eps=eps)
    with pytest.raises(ValueError, match=r"parameter embed_tokens.weight is float32, where AdamW's eps=1e-50 is 0: "
                                         r".*pass an eps that float32 holds"):
        kt.adamw(model, 1e-3, eps=1e-50)
    # fused (a GPU's default) was not checked: its kernel computes half precision and float32 in float32
    with pytest.raises(ValueError, match=r"parameter embed_tokens.weight is float32, where AdamW's eps=1e-50 is 0"):
        kt.adamw(model, 1e-3, eps=1e-50, fused=True)
    half = make_model(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"parameter embed_tokens.weight is bfloat16, which AdamW's fused kernel "
                                         r"computes in float32, where eps=1e-50 is 0: .*float32 holds"):
        kt.adamw(half, 1e-3, eps=1e-50, fused=True)
    kt.adamw(half, 1e-3, fused=True)
    kt.adamw(model.double(), 1e-3, eps=1e-50)  # float64 holds it
    kt.adamw(model, 1e-3, eps=1e-50, fused=True)


def test_icots_adamw_keeps_numpy_numbers_as_python_floats(make_model):
    """ICoT's AdamW (weight decay on every parameter) passed a NumPy lr and weight decay on to torch, and fit
    refuses such param groups: checkpoints cannot hold them."""
    from kpro.internalize.loop import adamw_every_parameter

    group = adamw_every_parameter(make_model(dtype=torch.float32), np.float32(1e-3), np.float64(0.01)).param_groups[0]
    assert type(group["lr"]) is float and type(group["weight_decay"]) is float and group["weight_decay"] == 0.01
    for bad in (-0.1, float("nan"), "0.01", True):
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            adamw_every_parameter(make_model(dtype=torch.float32), 1e-3, bad)


def test_adamw_on_the_cpu_is_torch_default_adamw_to_the_bit(make_model):
    """kpro's CPU AdamW runs torch's multi-tensor implementation for speed: it must leave every weight
    exactly where torch's per-parameter default does, with weight decay, a frozen block, a tied weight and
    a parameter without a gradient in the step."""
    torch.manual_seed(0)
    base = make_model(dtype=torch.float32, tie_word_embeddings=True)
    base.layers[0].requires_grad_(False)
    base.spare = torch.nn.Parameter(torch.randn(3))  # in no loss: its gradient stays None
    models = [base, copy.deepcopy(base)]
    ours = kt.adamw(models[0], 1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW(kt.param_groups(models[1], 0.1), lr=1e-2, foreach=False)
    assert ours.defaults["foreach"] and not ours.defaults["fused"]
    ids = torch.randint(1, base.config.vocab_size, (3, 7))
    for _ in range(3):
        for model, optimizer in zip(models, (ours, reference)):
            kt.lm_loss(model, {"input_ids": ids, "labels": ids}).total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(models[0].norm.weight, torch.ones_like(models[0].norm.weight))  # it trained


@pytest.mark.parametrize("kind, step, expected", [
    ("constant", 0, 0.1), ("constant", 4, 0.5), ("constant", 9, 1.0), ("constant", 10_000, 1.0),
    ("linear", 10, 1.0), ("linear", 35, 0.75), ("linear", 60, 0.5), ("linear", 110, 0.0), ("linear", 500, 0.0),
    ("cosine", 0, 0.1), ("cosine", 10, 1.0), ("cosine", 35, 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 60, 0.5), ("cosine", 110, 0.0), ("cosine", 111, 0.0),
])
def test_schedule_values(kind, step, expected):
    schedule = kt.Schedule(kind, warmup_steps=10, total_steps=None if kind == "constant" else 110)
    assert schedule(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind, step, expected", [
    ("linear", 9, 1.0), ("linear", 69, 1.0), ("linear", 70, 1.0), ("linear", 80, 0.75), ("linear", 109, 0.025),
    ("linear", 110, 0.0), ("cosine", 70, 1.0), ("cosine", 90, 0.5), ("cosine", 200, 0.0),
])
def test_schedule_decaying_over_its_last_steps_only(kind, step, expected):
    schedule = kt.Schedule(kind, warmup_steps=10, total_steps=110, decay_steps=40)
    assert schedule(step) == pytest.approx(expected, abs=1e-12)
    assert schedule(0) == pytest.approx(0.1)  # the warmup is unchanged
    # All of the steps after the warmup: the plain schedule, to the bit.
    assert kt.Schedule(kind, warmup_steps=10, total_steps=110, decay_steps=100)(step) == \
        kt.Schedule(kind, warmup_steps=10, total_steps=110)(step)


def test_schedule_floor_and_set_lr(make_model):
    schedule = kt.Schedule("cosine", warmup_steps=0, total_steps=100, min_ratio=0.1)
    assert schedule(50) == pytest.approx(0.55) and schedule(100) == pytest.approx(0.1)
    model = make_model(dtype=torch.float32)
    optimizer = torch.optim.AdamW([{"params": [model.norm.weight], "lr": 1e-2},
                                   {"params": [model.lm_head.weight], "lr": 1e-3}])
    kpro.train.optim.remember_peak_lr(optimizer)
    kt.set_lr(optimizer, schedule, 50)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5.5e-3, 5.5e-4])
    # A factor of 0 is a learning rate (documented: any real number >= 0), and the peaks stay for the next step
    assert kt.set_lr(optimizer, kt.Schedule("linear", total_steps=10), 10) == 0.0
    assert kt.set_lr(optimizer, lambda step: 0, 3) == 0.0 and [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    kt.set_lr(optimizer, lambda step: 1.0, 4)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        kt.Schedule("exponential")
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        kt.Schedule("cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        kt.Schedule("constant", warmup_steps=-1)
    # Bools are not step counts: warmup_steps=True was a warmup of 1, total_steps=True a decay over 1 step.
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0, got True"):
        kt.Schedule("linear", warmup_steps=True, total_steps=10)
    with pytest.raises(ValueError, match="a linear schedule needs total_steps > warmup_steps"):
        kt.Schedule("linear", total_steps=True)
    for bad in ("0.1", True, float("nan"), 1.5):  # a string was a raw TypeError from the comparison
        with pytest.raises(ValueError, match="min_ratio must be a number in \\[0, 1\\]"):
            kt.Schedule("cosine", total_steps=10, min_ratio=bad)
    with pytest.raises(ValueError, match="decay_steps needs a linear or cosine schedule"):
        kt.Schedule("constant", decay_steps=5)
    with pytest.raises(ValueError, match="min_ratio needs a linear or cosine schedule"):
        kt.Schedule("constant", warmup_steps=2, min_ratio=0.1)  # was ignored: 1.0 after warmup
    for total in (3, -5):  # ignored: a constant schedule ends nowhere
        with pytest.raises(ValueError, match=f"a constant one has none \\(got total_steps={total}\\)"):
            kt.Schedule("constant", warmup_steps=5, total_steps=total)
    for bad in (0, 101, 2.5, True):
        with pytest.raises(ValueError, match=r"decay_steps must be an integer from 1 to total_steps - warmup_steps \(100\)"):
            kt.Schedule("linear", warmup_steps=10, total_steps=110, decay_steps=bad)


def test_numpy_numbers_are_numbers_kept_as_python_ones(make_model):
    """A NumPy learning rate or step count (a sweep's) was refused as if it were no number: 'a linear schedule
    needs total_steps > warmup_steps (got total_steps=10, warmup_steps=2)'. Taken now, as Python numbers (they
    go into checkpoints)."""
    optimizer = kt.adamw(make_model(dtype=torch.float32), np.float32(1e-3), weight_decay=np.float64(0.1))
    assert [(type(g["lr"]), type(g["weight_decay"])) for g in optimizer.param_groups] == [(float, float)] * 2
    schedule = kt.Schedule("linear", warmup_steps=np.int64(2), total_steps=np.int32(10), min_ratio=np.float32(0.5),
                           decay_steps=np.uint8(4))
    assert schedule == kt.Schedule("linear", warmup_steps=2, total_steps=10, min_ratio=0.5, decay_steps=4)
    assert [type(v) for v in (schedule.warmup_steps, schedule.total_steps, schedule.decay_steps)] == [int] * 3
    assert type(schedule.min_ratio) is float
    with pytest.raises(ValueError, match=r"a linear schedule needs total_steps > warmup_steps, an integer .*got "
                                         r"total_steps=10.0"):  # the comparison's message named 10.0 > 2 before
        kt.Schedule("linear", warmup_steps=2, total_steps=10.0)
    batches = kt.Batches(list(range(6)), np.int64(2), collate=list, seed=np.int64(3))
    assert (batches.batch_size, batches.seed, type(batches.seed)) == (2, 3, int)
    assert next(iter(batches)) == next(iter(kt.Batches(list(range(6)), 2, collate=list, seed=3)))
    assert kt.pack_documents([[5, 6, 7]], seq_len=np.int64(4), eos_id=2).tolist() == [[5, 6, 7, 2]]
    assert kt.ProgressLine(10, every=np.int64(2)).every == 2
    for bad in (np.float32(1e-3), np.bool_(True)):  # not integers
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            kt.Batches(list(range(6)), bad)


def test_pack_documents_takes_tensors_and_arrays():
    rows = kt.pack_documents([torch.tensor([5, 6, 7]), np.array([8, 9])], seq_len=4, eos_id=2)
    assert rows.tolist() == [[5, 6, 7, 2], [2, 8, 9, 2]] and rows.dtype == torch.long
    assert kt.pack_documents([torch.tensor([[5, 6, 7]])], seq_len=4, eos_id=2).tolist() == [[5, 6, 7, 2]]  # [1, T]
    # A document of two rows was flattened into one, with no eos between them: two documents run together.
    with pytest.raises(ValueError, match=r"document 1 has shape \[2, 3\]: a document is 1-D token ids"):
        kt.pack_documents([[4], torch.tensor([[5, 6, 7], [8, 9, 10]])], seq_len=4, eos_id=2)
    for seed in ("0", -1, True):  # hash(-1) == hash(-2): two negative seeds would give one order
        with pytest.raises(ValueError, match="seed must be an integer from 0 to 2\\*\\*61 - 2"):
            kt.Batches(rows, 1, seed=seed)


def test_batches_refuses_a_seed_whose_order_a_smaller_seed_draws():
    """Python hashes an int modulo 2**61 - 1, so seed 2**61 - 1 shuffled exactly as seed 0 did (and s + 2**61 - 1
    as s): refused, naming the seed it would repeat. The largest seed taken keeps its own order."""
    rows = list(range(20))
    for seed, repeats in ((2 ** 61 - 1, 0), (2 ** 61 + 4, 5), (np.int64(2 ** 62), 2),
                          (10 ** 23, 10 ** 23 % (2 ** 61 - 1))):
        assert kt.Batches(rows, 4, seed=repeats).order(3).tolist() == \
            torch.randperm(20, generator=torch.Generator().manual_seed(hash((int(seed), 3)) & (2 ** 63 - 1))).tolist()
        with pytest.raises(ValueError, match=rf"seed {seed} is past 2\*\*61 - 2: Batches shuffles with Python's hash, "
                                             rf"which takes an integer modulo 2\*\*61 - 1, so it would draw seed "
                                             rf"{repeats}'s order; pass a seed from 0 to 2\*\*61 - 2"):
            kt.Batches(rows, 4, seed=seed)
    largest = kt.Batches(rows, 4, seed=2 ** 61 - 2).order(0).tolist()
    assert largest not in [kt.Batches(rows, 4, seed=s).order(0).tolist() for s in range(3)]


def test_the_content_digest_hashes_tensors_in_place_and_is_unchanged():
    """The digest copied the whole examples tensor (tobytes) before hashing it: twice the rows' memory at the
    start of a run. Its value must stay what checkpoints already hold."""
    import hashlib
    import tracemalloc

    def old_digest(tensor):  # the formula of the checkpoints written so far
        digest = hashlib.sha256()
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50_000, (7, 33), generator=g)
    for value in (rows, rows.t(), rows.to(torch.int32), torch.randn(3, 5, generator=g).to(torch.bfloat16),
                  rows > 100, torch.tensor(5), torch.zeros(0, 4), rows.numpy()):
        assert content_digest(value) == old_digest(value)
    big = torch.zeros(1_000_000, dtype=torch.long)  # 8 MB
    tracemalloc.start()
    try:
        content_digest(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_atomic_file_leaves_neither_the_file_nor_its_temporary_when_the_block_fails(tmp_path):
    from kpro._files import atomic_file
    with pytest.raises(ValueError, match="boom"):
        with atomic_file(tmp_path / "x.bin") as f:
            f.write(b"half")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "x.bin") as f:
            f.write(b"new")
            raise ValueError
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"] and (tmp_path / "x.bin").read_bytes() == b"old"


def test_adamw_takes_an_eps_that_is_subnormal_but_not_0_in_the_weights_dtype(make_model):
    """An eps is refused only where the dtype rounds it to 0: 1e-40 is a float32 subnormal, not 0, and a zero
    gradient's step stays 0, not 0/0 (the refusal advised the smallest normal number, a stricter rule than its own)."""
    model = make_model(dtype=torch.float32)
    assert torch.tensor(1e-40, dtype=torch.float32).item() != 0
    optimizer = kt.adamw(model, 1e-3, eps=1e-40)
    kt.adamw(make_model(dtype=torch.bfloat16), 1e-3, eps=1e-40, fused=True)  # fused computes it in float32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        assert p.isfinite().all() and torch.equal(p, before[n]), n  # weight decay 0: a zero gradient moves nothing


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_lm_loss_takes_the_logits_where_a_backward_pre_hook_watches_the_model_or_its_head(make_model):
    """A full backward pre-hook sees (and may change) the gradient of the module's output: on the model given
    head=False it would see the hidden states' gradient [B, T, hidden], not the logits' [B, T, vocab]; on the head,
    the fused loss would never call it."""
    model = make_model(tie_word_embeddings=False)
    batch = kt.collate_prompt_answer([([1, 5, 6, 9], [7, 8]), ([1, 9], [4, 3, 11])], pad_id=0)
    for module in (model, model.lm_head):
        seen = []
        handle = module.register_full_backward_pre_hook(lambda m, grad_out: seen.append(grad_out[0].shape))
        try:
            assert kt.loss.output_head_weight(model) is None
            kt.lm_loss(model, batch).total.backward()
        finally:
            handle.remove()
        assert seen == [batch["input_ids"].shape + (model.config.vocab_size,)]
    assert kt.loss.output_head_weight(model) is model.lm_head.weight


@pytest.mark.parametrize("register", ["register_module_forward_pre_hook", "register_module_forward_hook",
                                      "register_module_full_backward_pre_hook", "register_module_full_backward_hook"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_every_global_module_hook_makes_lm_loss_take_the_logits(make_model, register):
    """Each of torch's four global module hooks makes the loss take the logits: a global pre-hook doubling the
    head's input counts in lm_loss as in model(ids)."""
    model = make_model(tie_word_embeddings=False)
    batch = kt.collate_prompt_answer([([1, 5, 6, 9], [7, 8]), ([1, 9], [4, 3, 11])], pad_id=0)
    doubling = register == "register_module_forward_pre_hook"
    hook = ((lambda module, args: (args[0] * 2,) if module is model.lm_head else None) if doubling
            else (lambda *args: None))
    handle = getattr(torch.nn.modules.module, register)(hook)
    try:
        assert kt.loss.output_head_weight(model) is None
        if doubling:
            expected = kt.causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"],
                                         reduction="sum")
            torch.testing.assert_close(kt.lm_loss(model, batch).total, expected)
    finally:
        handle.remove()


def test_only_torch_distributeds_own_hooks_are_taken_as_changing_no_value():
    """Only torch.distributed's own hooks (FSDP2's) are passed over: torch.nn.utils.prune's forward pre-hook, from
    torch too, recomputes the weight."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    from torch.nn.utils import prune
    linear = torch.nn.Linear(4, 4)
    prune.l1_unstructured(linear, "weight", 0.5)
    hooks = kpro.model.module_hooks(linear)
    assert hooks and not any(kt.loss._distributed_own(hook) for hook in hooks)
    assert kt.loss._distributed_own(FSDPState._pre_forward)


def test_load_checkpoint_clears_gradients_left_on_the_parameters(tmp_path, make_model):
    """C03: load_checkpoint documents that gradients left on the parameters (a check's backward) are cleared: a
    checkpoint is taken between steps. A hand-written loop that calls optimizer.step() after resuming would
    otherwise add the stale gradient to the restored moments."""
    model = make_model(dtype=torch.float32)
    optimizer = kt.adamw(model, lr=1e-2)
    ids = torch.randint(3, 67, (2, 9), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(ids)[:, :-1].reshape(-1, 67), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    kt.save_checkpoint(tmp_path, 1, model, optimizer, {})
    other = make_model(seed=5, dtype=torch.float32)
    other_opt = kt.adamw(other, lr=1e-2)
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    kt.load_checkpoint(tmp_path / "step-00000001", other, other_opt)
    assert all(p.grad is None for p in other.parameters())


def test_batches_without_drop_last_yield_the_last_smaller_batch_every_epoch():
    """D01: drop_last=False keeps each epoch's last, smaller batch: 10 examples in batches of 4 are 4, 4, 2, then
    the next epoch. Independent reference: the examples themselves, unshuffled."""
    batches = kt.Batches(list(range(10)), 4, collate=lambda ex: ex, shuffle=False, drop_last=False)
    it = iter(batches)
    assert [next(it) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    shuffled = kt.Batches(list(range(10)), 4, collate=lambda ex: ex, seed=3, drop_last=False)
    it = iter(shuffled)
    epoch = [next(it) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(sum(epoch, [])) == list(range(10))


# Mutation round 12
def test_a_metric_dict_with_a_key_that_is_not_a_string_is_refused():
    """json.dumps writes {1: 2.0} as {"1": 2.0}: read back, the key is another."""
    from kpro.train.callbacks import check_metrics
    with pytest.raises(TypeError, match=r"metrics\['per_layer'\] has the key 1, not a string"):
        check_metrics({"per_layer": {1: 2.0}}, "on_step")
    check_metrics({"per_layer": {"1": 2.0}}, "on_step")


def test_listed_adds_more_only_when_names_are_left_out():
    """kpro.errors.listed, which error messages use to name the culprits: ", ..." only past `limit` names."""
    from kpro.errors import listed

    assert listed(["a", "b", "c", "d"]) == "a, b, c, d"
    assert listed(list("abcde")) == "a, b, c, d, ..."
    assert listed(list("abcde"), 4, " and {left} more ({total} in all)") == "a, b, c, d and 1 more (5 in all)"
    assert listed([1, 2], 2, " and {left} more") == "1, 2"
