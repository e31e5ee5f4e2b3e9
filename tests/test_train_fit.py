"""kpro.train.fit on the CPU: exact resume (with optimizer resets, callback state, RNG-driven batch transforms),
Ctrl-C, atomic checkpoints, token-weighted accumulation, frozen parameters, metrics, and bad input."""
import errno
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kpro
from kpro import train as kt
from kpro._run_lock import LOCK_FILE, holding
from kpro._files import save_safetensors
from kpro.errors import DirectoryInUse
from kpro.train import checkpointing

from conftest import randomize_norms, tiny_config


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config(**overrides))
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def examples(n=48, seed=0):
    """(prompt, answer) pairs of varied lengths, so batches hold different numbers of loss tokens."""
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, 67) for _ in range(rng.randint(1, 6))],
             [rng.randrange(3, 67) for _ in range(rng.randint(1, 5))] + [2]) for _ in range(n)]


def batches(seed=3, batch_size=8):
    return kt.Batches(examples(), batch_size, lambda ex: kt.collate_prompt_answer(ex, pad_id=0), seed=seed)


class Internalize(kt.Callback):
    """Like ICoT: every 3 steps one more unit is 'removed' and the optimizer is re-created; each step a
    random share of the labels is masked with the global torch RNG (so restoring the RNG matters)."""

    def __init__(self):
        self.removed, self.resets = 0, []

    def on_batch(self, run, batch):
        if run.step // 3 > self.removed:
            self.removed = run.step // 3
            self.resets.append(run.step)
            run.reset_optimizer()
        labels = batch["labels"].clone()
        drop = torch.rand(labels.shape) < 0.1 * self.removed
        labels[drop & (labels != 2)] = -100  # every answer keeps its eos: no row loses all its loss tokens
        return {**batch, "labels": labels}

    def on_step_end(self, run, metrics):
        metrics["removed"] = self.removed

    def state_dict(self):
        return {"removed": self.removed}

    def load_state_dict(self, state):
        self.removed = state["removed"]


class StopAt(kt.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, run, metrics):
        if run.step == self.step:
            run.stop()


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test: a shell starts background jobs (CI runners among them) with
    SIGINT ignored, and fit rightly leaves an ignored SIGINT alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine OpenMP barriers cost ~10 ms each.
    (Module-wide: the thread count changes float reduction orders, and runs compared bit for bit must agree.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FIT = dict(steps=8, grad_accum=2, weight_decay=0.1, lr=3e-3, schedule=kt.Schedule("cosine", warmup_steps=2, total_steps=8))


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in kt.read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps in one go: the reference the interrupted runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("straight")
    model, cb = make_model(), Internalize()
    run = kt.fit(model, batches(), out, callbacks=[cb], **FIT)
    return out, state_of(model), run.optimizer.state_dict(), cb.resets


def assert_same_run(reference, out, model, optimizer):
    ref_dir, ref_weights, ref_optimizer, _ = reference
    assert losses(out) == losses(ref_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_weights[name]), name
    mine = optimizer.state_dict()
    assert mine["param_groups"] == ref_optimizer["param_groups"]
    for key, state in ref_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(mine["state"][key][name], value), (key, name)


def test_resume_is_exact(straight_run, tmp_path):
    assert straight_run[3] == [3, 6]  # the optimizer was re-created twice
    first = kt.fit(make_model(), batches(), tmp_path, callbacks=[Internalize(), StopAt(4)], **FIT)
    assert first.step == 4 and first.checkpoint.name == "step-00000004"
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG it starts with
    model, cb = make_model(seed=5), Internalize()  # other initial weights: the checkpoint must replace them
    run = kt.fit(model, batches(), tmp_path, callbacks=[cb], **FIT)
    assert run.step == 8 and cb.resets == [6]
    assert_same_run(straight_run, tmp_path, model, run.optimizer)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(straight_run, tmp_path, sigint_default):
    class CtrlC(kt.Callback):
        def on_batch(self, run, batch):
            if run.step == 4:  # the signal arrives in the middle of step 5
                os.kill(os.getpid(), signal.SIGINT)
            return batch

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        kt.fit(make_model(), batches(), tmp_path, callbacks=[Internalize(), CtrlC()], **FIT)
    assert kt.latest_checkpoint(tmp_path).name == "step-00000005"  # step 5 finished, then the save
    assert signal.getsignal(signal.SIGINT) is handler
    model = make_model(seed=9)
    run = kt.fit(model, batches(), tmp_path, callbacks=[Internalize()], **FIT)
    assert_same_run(straight_run, tmp_path, model, run.optimizer)


def test_resume_with_a_plain_iterable_fast_forwards(tmp_path):
    data = [kt.collate_prompt_answer(examples(8, seed=s), pad_id=0) for s in range(6)]
    kt.fit(make_model(), data, tmp_path / "a", lr=1e-2)
    kt.fit(make_model(), data, tmp_path / "b", lr=1e-2, callbacks=[StopAt(3)])
    kt.fit(make_model(), data, tmp_path / "b", lr=1e-2)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6


def test_a_plain_iterable_drawing_from_the_global_rng_resumes_exactly(tmp_path):
    """A generator drawing each batch from the global RNG, and a DataLoader shuffled by it: the fast-forward
    re-makes the steps done from the state the first session began with, then the checkpoint's state goes on."""
    rows = torch.randint(3, 60, (16, 8), generator=torch.Generator().manual_seed(0))

    def drawn():
        while True:
            ids = torch.randint(3, 60, (4, 8))
            yield {"input_ids": ids, "labels": ids}

    def shuffled():
        return torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=4, shuffle=True)

    for name, data in (("drawn", drawn), ("shuffled", shuffled)):
        for out, sessions in ((tmp_path / f"{name}-straight", [[]]), (tmp_path / f"{name}-resumed", [[StopAt(2)], []])):
            for stop in sessions:
                torch.manual_seed(0)  # the script seeds, builds its model and data, and calls fit
                kt.fit(make_model(), data(), out, steps=4, lr=1e-2, callbacks=[Internalize(), *stop])
        assert losses(tmp_path / f"{name}-resumed") == losses(tmp_path / f"{name}-straight"), name


def test_a_new_run_starts_a_used_batches_from_its_start(tmp_path):
    """fit into a new directory iterated a Batches from where an earlier fit (or a look at a batch) left it,
    and saved that offset as its own: a fresh script could not make the same run."""
    kt.fit(make_model(), batches(), tmp_path / "fresh", steps=3, lr=1e-2)
    used = batches()
    kt.fit(make_model(), used, tmp_path / "earlier", steps=2, lr=1e-2)
    next(iter(used))
    again = kt.fit(make_model(), used, tmp_path / "again", steps=3, lr=1e-2)
    assert losses(tmp_path / "again") == losses(tmp_path / "fresh")
    saved = torch.load(again.checkpoint / "trainer_state.pt", weights_only=True)["data"]
    assert saved == batches().state_dict() | {"index": 3}  # the position of its own 3 steps


def test_resuming_a_plain_iterable_shorter_than_the_steps_done_is_named(tmp_path):
    data = [kt.collate_prompt_answer(examples(8, seed=s), pad_id=0) for s in range(4)]
    kt.fit(make_model(), data, tmp_path, steps=4)
    with pytest.raises(ValueError, match=r"cannot resume at step 4: the batches ran out after 2, .*skipping the 4 "
                                         r"batches the checkpointed steps used"):
        kt.fit(make_model(), iter(data[:2]), tmp_path, steps=6)


def test_every_resume_refusal_is_a_resume_refused_and_keeps_its_old_type(tmp_path):
    """One `except kpro.ResumeRefused` takes every refusal of a run that is not the checkpoint's, each still the
    type it was (CheckpointError or ValueError) and carrying its details."""
    data = [kt.collate_prompt_answer(examples(8, seed=s), pad_id=0) for s in range(4)]
    kt.fit(make_model(), data, tmp_path / "plain", steps=4)
    kt.fit(make_model(), batches(), tmp_path / "batches", steps=4, lr=1e-2)
    frozen = make_model()
    frozen.lm_head.weight.requires_grad_(False)
    refusals = [  # (the call, the old type, a detail the refusal carries)
        (lambda: kt.fit(make_model(), iter(data[:2]), tmp_path / "plain", steps=6), ValueError, ("found", 2)),
        (lambda: kt.fit(make_model(), data, tmp_path / "plain", steps=3), kpro.CheckpointError, ("step", 4)),
        # found at the first batch after the skip (and the load): a ValueError before
        (lambda: kt.fit(make_model(), [kt.collate_prompt_answer(examples(4, seed=s), pad_id=0) for s in range(8)],
                        tmp_path / "plain", steps=6), ValueError, ("now", 4)),
        (lambda: kt.fit(make_model(), batches(), tmp_path / "batches", steps=6, lr=1e-2, clip_grad_norm=0.5),
         kpro.CheckpointError, ("differences", {"clip_grad_norm": (1.0, 0.5)})),
        (lambda: kt.fit(frozen, batches(), tmp_path / "batches", steps=6, lr=1e-2), kpro.CheckpointError,
         ("now", sorted(n for n, p in frozen.named_parameters() if p.requires_grad))),
        (lambda: kt.fit(make_model(), batches(seed=4), tmp_path / "batches", steps=6, lr=1e-2), ValueError,
         ("setting", "seed")),
        (lambda: kt.fit(make_model(), kt.Batches(examples(40), 8, lambda ex: kt.collate_prompt_answer(ex, pad_id=0),
                                                 seed=3), tmp_path / "batches", steps=6, lr=1e-2), ValueError,
         ("had", 48)),
    ]
    kinds = set()
    for call, old_type, (attribute, value) in refusals:
        with pytest.raises(kpro.ResumeRefused) as refused:
            call()
        assert isinstance(refused.value, old_type), refused.value
        detail = getattr(refused.value, attribute)
        assert (sorted(detail) if isinstance(detail, list) else detail) == value, (type(refused.value), attribute)
        kinds.add(type(refused.value).__name__)
    assert kinds == {"TooFewBatches", "PastSteps", "OtherSettings", "OtherParameters", "OtherSetting", "OtherExamples"}


def test_resuming_a_plain_iterable_run_with_batches_is_named(tmp_path):
    data = [kt.collate_prompt_answer(examples(8, seed=s), pad_id=0) for s in range(4)]
    kt.fit(make_model(), data, tmp_path, steps=4, callbacks=[StopAt(2)])
    with pytest.raises(ValueError, match=r"the checkpoint's data position is not a Batches' "
                                         r"\({'steps': 2, 'rows': 8}\): "
                                         r"the run took its batches from another kind of source"):  # was KeyError
        kt.fit(make_model(), batches(), tmp_path, steps=4)


def test_metrics_file_drops_steps_no_checkpoint_kept(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=6, save_every=2, callbacks=[StopAt(5)])
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]
    # Simulate a crash after step 5 with only the step-4 checkpoint kept: resuming re-does step 5 once.
    os.rename(tmp_path / "step-00000005", tmp_path / "gone")
    run = kt.fit(make_model(), batches(), tmp_path, steps=6, save_every=2)
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6] and run.step == 6
    record = kt.read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time"}
    sixth = [b for _, b in zip(range(6), batches())][-1]
    assert record["tokens"] == sixth["attention_mask"].sum().item()  # real tokens of the global batch


def test_a_resume_whose_metrics_rewrite_fails_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """The resume's rewrite of metrics.jsonl (the steps no checkpoint kept dropped) left .metrics.jsonl.tmp-PID in the
    run directory for good where it failed (a full disk, Ctrl-C), and raised an OSError naming no file."""
    kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2, callbacks=[StopAt(3)])
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(kpro._files.os, "fsync", full)
        with pytest.raises(OSError, match=rf"cannot write {re.escape(str(tmp_path / 'metrics.jsonl'))}: no space left"):
            kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step-00000002", "step-00000003"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2)
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]


def test_states_a_checkpoint_cannot_load_back_are_refused_before_they_are_saved(tmp_path):
    """trainer_state.pt is read with torch.load(weights_only=True): a NumPy number saved in it made every
    checkpoint of the run unresumable, found out only on resume. Refused when given, naming the entry."""
    import numpy as np

    class Holds(kt.Callback):
        def __init__(self, value, from_step=0):
            self.value, self.from_step, self.step = value, from_step, 0

        def on_step_end(self, run, metrics):
            self.step = run.step

        def state_dict(self):
            return {"ok": [1, 2.5, "x", torch.ones(2)], "v": self.value if self.step >= self.from_step else 0}

        def load_state_dict(self, state):
            self.value = state["v"]

    class Logs(kt.Callback):
        def on_step_end(self, run, metrics):
            metrics["acc"] = np.mean([1, 0, 1])  # an np.float64: a float to json, not to the checkpoint loader

    with pytest.raises(TypeError, match=r"Holds#2's state_dict\(\)\['v'\] is a numpy.float32, which a "
                                        r"checkpoint cannot hold \(.*weights_only"):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=2, callbacks=[Holds(1), Holds(np.float32(0.5))])
    assert kt.read_metrics(tmp_path / "a" / "metrics.jsonl") == []  # before the first step
    with pytest.raises(TypeError, match=r"\.Holds's state_dict\(\)\['v'\] is a fractions.Fraction"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=3, callbacks=[Holds(Fraction(1, 3), from_step=2)])
    assert [p.name for p in kt.list_checkpoints(tmp_path / "b")] == []
    with pytest.raises(TypeError, match=r"Logs.on_step_end at step 1: metrics\['acc'\] is a numpy.float64; log Python "
                                        r"numbers"):
        kt.fit(make_model(), batches(), tmp_path / "c", steps=2, callbacks=[Logs()])
    model = make_model()
    with pytest.raises(TypeError, match=r"save_checkpoint\['data'\]\['rng'\]\[1\] is a numpy.ndarray"):
        kt.save_checkpoint(tmp_path / "d", 1, model, kt.adamw(model), {"data": {"rng": np.random.get_state()}})
    run = kt.fit(make_model(), batches(), tmp_path / "e", steps=1, callbacks=[Holds({1, 2}), Holds(torch.float16)])
    assert run.step == 1  # what the loader takes (sets, dtypes, tensors, OrderedDicts...) is saved as before


