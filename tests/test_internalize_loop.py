"""The ICoT-SI loop on the CPU: optimizer re-creation where the schedule goes up, each step's removal, exact
resume mid-schedule, the baselines, and `python -m kpro internalize` end to end with its errors."""
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kpro
from kpro import cli
from kpro import train as kt
from kpro.cli import main
from kpro.internalize import (REMOVE_ALL, CoTRemoval, RemovalSchedule, TokenizedExample, ValidationAccuracy, evaluate,
                              fit_internalization, multiplication_tokenizer, multiplication_training_set, parse_line,
                              read_examples, step_generator, tokenize_examples)
from kpro.internalize.loop import OFFICIAL_WEIGHT_DECAY, lr_schedule
from conftest import held_by_another_run
from test_train_fit import StopAt

TOK = multiplication_tokenizer()
SEED = 7
STEPS = 10
# One more token every 2 steps; λ = 1 makes offsets of 1, 2, 3 ... common, so their effect is visible.
SCHEDULE = RemovalSchedule(steps_per_epoch=8, remove_per_epoch=4, smoothing_lambda=1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bit-identical comparisons need one reduction order; tiny matrices gain nothing from threads anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def examples(count=48):
    """3x3 lines: 24 CoT tokens each, so the schedule (up to 4 + offsets at step 9) never runs out of CoT."""
    return tokenize_examples([parse_line(line) for line in multiplication_training_set(3, count, seed=1)], TOK)


VALID = [parse_line(line) for line in multiplication_training_set(3, 2, seed=9)]  # scored by a stand-in or in full


def make_model(seed=0):
    torch.manual_seed(seed)
    return kpro.Llama(kpro.LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, initializer_range=0.1))


class Recorder(kt.Callback):
    """After CoTRemoval: what each step trained on, and with which optimizer."""

    def __init__(self):
        self.batches, self.optimizers, self.adam_steps = {}, {}, {}

    def on_batch(self, run, batch):
        self.batches[run.step] = batch
        self.optimizers[run.step] = run.optimizer
        return batch

    def on_step_end(self, run, metrics):
        state = run.optimizer.state[next(run.model.parameters())]
        self.adam_steps[run.step - 1] = int(state["step"])


def train(out, removal=SCHEDULE, callbacks=(), model=None, **options):
    model = model or make_model()
    run = fit_internalization(model, examples(), out, removal=removal, steps=STEPS, batch_size=8, pad_id=TOK.pad_id,
                              lr=3e-3, seed=SEED, callbacks=callbacks, **options)
    return model, run


def test_the_optimizer_is_re_created_exactly_where_the_schedule_goes_up(tmp_path):
    recorder = Recorder()
    train(tmp_path / "reset", callbacks=[recorder])
    increases = [s for s in range(STEPS) if SCHEDULE.increases_at(s)]
    assert increases == [2, 4, 6, 8]
    changes = [s for s in range(1, STEPS) if recorder.optimizers[s] is not recorder.optimizers[s - 1]]
    assert changes == increases
    # A fresh AdamW: its step count starts over at each increase.
    assert [recorder.adam_steps[s] for s in range(STEPS)] == [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]
    resets = [r["step"] for r in kt.read_metrics(tmp_path / "reset" / "metrics.jsonl") if r.get("optimizer_reset")]
    assert resets == [s + 1 for s in increases]  # metrics count completed steps

    kept = Recorder()
    train(tmp_path / "kept", callbacks=[kept], reset_optimizer=False)
    assert all(kept.optimizers[s] is kept.optimizers[0] for s in range(STEPS))
    assert [kept.adam_steps[s] for s in range(STEPS)] == list(range(1, STEPS + 1))


def test_every_step_trains_on_its_scheduled_removal(tmp_path):
    recorder = Recorder()
    train(tmp_path, callbacks=[recorder])
    records = kt.read_metrics(tmp_path / "metrics.jsonl")
    offsets_seen = set()
    for step in range(STEPS):
        batch = recorder.batches[step]
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        # The step's whole examples (a Batches with the same seed draws them again), and what must be cut.
        rows = [examples()[i] for i in _batch_indices(step)]
        scheduled = step // 2
        offsets = SCHEDULE.sample_offsets(8, step_generator(SEED, step))
        offsets_seen |= set(offsets.tolist())
        for row, example in enumerate(rows):
            cut = min(example.cot_length, scheduled + int(offsets[row]))
            expected = list(example.ids[:example.cot_start]) + list(example.ids[example.cot_start + cut:])
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == expected, (step, row)
            labels = batch["labels"][row]
            assert (labels[:example.cot_start] == -100).all() and labels[example.cot_start:length].tolist() == \
                expected[example.cot_start:]
        assert records[step]["cot_scheduled"] == scheduled
        cot_left = sum(max(0, e.cot_length - scheduled - int(o)) for e, o in zip(rows, offsets)) / 8
        assert records[step]["cot_left"] == pytest.approx(cot_left, abs=1e-3)
    assert len(offsets_seen) > 2  # the offsets really varied


# 2x2 lines have 8 CoT tokens: with one more token every step and no smoothing, the batch of step 8 is the
# first with no CoT left, and the schedule keeps going up after it.
FAST = RemovalSchedule(steps_per_epoch=8, remove_per_epoch=8, smoothing_lambda=float("inf"))
FAST_STEPS = 12


def train_fast(out, callbacks=(), model=None, steps=FAST_STEPS, **options):
    model = model or make_model()
    data = tokenize_examples([parse_line(line) for line in multiplication_training_set(2, 48, seed=1)], TOK)
    run = fit_internalization(model, data, out, removal=FAST, steps=steps, batch_size=8, pad_id=TOK.pad_id, lr=3e-3,
                              seed=SEED, callbacks=callbacks, **options)
    return model, run


def test_no_resets_once_the_previous_batch_had_no_cot_left(tmp_path):
    """The official rule: re-create the optimizer at an increase only while the previous batch still had CoT
    (kpro used to re-create it at every increase to the end of the run, each reset a sign-like jolt)."""
    recorder = Recorder()
    train_fast(tmp_path / "run", callbacks=[recorder])
    records = kt.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [FAST.scheduled(s) for s in range(FAST_STEPS)] == list(range(FAST_STEPS))  # it goes up every step
    assert [r["cot_rows_left"] for r in records] == [8] * 8 + [0] * 4
    resets = [r["step"] - 1 for r in records if r.get("optimizer_reset")]
    assert resets == list(range(1, 9))  # step 8 still follows a batch with CoT; steps 9-11 do not
    changes = [s for s in range(1, FAST_STEPS) if recorder.optimizers[s] is not recorder.optimizers[s - 1]]
    assert changes == resets
    assert [recorder.adam_steps[s] for s in range(8, FAST_STEPS)] == [1, 2, 3, 4]  # one optimizer from step 8 on


@pytest.mark.parametrize("stop", [8, 9])  # 9: resumed where the next reset depends on the saved batch
def test_resume_after_the_cot_is_gone_keeps_the_optimizer(tmp_path, stop):
    straight, _ = train_fast(tmp_path / "straight")
    train_fast(tmp_path / "resumed", callbacks=[StopAt(stop)])
    resumed, _ = train_fast(tmp_path / "resumed", model=make_model(seed=5))
    read = lambda d: [(r["step"], r["loss"], r.get("optimizer_reset")) for r in kt.read_metrics(d / "metrics.jsonl")]
    assert read(tmp_path / "resumed") == read(tmp_path / "straight")
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, straight.state_dict()[name]), name


def test_weight_decay_reaches_every_parameter_as_the_official_code(tmp_path):
    model, run = train_fast(tmp_path / "decay", steps=1, weight_decay=OFFICIAL_WEIGHT_DECAY)
    groups = run.optimizer.param_groups
    assert OFFICIAL_WEIGHT_DECAY == 0.01 and len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()}  # norms included
    norm = model.norm.weight
    assert any(p is norm for p in groups[0]["params"])
    # The default decays nothing: kpro's adamw, two groups at 0.
    _, run = train_fast(tmp_path / "none", steps=1)
    assert [g["weight_decay"] for g in run.optimizer.param_groups] == [0.0, 0.0]
    with pytest.raises(ValueError, match="weight_decay must be a number in"):
        train_fast(tmp_path / "bad", steps=1, weight_decay=-0.1)


def test_the_learning_rate_is_constant_unless_a_schedule_decays_it(tmp_path):
    train_fast(tmp_path / "constant")
    assert {r["lr"] for r in kt.read_metrics(tmp_path / "constant" / "metrics.jsonl")} == {3e-3}
    # Decay over the last 4 steps: the resets of steps 1-8 re-create AdamW at the peak, and the schedule
    # (a function of the step) sets every step's rate, before and after a reset alike.
    train_fast(tmp_path / "decayed", schedule=kt.Schedule("linear", total_steps=FAST_STEPS, decay_steps=4),
               weight_decay=OFFICIAL_WEIGHT_DECAY)
    records = kt.read_metrics(tmp_path / "decayed" / "metrics.jsonl")
    assert [r["lr"] for r in records] == pytest.approx([3e-3] * 9 + [3e-3 * 0.75, 3e-3 * 0.5, 3e-3 * 0.25])
    assert [r["step"] - 1 for r in records if r.get("optimizer_reset")] == list(range(1, 9))


