"""kpro.train.fit given inputs that trained silently wrong, or failed naming nothing: schedules, leftover
gradients (a resume's among them), scored padding, nested or non-dict batches, checkpoint steps, optimizer groups
added mid-run."""
from collections import UserDict

import pytest
import torch

import kpro
from kpro import train as kt
from kpro.train import checkpointing

from conftest import tiny_config


def make_model(seed=0):
    torch.manual_seed(seed)
    return kpro.Llama(tiny_config())


def batch(rows=4, length=6, seed=0):
    """A padded batch whose padding carries no label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # the first real token: a pad would predict it
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def fit(model, out, data=None, steps=2, **kwargs):
    data = [batch(seed=i) for i in range(steps)] if data is None else data
    return kt.fit(model, data, out, steps=steps, lr=1e-2, stream=None, log_every=None, **kwargs)


@pytest.mark.parametrize("factor", [float("nan"), -0.5, float("inf"), None])
def test_a_schedule_factor_that_is_no_learning_rate_is_refused(tmp_path, factor):
    """A callable schedule's NaN factor turned every weight NaN, and the run saved them; a negative one
    trained uphill."""
    model = make_model()
    before = weights(model)
    with pytest.raises(ValueError, match=fr"the schedule gave the factor {factor!r} at step 1; a schedule's factor "
                                         r"must be a finite number >= 0"):
        fit(model, tmp_path, schedule=lambda step: 1.0 if step == 0 else factor)
    after = weights(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[name], p) for name, p in after.items())  # step 0 trained, step 1 did not


def test_numpy_numbers_are_taken_and_checkpointed_as_python_ones(tmp_path):
    """fit refused a NumPy step count, lr or clip ('steps must be a positive integer, got np.int64(2)'); taken
    now, as Python numbers: the checkpoint (torch.load with weights_only) holds them and a resume compares them."""
    np = pytest.importorskip("numpy")
    data = [batch(seed=i) for i in range(4)]
    numbers = dict(lr=np.float32(1e-2), clip_grad_norm=np.float64(1.0), grad_accum=np.int64(2),
                   save_every=np.int64(1), keep_last=np.int32(2), log_every=np.int64(1))
    run = kt.fit(make_model(), data, tmp_path, steps=np.int64(2), stream=None, **numbers)
    assert run.step == 2 and type(run.total_steps) is int
    resumed = kt.fit(make_model(), data, tmp_path, steps=np.int64(3), stream=None, **numbers)
    assert resumed.step == 3


@pytest.mark.parametrize("kind", ["float32", "float64"])
def test_a_schedule_giving_numpy_numbers_trains_and_resumes(tmp_path, kind):
    """A schedule computing its factor with NumPy (np.cos) made every group's lr a NumPy number: the first save
    failed on metrics['lr'] (np.float64) after the steps before it were trained, or the first metrics line
    (np.float32, which json refuses). The factor is taken as a Python float now."""
    np = pytest.importorskip("numpy")
    cosine = lambda step: getattr(np, kind)(0.5 * (1 + np.cos(np.pi * step / 4)))
    data = [batch(seed=i) for i in range(3)]
    run = fit(make_model(), tmp_path, data=data, steps=2, save_every=1, schedule=cosine)
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert type(run.metrics["lr"]) is float and all(type(g["lr"]) is float for g in run.optimizer.param_groups)
    assert fit(make_model(), tmp_path, data=data, steps=3, schedule=cosine).step == 3
    lrs = [record["lr"] for record in kt.read_metrics(tmp_path / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-2 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(3)], rel=1e-6)


def test_an_optimizer_whose_param_groups_a_checkpoint_cannot_hold_is_refused_before_training(tmp_path):
    """A factory's optimizer built with NumPy hyperparameters (torch.optim.AdamW(..., eps=np.float64(1e-8)))
    trained and wrote checkpoints that no resume could load (torch.load(weights_only=True) refused optimizer.pt),
    or failed at its first save. Refused before the first step now, naming the group and key; so is such an
    optimizer given to save_checkpoint (a hand-written loop), before anything is written."""
    np = pytest.importorskip("numpy")
    data = [batch(seed=i) for i in range(3)]
    factories = {"eps": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, eps=np.float64(1e-8)),
                 "betas": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(np.float64(0.9), 0.99)),
                 "lr": lambda m: torch.optim.SGD(m.parameters(), lr=np.float64(1e-2)),
                 "weight_decay": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, weight_decay=np.float32(0.1))}
    for key, factory in factories.items():
        out = tmp_path / key
        with pytest.raises(TypeError, match=rf"the optimizer's param group 0 {key!r}.* is a numpy.float(64|32), which "
                                            r"a checkpoint cannot hold .*; build the optimizer with Python numbers"):
            kt.fit(make_model(), data, out, steps=2, optimizer=factory, save_every=1, stream=None)
        assert not (out / "metrics.jsonl").exists() and kt.list_checkpoints(out) == []  # refused before the start
    model = make_model()
    with pytest.raises(TypeError, match=r"the optimizer's param group 0 'eps' is a numpy.float64"):
        kt.save_checkpoint(tmp_path / "mine", 1, model, factories["eps"](model))
    assert not (tmp_path / "mine").exists() or not list((tmp_path / "mine").iterdir())

    class Reset(kt.Callback):  # a factory that turns NumPy later: refused at the reset, not at a save
        def on_batch(self, run, batch):
            if run.step == 1:
                run.reset_optimizer()
            return batch

    calls = []
    factory = lambda m: calls.append(1) or (factories["eps"](m) if len(calls) > 1 else kt.adamw(m, 1e-2))
    with pytest.raises(TypeError, match=r"the optimizer's param group 0 'eps' is a numpy.float64"):
        kt.fit(make_model(), data, tmp_path / "reset", steps=3, optimizer=factory, callbacks=[Reset()], stream=None)
    assert [r["step"] for r in kt.read_metrics(tmp_path / "reset" / "metrics.jsonl")] == [1]


def test_gradients_left_on_the_model_do_not_reach_the_first_step(tmp_path):
    """A backward run before fit (a check of the loss, a step that raised) added to step 1's gradients."""
    clean, stale = make_model(), make_model()
    kt.lm_loss(stale, batch(seed=9)).total.backward()
    assert all(p.grad is not None for p in stale.parameters())
    fit(clean, tmp_path / "clean", steps=1)
    fit(stale, tmp_path / "stale", steps=1)
    for (name, a), b in zip(clean.named_parameters(), stale.parameters()):
        assert torch.equal(a, b), name