def test_resuming_a_run_past_the_steps_asked_is_refused(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2)
    with pytest.raises(kpro.CheckpointError, match=r"step-00000004 is at step 4, past steps=3: pass steps=4 or more"):
        kt.fit(make_model(), batches(), tmp_path, steps=3)  # it returned the model of step 4, at 'step 4/3'
    with pytest.raises(kpro.CheckpointError, match=r"step-00000002 is at step 2, past steps=1"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=1, resume=tmp_path / "step-00000002")
    assert kt.fit(make_model(), batches(), tmp_path, steps=4).step == 4  # a finished run, again: nothing to do


def test_keep_last_and_summary(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=8, save_every=2, keep_last=2)
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]
    summary = json.loads((tmp_path / "step-00000008" / "trainer_state.json").read_text())
    assert summary["step"] == 8 and summary["metrics"]["step"] == 8
    loaded = kpro.load_pretrained(tmp_path / "step-00000008")  # an ordinary HF-layout model directory
    assert loaded.config == make_model().config


def test_a_checkpoint_older_than_the_directory_holds_is_refused(tmp_path):
    """A rewound hand-written loop saved step 5 beside steps 10 and 20: keep_last pruned the one just written,
    returned its path all the same, and the next resume took step 20."""
    model = make_model()
    optimizer = kt.adamw(model)
    for step in (10, 20):
        kt.save_checkpoint(tmp_path, step, model, optimizer, keep_last=2)
    with pytest.raises(kpro.CheckpointError, match=r"holds step-00000010, step-00000020, past step 5: a rewound run "
                                                   r"writes into another directory"):
        kt.save_checkpoint(tmp_path, 5, model, optimizer, keep_last=2)
    kt.save_checkpoint(tmp_path, 20, model, optimizer, keep_last=2)  # the same step again: replaced
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]


def test_save_checkpoint_checks_keep_last_before_writing(tmp_path):
    """save_checkpoint's keep_last was checked by fit alone: True was read as 1 and pruned the older checkpoints,
    0 and -1 were refused after the checkpoint was written, and 2.5 died in an unnamed TypeError after it too."""
    model = make_model()
    optimizer = kt.adamw(model)
    kt.save_checkpoint(tmp_path, 1, model, optimizer)
    for keep in (True, 0, -1, 2.5, "2"):
        with pytest.raises(ValueError, match=rf"keep_last must be a positive integer or None \(keep all\), "
                                             rf"got {re.escape(repr(keep))}"):
            kt.save_checkpoint(tmp_path, 2, model, optimizer, keep_last=keep)
        assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000001"]  # nothing written or pruned
    kt.save_checkpoint(tmp_path, 2, model, optimizer, keep_last=np.int64(1))
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]


def test_a_prune_finds_a_checkpoint_another_process_removed(tmp_path, monkeypatch):
    model = make_model()
    optimizer = kt.adamw(model)
    for step in (1, 2):
        kt.save_checkpoint(tmp_path, step, model, optimizer)
    stale = kt.list_checkpoints(tmp_path)
    shutil.rmtree(stale[0])  # between the listing and the rename: a raw FileNotFoundError crashed the run
    monkeypatch.setattr(checkpointing, "list_checkpoints", lambda run_dir: stale)
    checkpointing.prune(tmp_path, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_an_interrupted_save_never_replaces_a_good_checkpoint(tmp_path):
    class FailingSave(kt.Callback):
        def on_save(self, run, directory):
            if run.step == 6:
                assert any(directory.iterdir())  # the checkpoint was being written...
                raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        kt.fit(make_model(), batches(), tmp_path, steps=8, save_every=3, callbacks=[FailingSave()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step-00000003"]  # no temp dir left

    # Re-saving an existing step and failing leaves the old one as it was.
    model = make_model(seed=3)
    good = state_of(kpro.load_pretrained(tmp_path / "step-00000003"))
    optimizer = kt.adamw(model)
    with pytest.raises(RuntimeError, match="killed"):
        checkpointing.save_checkpoint(tmp_path, 3, model, optimizer, {}, kt.DistEnv(),
                                      write_extra=lambda d: (_ for _ in ()).throw(RuntimeError("killed")))
    again = kpro.load_pretrained(tmp_path / "step-00000003")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in good.items())

    # What a killed process left (a temp dir with its pid) is ignored, then removed by the next save.
    dead = subprocess.Popen(["true"])
    dead.wait()
    junk = tmp_path / f".step-00000009.tmp-{dead.pid}-abcd1234"
    junk.mkdir()
    (junk / "trainer_state.pt").write_bytes(b"partial")
    assert kt.latest_checkpoint(tmp_path).name == "step-00000003"
    kt.fit(make_model(), batches(), tmp_path, steps=4)
    assert not junk.exists() and kt.latest_checkpoint(tmp_path).name == "step-00000004"


def test_an_on_save_hook_that_draws_random_numbers_does_not_move_the_run(tmp_path):
    """A hook sampling a generation into each checkpoint moved the RNG streams after they were saved: the
    uninterrupted run went on from other states than a resume restores (and, rank 0 alone running it, than the
    other processes')."""
    class MaskAtRandom(kt.Callback):  # from all three streams fit's checkpoints hold: torch, Python, NumPy
        def on_batch(self, run, batch):
            labels = batch["labels"].clone()
            share = 0.1 + 0.2 * random.random() + 0.2 * float(np.random.rand())
            labels[(torch.rand(labels.shape) < share) & (labels != 2)] = -100
            return {**batch, "labels": labels}

    class Sample(kt.Callback):
        def on_save(self, run, directory):
            drawn = [torch.rand(3).tolist(), random.random(), float(np.random.rand())]
            (directory / "sample.json").write_text(json.dumps(drawn))

    def fit(out, seed, *more):  # make_model seeds torch; the resumed process starts Python's and NumPy's elsewhere
        random.seed(seed)
        np.random.seed(seed)
        return kt.fit(make_model(), batches(), tmp_path / out, steps=6, lr=1e-2, save_every=2,
                      callbacks=[MaskAtRandom(), Sample(), *more])
    straight = fit("a", 7)
    fit("b", 7, StopAt(2))
    resumed = fit("b", 99)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))


def test_an_on_fit_start_hook_that_draws_random_numbers_does_not_move_the_run(tmp_path):
    """A callback picking a random evaluation subset in on_fit_start drew from the RNG states a resume had just
    restored: the resumed run went on from other states than the uninterrupted one (and its masks differed)."""
    class PickSubset(kt.Callback):
        def on_fit_start(self, run):
            self.subset = [torch.randperm(100)[:10].tolist(), random.random(), float(np.random.rand())]

    class MaskAtRandom(kt.Callback):
        def on_batch(self, run, batch):
            labels = batch["labels"].clone()
            labels[(torch.rand(labels.shape) < 0.3) & (labels != 2)] = -100
            return {**batch, "labels": labels}

    def fit(out, *more):  # make_model seeds torch
        random.seed(0)
        np.random.seed(0)
        kt.fit(make_model(), batches(), tmp_path / out, steps=4, lr=1e-2, callbacks=[MaskAtRandom(), *more])
    fit("a", PickSubset())
    fit("b", PickSubset(), StopAt(2))
    fit("b", PickSubset())
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    fit("c")  # the steps see the RNG states fit was called with, as without the hook
    assert losses(tmp_path / "c") == losses(tmp_path / "a")


def test_a_resume_may_change_the_accumulation(tmp_path):
    """grad_accum only cuts each step's global batch into micro-batches (to fit memory): a resume with
    another one continues the same run, up to float rounding."""
    sgd = dict(clip_grad_norm=None, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    straight = make_model()
    kt.fit(straight, batches(), tmp_path / "straight", steps=4, grad_accum=1, **sgd)
    model = make_model()
    kt.fit(model, batches(), tmp_path / "resumed", steps=4, grad_accum=1, callbacks=[StopAt(2)], **sgd)
    model = make_model(seed=5)  # the weights come from the checkpoint
    kt.fit(model, batches(), tmp_path / "resumed", steps=4, grad_accum=4, **sgd)
    for (step, a), (_, b) in zip(losses(tmp_path / "straight"), losses(tmp_path / "resumed"), strict=True):
        assert a == pytest.approx(b, rel=1e-6), step
    for name, tensor in state_of(straight).items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_accumulation_weights_every_loss_token_equally(tmp_path):
    """Batches hold different numbers of loss tokens: accumulating micro-batches must give the gradient of
    the whole batch (a token-weighted mean), not a mean of micro-batch means."""
    results = {}
    for accum in (1, 2, 4):  # SGD: Adam's g/sqrt(v) would blow rounding noise of near-zero gradients up
        model = make_model()
        kt.fit(model, batches(), tmp_path / str(accum), steps=3, grad_accum=accum, clip_grad_norm=None,
               optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
        results[accum] = (losses(tmp_path / str(accum)), state_of(model))
    for accum in (2, 4):
        for (_, a), (_, b) in zip(results[1][0], results[accum][0]):
            assert a == pytest.approx(b, rel=1e-6)
        for name, tensor in results[1][1].items():
            torch.testing.assert_close(results[accum][1][name], tensor, rtol=1e-5, atol=1e-6)

    # A scalar loss_fn (a mean) is a mean of micro-batch means: with as many loss tokens in each micro-batch,
    # that is the batch's mean, so accumulating must not change the step either.
    rows = torch.randint(3, 67, (4, 8), generator=torch.Generator().manual_seed(1))
    full = [{"input_ids": rows, "labels": rows.clone()}] * 3
    scalar = {}
    for accum in (1, 2, 4):
        model = make_model()
        kt.fit(model, full, tmp_path / f"scalar{accum}", steps=3, grad_accum=accum, clip_grad_norm=None,
               loss_fn=lambda m, b: kt.lm_loss(m, b).mean, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
        scalar[accum] = state_of(model)
    for accum in (2, 4):
        for name, tensor in scalar[1].items():
            torch.testing.assert_close(scalar[accum][name], tensor, rtol=1e-5, atol=1e-6)


def test_fit_equals_a_hand_written_loop(tmp_path):
    """Decay groups, clipping, the token-mean loss: fit is this plain loop, bit for bit, and logs the norm over
    every group before clipping (clipping at work: a norm over one group passed while the gradients stayed below
    the clip). (The loop computes the loss as lm_loss does, fused with the head; test_ops_linear_cross_entropy.py
    compares fit with the materialised logits.)"""
    model, reference = make_model(), make_model()
    clip = 0.05
    kt.fit(model, batches(), tmp_path, steps=3, lr=1e-2, weight_decay=0.1, clip_grad_norm=clip)
    optimizer = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2)
    expected, norms = [], []
    for _, batch in zip(range(3), batches()):
        hidden = reference(batch["input_ids"], batch["attention_mask"], head=False)
        targets = torch.cat((batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)), dim=1)
        count = int((targets != -100).sum())
        loss_sum = kpro.ops.linear_cross_entropy(hidden, reference.lm_head.weight, targets, reduction="sum")
        loss_sum.backward()
        for p in reference.parameters():
            p.grad.mul_(1 / count)
        # (the norm summed in the optimizer's parameter order, as fit does: another order rounds differently)
        groups = [[p for p in g["params"]] for g in optimizer.param_groups]
        by_group = [float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in g]))) for g in groups]
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for g in groups for p in g], clip)))
        assert min(by_group) > 0 and norms[-1] > clip  # both groups count, and the clip acts
        assert norms[-1] == pytest.approx(math.hypot(*by_group), rel=1e-5)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss_sum.item() / count)
    assert [loss for _, loss in losses(tmp_path)] == expected
    assert [r["grad_norm"] for r in kt.read_metrics(tmp_path / "metrics.jsonl")] == norms
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_only_trainable_parameters_reach_the_optimizer(tmp_path):
    model = make_model()
    model.requires_grad_(False)
    model.layers[1].requires_grad_(True)  # like block expansion: one block trains
    before = state_of(model)
    run = kt.fit(model, batches(), tmp_path, steps=2, lr=1e-2)
    trainable = {id(p) for p in model.layers[1].parameters()}
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == trainable
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) != name.startswith("layers.1."), name
    model = make_model()
    model.norm.requires_grad_(False)
    with pytest.raises(ValueError, match=r"optimizer holds 1 frozen parameter\(s\) \(norm.weight\)"):
        kt.fit(model, batches(), tmp_path / "x", steps=1, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))


class Wrapper(torch.nn.Module):
    """Not a kpro.Llama (like a Bitune wrapper): saved as module.safetensors, tied weights included."""

    def __init__(self, seed=0):
        super().__init__()
        self.base = make_model(seed, tie_word_embeddings=True)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, input_ids, attention_mask=None):
        return self.base(input_ids, attention_mask) * self.scale


def mean_loss(model, batch):
    return kt.causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def test_resuming_a_plain_iterable_with_another_batch_size_is_refused(tmp_path):
    """The fast-forward skips as many batches as steps were done: of another size, they are other examples
    than the checkpointed steps used (rows 12-47 of 96 were skipped, never trained, without a word)."""
    rows = torch.randint(3, 60, (96, 8), generator=torch.Generator().manual_seed(0))
    cut = lambda size: [kt.collate_packed(rows[i:i + size]) for i in range(0, len(rows) - size + 1, size)]
    kt.fit(make_model(), cut(4), tmp_path, steps=3)
    with pytest.raises(ValueError, match=r"the batches have 16 rows, the checkpoint's run had 4: a plain iterable "
                                         r"resumes by skipping 3 batches"):
        kt.fit(make_model(), cut(16), tmp_path, steps=6)
    kt.fit(make_model(), cut(4), tmp_path, steps=6)  # the same batches resume
    assert [r["tokens"] for r in kt.read_metrics(tmp_path / "metrics.jsonl")] == [32] * 6


