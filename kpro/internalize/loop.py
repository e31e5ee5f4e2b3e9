"""The ICoT-SI training loop: `kpro.train.fit` with a callback that removes each step's CoT tokens.

Data flow: `Batches` over TokenizedExamples yields every step's examples whole (a `CoTBatch`, nothing
removed), and `CoTRemoval.on_batch` turns the batch of global step s into the model's batch with the
removal of step s (`schedule.removal_counts(s, B, seed)`), re-creating the optimizer first where
`schedule.increases_at(s)`. The removal is a pure function of (schedule, seed, step, examples), so the
callback keeps no state of its own: a resumed run gets the step and the data position back from the
checkpoint, and with them the exact removal an uninterrupted run applies at that step. The optimizer of a
checkpoint is the one re-created at the last increase, with its moments since, and comes back as such.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from typing import Sequence

from torch import nn

from ..train import Batches, Callback, Run, adamw, fit
from .batching import collate, remove_cot
from .evaluation import evaluate
from .schedule import REMOVE_ALL, RemovalSchedule
from .tokenization import TokenizedExample

NO_REMOVAL = "none"   # removal="none": train on the whole CoT (the explicit-CoT baseline)
REMOVE_EVERYTHING = "all"  # removal="all": train with no CoT at all (the no-CoT baseline)


class CoTRemoval(Callback):
    """Turns each step's `CoTBatch` into `{input_ids, attention_mask, labels}` with that step's CoT removed.

    removal          a RemovalSchedule, "none" (keep the whole CoT) or "all" (remove it all)
    seed             seeds the smoothing offsets of every step (with the step)
    reset_optimizer  re-create the optimizer at each step where the scheduled count goes up
    stream           where to announce each increase (default stdout; main process only)
    """

    def __init__(self, removal, seed: int = 0, *, reset_optimizer: bool = True, stream=None):
        if not isinstance(removal, RemovalSchedule) and removal not in (NO_REMOVAL, REMOVE_EVERYTHING):
            raise ValueError(f"removal must be a RemovalSchedule, {NO_REMOVAL!r} or {REMOVE_EVERYTHING!r}, got {removal!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.removal, self.seed, self.reset_optimizer, self.stream = removal, seed, reset_optimizer, stream
        self._last: dict = {}
        self._first_batch = True  # of this session: where a resumed run says how much it removes

    def scheduled(self, step: int):
        """Tokens every example loses at `step` before its offset: an int, or REMOVE_ALL."""
        if self.removal == NO_REMOVAL:
            return 0
        if self.removal == REMOVE_EVERYTHING:
            return REMOVE_ALL
        return self.removal.scheduled(step)

    def counts(self, step: int, batch_size: int):
        """What `remove_cot` removes from each row at `step`: scheduled + the step's seeded offsets."""
        if isinstance(self.removal, RemovalSchedule):
            return self.removal.removal_counts(step, batch_size, self.seed)
        return self.scheduled(step)

    def on_fit_start(self, run: Run) -> None:
        self._first_batch = True

    def on_batch(self, run: Run, batch):
        step = run.step
        reset = (self.reset_optimizer and isinstance(self.removal, RemovalSchedule)
                 and self.removal.increases_at(step))
        if reset:
            run.reset_optimizer()
        if reset or (self._first_batch and self.removal != NO_REMOVAL):
            self._announce(run, step, reset)
        self._first_batch = False
        device = next(run.model.parameters()).device
        removed = remove_cot(batch.to(device), self.counts(step, batch.input_ids.shape[0]))
        scheduled = self.scheduled(step)
        self._last = {"cot_scheduled": "all" if scheduled == REMOVE_ALL else scheduled,
                      "cot_left": round(removed.cot_left.float().mean().item(), 3)}
        if reset:
            self._last["optimizer_reset"] = True
        return {"input_ids": removed.input_ids, "attention_mask": removed.attention_mask, "labels": removed.labels}

    def on_step_end(self, run: Run, metrics: dict) -> None:
        metrics.update(self._last)

    def state_dict(self) -> dict:
        # Nothing to restore (the step decides everything); saved to refuse resuming with another removal.
        return {"removal": describe_removal(self.removal), "seed": self.seed, "reset_optimizer": self.reset_optimizer}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"the checkpoint was trained with {key}={state.get(key)!r} and this run has "
                                 f"{key}={value!r}; resume with the same settings, or start a new run directory")

    def _announce(self, run: Run, step: int, reset: bool) -> None:
        if not run.is_main:
            return
        scheduled = self.scheduled(step)
        what = "the whole CoT" if scheduled == REMOVE_ALL else f"{scheduled} CoT token{'s' * (scheduled != 1)}"
        smoothed = isinstance(self.removal, RemovalSchedule) and self.removal.smoothing_lambda != float("inf")
        offsets = " + smoothing offsets" if scheduled != REMOVE_ALL and smoothed else ""
        # Numbered like the progress line and metrics.jsonl: step s + 1 is the one that begins now.
        print(f"step {step + 1}: removing {what}{offsets} per example{'; optimizer re-created' if reset else ''}",
              file=self.stream or sys.stdout, flush=True)