def test_gradients_a_callback_leaves_between_steps_do_not_reach_the_next_step(tmp_path):
    """fit cleared gradients before step 1 and after each optimizer step only: a callback's backward (a probe of
    the validation gradient) in on_step_end or on_batch, left uncleared, added to the next step's gradients."""
    class GradProbe(kt.Callback):
        def __init__(self, hook):
            self.hook = hook

        def probe(self, run):
            kt.lm_loss(run.model, batch(seed=9)).total.backward()

        def on_step_end(self, run, metrics):
            if self.hook == "on_step_end":
                self.probe(run)

        def on_batch(self, run, batch):
            if self.hook == "on_batch":
                self.probe(run)
            return batch

    clean = make_model()
    fit(clean, tmp_path / "clean", steps=3, clip_grad_norm=None)
    for hook in ("on_step_end", "on_batch"):
        probed = make_model()
        fit(probed, tmp_path / hook, steps=3, clip_grad_norm=None, callbacks=[GradProbe(hook)])
        for (name, a), b in zip(clean.named_parameters(), probed.parameters()):
            assert torch.equal(a, b), (hook, name)


def test_gradients_left_on_the_model_do_not_stop_a_resume(tmp_path):
    """With gradients on the parameters, torch's loader did not prepare the fresh optimizer's state, and the
    resume died in it with 'AssertionError: Expected device to be set'."""
    straight, stale = make_model(), make_model()
    data = [batch(seed=i) for i in range(4)]
    fit(straight, tmp_path / "a", data=data, steps=4)
    fit(stale, tmp_path / "b", data=data[:2], steps=2)
    stale = make_model(seed=1)
    kt.lm_loss(stale, batch(seed=9)).total.backward()
    fit(stale, tmp_path / "b", data=data, steps=4)  # resumes at step 2, skipping the batches done
    for (name, a), b in zip(straight.named_parameters(), stale.parameters()):
        assert torch.equal(a, b), name
    optimizer = kt.adamw(stale, 1e-2)  # a loop of one's own: its load_checkpoint clears them too
    kt.lm_loss(stale, batch(seed=9)).total.backward()
    kt.load_checkpoint(tmp_path / "b" / "step-00000004", stale, optimizer)
    assert all(p.grad is None for p in stale.parameters()) and len(optimizer.state) == len(list(stale.parameters()))