def test_a_lora_model_trains_checkpoints_and_resumes_exactly(tmp_path):
    """A Llama with LoRA layers (documented for fit's default loss) trained every step, then its checkpoint was
    refused at the first save (unmerged adapters have no place in an HF checkpoint) and the run was lost. Its
    checkpoints are its state dict now, adapters included, and resume exactly: the resumed model starts from
    other weights, frozen base and adapters alike, which the checkpoint must all replace."""
    def adapted(seed=0):
        model = make_model(seed)
        kpro.lora.add_adapters(model, ["a"], rank=2, seed=seed)
        return model
    straight = adapted()
    with kpro.lora.active(straight, "a"):
        kt.fit(straight, batches(), tmp_path / "a", steps=4, lr=1e-2)
    for stop, seed in (([StopAt(2)], 0), ([], 5)):
        resumed = adapted(seed)
        with kpro.lora.active(resumed, "a"):
            kt.fit(resumed, batches(), tmp_path / "b", steps=4, lr=1e-2, callbacks=stop)
    assert (tmp_path / "b" / "step-00000002" / "module.safetensors").is_file()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_a_model_with_a_merged_adapter_checkpoints_its_merge_and_resumes_exactly(tmp_path):
    """A merged LoRA layer's state dict holds its merge mark (the adapter's name, a uint8 tensor): a model trained
    with an adapter merged (its norms trained here) checkpoints it with its tensors, and resumes into a model
    merged the same way, exactly: the resumed model starts from other weights, whose frozen (merged) ones the
    checkpoint must replace too."""
    def merged(merge=True, seed=0):
        model = make_model(seed)
        kpro.lora.add_adapters(model, ["a"], rank=2, seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.fill_(0.01)
        for layer in kpro.lora.lora_layers(model) if merge else []:
            layer.merge("a")
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        return model
    straight = merged()
    kt.fit(straight, batches(), tmp_path / "a", steps=4, lr=1e-2)
    for stop, seed in (([StopAt(2)], 0), ([], 5)):
        resumed = merged(seed=seed)
        kt.fit(resumed, batches(), tmp_path / "b", steps=4, lr=1e-2, callbacks=stop)
    saved = load_file(tmp_path / "b" / "step-00000002" / "module.safetensors")
    assert saved["layers.0.self_attn.q_proj.merged_adapter"].tolist() == list(b"a")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert resumed.layers[0].self_attn.q_proj.merged == "a"
    with pytest.raises(kpro.CheckpointError, match=r"tensor\(s\) the checkpoint has and this model lacks: "
                                                   r"layers.0.mlp.down_proj.merged_adapter"):
        kt.fit(merged(merge=False), batches(), tmp_path / "b", steps=6, lr=1e-2)  # not into an unmerged model


def test_a_loss_that_trains_nothing_is_named(tmp_path):
    """A LoRA model with no adapter active: the loss depends on no trainable parameter, and backward died with
    torch's 'element 0 of tensors does not require grad'."""
    model = make_model()
    kpro.lora.add_adapters(model, ["a"], rank=2)
    with pytest.raises(ValueError, match=r"the loss of step 1 depends on no trainable parameter.*"
                                         r"kpro.lora.AdaptedModel\(model, name\)"):
        kt.fit(model, batches(), tmp_path, steps=2)


def test_a_model_whose_checkpoint_would_be_refused_is_refused_before_training(tmp_path):
    """A head that is the embedding under an untied config: safetensors refused the save (shared memory)
    after every step had trained; kpro.save_pretrained names the config now, and fit asks before step 1."""
    model = make_model()
    model.lm_head.weight = model.embed_tokens.weight
    for save in (lambda: kpro.save_pretrained(model, tmp_path / "model"),
                 lambda: kt.fit(model, batches(), tmp_path / "run", steps=2)):
        with pytest.raises(kpro.CheckpointError, match=r"lm_head.weight is the embedding, but "
                                                       r"config.tie_word_embeddings is False"):
            save()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "model").exists()


def test_any_module_with_a_scalar_loss_resumes_exactly(tmp_path):
    straight = Wrapper()
    kt.fit(straight, batches(), tmp_path / "a", steps=4, loss_fn=mean_loss, lr=1e-2)
    kt.fit(Wrapper(), batches(), tmp_path / "b", steps=4, loss_fn=mean_loss, lr=1e-2, callbacks=[StopAt(2)])
    assert (tmp_path / "b" / "step-00000002" / "module.safetensors").is_file()
    resumed = Wrapper(seed=4)
    kt.fit(resumed, batches(), tmp_path / "b", steps=4, loss_fn=mean_loss, lr=1e-2)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert resumed.base.lm_head.weight is resumed.base.embed_tokens.weight