class Snapshots(kt.Callback):
    """The weights after every step."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, run, metrics):
        self.weights[run.step] = {k: v.clone() for k, v in run.model.state_dict().items()}


def scripted_accuracies(monkeypatch, accuracies):
    """ValidationAccuracy's evaluate returns these accuracies in turn (keyed by the call)."""
    from kpro.internalize import loop

    calls = []

    def fake(model, tokenizer, examples, batch_size, progress):
        accuracy = accuracies[len(calls)]
        calls.append(accuracy)
        return type("E", (), {"accuracy": accuracy, "correct": int(accuracy * 10), "total": 10,
                              "predictions": [type("P", (), {"ids": (TOK.eos_id,)})()]})()
    monkeypatch.setattr(loop, "evaluate", fake)
    return calls


def test_select_best_keeps_the_best_weights_once_the_cot_is_gone(tmp_path, monkeypatch, capsys):
    # Evaluations at steps 2, 4, ..., 12. The CoT is gone from the batch of step 8 on (metrics step 9):
    # the 0.9 at step 4 had CoT left and does not count; the selection takes step 10's 0.7 over 12's 0.6.
    scripted_accuracies(monkeypatch, [0.5, 0.9, 0.2, 0.3, 0.7, 0.6])
    snapshots = Snapshots()
    best = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    model, run = train_fast(tmp_path / "run", callbacks=[best, snapshots])
    assert best.selected == {"step": 10, "accuracy": 0.7} and run.step == 12
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshots.weights[10][name]), name
    assert "kept the weights of step 10 (valid accuracy 0.700)" in capsys.readouterr().err

    # Stopped after the best and resumed: the best weights come back from the checkpoint.
    scripted_accuracies(monkeypatch, [0.5, 0.9, 0.2, 0.3, 0.7] + [0.6])
    train_fast(tmp_path / "resumed", callbacks=[ValidationAccuracy(TOK, VALID, 2, select_best=True), StopAt(11)])
    again = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    resumed, _ = train_fast(tmp_path / "resumed", model=make_model(seed=5), callbacks=[again])
    assert again.selected == {"step": 10, "accuracy": 0.7}
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, snapshots.weights[10][name]), name

    # Without select_best the final weights stay; with it but no evaluation after the CoT is gone, too.
    scripted_accuracies(monkeypatch, [0.5, 0.9])
    early, snapshots = ValidationAccuracy(TOK, VALID, 2, select_best=True), Snapshots()
    model, _ = train_fast(tmp_path / "early", callbacks=[early, snapshots], steps=4)
    assert early.selected is None
    assert all(torch.equal(tensor, snapshots.weights[4][name]) for name, tensor in model.state_dict().items())

    # CoT back in a batch after a CoT-free evaluation (rows of other lengths, smoothing offsets): the selection
    # starts over, so step 1's 0.9 does not count and step 3's 0.5 is kept.
    scripted_accuracies(monkeypatch, [0.9, 0.2, 0.5])
    restart = ValidationAccuracy(TOK, VALID, 1, select_best=True, stream=io.StringIO())
    run = type("R", (), {"is_main": True, "step": 0, "total_steps": 3, "model": make_model()})()
    for step, rows_left in [(1, 0), (2, 3), (3, 0)]:
        run.step = step
        restart.on_step_end(run, {"cot_rows_left": rows_left})
    restart.on_fit_end(run)
    assert restart.selected == {"step": 3, "accuracy": 0.5}


def test_a_resume_on_other_validation_examples_is_refused(tmp_path, monkeypatch):
    """The best accuracy was kept without its examples: a resume with another --eval-examples or --valid compared
    the saved best, measured on one set, with accuracies on another."""
    scripted_accuracies(monkeypatch, [0.5, 0.9, 0.2, 0.3, 0.7] + [0.6])  # the last for the step-12 evaluation
    train_fast(tmp_path, callbacks=[ValidationAccuracy(TOK, VALID, 2, select_best=True), StopAt(11)])
    other = ValidationAccuracy(TOK, VALID[:1], 2, select_best=True)
    with pytest.raises(ValueError, match=r"the checkpoint's best weights \(step 10, valid accuracy 0.700\) were "
                                         r"selected on other validation examples than these 1 \(content digest "
                                         r"[0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\): resume with the same"):
        train_fast(tmp_path, model=make_model(seed=5), callbacks=[other])
    scripted_accuracies(monkeypatch, [0.6])
    same = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    train_fast(tmp_path, model=make_model(seed=5), callbacks=[same])
    assert same.selected == {"step": 10, "accuracy": 0.7}


def test_a_resume_validating_at_another_interval_is_refused(tmp_path, monkeypatch):
    """The interval was not kept with the best: a resume with another --eval-every was taken silently, and the
    selection went on among other steps than the run's (the best of steps 2, 4, ... then of 3, 6, ...)."""
    scripted_accuracies(monkeypatch, [0.5, 0.9, 0.2, 0.3, 0.7] + [0.6])
    train_fast(tmp_path, callbacks=[ValidationAccuracy(TOK, VALID, 2, select_best=True), StopAt(11)])
    with pytest.raises(ValueError, match=r"the checkpoint's best weights \(step 10, valid accuracy 0.700\) were "
                                         r"selected among validations every 2 steps, and this run validates every 3: "
                                         r"resume with every=2 \(the command's --eval-every 2\), or start a new run "
                                         r"directory"):
        train_fast(tmp_path, model=make_model(seed=5), callbacks=[ValidationAccuracy(TOK, VALID, 3, select_best=True)])
    scripted_accuracies(monkeypatch, [0.6])
    same = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    train_fast(tmp_path, model=make_model(seed=5), callbacks=[same])
    assert same.selected == {"step": 10, "accuracy": 0.7}
    # Validation alone (no selection) keeps nothing the interval decides: another one is taken.
    scripted_accuracies(monkeypatch, [0.4])
    train_fast(tmp_path, model=make_model(seed=5), steps=FAST_STEPS + 1, callbacks=[ValidationAccuracy(TOK, VALID, 3)])


def test_a_validation_callback_used_for_a_second_run_starts_its_selection_over(tmp_path, monkeypatch):
    # One ValidationAccuracy for the internalized run and then the no-CoT baseline (no step of which has CoT
    # to start the selection over): the baseline kept the first run's best (0.7 at step 10, above its own
    # 0.1s) and ended with the first model's weights.
    scripted_accuracies(monkeypatch, [0.5, 0.9, 0.2, 0.3, 0.7, 0.6] + [0.1] * 6)
    best = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    train_fast(tmp_path / "internalized", callbacks=[best])
    assert best.selected == {"step": 10, "accuracy": 0.7}
    snapshots, baseline = Snapshots(), make_model(seed=5)
    data = tokenize_examples([parse_line(line) for line in multiplication_training_set(2, 48, seed=1)], TOK)
    fit_internalization(baseline, data, tmp_path / "no-cot", removal="all", steps=FAST_STEPS, batch_size=8,
                        pad_id=TOK.pad_id, lr=3e-3, callbacks=[best, snapshots])
    assert best.selected == {"step": 2, "accuracy": 0.1}
    for name, tensor in baseline.state_dict().items():
        assert torch.equal(tensor, snapshots.weights[2][name]), name


def test_a_resumed_run_whose_checkpoint_has_no_selection_does_not_take_another_runs_best(tmp_path, monkeypatch):
    """A resume cleared the selection only through load_state_dict, which a checkpoint written without the
    callback never calls: the second run ended with the first run's best weights and step."""
    scripted_accuracies(monkeypatch, [0.9] * 6 + [0.1] * 6)
    best = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    data = tokenize_examples([parse_line(line) for line in multiplication_training_set(2, 48, seed=1)], TOK)
    first = make_model(seed=3)
    fit_internalization(first, data, tmp_path / "a", removal="all", steps=FAST_STEPS, batch_size=8,
                        pad_id=TOK.pad_id, lr=3e-3, callbacks=[best])
    assert best.selected["accuracy"] == 0.9
    fit_internalization(make_model(seed=5), data, tmp_path / "b", removal="all", steps=2, batch_size=8,
                        pad_id=TOK.pad_id, lr=3e-3)  # its first session, without the callback
    snapshots, second = Snapshots(), make_model(seed=5)
    fit_internalization(second, data, tmp_path / "b", removal="all", steps=FAST_STEPS, batch_size=8,
                        pad_id=TOK.pad_id, lr=3e-3, callbacks=[best, snapshots])
    assert best.selected["accuracy"] == 0.1 and best.selected["step"] > 2
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, snapshots.weights[best.selected["step"]][name]), name
        assert not torch.equal(tensor, first.state_dict()[name]), name