def test_padding_that_carries_labels_is_refused():
    """Labels left equal to input_ids, pads included, trained on the padding."""
    model = make_model()
    data = batch()
    data["labels"] = data["input_ids"].clone()
    data["input_ids"][1, :3] = 0
    data["attention_mask"][1, :3] = 0  # and a second row of 3 pads carrying labels
    with pytest.raises(ValueError, match=r"3 position\(s\) that attention_mask marks as padding carry labels, and "
                                         r"would be trained on: set labels\[attention_mask == 0\] = -100"):
        kt.lm_loss(model, data)  # position 0 of each row is never scored: 1 + 2
    data["labels"] = data["labels"].masked_fill(data["attention_mask"] == 0, -100)
    data["labels"][:, 1:][data["attention_mask"][:, :-1] == 0] = -100
    data["labels"][:, 0] = 5
    assert kt.lm_loss(model, data).count == int((data["labels"][:, 1:] != -100).sum())


def test_a_label_predicted_from_padding_is_refused():
    """Left padding with labels[attention_mask == 0] = -100 alone: each padded row's first real token was
    scored from the pad before it, and the loss differed from the rows' own."""
    model = make_model().double()
    rows = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]]
    ids, mask = kpro.pad_left(rows, pad_id=0)
    labels = ids.masked_fill(mask == 0, -100)
    with pytest.raises(ValueError, match=r"^1 label\(s\) come right after padding \(with left padding, each padded "
                                         r"row's first real token\), .*: set labels\[:, 1:\]\[attention_mask\[:, "
                                         r":-1\] == 0\] = -100"):
        kt.lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    labels[:, 1:][mask[:, :-1] == 0] = -100  # the fix the message names
    padded = kt.lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    alone = [kt.lm_loss(model, {"input_ids": torch.tensor([row]), "labels": torch.tensor([row])}) for row in rows]
    assert int(padded.count) == sum(int(part.count) for part in alone) == 8
    torch.testing.assert_close(padded.total, sum(part.total for part in alone), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"1 position\(s\) .* padding carry labels, .*: set labels\[attention_mask "
                                         r"== 0\] = -100; and set labels\[:, 1:\]\[attention_mask\[:, :-1\] == 0\]"):
        kt.lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})  # pads labelled as well


def test_tensors_nested_in_a_batch_are_refused_when_it_is_split(tmp_path):
    """{"meta": {"weight": tensor[B]}} reached every micro-batch whole, out of step with its rows."""
    data = batch()
    data["meta"] = {"weight": torch.ones(4)}
    with pytest.raises(TypeError, match=r"batch\['meta'\] is a dict holding tensors, and fit splits only the batch's "
                                        r"own tensors"):
        fit(make_model(), tmp_path, data=[data, data], grad_accum=2, loss_fn=lambda m, b: kt.lm_loss(m, b))


class Columns(UserDict):
    """A mapping that is not a dict, as Hugging Face's BatchEncoding."""