class WithUnused(Wrapper):
    """Two trainable parameters the loss never reaches, and one it reaches from step 3 on: AdamW keeps no state
    for a parameter before its first gradient (as for the adapter that Bitune's only_causal mode leaves
    without one)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.unused_a, self.unused_b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        self.late, self.use_late = torch.nn.Parameter(torch.ones(())), False

    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        return out * self.late if self.use_late else out


class LateFromStep3(kt.Callback):
    def on_batch(self, run, batch):
        run.model.use_late = run.step >= 2  # run.step: the steps done before this batch's
        return batch


def test_a_parameter_that_never_had_a_gradient_resumes_exactly(tmp_path):
    """Its checkpoint lists it without optimizer state, and every resume was refused ("Missing optimizer state
    for parameter 'unused_a'"): `kpro demo bitune` could never be run again into the same directory. Loaded
    non-strictly, torch gives such a parameter the state of a zero-gradient step, whose step count would skew
    Adam's bias correction at its first real gradient: it must start fresh, as it would have."""
    fit = lambda model, out, **kw: kt.fit(model, batches(), tmp_path / out, steps=4, loss_fn=mean_loss, lr=1e-2,
                                          callbacks=[LateFromStep3(), *kw.pop("callbacks", [])], **kw)
    straight = WithUnused()
    fit(straight, "a")
    fit(WithUnused(), "b", callbacks=[StopAt(2)])
    resumed = WithUnused(seed=4)
    fit(resumed, "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert straight.late.item() != 1.0  # it trained from step 3


def test_a_model_with_checkpoint_wrapped_layers_resumes_exactly(tmp_path):
    """torch's state-dict helpers key the optimizer state without checkpoint_wrapper's part of the name."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def wrapped(seed=0):
        model = make_model(seed)
        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer)
        return model
    straight = wrapped()
    kt.fit(straight, batches(), tmp_path / "a", steps=4, lr=1e-2)
    kt.fit(wrapped(), batches(), tmp_path / "b", steps=4, lr=1e-2, callbacks=[StopAt(2)])
    resumed = wrapped(seed=4)
    kt.fit(resumed, batches(), tmp_path / "b", steps=4, lr=1e-2)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    # another parameter trainable in its place (the counts agree): its missing state is not the saved set-up's
    frozen_b, swapped = WithUnused(), WithUnused()
    frozen_b.unused_b.requires_grad_(False)
    kt.fit(frozen_b, batches(), tmp_path / "c", steps=2, loss_fn=mean_loss, lr=1e-2)
    swapped.unused_a.requires_grad_(False)
    with pytest.raises(kpro.CheckpointError, match=r"the optimizer state does not fit this optimizer: the checkpoint's "
                                                   r"optimizer trained unused_a, which this one does not hold .*; this "
                                                   r"one holds unused_b, which the checkpoint's never held"):
        kt.fit(swapped, batches(), tmp_path / "c", steps=4, loss_fn=mean_loss, lr=1e-2)


# ------------------------------------------------------------------------------------------ bad input


def test_an_optimizer_that_does_not_train_the_models_trainable_parameters_is_refused(tmp_path):
    """An optimizer over another model's parameters trained nothing (grad_norm 0); parameters made trainable
    after the optimizer was built gathered gradients every step, outside clipping, and never changed; a factory
    returning the optimizer in use made reset_optimizer keep its moments."""
    other = make_model(seed=1)
    with pytest.raises(ValueError, match="the optimizer holds 21 parameter\\(s\\) that are not the model's"):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=2, optimizer=lambda m: kt.adamw(other, 1e-3))

    class UnfreezeAt2(kt.Callback):
        def on_batch(self, run, batch):
            if run.step == 1:
                run.model.embed_tokens.weight.requires_grad_(True)
            return batch
    model = make_model()
    model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) are not in the optimizer \(embed_tokens.weight\)"
                                         r": freeze them .*or call run.reset_optimizer\(\)"):
        kt.fit(model, batches(), tmp_path / "b", steps=3, callbacks=[UnfreezeAt2()])
    assert [r["step"] for r in kt.read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1]
    built = []
    once = lambda m: built[0] if built else built.append(kt.adamw(m, 1e-3)) or built[0]
    with pytest.raises(ValueError, match="returned the optimizer in use"):  # Internalize resets at step 3
        kt.fit(make_model(), batches(), tmp_path / "c", steps=4, callbacks=[Internalize()], optimizer=once)


def test_a_stateless_optimizer_resumes_with_its_settings_checked(tmp_path):
    """Plain SGD holds no state, so the checkpoint held no param groups, and another lr or parameter set went
    through unchecked on resume."""
    sgd = lambda lr: (lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr))
    kt.fit(make_model(), batches(), tmp_path, steps=2, optimizer=sgd(0.1))
    with pytest.raises(kpro.CheckpointError, match=r"optimizer param group 0 peak_lr: 0.1 in the checkpoint, 5.0 now"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, optimizer=sgd(5.0))
    frozen = make_model()
    frozen.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(kpro.CheckpointError, match=r"the checkpoint's optimizer trained embed_tokens.weight, which "
                                                   r"this one does not hold"):
        kt.fit(frozen, batches(), tmp_path, steps=4, optimizer=sgd(0.1))
    kt.fit(make_model(), batches(), tmp_path, steps=4, optimizer=sgd(0.1))


class UnfreezeEmbeddingAt(kt.Callback):
    """Makes the embedding trainable before step `step` + 1 and asks for a fresh optimizer, as the docs advise."""

    def __init__(self, step):
        self.step, self.done = step, False

    def on_batch(self, run, batch):
        if run.step == self.step and not self.done:
            self.done = True
            run.model.embed_tokens.weight.requires_grad_(True)
            run.reset_optimizer()
        return batch

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


def frozen_embedding(seed=0):
    model = make_model(seed)
    model.embed_tokens.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_resume_whose_optimizer_lacks_parameters_the_checkpoints_trained_is_refused(tmp_path, optimizer):
    """An embedding unfrozen mid-run (then run.reset_optimizer()) came back frozen on resume, and one in a group
    added in on_fit_start lost its moments: torch's loader dropped what this optimizer lacks, silently (plain SGD
    holds no state, and its checkpoint no parameters). Made trainable before fit resumes, the run goes on exactly."""
    kw = dict(steps=5, lr=1e-2) if optimizer == "adamw" else dict(
        steps=5, optimizer=lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1))
    straight = frozen_embedding()
    kt.fit(straight, batches(), tmp_path / "a", callbacks=[UnfreezeEmbeddingAt(2)], **kw)
    kt.fit(frozen_embedding(), batches(), tmp_path / "b", callbacks=[UnfreezeEmbeddingAt(2), StopAt(3)], **kw)
    with pytest.raises(kpro.CheckpointError, match=r"step-00000003: the optimizer state does not fit this "
                                                   r"optimizer: the checkpoint's optimizer trained embed_tokens.weight,"
                                                   r" which this one does not hold \(they would lose their optimizer "
                                                   r"state, or train no more\). Make the same parameters trainable"):
        kt.fit(frozen_embedding(seed=4), batches(), tmp_path / "b", callbacks=[UnfreezeEmbeddingAt(2)], **kw)
    if optimizer == "adamw":  # a checkpoint of an older kpro records no parameters: read off its optimizer state
        older = tmp_path / "b" / "step-00000003" / "trainer_state.pt"
        state = torch.load(older, weights_only=True)
        del state["trained_params"]
        # and its groups' sizes as the run started (the embedding frozen then), which an older kpro recorded
        state["settings"]["param_groups"][0]["params"] -= 1
        torch.save(state, older)
        with pytest.raises(kpro.CheckpointError, match=r"trained embed_tokens.weight, which this one does not hold"):
            kt.fit(frozen_embedding(seed=4), batches(), tmp_path / "b", callbacks=[UnfreezeEmbeddingAt(2)], **kw)
    resumed = make_model(seed=4)  # the embedding trainable, as it was when step 3 was saved
    kt.fit(resumed, batches(), tmp_path / "b", callbacks=[UnfreezeEmbeddingAt(2)], **kw)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))

    class EmbeddingGroup(kt.Callback):
        def on_fit_start(self, run):
            run.model.embed_tokens.weight.requires_grad_(True)
            run.optimizer.add_param_group({"params": [run.model.embed_tokens.weight], "lr": 1e-3})
    kt.fit(frozen_embedding(), batches(), tmp_path / "c", callbacks=[EmbeddingGroup(), StopAt(2)], **kw)
    with pytest.raises(kpro.CheckpointError, match=r"trained embed_tokens.weight, which this one does not hold .*"
                                                   r"on_fit_start runs after the resume"):
        kt.fit(frozen_embedding(), batches(), tmp_path / "c", callbacks=[EmbeddingGroup()], **kw)


def test_bad_learning_rates_are_refused(tmp_path):
    for lr in (0, -1e-3):
        with pytest.raises(ValueError, match="lr must be a positive"):
            kt.fit(make_model(), batches(), tmp_path, steps=1, lr=lr)
    with pytest.raises(ValueError, match="learning rate of param group 0 must be a positive"):
        kt.fit(make_model(), batches(), tmp_path, steps=1, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="with an optimizer factory"):
        kt.fit(make_model(), batches(), tmp_path, steps=1, lr=1e-3, optimizer=kt.adamw)


def test_a_batch_without_loss_tokens_is_an_error(tmp_path):
    good = kt.collate_prompt_answer([([1, 4, 5, 6], [7, 2])] * 4, pad_id=0)
    prompts_only = {**good, "labels": torch.full_like(good["labels"], -100)}
    half = {**good, "labels": torch.cat([good["labels"][:2], prompts_only["labels"][2:]])}
    with pytest.raises(ValueError, match="the batch of step 2 has no loss tokens"):
        kt.fit(make_model(), [good, prompts_only], tmp_path / "a", steps=2, grad_accum=2)
    run = kt.fit(make_model(), [half], tmp_path / "b", steps=1, grad_accum=2)  # one micro-batch with none: fine
    assert math.isfinite(run.metrics["loss"])
    with pytest.raises(ValueError, match="no loss tokens"):
        kt.fit(make_model(), [prompts_only], tmp_path / "c", steps=1, loss_fn=mean_loss)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=1)
    with pytest.raises(kpro.CheckpointError, match=r"different model:(.|\n)*intermediate_size=88 there, 96 here"
                                                    r"(.|\n)*layers.0.mlp.up_proj.weight is \[88, 48\] there, \[96, 48\] here"):
        kt.fit(make_model(intermediate_size=96), batches(), tmp_path, steps=2)
    with pytest.raises(kpro.CheckpointError, match="this model lacks: layers.1.input_layernorm.weight"):
        kt.fit(make_model(num_hidden_layers=1), batches(), tmp_path, steps=2)
    with pytest.raises(kpro.CheckpointError, match="already holds checkpoints"):
        kt.fit(make_model(), batches(), tmp_path, steps=2, resume=False)


def test_other_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cannot be split into 1 process.*3 accumulation"):
        kt.fit(make_model(), batches(), tmp_path, steps=1, grad_accum=3)
    partial = kt.Batches(examples(45), 8, lambda ex: kt.collate_prompt_answer(ex, pad_id=0), drop_last=False)
    with pytest.raises(ValueError, match=r"last batch of each epoch holds 5 of the 45 examples \(Batches\(drop_last=False"):
        kt.fit(make_model(), partial, tmp_path / "p", steps=1, grad_accum=2)  # failed 5 steps in before
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        kt.fit(make_model(), batches(), tmp_path, steps=0)
    with pytest.raises(ValueError, match="precision"):
        kt.fit(make_model(), batches(), tmp_path, steps=1, precision="fp8")
    kt.fit(make_model(), batches(), tmp_path / "c", steps=2, callbacks=[Internalize(), StopAt(1)])
    with pytest.raises(ValueError, match="state for callback.*Internalize"):
        kt.fit(make_model(), batches(), tmp_path / "c", steps=2)  # Internalize's saved state has no taker
    for clip in (True, "1"):  # True read as 1.0; "1" died in a bare '>' TypeError
        with pytest.raises(ValueError, match=f"clip_grad_norm must be a positive number or None, got {clip!r}"):
            kt.fit(make_model(), batches(), tmp_path / "d", steps=1, clip_grad_norm=clip)
    with pytest.raises(ValueError, match="precision='bf16' autocasts float32 operations, and this model is float64"):
        kt.fit(make_model().double(), batches(), tmp_path / "e", steps=1, precision="bf16")  # fp64 as recorded 'bf16'


def test_batches_holding_no_batch_are_named_not_taken_for_steps_0(tmp_path):
    """fit(model, [], out) said "steps must be a positive integer, got 0", a steps= the caller never passed."""
    from torch.utils.data import DataLoader
    for name, empty in (("list", []), ("loader", DataLoader(torch.zeros(0, 4, dtype=torch.long), batch_size=2))):
        with pytest.raises(ValueError, match=r"the batches hold no batch \(len\(batches\) is 0\), so there is no "
                                             r"step to train: pass batches that hold some"):
            kt.fit(make_model(), empty, tmp_path / name)
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=0)


def test_callbacks_that_are_no_callback_instances_are_refused_before_anything_is_written(tmp_path):
    """callbacks=[kt.Callback] (the class) died in "on_fit_start() missing 1 required positional argument", an
    object with only on_step_end in an AttributeError on_fit_start, both after out_dir was made."""
    class OnlyStepEnd:
        def on_step_end(self, run, metrics):
            pass

    for callbacks, error in (([kt.Callback], r"callbacks\[0\] is the class kpro.train.callbacks.Callback, not an "
                                             r"instance: pass Callback\(\.\.\.\)"),
                             ([StopAt(1), OnlyStepEnd()], r"callbacks\[1\] is a .*OnlyStepEnd, not a "
                                                          r"kpro.train.Callback: subclass kpro.train.Callback"),
                             (StopAt(1), r"callbacks must be a list of kpro.train.Callback instances, got a .*StopAt")):
        with pytest.raises(TypeError, match=error):
            kt.fit(make_model(), batches(), tmp_path / "a", steps=1, callbacks=callbacks)
        assert not (tmp_path / "a").exists()


def test_a_callback_whose_saved_state_it_cannot_read_is_named(tmp_path):
    """A callback changed since the run saved it died in a bare KeyError('level') naming neither."""
    class Stage(kt.Callback):
        def state_dict(self):
            return {"stage": 1}

    kt.fit(make_model(), batches(), tmp_path, steps=1, callbacks=[Stage()])

    class Stage(kt.Callback):  # noqa: F811: the same callback, a later version
        def state_dict(self):
            return {"level": 0}

        def load_state_dict(self, state):
            self.level = state["level"]

    with pytest.raises(kpro.CheckpointError, match=r"callback .*Stage could not load the state the checkpoint holds "
                                                   r"for it \(keys \['stage'\]\): KeyError: 'level'"):
        kt.fit(make_model(), batches(), tmp_path, steps=2, callbacks=[Stage()])


def test_a_stop_asked_for_in_on_fit_start_ends_the_run_before_its_first_step(tmp_path):
    """run.stop() in on_fit_start (an early stop that a callback's restored state remembers) still trained a step:
    a run requeued after it stopped (SLURM) grew one step, and one checkpoint, per relaunch. It ends before the
    first step now, saving nothing new; on_fit_end still runs."""
    class EarlyStop(kt.Callback):
        def __init__(self, at):
            self.at, self.stopped, self.ended = at, False, []

        def on_fit_start(self, run):
            if self.stopped:
                run.stop()

        def on_step_end(self, run, metrics):
            if run.step >= self.at:
                self.stopped = True
                run.stop()

        def on_fit_end(self, run):
            self.ended.append(run.step)

        def state_dict(self):
            return {"stopped": self.stopped}

        def load_state_dict(self, state):
            self.stopped = state["stopped"]

    first = kt.fit(make_model(), batches(), tmp_path, callbacks=[EarlyStop(2)], **FIT)
    assert first.step == 2
    for relaunch in range(2):
        model, stop = make_model(seed=5), EarlyStop(2)
        run = kt.fit(model, batches(), tmp_path, callbacks=[stop], **FIT)
        assert run.step == 2 and stop.ended == [2] and run.checkpoint == tmp_path / "step-00000002"
        assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]
        assert [m["step"] for m in kt.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), first.model.parameters()))  # the resumed

    class StopAtOnce(kt.Callback):
        def on_fit_start(self, run):
            run.stop()

    run = kt.fit(make_model(), batches(), tmp_path / "fresh", callbacks=[StopAtOnce()], **FIT)
    assert run.step == 0 and run.checkpoint is None and kt.list_checkpoints(tmp_path / "fresh") == []
    assert kt.read_metrics(tmp_path / "fresh" / "metrics.jsonl") == []


def test_bookkeeping_arguments_are_checked_before_anything_runs(tmp_path):
    """log_every=0 fell back to the default and -2 meant 2, a bool passed for 1 (save_every=True saved every step),
    resume=1 died in pathlib, and an out_dir that is a file in mkdir's 'File exists'."""
    for name, value in [("log_every", 0), ("log_every", -2), ("log_every", True), ("log_every", 2.5),
                        ("save_every", True), ("keep_last", True), ("grad_accum", True)]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer.*got {value!r}"):
            kt.fit(make_model(), batches(), tmp_path / "a", steps=2, **{name: value})
    with pytest.raises(TypeError, match="resume must be True, False or the path of a checkpoint, got 1"):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=2, resume=1)
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="out_dir .*file is a file, not a run directory"):
        kt.fit(make_model(), batches(), tmp_path / "file", steps=2)
    with pytest.raises(ValueError, match="every must be a positive integer or None"):
        kt.ProgressLine(10, every=0)


def test_progress_line_on_a_terminal_and_in_a_log():
    class Tty(list):
        def write(self, s):
            self.append(s)

        def flush(self):
            pass

        def isatty(self):
            return True

    tty = Tty()
    line = kt.ProgressLine(3, stream=tty)
    for step in (1, 2, 3):
        line.update(step, loss=1.0, lr=1e-3, tokens=100)
    assert tty[0].startswith("\r\033[K") and tty[-1].startswith("\r\033[Kstep     3/3  loss 1.0000  lr 1.00e-03")
    assert tty[-1].endswith("\n")
    line.close()
    assert tty[-1].endswith("\n") and not tty[-1] == "\n"  # a finished line gets no extra newline
    interrupted = kt.ProgressLine(3, stream=tty)
    interrupted.update(1, loss=1.0, lr=1e-3, tokens=100)
    interrupted.close()
    assert tty[-1] == "\n"  # a line left open by a stopped run is ended
    log = Tty()
    log.isatty = lambda: False
    line = kt.ProgressLine(100, 40, stream=log)  # a resumed run: 60 steps to go, a line every 3
    for step in range(41, 101):
        line.update(step, loss=2.0, lr=1e-3, tokens=10)
    assert len(log) == 20 and log[-1].startswith("step   100/100  loss 2.0000") and "eta 0:00" in log[-1]


def test_a_long_runs_progress_line_comes_at_least_once_a_minute_off_a_terminal(monkeypatch):
    """Under nohup or a batch scheduler the first line of internalize's 170,426 steps came at step 8,521, 1 to 3
    hours in: by default a line also follows a minute without one; a log_every asked for is kept to."""
    from kpro.train import progress
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    for every, expected in ((None, [1, 2, 5, 6, 20, 40]), (20, [20, 40])):
        log = io.StringIO()  # not a terminal
        line = kt.ProgressLine(400, stream=log, every=every)  # by default a line every 20 steps (5%), and ...
        for step, seconds in zip(range(1, 41), [61, 121, 130, 140, 200, 261] + [270 + i for i in range(34)]):
            clock[0] = seconds  # ... after 60 s without one: steps 1, 2, 5 and 6
            line.update(step, loss=2.0, lr=1e-3, tokens=10)
        assert [int(text.split()[1].split("/")[0]) for text in log.getvalue().splitlines()] == expected, every


def test_count_progress_prints_a_line_every_ten_seconds_off_a_terminal(monkeypatch):
    """Scoring an --eval file or decoding an evaluation set said nothing for minutes (a PIQA-sized file: ~40 min on
    a CPU): CountProgress, their callback, prints a line once 10 s have passed since the last, with an ETA, and none
    at the end (the caller's result follows); on a terminal it redraws in place and ends its line."""
    from types import SimpleNamespace

    from kpro.train import progress

    clock = iter([0.0, 4.0, 11.0, 15.0, 22.0, 30.0])  # the start, then one reading per call
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    log = io.StringIO()
    count = progress.CountProgress("mc.jsonl", "choices scored", stream=log)
    for done in (16, 32, 48, 64, 80):
        count(done, 80)
    assert log.getvalue() == "mc.jsonl: 32/80 choices scored in 0:11, eta 0:16\n" \
                             "mc.jsonl: 64/80 choices scored in 0:22, eta 0:06\n"  # not at 15 s, nor once done

    class Tty(io.StringIO):
        def isatty(self):
            return True
    clock = iter([0.0, 1.0, 2.0])
    tty = Tty()
    count = progress.CountProgress("valid", "examples decoded", stream=tty)
    count(8, 16)
    count.close()  # stopped before the end (an error): the in-place line is ended
    assert tty.getvalue() == "\r\033[Kvalid: 8/16 examples decoded in 0:01, eta 0:01\n"
    clock = iter([0.0, 1.0, 2.0])
    tty = Tty()
    with pytest.raises(KeyboardInterrupt), progress.CountProgress("valid", "examples decoded", stream=tty) as count:
        count(8, 16)
        raise KeyboardInterrupt  # as a context manager it ends the line however the block ends
    assert tty.getvalue() == "\r\033[Kvalid: 8/16 examples decoded in 0:01, eta 0:01\n"


def test_progress_goes_to_stderr_by_default(tmp_path, capsys):
    """The progress line and "resumed from" went to stdout, which a user pipes (`| head`) for results."""
    kt.fit(make_model(), batches(), tmp_path, steps=2, lr=1e-3, log_every=1)
    kt.fit(make_model(), batches(), tmp_path, steps=3, lr=1e-3, log_every=1)
    out, err = capsys.readouterr()
    assert out == "" and "step     2/2" in err and "resumed from" in err and "step     3/3" in err