def describe_removal(removal) -> str:
    return repr(removal) if isinstance(removal, RemovalSchedule) else removal


class SaveTokenizer(Callback):
    """Write the tokenizer into every checkpoint, so each one is a model directory `--model` can start from."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def on_save(self, run: Run, directory) -> None:
        self.tokenizer.save(directory)


class ValidationAccuracy(Callback):
    """Every `every` steps (and at the last), greedy-decode `examples` and log `valid_accuracy` with the step."""

    def __init__(self, tokenizer, examples, every: int, *, batch_size: int = 256, stream=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.tokenizer, self.examples, self.every = tokenizer, list(examples), every
        self.batch_size, self.stream = batch_size, stream

    def on_step_end(self, run: Run, metrics: dict) -> None:
        if not run.is_main or (run.step % self.every and run.step != run.total_steps):
            return
        run.model.eval()
        result = evaluate(run.model, self.tokenizer, self.examples, batch_size=self.batch_size)
        run.model.train()
        metrics["valid_accuracy"] = result.accuracy
        metrics["valid_cot_tokens"] = round(mean_cot_tokens(result, self.tokenizer.eos_id), 3)
        print(f"step {run.step}: valid accuracy {result.accuracy:.3f} ({result.correct}/{result.total}), "
              f"{metrics['valid_cot_tokens']:.1f} CoT tokens written per example",
              file=self.stream or sys.stdout, flush=True)


def mean_cot_tokens(result, eos_id: int) -> float:
    """The CoT tokens the model wrote (before its first eos), on average over an Evaluation's predictions."""
    lengths = [p.ids.index(eos_id) if eos_id in p.ids else len(p.ids) for p in result.predictions]
    return sum(lengths) / len(lengths)


def fit_internalization(model: nn.Module, examples: Sequence[TokenizedExample], out_dir: str | os.PathLike, *,
                        removal, steps: int, batch_size: int, pad_id: int, lr: float, seed: int = 0,
                        reset_optimizer: bool = True, tokenizer=None, callbacks=(), stream=None, **fit_options) -> Run:
    """Train `model` on `examples` for `steps` steps of `batch_size`, removing CoT tokens by `removal`.

    removal          a RemovalSchedule (stepwise internalization), "none" (explicit CoT) or "all" (no CoT)
    lr               AdamW's constant learning rate (no weight decay); gradients are clipped to norm 1.0
    seed             the data order (reshuffled every epoch) and the smoothing offsets
    reset_optimizer  a fresh AdamW wherever the scheduled count goes up (False: one optimizer throughout)
    tokenizer        written into every checkpoint when given (checkpoints become `--model` directories)
    fit_options      passed to `kpro.train.fit`: save_every, keep_last, resume, precision, grad_accum, ...

    Calling it again with the same `out_dir` resumes from the newest checkpoint, exactly.
    """
    batches = Batches(list(examples), batch_size, partial(collate, pad_id=pad_id), seed=seed)
    removal_callback = CoTRemoval(removal, seed, reset_optimizer=reset_optimizer, stream=stream)
    extra = [SaveTokenizer(tokenizer)] if tokenizer is not None else []
    return fit(model, batches, out_dir, steps=steps, optimizer=lambda m: adamw(m, lr), schedule="constant",
               clip_grad_norm=1.0, callbacks=[removal_callback, *extra, *callbacks], stream=stream, **fit_options)