def test_a_fresh_run_after_a_refused_resume_starts_its_selection_empty(tmp_path, monkeypatch):
    """load_state_dict marked the selection restored; a resume refused after it (another seed, say) left the mark,
    and the next fresh run with the callback ended with the refused checkpoint's best weights."""
    scripted_accuracies(monkeypatch, [0.1] * 6)
    best = ValidationAccuracy(TOK, VALID, 2, select_best=True)
    best.load_state_dict({"best_step": 4, "best_accuracy": 0.99, "best_weights": make_model(seed=9).state_dict()})
    data = tokenize_examples([parse_line(line) for line in multiplication_training_set(2, 48, seed=1)], TOK)
    fit_internalization(make_model(seed=5), data, tmp_path, removal="all", steps=FAST_STEPS, batch_size=8,
                        pad_id=TOK.pad_id, lr=3e-3, callbacks=[best])
    assert best.selected["accuracy"] == 0.1


def test_each_increase_is_announced_with_or_without_a_reset(tmp_path):
    """Only a reset printed its line: with reset_optimizer=False (the command's --keep-optimizer) no increase
    was shown, though the docs promise a line at each."""
    for reset in (True, False):
        stream = io.StringIO()
        train(tmp_path / str(reset), reset_optimizer=reset, stream=stream)
        lines = [line for line in stream.getvalue().splitlines() if "removing" in line]
        assert [line.split(":")[0] for line in lines] == ["step 1", "step 3", "step 5", "step 7", "step 9"], lines
        assert all(("optimizer re-created" in line) == (reset and line != lines[0]) for line in lines), lines