def test_a_progress_reader_gone_stops_with_the_steps_done_saved(tmp_path):
    """The progress's reader going away (`2>&1 | head -3`) ended the run with a BrokenPipeError and nothing saved
    (step ~40 of 400): it now stops as Ctrl-C does, with a checkpoint of the steps done, then raises it."""
    class Pipe(io.StringIO):
        lines = 0

        def write(self, text):
            if self.lines == 3:
                raise BrokenPipeError(32, "Broken pipe")
            self.lines += 1
            return super().write(text)

    with pytest.raises(BrokenPipeError):
        kt.fit(make_model(), batches(), tmp_path, steps=6, lr=1e-3, log_every=1, stream=Pipe())
    assert kt.latest_checkpoint(tmp_path).name == "step-00000004"
    assert [record["step"] for record in kt.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert kt.fit(make_model(), batches(), tmp_path, steps=6, lr=1e-3, stream=io.StringIO()).step == 6


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path, capfd):
    """SIGTERM, which a scheduler (SLURM, Kubernetes, torchrun) sends before it kills a job, killed fit at once
    without a checkpoint: it is taken as a Ctrl-C, and a second one does not quit without saving (its notice said
    "press Ctrl-C again", no Ctrl-C having been pressed)."""
    class Term(kt.Callback):
        def on_batch(self, run, batch):
            if run.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.05)
                os.kill(os.getpid(), signal.SIGTERM)
            return batch

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        kt.fit(make_model(), batches(), tmp_path, steps=4, callbacks=[Term()])
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]
    assert signal.getsignal(signal.SIGTERM) is handler
    assert "SIGTERM: stopping after this step with a checkpoint (press Ctrl-C to quit without saving)" \
        in capfd.readouterr().err


def test_sighup_stops_after_the_step_with_a_checkpoint_and_a_hung_up_terminal_is_a_stop(tmp_path, capfd,
                                                                                           sighup_default):
    """A closed terminal's SIGHUP (an ssh session dropped) ended fit at once, nothing saved: it is taken as
    SIGTERM. Writing the progress line to the hung-up terminal then fails with EIO: a stop too, the steps saved."""
    import errno as errnos

    class Hup(kt.Callback):
        def on_batch(self, run, batch):
            if run.step == 1:
                os.kill(os.getpid(), signal.SIGHUP)
            return batch

    handler = signal.getsignal(signal.SIGHUP)
    with pytest.raises(KeyboardInterrupt):
        kt.fit(make_model(), batches(), tmp_path / "hup", steps=4, callbacks=[Hup()])
    assert [p.name for p in kt.list_checkpoints(tmp_path / "hup")] == ["step-00000002"]
    assert signal.getsignal(signal.SIGHUP) is handler
    assert "SIGHUP: stopping after this step with a checkpoint" in capfd.readouterr().err

    class HungUp(io.StringIO):
        def write(self, text):
            raise OSError(errnos.EIO, "Input/output error")
    with pytest.raises(BrokenPipeError, match="stopped at step 1 of 4, saved .*step-00000001"):
        kt.fit(make_model(), batches(), tmp_path / "eio", steps=4, stream=HungUp(), log_every=1)
    assert [p.name for p in kt.list_checkpoints(tmp_path / "eio")] == ["step-00000001"]


def test_ctrl_c_after_the_step_check_stops_at_this_step_and_is_never_dropped(tmp_path, sigint_default):
    """A Ctrl-C during on_step_end (an evaluation, say) came after the step's check: fit trained one more step
    before stopping, and at the last step, or during the final save, it returned as if nothing had happened."""
    class CtrlC(kt.Callback):
        def __init__(self, at, where):
            self.at, self.where = at, where

        def on_step_end(self, run, metrics):
            if self.where == "step_end" and run.step == self.at:
                os.kill(os.getpid(), signal.SIGINT)

        def on_save(self, run, directory):
            if self.where == "save" and run.step == self.at:
                os.kill(os.getpid(), signal.SIGINT)

    for name, at, where, saved in [("mid", 2, "step_end", ["step-00000002"]), ("periodic_save", 2, "save",
                                   ["step-00000002"]), ("last", 4, "step_end", ["step-00000004"]),
                                   ("final_save", 4, "save", ["step-00000002", "step-00000004"])]:
        with pytest.raises(KeyboardInterrupt):
            kt.fit(make_model(), batches(), tmp_path / name, steps=4, save_every=2 if where == "save" else None,
                   callbacks=[CtrlC(at, where)])
        assert [p.name for p in kt.list_checkpoints(tmp_path / name)] == saved, name


class _CtrlCInWorker(torch.utils.data.Dataset):
    """A terminal's Ctrl-C as a DataLoader worker process sees it: the signal reaches fit's process too, and the
    worker exits quietly on its KeyboardInterrupt."""

    def __init__(self, at):
        self.examples, self.at, self.fetched = examples(), at, 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == self.at:
            time.sleep(1.0)  # fit has taken the batch before and waits for this one
            os.kill(os.getppid(), signal.SIGINT)
            raise KeyboardInterrupt
        return self.examples[i]


def test_ctrl_c_that_ends_the_dataloader_workers_still_saves(tmp_path, sigint_default):
    """fit, waiting for the next batch, got the DataLoader's "worker exited unexpectedly" and died without a
    checkpoint."""
    loader = torch.utils.data.DataLoader(_CtrlCInWorker(at=8 * 2 + 1), batch_size=8, num_workers=1, prefetch_factor=1,
                                         collate_fn=lambda ex: kt.collate_prompt_answer(ex, pad_id=0))
    with pytest.raises(KeyboardInterrupt):
        kt.fit(make_model(), loader, tmp_path, steps=6)
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save and safetensors report a full disk without a path ("basic_ios::clear: iostream error"), and
    the commands printed torch's RuntimeError as a 40-line traceback."""
    import safetensors.torch
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    saves, torch_save = [], torch.save

    def fills_the_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 2:  # step 2's optimizer.pt and trainer_state.pt are written
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return torch_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(OSError) as failure:
        kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2)
    assert failure.value.errno == errno.ENOSPC
    assert str(failure.value) == f"cannot write {tmp_path / 'step-00000004' / 'optimizer.pt'}: no space left on device"
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]

    def safetensors_full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    with pytest.raises(OSError) as failure:  # written in a temporary directory, which is gone: named as saved to
        kpro.save_pretrained(make_model(), tmp_path / "model")
    assert str(failure.value) == f"cannot write {tmp_path / 'model' / 'model.safetensors'}: no space left on device"
    assert not (tmp_path / "model").exists()


def test_temporaries_left_by_a_dead_process_with_this_pid_are_removed(tmp_path):
    """A container restarted in a fresh PID namespace gets the same small pid every time: the half-written
    checkpoints of the killed run, named with that pid, were taken for this process's own and never removed."""
    leftovers = [tmp_path / "run" / f".step-00000002.tmp-{os.getpid()}-0123abcd",
                 tmp_path / "run" / f".step-00000001.deleting-{os.getpid()}-4567cdef",
                 tmp_path / f".model.tmp-{os.getpid()}-89abcdef"]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "optimizer.pt").write_bytes(b"half")
    kt.fit(make_model(), batches(), tmp_path / "run", steps=2)
    kpro.save_pretrained(make_model(), tmp_path / "model")
    assert [p for p in leftovers if p.exists()] == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".step")) == []


def test_ctrl_c_twice_quits_without_saving_and_respects_an_ignored_sigint(tmp_path, sigint_default):
    class CtrlC(kt.Callback):
        def __init__(self, pause):
            self.pause = pause

        def on_batch(self, run, batch):
            if run.step == 1:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(self.pause)
                os.kill(os.getpid(), signal.SIGINT)
            return batch

    with pytest.raises(KeyboardInterrupt):  # torchrun's duplicate, milliseconds apart: still one clean stop
        kt.fit(make_model(), batches(), tmp_path / "a", steps=4, callbacks=[CtrlC(0.0)])
    assert [p.name for p in kt.list_checkpoints(tmp_path / "a")] == ["step-00000002"]
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C a while later: out at once, nothing saved
        kt.fit(make_model(), batches(), tmp_path / "b", steps=4, callbacks=[CtrlC(1.05)])
    assert kt.list_checkpoints(tmp_path / "b") == []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: Ctrl-C is not for it
    try:
        run = kt.fit(make_model(), batches(), tmp_path / "c", steps=4, callbacks=[CtrlC(0.0)])
        assert run.step == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_rewinding_into_a_run_with_newer_checkpoints_is_refused(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2)
    with pytest.raises(kpro.CheckpointError, match="newer than step-00000002 \\(step-00000004\\)"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, resume=tmp_path / "step-00000002")
    run = kt.fit(make_model(), batches(), tmp_path / "rewound", steps=4, resume=tmp_path / "step-00000002")
    assert run.step == 4 and losses(tmp_path / "rewound") == losses(tmp_path)[2:]
    with pytest.raises(kpro.CheckpointError, match="not a training checkpoint"):
        kt.fit(make_model(), batches(), tmp_path / "x", steps=4, resume=tmp_path)
    # a file of a checkpoint was reported as a checkpoint that does not exist
    state_file = tmp_path / "step-00000002" / "trainer_state.pt"
    with pytest.raises(NotADirectoryError, match=re.escape(f"resume='{state_file}' is a file; pass the checkpoint "
                                                           f"directory (step-XXXXXXXX), {state_file.parent}")):
        kt.fit(make_model(), batches(), tmp_path / "y", steps=4, resume=state_file)
    with pytest.raises(NotADirectoryError, match=r"is a file; pass the checkpoint directory \(step-XXXXXXXX\)$"):
        kt.fit(make_model(), batches(), tmp_path / "y", steps=4, resume=tmp_path / "metrics.jsonl")


def test_a_checkpoint_of_another_directory_does_not_mix_with_this_one(tmp_path):
    """Its steps were kept in this directory's metrics.jsonl beside lines of this directory's own run (steps 1-3 of
    one run, then 5 and 6 of the other), and its checkpoints beside this directory's."""
    kt.fit(make_model(), batches(seed=7), tmp_path / "y", steps=4, save_every=4)
    kt.fit(make_model(seed=1), batches(), tmp_path / "x", steps=6, save_every=2, callbacks=[StopAt(3)])
    with pytest.raises(kpro.CheckpointError, match=r"x holds checkpoints of its own \(step-00000002, step-00000003\); "
                                                    r"to continue .*y/step-00000004 there would mix two runs"):
        kt.fit(make_model(), batches(seed=7), tmp_path / "x", steps=6, resume=tmp_path / "y" / "step-00000004")
    for checkpoint in kt.list_checkpoints(tmp_path / "x"):  # a run that died before its first checkpoint
        os.rename(checkpoint, tmp_path / checkpoint.name)
    kt.fit(make_model(), batches(seed=7), tmp_path / "x", steps=6, resume=tmp_path / "y" / "step-00000004")
    assert [s for s, _ in losses(tmp_path / "x")] == [5, 6]


def test_a_second_fit_in_a_run_directory_in_use_is_refused(tmp_path):
    """Two runs given one directory (a job submitted twice) both resumed from its checkpoints and wrote over each
    other's metrics. A second process is refused before it reads anything; the hold ends with the first."""
    kt.fit(make_model(), batches(), tmp_path / "x", steps=2)
    metrics = (tmp_path / "x" / "metrics.jsonl").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kpro._run_lock import holding\n"
                               "with holding(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                               str(tmp_path / "x")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUse, match=rf"x is in use by another kpro run \(process "
                                                             rf"{holder.pid}\)"):
            kt.fit(make_model(), batches(), tmp_path / "x", steps=4)
        assert (tmp_path / "x" / "metrics.jsonl").read_bytes() == metrics
    finally:
        holder.kill()
        holder.wait()
    kt.fit(make_model(), batches(), tmp_path / "x", steps=4)  # released when its holder was killed
    assert [s for s, _ in losses(tmp_path / "x")] == [1, 2, 3, 4]
    assert not (tmp_path / "x" / LOCK_FILE).exists()


def test_the_run_directorys_hold_is_per_thread_and_leaves_nothing_behind(tmp_path):
    """Another thread of the process got into a held directory, and the first one's release then left it
    unguarded; a run refused before writing anything left an empty directory behind."""
    with pytest.raises(FileNotFoundError, match="checkpoint to resume from does not exist"):
        kt.fit(make_model(), batches(), tmp_path / "runs" / "new", steps=2, resume=tmp_path / "nowhere")
    assert not (tmp_path / "runs").exists()  # nor the parent it created
    outcome = []

    def other_thread():
        try:
            kt.fit(make_model(), batches(), tmp_path / "x", steps=2)
            outcome.append("trained")
        except DirectoryInUse as err:
            outcome.append(str(err))
    with holding(tmp_path / "x"), holding(tmp_path / "x"):  # re-entrant in its own thread
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert outcome == [f"{tmp_path / 'x'} is in use by another kpro run (process another thread of this process, "
                       f"{os.getpid()}): two runs there would resume from and write over each other's checkpoints "
                       "and results; wait for it to end, or pass another output directory"]
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert outcome[1:] == ["trained"]


def test_a_child_forked_by_the_holder_is_refused_as_another_process(tmp_path):
    """A child forked inside the holder's block passed as the holder re-entering it (its copy of the holder's
    memory, and the thread id its forking thread keeps): both ran in the directory."""
    import multiprocessing

    def child(queue):
        try:
            with holding(tmp_path / "x"):
                queue.put("held")
        except DirectoryInUse as err:
            queue.put(str(err))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with holding(tmp_path / "x"):
        process = context.Process(target=child, args=(queue,))
        process.start()
        said = queue.get(timeout=60)
        process.join()
    assert said.startswith(f"{tmp_path / 'x'} is in use by another kpro run (process {os.getpid()})"), said
    process = context.Process(target=child, args=(queue,))  # once the parent let go, the child holds it
    process.start()
    assert queue.get(timeout=60) == "held"
    process.join()