def test_a_mapping_batch_trains_as_the_same_dict(tmp_path):
    """A BatchEncoding-like batch logged 0 tokens, stayed on the CPU, and grad_accum=2 refused it."""
    as_dict, as_mapping = make_model(), make_model()
    data = [batch(seed=i) for i in range(2)]
    runs = [fit(as_dict, tmp_path / "dict", data=data, grad_accum=2),
            fit(as_mapping, tmp_path / "mapping", data=[Columns(b) for b in data], grad_accum=2)]
    assert runs[0].metrics["tokens"] == runs[1].metrics["tokens"] == int(data[1]["attention_mask"].sum())
    for (name, a), b in zip(as_dict.named_parameters(), as_mapping.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("step", [-3, 5.0, True, 10**8])
def test_a_checkpoint_step_its_directory_cannot_name_is_refused(tmp_path, step):
    """-3 and 10^8 named directories that latest_checkpoint never found, so the next run started afresh."""
    with pytest.raises(ValueError, match=r"a checkpoint's step must be an integer from 0 to 99,999,999"):
        checkpointing.checkpoint_dir(tmp_path, step)
    model = make_model()
    with pytest.raises(ValueError, match="a checkpoint's step must be an integer"):
        kt.save_checkpoint(tmp_path, step, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not list(tmp_path.iterdir())


def test_a_numpy_checkpoint_step_is_saved_as_a_python_int(tmp_path):
    """A hand-written loop counting steps with NumPy (for step in np.arange(...)) had its save fail on the summary
    ('Object of type int64 is not JSON serializable'), where the directory name took the step; trainer_state.pt
    would have held a NumPy number, which no resume can load."""
    np = pytest.importorskip("numpy")
    model = make_model()
    optimizer = kt.adamw(model, 1e-3)
    directory = kt.save_checkpoint(tmp_path, np.int64(3), model, optimizer)
    assert directory.name == "step-00000003"
    state = kt.load_checkpoint(directory, model, optimizer)
    assert state["step"] == 3 and type(state["step"]) is int


def test_a_param_group_added_by_a_callback_is_in_the_optimizer(tmp_path):
    """A group added with add_param_group was named as 'not in the optimizer' at the next step."""
    class Unfreeze(kt.Callback):
        def on_batch(self, run, batch):
            if run.step == 1:
                run.model.lm_head.weight.requires_grad_(True)
                run.optimizer.add_param_group({"params": [run.model.lm_head.weight], "lr": 1e-3})
            return batch

    model = make_model()
    model.lm_head.weight.requires_grad_(False)
    head = model.lm_head.weight.detach().clone()
    fit(model, tmp_path, steps=3, callbacks=[Unfreeze()])
    assert not torch.equal(model.lm_head.weight, head)


def test_a_callback_that_returns_no_batch_is_named(tmp_path):
    class Forgets(kt.Callback):
        def on_batch(self, run, batch):
            batch["labels"] = batch["labels"].clone()

    with pytest.raises(TypeError, match=r"Forgets.on_batch returned None at step 1: it must return the batch"):
        fit(make_model(), tmp_path, callbacks=[Forgets()])


def test_a_constant_loss_for_a_micro_batch_of_no_tokens_is_explained(tmp_path):
    """It read 'depends on no trainable parameter ... is every parameter frozen?'."""
    def loss(model, micro):
        if (micro["labels"][:, 1:] == -100).all():
            return kt.LossSum(torch.zeros(()), torch.tensor(0))
        return kt.lm_loss(model, micro)

    data = batch()
    data["labels"][:2] = -100  # the first micro-batch has no loss tokens, the step has some
    with pytest.raises(ValueError, match=r"returned a LossSum of no loss tokens for micro-batch 0 of step 1 whose "
                                         r"total depends on no trainable parameter"):
        fit(make_model(), tmp_path, data=[data], steps=1, grad_accum=2, loss_fn=loss)


def test_outputs_the_default_loss_cannot_read_are_named():
    class Outputs(torch.nn.Module):  # a model returning a tuple, as some Hugging Face models do
        def __init__(self):
            super().__init__()
            self.inner = make_model()

        def forward(self, ids, mask=None):
            return (self.inner(ids, mask),)

    with pytest.raises(TypeError, match="returned a tuple: give fit a loss_fn that reads the logits"):
        kt.lm_loss(Outputs(), batch())
    data = batch()
    data["input_ids"] = data["input_ids"].tolist()
    with pytest.raises(TypeError, match=r"lm_loss needs batch\['input_ids'\] as a tensor \[B, T\], got list"):
        kt.lm_loss(make_model(), data)
    with pytest.raises(TypeError, match=r"Batches draws from a sequence of examples, and got a dict \(keys "
                                        r"input_ids, labels\)"):
        kt.Batches({"input_ids": [[1, 2]], "labels": [[1, 2]]}, 1)


def test_fit_names_a_checkpoint_it_did_not_write(tmp_path):
    """A checkpoint of a hand-written loop failed in fit with KeyError('callbacks')."""
    model = make_model()
    kt.save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {"mine": 1})
    with pytest.raises(kpro.CheckpointError, match=r"was not written by fit \(its state lacks 'callbacks'\)"):
        fit(make_model(), tmp_path, steps=2)


def test_a_compiled_model_is_checkpointed_and_loaded_as_the_model_inside(tmp_path):
    """Your own loop with torch.compile: save_checkpoint wrote the `_orig_mod.*` names as module.safetensors
    (not the HF layout), beside an optimizer.pt keyed by the model's own names; nothing could load it."""
    model = make_model()
    optimizer = kt.adamw(model, 1e-2)
    kt.lm_loss(model, batch()).mean.backward()
    optimizer.step()
    saved = kt.save_checkpoint(tmp_path, 1, torch.compile(model), optimizer)  # never run: no compilation
    assert not (saved / checkpointing.MODULE_WEIGHTS).exists()
    for name, tensor in kpro.load_pretrained(saved).state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0, msg=name)
    other = make_model(seed=1)
    other_optimizer = kt.adamw(other, 1e-2)
    assert kt.load_checkpoint(saved, torch.compile(other), other_optimizer)["step"] == 1
    for name, tensor in other.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert [s["step"] for s in other_optimizer.state.values()] == [s["step"] for s in optimizer.state.values()]


def test_a_model_its_config_does_not_describe_is_refused_before_training(tmp_path):
    """A block appended by hand trained until the first checkpoint, which then refused it."""
    import copy
    model = make_model()
    model.layers.append(copy.deepcopy(model.layers[-1]))
    with pytest.raises(kpro.CheckpointError, match=r"the model does not match its config \(model.config\)"):
        fit(model, tmp_path, steps=3, save_every=2)
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()