class _ClosedAfter(io.StringIO):
    """A stream whose reader goes away at the first write holding `text` (`2>&1 | head`)."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def write(self, s):
        if self.text in s:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(s)


def test_a_closed_pipe_at_an_announcement_saves_the_steps_done(tmp_path):
    """The announcement was printed from on_batch, whose BrokenPipeError fit does not take as Ctrl-C: it ended
    the run with no checkpoint, every step done lost. It is printed where fit takes one: the step is saved."""
    out = tmp_path / "run"
    with pytest.raises(BrokenPipeError):
        train(out, stream=_ClosedAfter("step 3: removing"))
    assert [p.name for p in kt.list_checkpoints(out)] == ["step-00000003"]
    model, _ = train(out)  # the same call resumes it, and ends as an uninterrupted run
    straight, _ = train(tmp_path / "straight")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), straight.state_dict().values()))


def _batch_indices(step, batch_size=8, count=48):
    batches = kt.Batches(list(range(count)), batch_size, list, seed=SEED)
    data = iter(batches)
    for _ in range(step):
        next(data)
    return next(data)


def test_baselines_keep_the_whole_cot_or_none_of_it(tmp_path):
    for removal, check in (("none", lambda e, n: n == len(e.ids)), ("all", lambda e, n: n == len(e.ids) - e.cot_length)):
        recorder = Recorder()
        train(tmp_path / removal, removal=removal, callbacks=[recorder])
        for step in range(STEPS):
            rows = [examples()[i] for i in _batch_indices(step)]
            lengths = recorder.batches[step]["attention_mask"].sum(1).tolist()
            assert all(check(e, n) for e, n in zip(rows, lengths)), (removal, step)
        # No schedule, no resets: one optimizer all along.
        assert all(recorder.optimizers[s] is recorder.optimizers[0] for s in range(STEPS))
        scheduled = {r["cot_scheduled"] for r in kt.read_metrics(tmp_path / removal / "metrics.jsonl")}
        assert scheduled == ({0} if removal == "none" else {"all"})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    model, run = train(out)
    return out, {k: v.clone() for k, v in model.state_dict().items()}, run.optimizer.state_dict()


@pytest.mark.parametrize("stop", [3, 4])  # 4: the checkpoint falls on a step that re-creates the optimizer
def test_resume_mid_schedule_continues_bit_identically(straight_run, tmp_path, stop):
    ref_dir, ref_weights, ref_optimizer = straight_run
    first = train(tmp_path, callbacks=[StopAt(stop)])[1]
    assert first.step == stop
    torch.manual_seed(99)  # the resumed run must depend on nothing but the checkpoint
    model, run = train(tmp_path, model=make_model(seed=5))
    assert run.step == STEPS
    losses = lambda d: [(r["step"], r["loss"], r["cot_scheduled"], r["cot_left"]) for r in kt.read_metrics(d / "metrics.jsonl")]
    assert losses(tmp_path) == losses(ref_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_weights[name]), name
    mine = run.optimizer.state_dict()
    for key, state in ref_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(mine["state"][key][name], value), (key, name)


def test_resuming_with_another_removal_is_refused(tmp_path):
    train(tmp_path, callbacks=[StopAt(2)])
    other = RemovalSchedule(steps_per_epoch=8, remove_per_epoch=2, smoothing_lambda=1.0)
    with pytest.raises(ValueError, match="trained with removal=.*remove_per_epoch=4.*this run has"):
        train(tmp_path, removal=other)
    with pytest.raises(ValueError, match="reset_optimizer"):
        train(tmp_path, reset_optimizer=False)


def test_a_removal_rate_written_as_an_int_or_a_float_is_one_schedule(tmp_path):
    """The API takes 4, the command passes 4.0: a run started one way resumes the other."""
    assert repr(RemovalSchedule(8, 4, 1.0)) == repr(RemovalSchedule(8, 4.0, 1.0))
    train(tmp_path, callbacks=[StopAt(2)])  # SCHEDULE: remove_per_epoch=4
    _, run = train(tmp_path, removal=RemovalSchedule(steps_per_epoch=8, remove_per_epoch=4.0, smoothing_lambda=1.0))
    assert run.step == STEPS
    legacy = CoTRemoval(SCHEDULE, seed=SEED)  # a checkpoint written when the repr kept the int
    legacy.load_state_dict({**legacy.state_dict(), "removal": legacy.settings()["removal"].replace("=4.0,", "=4,")})


def test_a_pad_id_outside_the_model_is_named(tmp_path):
    for pad_id in (TOK.vocab_size + 5, -1, None):  # blamed on input_ids at the first forward before
        with pytest.raises(ValueError, match=rf"pad_id must be a token id of the model \(an integer in \[0, {TOK.vocab_size}\)\)"):
            fit_internalization(make_model(), examples(), tmp_path, removal=SCHEDULE, steps=1, batch_size=8,
                                pad_id=pad_id, lr=1e-3)


def test_lr_schedule_refuses_a_warmup_and_decay_longer_than_the_run():
    assert lr_schedule(10) == "constant" and lr_schedule(10, 3, 7).warmup_steps == 7
    for args in ((10, 0, 20), (10, 6, 5), (10, -1), (0,), (10, 1.5)):
        with pytest.raises(ValueError, match="longer than the run|must be an integer"):
            lr_schedule(*args)


def test_cot_removal_argument_errors():
    with pytest.raises(ValueError, match="removal must be a RemovalSchedule, 'none' or 'all'"):
        CoTRemoval("some")
    with pytest.raises(ValueError, match=r"seed must be an integer, got 1\.5 \(float\)"):
        CoTRemoval(SCHEDULE, seed=1.5)
    with pytest.raises(ValueError, match=r"seed must be an integer, got .* \(float64\)$"):
        CoTRemoval(SCHEDULE, seed=np.float64(3))
    seeded = CoTRemoval(SCHEDULE, seed=np.int64(3))  # was refused as "seed must be an integer, got 3" (numpy 1)
    assert type(seeded.seed) is int and seeded.seed == 3
    assert CoTRemoval("all").counts(3, 4) == REMOVE_ALL and CoTRemoval("none").counts(3, 4) == 0


# ------------------------------------------------------------------------------------ the command line

TINY = ["--train-size", "64", "--eval-size", "16", "--layers", "1", "--hidden", "32", "--heads", "2",
        "--intermediate", "48", "--batch-size", "8", "--steps-per-epoch", "4", "--remove-per-epoch", "2",
        "--steps", "6", "--eval-batch-size", "16", "--threads", "1"]


def test_generated_valid_and_test_sets_never_hold_a_training_problem(tmp_path):
    """The generated training file was named without the pairs it leaves out, so a rerun with a larger
    --eval-size trained on the new test problems; and valid/test drawn for a --train file ignored its pairs."""
    from types import SimpleNamespace
    from kpro.internalize.command import _load_data
    args = lambda **changes: SimpleNamespace(**{"task": "2x2", "valid": None, "test": None, "train": None,
                                                "eval_only": False, "eval_size": 16, "data_seed": 0,
                                                "train_size": 4000, **changes})
    lines = lambda examples: {f"{e.input}||{e.cot} #### {e.answer}" for e in examples}
    out = tmp_path / "run"
    for eval_size in (16, 24):  # half of 2x2's 8,100 pairs are in training: 8 of 16 new pairs would be
        train, held_out = _load_data(args(eval_size=eval_size), out)
        assert len(train) == 4000 and len(held_out["test"]) == eval_size
        assert not lines(train) & (lines(held_out["valid"]) | lines(held_out["test"])), eval_size
    given = tmp_path / "train.txt"
    given.write_text("".join(line + "\n" for line in sorted(lines(train))))
    train, held_out = _load_data(args(train=given, eval_size=300), tmp_path / "other")
    assert len(held_out["valid"]) == len(held_out["test"]) == 300
    assert not lines(train) & (lines(held_out["valid"]) | lines(held_out["test"]))
    # --eval-only --train FILE scores the sets that run drew (they leave FILE's pairs out), and writes them
    # beside the plain draw's files rather than over them
    _load_data(args(eval_size=300), tmp_path / "other")
    none, again = _load_data(args(train=given, eval_size=300, eval_only=True), tmp_path / "other")
    assert none == [] and {split: lines(sets) for split, sets in again.items()} == \
        {split: lines(sets) for split, sets in held_out.items()}
    assert len(list((tmp_path / "other" / "data").glob("valid-2x2-300-seed0*.txt"))) == 2


def test_a_generated_valid_or_test_set_leaves_out_the_given_other_sets_problems(tmp_path):
    """With only one of --valid/--test given, the other was drawn leaving out the training pairs only: 2x2 valid
    and test shared ~120 of 1,000 problems, and --select-best selected partly on test problems."""
    from types import SimpleNamespace
    from kpro.internalize import multiplication_lines, multiplication_pairs
    from kpro.internalize.command import _load_data
    given = tmp_path / "given.txt"
    given.write_text("".join(line + "\n" for line in
                             multiplication_lines(multiplication_pairs(2, 1000, seed=123, exclude_published=False), 2)))
    inputs = lambda examples: {e.input for e in examples}
    for flag, other in (("test", "valid"), ("valid", "test")):
        args = SimpleNamespace(task="2x2", train=None, eval_only=False, eval_size=1000, data_seed=0, train_size=64,
                               **{"valid": None, "test": None, flag: given})
        out = tmp_path / flag
        train, sets = _load_data(args, out)
        assert len(sets[other]) == 1000 and not inputs(sets[other]) & inputs(sets[flag]), flag
        # named by what it leaves out: not the file a draw without the given set's pairs wrote
        assert [path.name.startswith(f"{other}-2x2-1000-seed0-without-") for path in (out / "data").glob(f"{other}-*")] \
            == [True]
        assert not inputs(train) & (inputs(sets["valid"]) | inputs(sets["test"]))


def test_the_command_trains_saves_evaluates_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["internalize", "--task", "3x3", "--out", str(out), "--eval-every", "3", "--eval-examples", "8",
                 "--save-every", "3", *TINY]) == 0
    printed, progress = capsys.readouterr()  # the results on stdout, the progress and status on stderr
    assert "step 3: removing 1 CoT token + smoothing offsets per example; optimizer re-created" in progress
    assert "step 3: valid accuracy" in progress and "step     6/6  loss" in progress
    assert ", weight decay 0.01, model" in progress  # the official decay is the command's default
    assert "internalized, test: accuracy" in printed and "examples/s" in printed
    assert "loss" not in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["model"] == "internalized" and report["valid"]["total"] == report["test"]["total"] == 16
    # The report is the final model's: scoring the saved model again gives the same answers.
    again = evaluate(kpro.load_pretrained(out / "model").eval(), kpro.load_tokenizer(out / "model"),
                     read_examples(out / "data" / "test-3x3-16-seed0.txt"), batch_size=16)
    assert (report["test"]["correct"], report["test"]["accuracy"]) == (again.correct, again.correct / 16)
    # examples/s is the 16 test examples over the decoding time: the report rounds both, keeping microseconds
    # (milliseconds were 2% of a 20 ms decode, and the two figures disagreed).
    assert report["test"]["examples_per_second"] == pytest.approx(16 / report["test"]["seconds"], rel=1e-3)
    records = kt.read_metrics(out / "metrics.jsonl")
    assert [r["cot_scheduled"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert "valid_accuracy" in records[2] and "valid_accuracy" in records[5]
    # The training set was generated without the valid/test pairs, and every checkpoint is a model directory.
    train = next((out / "data").glob("train-3x3-64-seed0-without-*.txt")).read_text().splitlines()
    held_out = set((out / "data" / "valid-3x3-16-seed0.txt").read_text().splitlines()
                   + (out / "data" / "test-3x3-16-seed0.txt").read_text().splitlines())
    assert len(train) == 64 and len(held_out) == 32 and not held_out & set(train)
    assert isinstance(kpro.load_tokenizer(out / "step-00000006"), kpro.SymbolTokenizer)
    final = kpro.load_pretrained(out / "model")

    # Ask for 2 more steps: the run resumes from its last checkpoint at step 6.
    assert main(["internalize", "--task", "3x3", "--out", str(out), *TINY[:-6], "--steps", "8",
                 *TINY[-4:]]) == 0
    printed = capsys.readouterr().err
    assert "resumed from" in printed and "step 7: removing 3 CoT tokens" in printed
    assert [r["step"] for r in kt.read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert not torch.equal(kpro.load_pretrained(out / "model").embed_tokens.weight, final.embed_tokens.weight)

    # Evaluation alone, of any model directory.
    assert main(["internalize", "--task", "3x3", "--out", str(tmp_path / "eval"), "--model", str(out / "model"),
                 "--eval-only", "--eval-size", "16", "--threads", "1"]) == 0
    assert f"model {out / 'model'}, valid: accuracy" in capsys.readouterr().out


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_the_command_runs_under_torchrun_and_rank_0_alone_saves_evaluates_and_prints(tmp_path):
    """Every rank held --out before fit, so the second was refused ("in use by another kpro run"); and every rank
    printed the status, saved model/, evaluated in full and wrote eval.json."""
    out = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "tests" / "_dist_command.py"), "internalize", "--task", "3x3", "--out", str(out), "--no-removal", *TINY],
                          env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("saved the final model") == 1, done.stdout
    assert done.stdout.count("explicit CoT, test: accuracy") == 1, done.stdout
    assert done.stderr.count("64 training examples, 6 steps of 8") == 1, done.stderr
    assert json.loads((out / "eval.json").read_text())["test"]["total"] == 16
    assert [r["step"] for r in kt.read_metrics(out / "metrics.jsonl")] == list(range(1, 7))


def test_an_out_holding_another_commands_run_is_refused_before_anything_is_written(tmp_path, capsys):
    """internalize into a train-expanded run wrote its generated data there, then failed on the optimizer's state
    with Python advice (or "holds a run at step 20, past --steps 2", whose advice failed next); train-expanded and
    bitune into an internalize run named its blocks or settings. Each command records its run (kpro_run.json) and
    refuses another's in one line."""
    import json
    out, steps = tmp_path / "run", TINY.index("--steps") + 1
    short = [*TINY[:steps], "2", *TINY[steps + 1:]]
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 0
    assert json.loads((out / "kpro_run.json").read_text()) == {"command": "internalize"}
    (tmp_path / "inst.jsonl").write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    (tmp_path / "c.txt").write_text("hello\n")
    capsys.readouterr()
    for command in (["bitune", "--model", str(out / "model"), "--data", str(tmp_path / "inst.jsonl"), "--steps", "1"],
                    ["train-expanded", str(out / "model"), "--data", str(tmp_path / "c.txt"), "--steps", "1"]):
        before = sorted(p.name for p in out.iterdir())
        assert main([*command, "--out", str(out)]) == 1
        assert capsys.readouterr().err == (f"error: --out {out} holds a run of the internalize command (its "
                                           f"kpro_run.json says so), not of {command[0]}: pass another --out\n")
        assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "tuned"
    other.mkdir()
    (other / "kpro_run.json").write_text(json.dumps({"command": "bitune"}) + "\n")
    assert main(["internalize", "--task", "3x3", "--out", str(other), *short]) == 1
    assert capsys.readouterr().err.endswith("holds a run of the bitune command (its kpro_run.json says so), not of "
                                            "internalize: pass another --out\n")
    assert sorted(p.name for p in other.iterdir()) == ["kpro_run.json"]  # no data/ generated into it
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 0  # its own: resumed (done)
    # A run of an older kpro has no record: a refused command given it by mistake leaves it without one (it
    # recorded itself there, and the run's own command was refused next); one that fails in folders it made
    # leaves none of them
    (out / "kpro_run.json").unlink()
    (tmp_path / "empty.jsonl").write_text(json.dumps({"instruction": "a", "response": ""}) + "\n")
    assert main(["bitune", "--model", str(out / "model"), "--data", str(tmp_path / "empty.jsonl"), "--steps", "1",
                 "--out", str(out)]) == 1
    assert "the response is empty" in capsys.readouterr().err and not (out / "kpro_run.json").exists()
    assert main(["bitune", "--model", str(out / "model"), "--data", str(tmp_path / "empty.jsonl"), "--steps", "1",
                 "--out", str(tmp_path / "new" / "sub" / "run")]) == 1
    assert not (tmp_path / "new").exists()
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 0