def test_a_child_forked_inside_the_block_that_unwinds_it_leaves_the_holders_lock(tmp_path):
    """A child of os.fork() inside the holder's block that left it (sys.exit, an exception) ran the copied block's
    end: it deleted the lock file, and a third run then took the directory while the holder was in it."""
    third_run = [sys.executable, "-c", "import sys; from kpro._run_lock import holding\n"
                 "try:\n with holding(sys.argv[1]): print('held')\nexcept Exception as err: print(err)",
                 str(tmp_path / "x")]
    pid = -1
    try:
        with holding(tmp_path / "x"):
            pid = os.fork()
            if pid == 0:
                raise SystemExit(0)  # the child leaves the block it inherited, as sys.exit would
            os.waitpid(pid, 0)
            assert (tmp_path / "x" / LOCK_FILE).exists()
            said = subprocess.run(third_run, capture_output=True, text=True, timeout=120).stdout
            assert f"in use by another kpro run (process {os.getpid()})" in said, said
    finally:
        if pid == 0:
            os._exit(0)  # the child: never back into pytest
    assert subprocess.run(third_run, capture_output=True, text=True, timeout=120).stdout == "held\n"


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """A child forked by the holder (a DataLoader worker) inherited its locked descriptor, and an flock lasts while
    any descriptor of it is open: after a SIGKILL of the holder, the directory stayed locked until the children
    ended (seconds for DataLoader workers; as long as a child lives, here)."""
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from kpro._run_lock import holding\n"
                               "with holding(sys.argv[1]):\n"
                               " child = os.fork()\n"
                               " if child == 0:\n  os.write(1, b'ready\\n'); time.sleep(600); os._exit(0)\n"
                               " os.write(1, b'%d\\n' % child); time.sleep(600)",
                               str(tmp_path / "x")], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        # The child's fork hooks have run once it writes (on a loaded machine it may not have run at all yet
        # when the parent writes its pid); one os.write each, so the two lines cannot interleave
        lines = {holder.stdout.readline().strip() for _ in range(2)}
        child = int(next(line for line in lines if line != "ready"))
        assert "ready" in lines, lines
        with pytest.raises(DirectoryInUse, match=rf"\(process {holder.pid}\)"):
            with holding(tmp_path / "x"):
                pass
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child still runs
        with holding(tmp_path / "x"):
            pass
    finally:
        holder.kill()
        holder.wait()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_a_system_without_flock_runs_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    """fcntl is POSIX: on Windows every fit failed with ModuleNotFoundError. A file system refusing locks
    (ENOLCK) left its lock file, and so an empty directory, behind."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with holding(tmp_path / "nfs"):
        assert not (tmp_path / "nfs" / LOCK_FILE).exists()
    assert not (tmp_path / "nfs").exists()
    assert f"warning: {tmp_path / 'nfs'} cannot be locked (No locks available)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fcntl", None)
    kt.fit(make_model(), batches(), tmp_path / "x", steps=1)
    assert f"warning: {tmp_path / 'x'} cannot be locked (this system has no flock)" in capsys.readouterr().err
    assert kt.latest_checkpoint(tmp_path / "x").name == "step-00000001"


def test_a_directory_another_run_removed_on_leaving_is_made_again(tmp_path, monkeypatch):
    """Run A created a directory and left it empty, removing it, just as run B, which found it there, went to
    open its lock file: B failed with FileNotFoundError."""
    import kpro._run_lock as run_lock
    real_open, left = os.open, []

    def open_after_a_left(path, *args):
        if str(path).endswith(LOCK_FILE) and not left:
            (tmp_path / "d").rmdir()
            left.append(path)
        return real_open(path, *args)
    (tmp_path / "d").mkdir()
    monkeypatch.setattr(run_lock.os, "open", open_after_a_left)
    with holding(tmp_path / "d"):
        assert left and (tmp_path / "d" / LOCK_FILE).read_text() == str(os.getpid())


def test_one_model_per_process_is_refused():
    with pytest.raises(ValueError, match="would train 2 different models"):
        kt.distributed.prepare(make_model(), "none", kt.DistEnv(rank=0, world_size=2))


def test_the_pieces_make_a_resumable_loop_of_your_own(tmp_path):
    """The README's own-loop example: save, load and continue gives the straight run's weights exactly."""

    def train(run_dir, stop_at):
        model = make_model()
        optimizer = kt.adamw(model, 1e-2, weight_decay=0.1)
        schedule, data, start = kt.Schedule("linear", warmup_steps=1, total_steps=6), batches(), 0
        if (last := kt.latest_checkpoint(run_dir)) is not None:
            state = kt.load_checkpoint(last, model, optimizer)
            start = state["step"]
            data.load_state_dict(state["data"])
        for step, batch in zip(range(start, stop_at), data):
            kt.set_lr(optimizer, schedule, step)
            loss = kt.causal_lm_loss(model(batch["input_ids"], batch.get("attention_mask")), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if (step + 1) % 3 == 0:
                kt.save_checkpoint(run_dir, step + 1, model, optimizer, {"data": data.state_dict()}, keep_last=1)
        return model

    straight = train(tmp_path / "a", 6)
    train(tmp_path / "b", 3)
    resumed = train(tmp_path / "b", 6)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert [p.name for p in kt.list_checkpoints(tmp_path / "b")] == ["step-00000006"]


def test_bf16_autocast_computes_the_loss_in_fp32(tmp_path):
    seen = []

    def loss_fn(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = kt.causal_lm_loss(logits, batch["labels"])
        seen.append((logits.dtype, loss.dtype))
        return loss

    def peaked_model():  # confident, mostly wrong logits: a loss far from log V, which any forward would give
        model = make_model()
        with torch.no_grad():
            model.lm_head.weight.mul_(8)
        return model

    model = peaked_model()
    run = kt.fit(model, batches(), tmp_path, steps=2, precision="bf16", loss_fn=loss_fn)
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters()) and math.isfinite(run.metrics["loss"])
    kt.fit(peaked_model(), batches(), tmp_path / "fp32", steps=1, loss_fn=loss_fn)  # "auto" on the CPU: fp32
    assert seen[-1] == (torch.float32, torch.float32)
    with torch.no_grad():
        expected = mean_loss(peaked_model(), next(iter(batches()))).item()  # the first step's loss, computed here
    assert abs(expected - math.log(67)) > 2  # so matching it checks the forward, not the vocabulary size
    assert losses(tmp_path / "fp32")[0][1] == pytest.approx(expected, rel=1e-6)
    assert losses(tmp_path)[0][1] == pytest.approx(expected, rel=1e-2)  # bf16 rounding only


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    calls = []

    def nan_from_step_3(model, batch):
        calls.append(1)
        loss = mean_loss(model, batch)
        return loss * float("nan") if len(calls) >= 3 else loss

    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3: stopped before its optimizer step; "
                                                 r"the last good checkpoint is .*step-00000002 \("):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=4, save_every=2, loss_fn=nan_from_step_3)
    calls.clear()
    with pytest.raises(FloatingPointError, match=r"at step 1: .*; no checkpoint was saved before it"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=4,
               loss_fn=lambda m, b: nan_from_step_3(m, b) * 0 + float("inf"))


def test_a_checkpoint_of_non_finite_weights_is_not_called_the_last_good_one(tmp_path):
    """An optimizer of eps=0 (built by a factory of one's own: kt.adamw refuses it) turns the weights that get a
    zero gradient NaN at its first step, with a finite loss and gradient norm; the next step's NaN loss named the
    checkpoint holding those weights "the last good checkpoint"."""
    zero_eps = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, eps=0.0)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 2: stopped before its optimizer step; the "
                                                 r"weights were non-finite before it \(embed_tokens.weight\): an "
                                                 r"earlier step made them so, and no checkpoint of the run holds "
                                                 r"finite weights \(step-00000001 holds non-finite weights\)"):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=3, save_every=1, optimizer=zero_eps)
    assert [p.name for p in kt.list_checkpoints(tmp_path / "a")] == ["step-00000001"]

    class ZeroEpsFromStep2(kt.Callback):
        def on_batch(self, run, batch):
            if run.step == 1:
                run.reset_optimizer()
            return batch

    factory = lambda m: zero_eps(m) if calls.append(1) or len(calls) > 1 else kt.adamw(m, 1e-3)
    calls = []
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3: .* the last good checkpoint is "
                                                 r".*step-00000001 \(step-00000002 holds non-finite weights\)"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=4, save_every=1, optimizer=factory,
               callbacks=[ZeroEpsFromStep2()])


def test_non_finite_gradients_of_a_finite_loss_stop_the_run_before_they_reach_the_weights(tmp_path):
    """A NaN can sit where the loss does not see it (a masked-out position) and still reach the gradients."""
    calls = []

    def nan_gradient_from_step_2(model, batch):
        calls.append(1)
        loss = mean_loss(model, batch)
        if len(calls) >= 2:
            hidden = model.norm.weight * torch.tensor(float("nan"))  # 0 · NaN in the backward
            loss = loss + torch.where(torch.zeros_like(hidden, dtype=torch.bool), hidden, 0.0).sum()
        return loss

    model = make_model()
    with pytest.raises(FloatingPointError, match=r"the gradient norm is nan \(the loss [0-9.]+ is finite\) at step 2: "
                                                 r"stopped before its optimizer step; the last good checkpoint is "):
        kt.fit(model, batches(), tmp_path, steps=4, save_every=1, loss_fn=nan_gradient_from_step_2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


KILLED_MID_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import kpro.train as kt
from test_train_fit import batches, make_model

class Kill(kt.Callback):
    def on_save(self, run, directory):
        if run.step == 4:  # model and optimizer files are written, the checkpoint not yet in place
            os.kill(os.getpid(), signal.SIGKILL)

kt.fit(make_model(), batches(), {out!r}, steps=6, save_every=2, callbacks=[Kill()])
"""


def test_a_process_killed_while_saving_leaves_the_last_good_checkpoint(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE.format(tests=tests, out=str(tmp_path))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".step-00000004.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "optimizer.pt").is_file()  # a half-made checkpoint...
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]  # ...that nothing mistakes for one
    run = kt.fit(make_model(), batches(), tmp_path, steps=6, save_every=2)
    assert run.step == 6 and not leftovers[0].exists()
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_more_total_steps_are_announced_only_once_the_resume_is_taken(tmp_path, capfd):
    """"continuing the run with total_steps=..." was printed before the data's and the callbacks' states were
    checked, and then the resume was refused: it said the run went on where it did not."""
    kt.fit(make_model(), batches(), tmp_path, steps=4, lr=1e-3, schedule="cosine", callbacks=[StopAt(2)])
    capfd.readouterr()
    with pytest.raises(ValueError, match="the checkpoint's data had seed=3, these have seed=4"):
        kt.fit(make_model(), batches(seed=4), tmp_path, steps=6, lr=1e-3, schedule="cosine")
    assert "continuing the run" not in capfd.readouterr().err
    assert kt.fit(make_model(), batches(), tmp_path, steps=6, lr=1e-3, schedule="cosine").step == 6
    assert capfd.readouterr().err.count("continuing the run with total_steps=6") == 1


def test_a_tuple_from_loss_fn_is_refused_not_taken_for_a_loss_sum(tmp_path):
    def loss_and_logits(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])
        return kt.causal_lm_loss(logits, batch["labels"]), logits

    with pytest.raises(TypeError, match="not a tuple"):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=1, loss_fn=loss_and_logits)
    with pytest.raises(ValueError, match="LossSum.count must be a scalar integer"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=1,
               loss_fn=lambda m, b: kt.LossSum(mean_loss(m, b), torch.tensor(2.5)))


def test_resuming_with_another_schedule_or_optimizer_setting_is_refused(tmp_path, capfd):
    kt.fit(make_model(), batches(), tmp_path, steps=4, lr=1e-3, schedule="cosine", callbacks=[StopAt(2)])
    with pytest.raises(kpro.CheckpointError, match=r"schedule kind: 'cosine' in the checkpoint, 'linear' now"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, lr=1e-3, schedule="linear")
    with pytest.raises(kpro.CheckpointError, match=r"param group 0 peak_lr: 0.001 in the checkpoint, 0.05 now"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, lr=5e-2, schedule="cosine")
    with pytest.raises(kpro.CheckpointError, match=r"param group 0 weight_decay: 0.0 in the checkpoint, 0.3 now"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, lr=1e-3, weight_decay=0.3, schedule="cosine")
    warmed = kt.Schedule("cosine", warmup_steps=1, total_steps=4)
    with pytest.raises(kpro.CheckpointError, match=r"schedule warmup_steps: 0 in the checkpoint, 1 now\n.*another "
                                                   r"number of total steps is fine"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, lr=1e-3, schedule=warmed)
    run = kt.fit(make_model(), batches(), tmp_path, steps=3, lr=1e-3, schedule="cosine", callbacks=[StopAt(3)])
    assert run.step == 3
    # more total steps extend the run, said aloud: the cosine now decays to step 6
    run = kt.fit(make_model(), batches(), tmp_path, steps=6, lr=1e-3, schedule="cosine")
    assert run.step == 6 and capfd.readouterr().err.count("continuing the run with total_steps=6") == 1
    lrs = [r["lr"] for r in kt.read_metrics(tmp_path / "metrics.jsonl")]
    assert lrs[3] == pytest.approx(1e-3 * kt.Schedule("cosine", total_steps=6)(3))
    constant = tmp_path / "constant"
    kt.fit(make_model(), batches(), constant, steps=2, lr=1e-3)
    assert kt.fit(make_model(), batches(), constant, steps=3, lr=1e-3).step == 3  # a constant lr may run longer


def test_resuming_with_another_optimizer_flag_is_refused(tmp_path):
    """torch's loader copies every saved param-group key over the new optimizer's, and fit compared five of them: a
    resume whose factory turned on amsgrad or nesterov went through, the checkpoint's False silently kept. The
    implementation flags (fused, foreach) are the new factory's: the checkpoint's fused=True came back before."""
    adamw = lambda **kw: (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, **kw))
    kt.fit(make_model(), batches(), tmp_path / "a", steps=2, optimizer=adamw())
    with pytest.raises(kpro.CheckpointError, match=r"param group 0 amsgrad: False in the checkpoint, True now\n  "
                                                   r"optimizer param group 0 maximize: False in the checkpoint, True"):
        kt.fit(make_model(), batches(), tmp_path / "a", steps=4, optimizer=adamw(amsgrad=True, maximize=True))
    sgd = lambda **kw: (lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, **kw))
    kt.fit(make_model(), batches(), tmp_path / "b", steps=2, optimizer=sgd())
    with pytest.raises(kpro.CheckpointError, match=r"param group 0 nesterov: False in the checkpoint, True now"):
        kt.fit(make_model(), batches(), tmp_path / "b", steps=4, optimizer=sgd(nesterov=True))
    kt.fit(make_model(), batches(), tmp_path / "c", steps=2, optimizer=lambda m: kt.adamw(m, 1e-3, fused=True))
    run = kt.fit(make_model(), batches(), tmp_path / "c", steps=3, optimizer=lambda m: kt.adamw(m, 1e-3))
    assert {(g["fused"], g["foreach"]) for g in run.optimizer.param_groups} == {(None, True)}


class Count(kt.Callback):
    def __init__(self, seen=0):
        self.seen = seen

    def on_step_end(self, run, metrics):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_a_refused_resume_loads_nothing_into_the_callers_objects(tmp_path):
    """A resume refused for another lr, another Batches seed, an optimizer whose state does not fit or a callback
    that cannot take its state had loaded the checkpoint's weights into the caller's model already (and the data
    position, the callbacks' states, the RNG states): a model passed in came back holding the checkpoint's. (A
    callback refusing its state leaves those before it in the list loaded: here the refusing one comes first.)"""
    class Stage(kt.Callback):
        def state_dict(self):
            return {"stage": 1}

    kt.fit(make_model(), batches(), tmp_path, steps=2, lr=1e-2, callbacks=[Count(), Stage()])
    Saved = Stage

    class Stage(Stage):  # noqa: F811: the same callback, a later version, which refuses the saved state
        def load_state_dict(self, state):
            raise ValueError("this callback refuses")

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    cases = [(dict(lr=5e-3), Saved, r"param group 0 peak_lr: 0.01 in the checkpoint, 0.005 now"),
             (dict(lr=1e-2, data=batches(seed=7)), Saved, r"the checkpoint's data had seed=3, these have seed=7"),
             (dict(optimizer=sgd), Saved, r"optimizer: 'torch.optim.adamw.AdamW' in the checkpoint, "
                                          r"'torch.optim.sgd.SGD' now"),
             (dict(lr=1e-2), Stage, r"this callback refuses")]
    older_cases = [(dict(lr=5e-3), Saved, r"param group 0 peak_lr: 0.01 in the checkpoint, 0.005 now"),
                   (dict(optimizer=sgd), Saved, r"the optimizer state does not fit this optimizer")]
    for i, (kwargs, stage, refusal) in enumerate(cases + older_cases):
        if i == len(cases):  # as an older kpro wrote it: neither the optimizer's class nor its groups recorded
            last = tmp_path / "step-00000002" / "trainer_state.pt"
            older = torch.load(last, weights_only=True)
            del older["settings"]["optimizer"], older["settings"]["param_groups"]
            torch.save(older, last)
        model, count, data = make_model(seed=5), Count(seen=7), kwargs.pop("data", batches())
        weights, rng = state_of(model), (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        with pytest.raises((kpro.CheckpointError, ValueError), match=refusal):
            kt.fit(model, data, tmp_path, steps=4, callbacks=[stage(), count], **kwargs)
        assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items()), refusal
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
        assert np.array_equal(np.random.get_state()[1], rng[2])
        assert count.seen == 7 and (data.epoch, data.index) == (0, 0), refusal

    # kt.load_checkpoint too: an optimizer of another kind leaves the model, and the optimizer, as they were
    model = make_model(seed=5)
    optimizer, weights = sgd(model), state_of(model)
    groups = [dict(group) for group in optimizer.param_groups]
    with pytest.raises(kpro.CheckpointError, match=r"the optimizer state does not fit this optimizer"):
        kt.load_checkpoint(tmp_path / "step-00000002", model, optimizer)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert not optimizer.state and [dict(group) for group in optimizer.param_groups] == groups
    count = Count()
    assert kt.fit(make_model(), batches(), tmp_path, steps=3, lr=1e-2, callbacks=[count, Saved()]).step == 3
    assert count.seen == 3


def test_resuming_with_other_clipping_precision_or_dtypes_is_refused(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=4, callbacks=[StopAt(2)])
    with pytest.raises(kpro.CheckpointError, match=r"clip_grad_norm: 1.0 in the checkpoint, 0.5 now"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, clip_grad_norm=0.5)
    with pytest.raises(kpro.CheckpointError, match=r"precision: 'fp32' in the checkpoint, 'bf16' now"):
        kt.fit(make_model(), batches(), tmp_path, steps=4, precision="bf16")
    with pytest.raises(kpro.CheckpointError, match=r"param_dtypes: 'float32' in the checkpoint, 'bfloat16' now"):
        kt.fit(make_model().to(torch.bfloat16), batches(), tmp_path, steps=4)
    assert kt.fit(make_model(), batches(), tmp_path, steps=4, precision="fp32").step == 4  # "auto" was fp32 here


def test_a_run_of_one_dtype_resumed_on_float32_norms_beside_it_says_how_to_load_its_model(tmp_path):
    """load_pretrained(dtype="auto") cast every tensor to the dtype of most parameters, and now keeps float32 norms
    beside bfloat16 matrices: a run started on the old load is refused on the new one, saying which dtype to load."""
    kt.fit(make_model().to(torch.bfloat16), batches(), tmp_path / "run", steps=4, callbacks=[StopAt(2)])
    mixed = make_model().to(torch.bfloat16)
    for module in mixed.modules():
        if isinstance(module, kpro.model.RMSNorm):
            module.float()
    with pytest.raises(kpro.CheckpointError, match=r"param_dtypes: 'bfloat16' in the checkpoint, 'bfloat16, float32' "
                                                   r"now \(load_pretrained\(dtype=\"auto\"\) keeps each tensor's "
                                                   r"stored dtype, .*: load the model with dtype=torch.bfloat16, as this "
                                                   r"run's was\)\n"):
        kt.fit(mixed, batches(), tmp_path / "run", steps=4)
    with pytest.raises(kpro.CheckpointError, match=r"param_dtypes: 'bfloat16' in the checkpoint, 'float32' now\n"):
        kt.fit(make_model(), batches(), tmp_path / "run", steps=4)  # no hint: float32 alone is not the old load


def test_a_schedule_that_ends_before_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cosine schedule decays to 0 at total_steps=4, before steps=8: the last 4 "
                                         r"steps would train at lr 0; give the Schedule total_steps=8"):
        kt.fit(make_model(), batches(), tmp_path, steps=8, schedule=kt.Schedule("cosine", total_steps=4))
    assert kt.list_checkpoints(tmp_path) == []
    longer = kt.Schedule("linear", total_steps=4)  # a run cut short of its schedule is fine
    assert kt.fit(make_model(), batches(), tmp_path / "a", steps=2, schedule=longer).step == 2
    floor = kt.Schedule("linear", total_steps=2, min_ratio=0.1)  # decay, then hold a floor: documented
    assert kt.fit(make_model(), batches(), tmp_path / "b", steps=4, schedule=floor).step == 4


def test_a_metrics_line_cut_short_by_a_crash_does_not_block_resuming(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=3, callbacks=[StopAt(2)])
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the process died mid-write
    assert [r["step"] for r in kt.read_metrics(metrics)] == [1, 2]
    assert kt.fit(make_model(), batches(), tmp_path, steps=3).step == 3
    assert [r["step"] for r in kt.read_metrics(metrics)] == [1, 2, 3]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        kt.read_metrics(metrics)


def test_batches_that_run_out_before_the_steps_are_an_error(tmp_path):
    data = [kt.collate_prompt_answer(examples(8, seed=s), pad_id=0) for s in range(3)]
    with pytest.raises(ValueError, match=r"batches ran out after 3 of steps=10 \(saved .*step-00000003\)"):
        kt.fit(make_model(), data, tmp_path, steps=10)
    assert kt.latest_checkpoint(tmp_path).name == "step-00000003"


def test_a_batch_refused_at_the_start_of_a_step_keeps_the_steps_done(tmp_path):
    """A batch that cannot be split into the micro-batches, or that holds no loss tokens, was refused before its step
    changed any weight, and with no checkpoint of the steps done (save_every=None lost the whole run), where batches
    that run out one step earlier get one."""
    data = [kt.collate_prompt_answer(examples(4, seed=s), pad_id=0) for s in range(3)]
    odd = kt.collate_prompt_answer(examples(3, seed=9), pad_id=0)
    no_loss = {**data[2], "labels": torch.full_like(data[2]["labels"], -100)}
    for name, bad, error in (("odd", odd, r"the batch of step 3: a global batch of 3 rows cannot be split into 1 "
                                          r"process\(es\) x 2 accumulation step\(s\): 3 is not a multiple of 2"),
                             ("no_loss", no_loss, r"the batch of step 3 has no loss tokens: .*")):
        with pytest.raises(ValueError, match=error + r" \(saved .*step-00000002: the 2 steps before it; run again to "
                                                     r"resume\)"):
            kt.fit(make_model(), [*data[:2], bad], tmp_path / name, steps=3, grad_accum=2)
        assert [p.name for p in kt.list_checkpoints(tmp_path / name)] == ["step-00000002"]
        # run again as it was: the same refusal, not "the batches have 3 rows, the checkpoint's run had 4"
        with pytest.raises(ValueError, match=error + "$"):
            kt.fit(make_model(), [*data[:2], bad], tmp_path / name, steps=3, grad_accum=2)
        run = kt.fit(make_model(), data, tmp_path / name, steps=3, grad_accum=2)  # the batch fixed: resumes
        assert run.step == 3 and [s for s, _ in losses(tmp_path / name)] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"cannot be split into .* accumulation step\(s\): 3 is not a multiple of 2$"):
        kt.fit(make_model(), [odd], tmp_path / "first", steps=1, grad_accum=2)  # no step done: nothing to save
    assert kt.list_checkpoints(tmp_path / "first") == []

    class Seen(kt.Callback):  # counts the batches it takes: the checkpoint holds its count before the refused one
        def __init__(self, refuse_at=None):
            self.seen, self.refuse_at = 0, refuse_at

        def on_batch(self, run, batch):
            self.seen += 1
            return {**batch, "labels": torch.full_like(batch["labels"], -100)} if run.step == self.refuse_at else batch

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state["seen"]

    straight, counted = make_model(), Seen()
    kt.fit(straight, batches(), tmp_path / "straight", steps=4, callbacks=[counted])
    with pytest.raises(ValueError, match=r"the batch of step 3 has no loss tokens: .*\(saved .*step-00000002: "):
        kt.fit(make_model(), batches(), tmp_path / "resumed", steps=4, callbacks=[Seen(refuse_at=2)])
    resumed, recounted = make_model(seed=1), Seen()
    kt.fit(resumed, batches(), tmp_path / "resumed", steps=4, callbacks=[recounted])
    assert recounted.seen == counted.seen == 4  # was 5: the refused step's on_batch saved as if its step had run
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_a_truncated_optimizer_file_is_a_named_error(tmp_path):
    kt.fit(make_model(), batches(), tmp_path, steps=2, callbacks=[StopAt(1)])
    optimizer = tmp_path / "step-00000001" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(kpro.CheckpointError, match=r"step-00000001/optimizer.pt cannot be read"):
        kt.fit(make_model(), batches(), tmp_path, steps=2)


def test_a_truncated_trainer_state_file_is_a_named_error(tmp_path):
    """Named only by the checkpoint directory before, where a truncated optimizer.pt or model file is named."""
    kt.fit(make_model(), batches(), tmp_path, steps=2, callbacks=[StopAt(1)])
    state = tmp_path / "step-00000001" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(kpro.CheckpointError, match=r"step-00000001/trainer_state.pt cannot be read \(truncated or "
                                                   r"corrupt\?\): "):
        kt.fit(make_model(), batches(), tmp_path, steps=2)


def test_dict_examples_with_the_default_collate_are_named(tmp_path):
    examples = [{"input_ids": torch.randint(0, 67, (8,)), "labels": torch.randint(0, 67, (8,))} for _ in range(4)]
    with pytest.raises(ValueError, match=r"collate_packed \(Batches' default collate\) stacks rows of token ids, and "
                                         r"these examples are dicts \(keys input_ids, labels\): pass Batches\(\.\.\., "
                                         r"collate=\.\.\.\)"):
        kt.fit(make_model(), kt.Batches(examples, 2), tmp_path, steps=1)
    run = kt.fit(make_model(), kt.Batches(examples, 2, torch.utils.data.default_collate), tmp_path / "ok", steps=1)
    assert run.step == 1