def test_a_stop_during_the_final_evaluation_says_the_model_is_saved(tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM during the final evaluation printed a bare "interrupted", though the model was saved and
    a rerun only evaluates again."""
    from kpro.internalize import command
    out, steps = tmp_path / "run", TINY.index("--steps") + 1
    short = [*TINY[:steps], "2", *TINY[steps + 1:]]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(command, "_final_evaluation", stopped)
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted during the final evaluation: the model is saved in {out / 'model'}; run the same command "
        "again to evaluate")
    monkeypatch.undo()
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 0
    assert (out / "eval.json").is_file()


def test_a_resume_on_other_training_examples_names_the_flags_that_chose_them(tmp_path, capsys):
    """Refused in Batches' words ("... num_examples=64, these have num_examples=48: other data, or the same cut
    into rows of another length (seq_len)"): no such option here, and neither --train-size nor --train named."""
    out, steps = tmp_path / "run", TINY.index("--steps") + 1
    short = [*TINY[:steps], "2", *TINY[steps + 1:]]
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 0
    capsys.readouterr()
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short, "--train-size", "48"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: --out {out} holds a run trained on 64 examples, and --task 3x3 --train-size 48 "
                        "--data-seed 0 generates 48: resume with the run's --task, --train-size and --data-seed (the "
                        "generated set leaves out the problems of the valid and test sets: the same --valid, --test "
                        "and --eval-size too), or pass another --out for a new run\n"), err
    lines = multiplication_training_set(3, 64, seed=5)
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    given = [*short[:short.index("--train-size")], *short[short.index("--train-size") + 2:]]
    assert main(["internalize", "--task", "3x3", "--out", str(out), *given, "--train", str(tmp_path / "train.txt")]) \
        == 1  # as many examples, other ones
    err = capsys.readouterr().err
    assert err.endswith(f"error: --out {out} holds a run trained on other examples than the 64 that --train "
                        f"{tmp_path / 'train.txt'} holds (as many): resume with the run's --train, or pass another "
                        "--out for a new run\n"), err