def test_a_list_with_an_item_per_row_is_not_given_whole_to_every_micro_batch(tmp_path):
    """fit splits tensors only: per-example weights in a list reached every micro-batch whole (silently
    misaligned with its rows) once grad_accum or processes split the batch."""
    batch = {**kt.collate_prompt_answer(examples(8), pad_id=0), "weights": [1.0] * 8}
    with pytest.raises(TypeError, match=r"batch\['weights'\] is a list of 8 items, as many as the batch has rows"):
        kt.distributed.split_batch(batch, kt.DistEnv(), grad_accum=2)
    with pytest.raises(TypeError, match="make it a tensor"):
        kt.fit(make_model(), [batch], tmp_path, steps=1, grad_accum=2)
    assert len(kt.distributed.split_batch(batch, kt.DistEnv(), grad_accum=1)) == 1  # not split: left alone
    kept = kt.distributed.split_batch({**batch, "weights": [1.0, 2.0]}, kt.DistEnv(), grad_accum=2)
    assert [m["weights"] for m in kept] == [[1.0, 2.0]] * 2  # not one item per row: every micro-batch's


def test_a_per_process_batch_that_does_not_split_is_named_as_this_process_rows():
    """TokenShards under 2 processes, grad_accum 2, a global batch of 6: the error spoke of 'a global batch of
    3 rows' split into '1 process(es)'."""
    rows = {"input_ids": torch.zeros(3, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"this process's 3 rows of the global batch .* each of the 2 process\(es\) "
                                         r"its own rows\) cannot be split into 2 accumulation steps: make the global "
                                         r"batch a multiple of 4"):
        kt.distributed.split_batch(rows, kt.DistEnv(rank=1, world_size=2), 2, per_process=True)
    parts = kt.distributed.split_batch({"input_ids": torch.arange(4)[:, None]}, kt.DistEnv(rank=1, world_size=2), 2,
                                       per_process=True)
    assert [p["input_ids"].flatten().tolist() for p in parts] == [[0, 1], [2, 3]]  # this process's rows, all of them


def test_the_logged_loss_does_not_depend_on_how_the_batch_is_split(tmp_path):
    """float64 weights: one micro-batch or four give the same weights, and now the same logged loss (summed in
    float32 before, it differed in the 7th digit). The weights to 1e-10 relative: the split changes the
    gradients' summation order, and AdamW's division by sqrt(v) magnifies that rounding in an element whose
    gradient is tiny (8e-12 relative was seen on a loaded machine; float32 gradients would be off by 1e-7)."""
    runs = [kt.fit(make_model().double(), batches(), tmp_path / str(accum), steps=2, lr=1e-2, grad_accum=accum)
            for accum in (1, 4)]
    want, got = losses(tmp_path / "1"), losses(tmp_path / "4")
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-13, abs=0)
    for x, y in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_clip_grad_norm_none_leaves_a_large_gradient_whole(tmp_path):
    """clip_grad_norm=None clips nothing: one SGD step of fit equals a hand-written unclipped step on a gradient
    whose norm is well above 1 (the other tests' gradients stay below 1, where clipping at 1 changes nothing)."""
    model, reference = make_model(), make_model()
    with torch.no_grad():  # a large head makes a gradient norm well above 1
        model.lm_head.weight.mul_(20)
        reference.lm_head.weight.mul_(20)
    kt.fit(model, batches(), tmp_path, steps=1, clip_grad_norm=None,
           optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    batch = next(iter(batches()))
    hidden = reference(batch["input_ids"], batch["attention_mask"], head=False)
    targets = torch.cat((batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)), dim=1)
    kpro.ops.linear_cross_entropy(hidden, reference.lm_head.weight, targets).backward()
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])) > 2
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_a_batches_reused_after_its_examples_changed_in_place_is_refused_as_a_new_one_would_be(tmp_path):
    """Batches computed its examples' content digest once: a second fit in the same process with the same object,
    its examples edited in between, resumed on the edited data, and saved the old digest (so a fresh process holding
    the data the run trained on was refused). The digest is taken afresh at each run's start."""
    rows = [torch.arange(i, i + 8) % 32 for i in range(8)]
    data = kt.Batches(rows, 2, seed=0)
    kt.fit(make_model(), data, tmp_path, steps=2, lr=1e-3)
    for row in rows:  # the examples edited in place between the two sessions
        row.add_(1).remainder_(32)
    with pytest.raises(kt.data.OtherExamples, match="content digest"):
        kt.fit(make_model(), data, tmp_path, steps=4, lr=1e-3)
    with pytest.raises(kt.data.OtherExamples, match="content digest"):
        kt.fit(make_model(), kt.Batches(rows, 2, seed=0), tmp_path, steps=4, lr=1e-3)
    data.restart()  # a new run in another directory takes the examples as they are now
    kt.fit(make_model(), data, tmp_path / "edited", steps=2, lr=1e-3)
    kt.fit(make_model(), kt.Batches(rows, 2, seed=0), tmp_path / "edited", steps=4, lr=1e-3)  # a fresh one resumes it


def test_a_whole_checkpoint_missing_a_tensor_is_refused(tmp_path):
    """On one process torch's loader fills the tensors a full state lacks with the model's own before its strict
    load, so a checkpoint whose weights file had lost a tensor resumed with that tensor's fresh value, silently."""
    kt.fit(make_model(), batches(), tmp_path, steps=6, lr=1e-2, callbacks=[StopAt(3)])
    path = tmp_path / "step-00000003" / "model.safetensors"
    saved = load_file(path)
    del saved["model.layers.0.mlp.up_proj.weight"]
    save_safetensors(saved, path, metadata={"format": "pt"})
    model = make_model(seed=1)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(kpro.CheckpointError, match=r"step-00000003: the weights file does not hold its model's "
                                                   r"weights \(edited, or written by something else\): it lacks "
                                                   r"layers\.0\.mlp\.up_proj\.weight"):
        kt.fit(model, batches(), tmp_path, steps=6, lr=1e-2)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


@pytest.mark.parametrize("key, mine, theirs", [("clip_grad_norm", 1.0, 2.0), ("grad_accum", 1, 2),
                                               ("precision", "fp32", "bf16"), ("save_frozen", True, False)])
def test_every_fit_setting_that_differs_between_processes_is_refused(monkeypatch, key, mine, theirs):
    """_check_same_settings on two (simulated) processes compares every setting, not only steps and lr (which the
    torchrun test covers)."""
    from kpro.train import distributed, loop
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, env: [obj, {**obj, key: theirs}])
    settings = {"steps": 3, "lr": 0.01, "clip_grad_norm": 1.0, "grad_accum": 1, "precision": "fp32", key: mine}
    with pytest.raises(ValueError, match=rf"{key}: {mine!r} on process 0, {theirs!r} on process 1"):
        loop._check_same_settings(settings, kt.DistEnv(rank=0, world_size=2))


def test_the_eta_of_a_resumed_run_counts_the_steps_left(monkeypatch):
    """Resumed at step 40 of 100: 10 steps in 10 s, 50 left: eta 0:50 (not the 90 steps since the start)."""
    from kpro.train import progress
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    line = kt.ProgressLine(100, 40, stream=log, every=1)
    line.update(50, loss=1.0, lr=1e-3, tokens=10)
    assert log.getvalue().rstrip().endswith("eta 0:50"), log.getvalue()


def test_a_full_disk_seen_as_the_summary_closes_names_the_file(tmp_path, monkeypatch):
    """The checkpoint's trainer_state.json is written last, and a full disk is seen as it closes: an OSError naming
    no file, which the commands printed as `cannot write or read: No space left on device`."""
    from pathlib import Path
    write_text = Path.write_text

    def full_at_the_summary(self, *args, **kwargs):
        if self.name == "trainer_state.json" and "step-00000004" in str(self.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the close raises it: no filename
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_at_the_summary)
    with pytest.raises(OSError) as failure:
        kt.fit(make_model(), batches(), tmp_path, steps=4, save_every=2)
    assert failure.value.errno == errno.ENOSPC
    assert str(failure.value) == f"cannot write {tmp_path / 'step-00000004' / 'trainer_state.json'}: no space left " \
                                 "on device"
    assert [p.name for p in kt.list_checkpoints(tmp_path)] == ["step-00000002"]
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(OSError) as failure:  # kpro.save_pretrained's config.json: named by the path saved to too
        kpro.save_pretrained(make_model(), tmp_path / "model")
    assert str(failure.value) == f"cannot write {tmp_path / 'model' / 'config.json'}: no space left on device"
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.tmp-*"))


def test_a_lock_file_that_cannot_be_removed_hides_no_error_and_keeps_no_lock(tmp_path, monkeypatch):
    """A run directory made read-only during a run: removing the lock file at the end failed, its PermissionError
    replaced the run's own error (the commands printed `Permission denied: 'run/.kpro-run.lock'`), and the lock was
    never released, so the same process was refused the directory afterwards (DirectoryInUse, by its own pid)."""
    from pathlib import Path
    unlink = Path.unlink

    def refuse(self, *args, **kwargs):
        if self.name == LOCK_FILE:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return unlink(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(ValueError, match="the run's own error"):
        with holding(tmp_path):
            raise ValueError("the run's own error")
    with holding(tmp_path):  # released: this process takes the directory again (the stale file is taken over)
        pass
    monkeypatch.undo()
    with holding(tmp_path):
        pass
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    """A run of 100 steps warming up over 5, stopped (with a checkpoint) at step 3."""
    out = tmp_path_factory.mktemp("warm") / "run"
    torch.manual_seed(0)
    model = kpro.Llama(kpro.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    ids = torch.randint(3, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    kt.fit(model, iter(lambda: {"input_ids": ids, "labels": ids}, None), out, steps=100, lr=1e-3,
           schedule=kt.Schedule("linear", warmup_steps=5, total_steps=100), callbacks=[StopAt(3)], stream=None)
    return out


def test_steps_equal_to_the_saved_warmup_are_refused_as_ending_within_it(warm_run):
    """X07 (train/checkpointing.py `steps <= warmup` -> `steps < warmup`): --steps equal to the saved warmup leave
    no step after it. The two callers' tests ask for 4 and 6 steps against a warmup of 5, never 5 itself."""
    from kpro.errors import EndsInWarmup
    from kpro.train.checkpointing import saved_schedule
    with pytest.raises(EndsInWarmup) as refused:
        saved_schedule(warm_run, 5)
    assert (refused.value.step, refused.value.steps, refused.value.warmup) == (3, 5, 5)
    assert saved_schedule(warm_run, 6)["warmup_steps"] == 5  # one step past the warmup continues the run


@pytest.mark.parametrize("name", ["trainer_state.pt", "optimizer.pt"])
def test_a_training_state_this_process_may_not_read_is_not_called_corrupt(warm_run, monkeypatch, name):
    """X19 (train/checkpointing.py `_read_state` re-raises PermissionError no longer): an unreadable
    trainer_state.pt (or optimizer.pt) became "cannot be read (truncated or corrupt?)". As root chmod stops nobody: open refuses it,
    as test_checkpoint's test of the weight files does."""
    import builtins
    from kpro.train.checkpointing import _read_state, latest_checkpoint, read_optimizer
    checkpoint = latest_checkpoint(warm_run)
    state = checkpoint / name
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(state):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(PermissionError, match=re.escape(f"[Errno 13] Permission denied: '{state}'")):
        (_read_state if name == "trainer_state.pt" else read_optimizer)(checkpoint)


def test_a_five_percent_line_restarts_the_minute_without_a_line(monkeypatch):
    """X11 (train/progress.py: only a line printed for the minute resets the timer): the minute counts from the
    last line printed, whatever printed it. The existing test's 5% lines (steps 20, 40) come within a minute of
    the last timed line, so it cannot tell."""
    from kpro.train import progress
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    log = io.StringIO()
    line = kt.ProgressLine(400, stream=log)  # every 20 steps (5%), and after 60 s without a line
    for step, seconds in ((1, 61), (20, 100), (21, 125), (22, 159), (23, 161)):
        clock[0] = seconds
        line.update(step, loss=2.0, lr=1e-3, tokens=10)
    # step 1: 61 s after the start; 20: its 5%; 23: 61 s after step 20's line (21 and 22 are within the minute)
    assert [int(text.split()[1].split("/")[0]) for text in log.getvalue().splitlines()] == [1, 20, 23]


def test_gradients_left_on_the_parameters_before_fit_do_not_reach_the_first_step(tmp_path):
    """Gradients left on the parameters before fit (a check's backward) must not add to the first step's: the
    loop's own zero_grad after each step hid a missing clear before the first."""
    rows = torch.randint(3, 67, (4, 8), generator=torch.Generator().manual_seed(1))
    batch = [{"input_ids": rows, "labels": rows.clone()}]
    clean, dirty = make_model(), make_model()
    probe = kt.lm_loss(dirty, batch[0])
    (probe.total / probe.count).backward()
    assert all(p.grad is not None for p in dirty.parameters())
    for model, name in ((clean, "clean"), (dirty, "dirty")):
        kt.fit(model, batch, tmp_path / name, steps=1, clip_grad_norm=None,
               optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    for name, tensor in state_of(clean).items():
        torch.testing.assert_close(state_of(dirty)[name], tensor, rtol=0, atol=0, msg=name)


def test_a_scalar_loss_logs_the_batch_mean_whatever_the_accumulation(tmp_path):
    """A scalar (mean) loss_fn logs the mean of its micro-batches' means, whatever grad_accum; the accumulation
    test compared the scalar runs' weights only, not their logged losses."""
    rows = torch.randint(3, 67, (4, 8), generator=torch.Generator().manual_seed(1))
    full = [{"input_ids": rows, "labels": rows.clone()}] * 2
    with torch.no_grad():
        first = float(kt.lm_loss(make_model(), full[0]).mean)  # every row has as many loss tokens
    for accum in (1, 2, 4):
        kt.fit(make_model(), full, tmp_path / str(accum), steps=2, grad_accum=accum, clip_grad_norm=None,
               loss_fn=lambda m, b: kt.lm_loss(m, b).mean, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
        assert losses(tmp_path / str(accum))[0][1] == pytest.approx(first, rel=1e-6), accum