def test_a_resume_keeps_the_runs_tokenizer_whatever_the_test_set(tmp_path, capsys):
    """Without --model the symbol tokenizer was rebuilt from train, valid and test at every run: another --test
    shifted the token ids, and the resume was refused as if --train held other examples. A resume, or a finished
    run evaluated again, takes the tokenizer saved with the run; a symbol it lacks is refused naming the file."""
    lines = multiplication_training_set(3, 48, seed=5)
    for name, chunk in (("train", lines[:32]), ("valid", lines[32:40]), ("test1", lines[40:]),
                        ("test2", lines[40:]), ("test3", lines[40:])):
        marks = {"test1": "!", "test3": "~"}  # '!' sorts before the digits: a tokenizer of the others shifts them
        (tmp_path / f"{name}.txt").write_text("".join(line.replace("*", marks.get(name, "*")) + "\n"
                                                      for line in chunk))
    out = tmp_path / "run"
    common = ["internalize", "--train", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"), "--out", str(out),
              "--batch-size", "8", "--steps-per-epoch", "4", "--remove-per-epoch", "2", "--layers", "1", "--hidden",
              "16", "--heads", "2", "--intermediate", "32", "--threads", "1", "--no-select-best"]
    assert main([*common, "--test", str(tmp_path / "test1.txt"), "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--test", str(tmp_path / "test2.txt"), "--steps", "3"]) == 0, capsys.readouterr().err
    printed, progress = capsys.readouterr()
    assert "resumed from" in progress and "internalized, test: accuracy" in printed
    assert main([*common, "--test", str(tmp_path / "test3.txt"), "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert f"error: --test {tmp_path / 'test3.txt'}:1 (" in err and "'~'" in err, err
    assert err.endswith(f"; the run in --out {out} keeps the tokenizer saved with its checkpoints: pass another "
                        "--out for a new run\n") and err.count("\n") == 1, err
    (tmp_path / "long.txt").write_text("".join(f"1 {line}\n" for line in lines[40:]))  # one more digit
    assert main([*common, "--test", str(tmp_path / "long.txt"), "--steps", "3"]) == 1
    err = capsys.readouterr().err  # was "saved from a different model: max_position_embeddings=..."
    assert err.startswith(f"error: --test {tmp_path / 'long.txt'} takes ") and "positions, and the run in --out" in err


@pytest.mark.parametrize("change, had, now", [
    (["--steps", "1"], None, None),
    (["--keep-optimizer"], "no --keep-optimizer", "--keep-optimizer"),
    (["--batch-size", "4"], "--batch-size 8", "--batch-size 4"),
    (["--seed", "1"], "--seed 0", "--seed 1"),
    (["--smoothing-lambda", "inf"], "--steps-per-epoch 4 --remove-per-epoch 2 --smoothing-lambda 4",
     "--steps-per-epoch 4 --remove-per-epoch 2 --smoothing-lambda inf"),
    (["--no-cot"], "--steps-per-epoch 4 --remove-per-epoch 2 --smoothing-lambda 4", "--no-cot"),
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_a_resume_with_other_settings_is_refused_in_the_commands_flags(tmp_path, capsys, change, had, now):
    """Refused in fit's, Batches' and CoTRemoval's parameters: "past steps=1: pass steps=2 or more ..., or resume
    an earlier checkpoint (resume=PATH)" (an option the command lacks), "reset_optimizer=True", "batch_size=8",
    "seed=0", "removal='RemovalSchedule(...)'"."""
    out, at = tmp_path / "run", TINY.index("--steps") + 1
    short = [*TINY[:at], "2", *TINY[at + 1:]]
    assert main(["internalize", "--task", "3x3", "--out", str(out), *short]) == 0
    capsys.readouterr()
    args = list(short)
    if change[0] in args and len(change) == 2:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    assert main(["internalize", "--task", "3x3", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    error = err[err.find("error: "):]
    if had is None:
        assert error == (f"error: --out {out} holds a run at step 2, past --steps 1: pass --steps 2 or more to "
                         "continue it (--steps 2: it is done), or another --out for a new run\n"), err
    else:
        assert error == (f"error: --out {out} holds a run trained with {had}, and this one asks for {now}: resume "
                         "with the run's, or pass another --out for a new run\n"), err


def test_the_baselines_and_files_from_the_command_line(tmp_path, capsys):
    for flag, label, scheduled in (("--no-removal", "explicit CoT", 0), ("--no-cot", "no CoT", "all")):
        out = tmp_path / flag.lstrip("-")
        assert main(["internalize", "--task", "3x3", "--out", str(out), flag, *TINY]) == 0
        assert f"{label}, test: accuracy" in capsys.readouterr().out
        assert {r["cot_scheduled"] for r in kt.read_metrics(out / "metrics.jsonl")} == {scheduled}

    # --train/--valid files in the format, continuing from a model directory with its tokenizer.
    lines = multiplication_training_set(3, 40, seed=5)
    (tmp_path / "train.txt").write_text("\n".join(lines[:32]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(lines[32:]) + "\n")
    out = tmp_path / "files"
    assert main(["internalize", "--train", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"),
                 "--model", str(tmp_path / "no-removal" / "model"), "--out", str(out), "--batch-size", "8",
                 "--steps", "2", "--steps-per-epoch", "4", "--remove-per-epoch", "2", "--threads", "1"]) == 0
    printed, progress = capsys.readouterr()
    assert "32 training examples, 2 steps of 8" in progress and "lr 5e-05" in progress
    assert "internalized, valid: accuracy" in printed and "test:" not in printed


def test_a_baseline_of_its_own_length_takes_any_removal_rate(tmp_path, capsys):
    # --remove-per-epoch 9 in an epoch of 4 steps would remove more than a token per step: refused where the
    # schedule is used (ICoT-SI, a baseline's default length), not for a baseline of --steps 6.
    out = tmp_path / "explicit"
    assert main(["internalize", "--task", "3x3", "--out", str(out), "--no-removal", *TINY,
                 "--remove-per-epoch", "9"]) == 0
    assert "explicit CoT, test: accuracy" in capsys.readouterr().out
    at = TINY.index("--steps")
    assert main(["internalize", "--task", "3x3", "--out", str(tmp_path / "default"), "--no-cot", *TINY[:at],
                 *TINY[at + 2:], "--remove-per-epoch", "9"]) == 1
    assert "or pass --steps (a baseline's default length follows the schedule)" in capsys.readouterr().err


def test_a_directory_in_use_is_refused_before_anything_is_written_there(tmp_path, capsys):
    """internalize --out X, X held by another run (a tokenize writing there), generated its data into X/data and
    only then was refused, by fit; it now holds --out from the start, and fit, below it, holds it again."""
    out = tmp_path / "run"
    with held_by_another_run(out):
        assert main(["internalize", "--task", "3x3", "--out", str(out), *TINY]) == 1
        assert "in use by another kpro run" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".kpro-run.lock"]  # nothing of this run's
    assert main(["internalize", "--task", "3x3", "--out", str(out), *TINY]) == 0


def test_the_help_says_validation_runs_every_epoch_by_default(tmp_path, capsys):
    # --select-best, on by default, evaluates every epoch without --eval-every, whose help said "never".
    assert main(["internalize", "--task", "3x3", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "step 4: valid accuracy" in capsys.readouterr().err  # the epoch is 4 steps
    with pytest.raises(SystemExit):
        main(["internalize", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "every N steps (default: every epoch under --select-best," in shown


def test_the_command_decays_the_learning_rate_over_its_last_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["internalize", "--task", "3x3", "--out", str(out), *TINY, "--decay-steps", "3"]) == 0
    assert "lr 0.001 decaying to 0 over the last 3 steps" in capsys.readouterr().err
    rates = [r["lr"] for r in kt.read_metrics(out / "metrics.jsonl")]
    assert rates == pytest.approx([1e-3] * 4 + [1e-3 * 2 / 3, 1e-3 / 3])


def test_the_command_warms_the_learning_rate_up_over_its_first_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["internalize", "--task", "3x3", "--out", str(out), *TINY, "--warmup-steps", "2",
                 "--decay-steps", "3"]) == 0
    assert "lr 0.001 warming up over the first 2 steps, decaying to 0 over the last 3 steps" in capsys.readouterr().err
    rates = [r["lr"] for r in kt.read_metrics(out / "metrics.jsonl")]
    assert rates == pytest.approx([1e-3 / 2, 1e-3, 1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


@pytest.mark.parametrize("args, message", [
    (["--task", "4x5"], "unknown --task '4x5'"),
    (["--task", "gsm8k"], "--task gsm8k has no generated training set: pass --train FILE"),
    (["--valid", "x.txt"], "pass --task, or --train FILE and --valid FILE"),
    (["--task", "3x3", "--train", "missing.txt"], "--train missing.txt does not exist"),
    (["--task", "3x3", "--eval-only"], "--eval-only evaluates a trained model: pass --model DIR"),
    (["--task", "3x3", "--model", "."], "--layers, --hidden, --heads, --intermediate shape a new model"),
    (["--task", "3x3", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--task", "3x3", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--task", "3x3", "--epochs", "2"], "pass --steps or --epochs, not both"),
    (["--task", "3x3", "--smoothing-lambda", "0"], "--smoothing-lambda must be > 0"),
    (["--task", "3x3", "--remove-all-after", "-1"], "--remove-all-after must be >= 0"),
    (["--task", "3x3", "--seed", "-1"], "--seed must be an integer from 0 to 2**61 - 2 (a larger one would repeat a "
                                        "smaller one's data order), got -1"),
    (["--task", "3x3", "--decay-steps", "-1"], "--decay-steps must be >= 0"),
    (["--task", "3x3", "--decay-steps", "7"], "--warmup-steps 0 and --decay-steps 7 together are longer than the "
                                              "run (6 steps)"),
    (["--task", "3x3", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--task", "3x3", "--warmup-steps", "4", "--decay-steps", "3"], "--warmup-steps 4 and --decay-steps 3 together "
                                                                     "are longer than the run (6 steps)"),
    (["--task", "2x2", "--train-size", "9000"], "--train-size 9,000: asked for 9,000 pairs of 2-digit numbers"),
    (["--task", "1x1", "--eval-size", "60"], "--eval-size 60: asked for 120 pairs of 1-digit numbers"),
    (["--task", "3x3", "--remove-per-epoch", "9"], "--remove-per-epoch 9 would remove more than one token per step"),
    # no validation runs during training for --eval-examples to size: it was ignored
    (["--task", "3x3", "--no-removal", "--eval-examples", "8"], "--eval-examples 8 sizes the validation during "
                                                               "training, and none runs with --no-removal: pass "
                                                               "--eval-every N too"),
    (["--task", "3x3", "--no-select-best", "--eval-examples", "8"], "none runs with --no-select-best: pass "
                                                                    "--eval-every N too"),
    pytest.param(["--task", "3x3", "--device", "cuda"], "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="there is a CUDA device")),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, capsys, args, message):
    assert main(["internalize", "--out", str(tmp_path / "run"), *TINY, *args]) == 1
    err = capsys.readouterr().err  # status lines ("generating ... training examples") before it
    error = err[err.find("error: "):]
    assert "error: " in err and message in error and error.count("\n") == 1 and "Traceback" not in err, err


def test_a_seed_torch_cannot_take_is_refused_before_any_data(tmp_path, capsys):
    """--seed 2**64 passed the checks; the training set was generated, then torch.manual_seed failed with
    "Overflow when unpacking long long", naming no option. The range is Batches': 2**61 - 1 shuffled as 0 did."""
    for seed in (2 ** 64, 2 ** 63, 2 ** 61 - 1):
        out = tmp_path / str(seed)
        assert main(["internalize", "--task", "2x2", "--out", str(out), *TINY, "--seed", str(seed)]) == 1
        err = capsys.readouterr().err
        assert err == f"error: --seed must be an integer from 0 to 2**61 - 2 (a larger one would repeat a smaller " \
                      f"one's data order), got {seed}\n", err
        assert not (out / "data").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "1e308", "--epochs must be at most 2**63 (a run of at most 2**63 - 1 steps), got 1e+308"),
    ("--remove-per-epoch", "1e-320", "--remove-per-epoch must be at least 2**-63 (one more token every 2**63 - 1 "
                                     "steps at most), got 9.99989e-321"),
    ("--steps-per-epoch", str(10 ** 400), "--steps-per-epoch must be a positive integer below 2**63, got 1000"),
])
def test_extreme_finite_run_lengths_are_refused_before_any_data(tmp_path, capsys, flag, value, message):
    """Only 0 < value < inf was checked: round(epochs * steps_per_epoch) and round(steps_per_epoch / removal rate)
    overflowed into an OverflowError traceback, after the training set was generated into --out."""
    out, at = tmp_path / "run", TINY.index("--steps")
    args = [*TINY[:at], *TINY[at + 2:]]  # no --steps, which --epochs excludes
    if flag in args:
        del args[args.index(flag):args.index(flag) + 2]
    assert main(["internalize", "--task", "2x2", "--out", str(out), *args, flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (out / "data").exists()


def test_a_task_that_chooses_no_data_set_is_refused(tmp_path, capsys):
    """--task 9x9 with --train, --valid and --test files trained and evaluated on the files, the task ignored
    silently, though options that would do nothing are refused (as --eval-size and --data-seed are)."""
    lines = multiplication_training_set(2, 48, seed=0)
    for name, chunk in (("t", lines[:32]), ("v", lines[32:40]), ("e", lines[40:])):
        (tmp_path / f"{name}.txt").write_text("\n".join(chunk) + "\n")
    files = ["--train", str(tmp_path / "t.txt"), "--valid", str(tmp_path / "v.txt"), "--test", str(tmp_path / "e.txt")]
    assert main(["internalize", "--task", "9x9", *files, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == ("error: --task 9x9 chooses data sets, and --train, --valid and --test give them all: drop "
                   "--task\n"), err
    assert main(["internalize", "--task", "2x2", *files[2:], "--model", str(tmp_path), "--eval-only",
                 "--out", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err
    assert err == ("error: --task 2x2 chooses data sets, and --valid and --test give them all under --eval-only: "
                   "drop --task\n"), err


def test_a_bad_data_line_is_reported_with_its_file_and_line(tmp_path, capsys):
    good = multiplication_training_set(3, 3, seed=0)
    (tmp_path / "train.txt").write_text(good[0] + "\n" + good[1] + "\n1 2 * 3 4 #### 5\n")
    code = main(["internalize", "--train", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "train.txt"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'train.txt'}:3: expected one '||'" in err and err.count("\n") == 1


def test_the_command_sizes_a_new_model_for_evaluating_examples_of_varied_lengths(tmp_path, capsys):
    """The longest prompt and the longest CoT come from different examples: evaluating them takes more
    positions than the longest example (a batch pads its prompts to its longest and decodes for the set's
    longest reference), so a model sized by the longest example failed at its first validation."""
    (tmp_path / "mix.txt").write_text("a b c d e f g h i j||x #### y\na||p q r s t u v w x y z #### y\n"
                                      "a b||x y #### z\nb||x #### y\n")
    out = tmp_path / "run"
    assert main(["internalize", "--train", str(tmp_path / "mix.txt"), "--valid", str(tmp_path / "mix.txt"),
                 "--out", str(out), "--batch-size", "2", "--steps", "4", "--remove-per-epoch", "1", "--layers", "1",
                 "--hidden", "16", "--heads", "2", "--intermediate", "32", "--threads", "1"]) == 0, \
        capsys.readouterr().err
    assert "internalized, valid: accuracy" in capsys.readouterr().out
    assert json.loads((out / "model" / "config.json").read_text())["max_position_embeddings"] == 12 + 15 + 8


def test_validation_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="at least one example"):
        ValidationAccuracy(TOK, [], every=1)
    valid = VALID
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ValidationAccuracy(TOK, valid, every=1, batch_size=0)
    with pytest.raises(TypeError, match="CoTExamples"):
        ValidationAccuracy(TOK, tokenize_examples(valid, TOK), every=1)
    # room for the training examples, not for evaluating (their margin of generated tokens)
    short = kpro.Llama(make_model().config.replace(max_position_embeddings=max(len(e.ids) for e in examples())))
    with pytest.raises(ValueError, match=r"evaluating the validation examples takes up to \d+ positions"):
        train(tmp_path, model=short, callbacks=[ValidationAccuracy(TOK, valid, every=5)])
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


def test_examples_longer_than_the_model_positions_are_refused_before_training(tmp_path):
    """They trained (past the positions the model has), and only evaluate refused them afterwards. The example
    is numbered from 1 with its text, as tokenize_examples names one (it was numbered from 0, with no text)."""
    lines = [multiplication_training_set(2, 1, seed=0)[0]] * 4 + [multiplication_training_set(4, 1, seed=0)[0]]
    tokenized = tokenize_examples([parse_line(line) for line in lines], TOK)  # the 5th is the long one
    short = kpro.Llama(make_model().config.replace(max_position_embeddings=len(tokenized[4].ids) - 1))
    fit = lambda out, **options: fit_internalization(short, tokenized, out, removal="none", steps=1, batch_size=2,
                                                     pad_id=TOK.pad_id, lr=1e-3, **options)
    with pytest.raises(ValueError) as err:
        fit(tmp_path / "text", tokenizer=TOK)
    assert str(err.value) == (f"example 5 ({lines[4][:80] + '...'!r}) takes {len(tokenized[4].ids)} tokens, more than "
                              f"the model's max_position_embeddings={len(tokenized[4].ids) - 1}")
    ids = f"example 5 (token ids {list(tokenized[4].ids[:12])}...) takes"
    with pytest.raises(ValueError, match="^" + re.escape(ids)):
        fit(tmp_path / "ids")  # no tokenizer to decode it with
    assert not (tmp_path / "text" / "metrics.jsonl").exists() and not (tmp_path / "ids" / "metrics.jsonl").exists()


def test_ids_outside_the_model_vocabulary_are_refused_before_training(tmp_path):
    """A tokenizer larger than the model trained on until the first forward refused input_ids, naming neither
    the tokenizer nor an example, and left metrics.jsonl behind; evaluate refused it up front."""
    tokenized = tokenize_examples([parse_line(line) for line in multiplication_training_set(2, 4, seed=0)], TOK)
    small = kpro.Llama(make_model().config.replace(vocab_size=TOK.vocab_size - 1))
    fit = lambda out, **options: fit_internalization(small, tokenized, out, removal="none", steps=1, batch_size=2,
                                                     pad_id=TOK.pad_id, lr=1e-3, **options)
    with pytest.raises(ValueError, match=rf"^the tokenizer has {TOK.vocab_size} tokens but the model only "
                                         rf"{TOK.vocab_size - 1} embeddings$"):
        fit(tmp_path / "tokenizer", tokenizer=TOK)
    # '####' is the tokenizer's last id: every example holds it; the second is named where the first is fine
    tokenized[0] = TokenizedExample(tuple(i for i in tokenized[0].ids if i != TOK.vocab_size - 1), 4, 4)
    last = TOK.vocab_size - 1
    with pytest.raises(ValueError, match=rf"^example 2 \(token ids .*\) holds token id {last}, outside the model's "
                                         rf"vocabulary of {last} \(ids 0 \.\.\. {last - 1}\)$"):
        fit(tmp_path / "ids")
    # ids held as a tensor are checked too (a tensor's truth value was asked, and raised)
    tokenized[1] = TokenizedExample(torch.tensor(tokenized[1].ids), tokenized[1].cot_start, tokenized[1].cot_end)
    with pytest.raises(ValueError, match=rf"^example 2 \(token ids \[{int(tokenized[1].ids[0])}, .*\) holds token id {last}, "
                                         "outside"):
        fit(tmp_path / "tensor")
    assert not any((tmp_path / name).exists() for name in ("tokenizer", "ids", "tensor"))


def test_an_adapted_model_is_checked_and_validated_as_its_model(tmp_path):
    """A kpro.lora.AdaptedModel has no config of its own: ValidationAccuracy failed on it (AttributeError), and
    fit_internalization skipped the pad_id and example-length checks for it."""
    def adapted(model):
        kpro.lora.add_adapters(model, ["a"], rank=2)
        return kpro.lora.AdaptedModel(model, "a")
    with pytest.raises(ValueError, match="pad_id must be a token id of the model"):
        fit_internalization(adapted(make_model()), examples(), tmp_path / "pad", removal=SCHEDULE, steps=1,
                            batch_size=8, pad_id=TOK.vocab_size + 5, lr=1e-3)
    longest = max(len(e.ids) for e in examples())
    with pytest.raises(ValueError, match=f"tokens, more than the model's max_position_embeddings={longest - 1}"):
        train(tmp_path / "long", model=adapted(kpro.Llama(make_model().config.replace(
            max_position_embeddings=longest - 1))))
    short = adapted(kpro.Llama(make_model().config.replace(max_position_embeddings=longest)))
    with pytest.raises(ValueError, match=r"evaluating the validation examples takes up to \d+ positions"):
        train(tmp_path / "short", model=short, callbacks=[ValidationAccuracy(TOK, VALID, every=5)])
    model = adapted(make_model())
    fit_internalization(model, examples(16), tmp_path / "run", removal=SCHEDULE, steps=1, batch_size=8,
                        pad_id=TOK.pad_id, lr=1e-3, callbacks=[ValidationAccuracy(TOK, VALID, every=1)],
                        stream=io.StringIO())


def test_a_model_whose_tokenizer_lacks_a_symbol_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "model"
    kpro.save_pretrained(make_model(), model_dir)
    kpro.SymbolTokenizer(list("0123456789")).save(model_dir)  # no '*', '+', ...
    code = main(["internalize", "--task", "3x3", "--model", str(model_dir), "--out", str(tmp_path / "run"),
                 "--train-size", "16", "--eval-size", "4"])
    err = capsys.readouterr().err
    # the generated set is read back from its file: named by its file and line
    assert code == 1 and re.search(r"the training set: \S+/run/data/train-3x3\S*\.txt:1 \(", err), err
    assert "): symbol '*' is not in the vocabulary" in err


def test_a_tokenizer_without_a_bos_trains_and_evaluates_with_prompts_of_no_bos(tmp_path, capsys):
    """A bos was hard-wired: a tokenizer.json that defines none failed with "the training set: example 1 (...):
    DIR/tokenizer.json: no bos token to add". The format needs none: the prompt is then `input <eos>`."""
    tokenizers = pytest.importorskip("tokenizers")
    symbols = ["<pad>", "</s>", "[UNK]", "####", *"0123456789*+()"]
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="[UNK]"))
    raw.pre_tokenizer, raw.decoder = tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.decoders.WordPiece()
    raw.add_special_tokens([tokenizers.AddedToken(token, special=True) for token in symbols[:3]])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    raw.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text('{"eos_token": "</s>", "pad_token": "<pad>"}')
    tok = kpro.load_tokenizer(model_dir)
    assert tok.bos_id is None
    torch.manual_seed(0)
    kpro.save_pretrained(kpro.Llama(kpro.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=128, bos_token_id=None, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)), model_dir)
    example = parse_line(multiplication_training_set(3, 1, seed=0)[0])
    assert tokenize_examples([example], tok)[0].prompt == (*tok.encode(example.input, bos=False), tok.eos_id)
    with pytest.raises(ValueError, match="bos=True: the tokenizer has no bos token"):
        tokenize_examples([example], tok, bos=True)
    assert main(["internalize", "--task", "3x3", "--model", str(model_dir), "--out", str(tmp_path / "run"),
                 "--train-size", "16", "--eval-size", "4", "--batch-size", "4", "--steps", "2",
                 "--remove-per-epoch", "2", "--threads", "1"]) == 0, capsys.readouterr().err
    assert "internalized, test: accuracy" in capsys.readouterr().out


def test_eval_only_refuses_a_train_file_where_no_valid_or_test_set_is_generated(tmp_path, capsys):
    """--eval-only --train FILE only leaves FILE's pairs out of generated valid/test sets: with a published
    task's sets (or --valid and --test given) it was accepted and did nothing."""
    train = tmp_path / "train.txt"
    train.write_text("\n".join(multiplication_training_set(4, 4, seed=0)) + "\n")
    model = tmp_path / "model"
    kpro.save_pretrained(make_model(), model)
    TOK.save(model)
    for data, why in ((["--task", "4x4"], "--task 4x4 has published ones"),
                      (["--task", "gsm8k"], "--task gsm8k has published ones"),
                      (["--task", "3x3", "--valid", str(train), "--test", str(train)],
                       f"--valid {train} and --test {train} are read as they are")):
        assert main(["internalize", *data, "--eval-only", "--model", str(model), "--train", str(train),
                     "--out", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert err == f"error: --eval-only --train {train} only leaves its pairs out of generated valid and test " \
                      f"sets; {why}\n", err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("shape, message", [
    (["--hidden", "30", "--heads", "4"], "--hidden 30 is not a multiple of --heads 4"),
    (["--heads", "3"], "--size tiny's hidden size 128 is not a multiple of --heads 3"),
    (["--size", "small", "--hidden", "20", "--heads", "4"], "--hidden 20 / --heads 4 is 5 dimensions per head; "
                                                            "rotary embeddings need an even number"),
    (["--heads", "4", "--kv-heads", "3"], "--heads 4 is not a multiple of --kv-heads 3"),
    (["--size", "base", "--kv-heads", "5"], "--size base's 12 heads is not a multiple of --kv-heads 5"),
])
def test_a_new_model_shape_that_cannot_be_is_refused_naming_the_flags_before_any_data(tmp_path, capsys, shape,
                                                                                       message):
    """They were refused by LlamaConfig, naming its fields (hidden_size, head_dim: 'set head_dim explicitly',
    which the command has no flag for), and only once the training set had been generated."""
    assert main(["internalize", "--task", "3x3", "--out", str(tmp_path / "run"), *shape]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {message}\n", err
    assert not (tmp_path / "run").exists()


def test_the_final_evaluation_reports_its_progress_on_stderr(tmp_path, capsys, monkeypatch):
    """The final evaluation said nothing until a whole set was decoded (30 s for 64 examples of SmolLM2 on a CPU;
    a published set of 1,000 about 7 minutes): a line of the examples decoded and an ETA now goes to stderr every
    10 s (here every batch); stdout keeps the accuracies."""
    from kpro.train import progress

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0, raising=False)
    model = tmp_path / "model"
    kpro.save_pretrained(make_model(), model)
    TOK.save(model)
    assert main(["internalize", "--task", "3x3", "--eval-only", "--model", str(model), "--eval-size", "6",
                 "--eval-batch-size", "4", "--threads", "1", "--out", str(tmp_path / "eval")]) == 0
    out, err = capsys.readouterr()
    lines = [line.split(" in ")[0] for line in err.splitlines() if "examples decoded" in line]
    assert lines == [f"model {model}, valid: 4/6 examples decoded", f"model {model}, test: 4/6 examples decoded"]
    assert "examples decoded" not in out and f"model {model}, test: accuracy" in out


def test_validation_during_training_reports_its_progress_on_stderr(tmp_path, capsys, monkeypatch):
    """--eval-every's validation printed one line after decoding the whole set (a 1,000-example --valid of a
    real model decodes for minutes on a CPU): it now prints the examples decoded and an ETA every 10 s (here
    every batch) before its accuracy line, on stderr with the training's progress."""
    from kpro.train import progress

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0, raising=False)
    assert main(["internalize", "--task", "3x3", "--out", str(tmp_path / "run"), *TINY, "--eval-every", "3",
                 "--eval-examples", "6", "--eval-batch-size", "4"]) == 0  # the last --eval-batch-size counts
    out, err = capsys.readouterr()
    lines = [match.group(0) for line in err.splitlines()
             if (match := re.match(r"step \d+: (validating: \d+/\d+ examples decoded|valid accuracy)", line))]
    assert lines == ["step 3: validating: 4/6 examples decoded", "step 3: valid accuracy",
                     "step 6: validating: 4/6 examples decoded", "step 6: valid accuracy"], lines
    assert "validating" not in out


def test_eval_only_refuses_an_out_that_holds_a_training_run(tmp_path, capsys):
    """--eval-only into a training run's --out overwrote that run's eval.json (its final evaluation)."""
    model = tmp_path / "model"
    kpro.save_pretrained(make_model(), model)
    TOK.save(model)
    run = tmp_path / "run"
    (run / "step-00000006").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "eval.json").write_text('{"model": "internalized"}\n')
    command = ["internalize", "--task", "3x3", "--eval-only", "--model", str(model), "--eval-size", "4",
               "--threads", "1"]
    assert main([*command, "--out", str(run)]) == 1
    assert capsys.readouterr().err == f"error: --out {run} holds a training run (metrics.jsonl, step-00000006), " \
                                      "whose eval.json --eval-only would overwrite: give it another --out\n"
    assert (run / "eval.json").read_text() == '{"model": "internalized"}\n'
    # an --out of evaluations alone is evaluated into again
    assert main([*command, "--out", str(tmp_path / "eval")]) == 0
    assert main([*command, "--out", str(tmp_path / "eval")]) == 0
    assert f"model {model}, test: accuracy" in capsys.readouterr().out


def test_the_command_gives_the_calling_process_its_thread_count_back(tmp_path, capsys):
    """`--threads N` set torch's thread count for the rest of a process that called kpro.cli.main (a notebook, a
    test), after the command and after its failure alike."""
    args = [a if a != "1" or TINY[i - 1] != "--threads" else "2" for i, a in enumerate(TINY)]
    assert torch.get_num_threads() == 1  # the module's fixture
    assert main(["internalize", "--task", "2x2", "--out", str(tmp_path / "run"), *args, "--steps", "2"]) == 0
    assert torch.get_num_threads() == 1
    (tmp_path / "bad.txt").write_text("not a line\n")  # refused as the run reads its data, threads set
    assert main(["internalize", "--train", str(tmp_path / "bad.txt"), "--valid", str(tmp_path / "bad.txt"), "--out",
                 str(tmp_path / "bad"), "--threads", "2", "--steps", "2"]) == 1
    assert "expected one '||' after the input" in capsys.readouterr().err
    assert torch.get_num_threads() == 1
    capsys.readouterr()


def test_a_resume_with_another_learning_rate_or_schedule_names_the_flags(tmp_path, capsys):
    """fit's refusal reached the command line in the library's terms ("optimizer param group 0 peak_lr ... start a
    new run directory (a checkpoint's weights alone load with kpro.load_pretrained)"), where train-expanded and bitune
    name their flags."""
    common = ["internalize", "--task", "2x2", "--out", str(tmp_path / "run"), *TINY]
    assert main([*common, "--steps", "4"]) == 0
    capsys.readouterr()
    for flags, line in ((["--lr", "3e-3"], "--lr: 0.001 in the run, 0.003 now"),
                        (["--weight-decay", "0.1"], "--weight-decay: 0.01 in the run, 0.1 now"),
                        (["--decay-steps", "2"], "--decay-steps: 0 in the run, 2 now"),
                        (["--warmup-steps", "2"], "--warmup-steps: 0 in the run, 2 now")):
        assert main([*common, "--steps", "6", *flags]) == 1
        err = capsys.readouterr().err  # after the run's description (stderr: status, not a result)
        assert err.endswith(f"\nerror: --out {tmp_path / 'run'} holds a run trained with other settings than these "
                            f"flags:\n  {line}\nresume with the run's flags, or pass another --out for a new run\n"), err


# Mutation round 12
def test_warmup_and_decay_may_fill_the_whole_run(tmp_path, capsys):
    """--warmup-steps 3 --decay-steps 3 of a 6-step run leave no constant stretch, and are allowed (refused
    only when "together longer than the run")."""
    out = tmp_path / "run"
    assert cli.main(["internalize", "--task", "3x3", "--out", str(out), *TINY, "--warmup-steps", "3",
                     "--decay-steps", "3"]) == 0, capsys.readouterr().err
    rates = [r["lr"] for r in kt.read_metrics(out / "metrics.jsonl")]
    assert len(rates) == 6 and rates[0] == pytest.approx(1e-3 / 3) and rates[-1] == pytest.approx(1e-3 / 3)


# Mutation round 12
def test_a_weight_decay_of_one_is_refused_by_its_flag(tmp_path, capsys):
    """--weight-decay must be in [0, 1): 1 is refused as its message says."""
    assert cli.main(["internalize", "--task", "3x3", "--out", str(tmp_path / "run"), "--weight-decay", "1"]) == 1
    assert "--weight-decay must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_validation_runs_at_the_last_step_off_the_interval(tmp_path, monkeypatch):
    """ValidationAccuracy evaluates every `every` steps and at the last (its docstring): a run of 5 steps
    validating every 2 evaluates at steps 2, 4 and 5; without step 5 the final model went unvalidated."""
    calls = scripted_accuracies(monkeypatch, [0.1, 0.2, 0.3])
    _, run = train_fast(tmp_path / "run", callbacks=[ValidationAccuracy(TOK, VALID, 2)], steps=5)
    assert run.step == 5 and calls == [0.1, 0.2, 0.3]
    steps = [r["step"] for r in kt.read_metrics(tmp_path / "run" / "metrics.jsonl") if "valid_accuracy" in r]
    assert steps == [2, 4, 5]


def test_fit_internalization_clips_gradients_at_norm_one(tmp_path, monkeypatch):
    """The official ICoT-SI code clips to 1.0 (clip_grad_norm_(..., 1.0)), as the docstring says; clipping
    dropped passed every other test, AdamW's first steps hardly changing under a uniform scale."""
    from kpro.internalize import loop
    seen = {}

    def fake_fit(model, batches, out_dir, **kwargs):
        seen.update(kwargs)
    monkeypatch.setattr(loop, "fit", fake_fit)
    loop.fit_internalization(make_model(), examples(8), tmp_path / "run", removal="none", steps=1, batch_size=8,
                             pad_id=TOK.pad_id, lr=1e-3)
    assert seen["clip_grad_norm"] == 1.0
