"""The ICoT-SI training loop: `kpro.train.fit` with a callback that removes each step's CoT tokens.

Data flow: `Batches` over TokenizedExamples yields every step's examples whole (a `CoTBatch`, nothing
removed), and `CoTRemoval.on_batch` turns the batch of global step s into the model's batch with the
removal of step s (`schedule.removal_counts(s, B, seed)`), re-creating the optimizer first where
`schedule.increases_at(s)` while the previous batch still had CoT tokens (the official rule: once a batch
has lost its whole CoT, the optimizer is kept to the end). The removal is a pure function of (schedule,
seed, step, examples); the callback remembers only whether the last batch had CoT left, saved with the
checkpoint, so a resumed run applies exactly the removal and the resets of an uninterrupted one. The
optimizer of a checkpoint is the one re-created at the last reset, with its moments since, and comes back
as such.

The official training details are options: AdamW's weight decay (`weight_decay`; 0.01 on every parameter
in the official code) and the model kept at the end (`ValidationAccuracy(..., select_best=True)`: the best
by validation accuracy once the CoT is fully removed, as the official code reports).
"""
from __future__ import annotations

import os
import re
import sys
from functools import partial
from typing import Sequence

import torch
from torch import nn

from .. import lora
from .._numbers import is_integer
from ..distributed import is_sharded
from ..train import Batches, Callback, Run, Schedule, adamw, fit, optim
from ..train.data import OtherSetting, check_special_id, content_digest
from ..train.progress import CountProgress
from .batching import collate, remove_cot
from .evaluation import MARGIN_TOKENS, check_evaluation_examples, check_tokenizer_fits, evaluate, evaluation_positions
from .schedule import REMOVE_ALL, RemovalSchedule
from .tokenization import TokenizedExample, describe_tokenized

NO_REMOVAL = "none"   # removal="none": train on the whole CoT (the explicit-CoT baseline)
REMOVE_EVERYTHING = "all"  # removal="all": train with no CoT at all (the no-CoT baseline)


class CoTRemoval(Callback):
    """Turns each step's `CoTBatch` into `{input_ids, attention_mask, labels}` with that step's CoT removed.

    removal          a RemovalSchedule, "none" (keep the whole CoT) or "all" (remove it all)
    seed             seeds the smoothing offsets of every step (with the step)
    reset_optimizer  re-create the optimizer at each step where the scheduled count goes up, unless the
                     previous batch had no CoT left (the official rule: no resets once the CoT is gone)
    stream           where to announce each increase, at the end of its step (default stderr; main process only)

    `batch_had_cot`: whether the last batch kept any CoT token (None before the first batch).
    """

    def __init__(self, removal, seed: int = 0, *, reset_optimizer: bool = True, stream=None):
        if not isinstance(removal, RemovalSchedule) and removal not in (NO_REMOVAL, REMOVE_EVERYTHING):
            raise ValueError(f"removal must be a RemovalSchedule, {NO_REMOVAL!r} or {REMOVE_EVERYTHING!r}, got {removal!r}")
        if not is_integer(seed):
            raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
        self.removal, self.seed, self.reset_optimizer, self.stream = removal, int(seed), reset_optimizer, stream
        self._last: dict = {}
        self._announcement: str | None = None  # this step's, printed at its end (see on_step_end)
        self._first_batch = True  # of this session: where a resumed run says how much it removes
        self.batch_had_cot: bool | None = None  # of the global batch, the same on every process

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
        increase = isinstance(self.removal, RemovalSchedule) and self.removal.increases_at(step)
        # As the official code: a fresh optimizer at an increase only while the previous batch had CoT left.
        reset = increase and self.reset_optimizer and self.batch_had_cot is not False
        if reset:
            run.reset_optimizer()
        self._announcement = None
        if increase or (self._first_batch and self.removal != NO_REMOVAL):  # with or without a reset
            self._announcement = self._announce(run, step, reset)
        self._first_batch = False
        device = next(run.model.parameters()).device
        removed = remove_cot(batch.to(device), self.counts(step, batch.input_ids.shape[0]))
        scheduled = self.scheduled(step)
        rows_with_cot = int((removed.cot_left > 0).sum())
        self.batch_had_cot = rows_with_cot > 0
        self._last = {"cot_scheduled": "all" if scheduled == REMOVE_ALL else scheduled,
                      "cot_left": round(removed.cot_left.float().mean().item(), 3), "cot_rows_left": rows_with_cot}
        if reset:
            self._last["optimizer_reset"] = True
        return {"input_ids": removed.input_ids, "attention_mask": removed.attention_mask, "labels": removed.labels}

    def on_step_end(self, run: Run, metrics: dict) -> None:
        metrics.update(self._last)
        # Printed here, not in on_batch: a BrokenPipeError (the reader gone, `2>&1 | head`) in on_step_end is
        # taken by fit as Ctrl-C, saving the steps done; in on_batch it ended the run with nothing saved.
        if self._announcement is not None:
            announcement, self._announcement = self._announcement, None
            print(announcement, file=self.stream or sys.stderr, flush=True)

    def settings(self) -> dict:
        return {"removal": describe_removal(self.removal), "seed": self.seed, "reset_optimizer": self.reset_optimizer}

    def state_dict(self) -> dict:
        # The settings, to refuse resuming with other ones, and whether the last batch had CoT left, which
        # decides the next reset (the step decides everything else).
        return {**self.settings(), "batch_had_cot": self.batch_had_cot}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if isinstance(state.get("removal"), str):  # checkpoints from before remove_per_epoch was kept as a float
            state["removal"] = re.sub(r"remove_per_epoch=(\d+),", r"remove_per_epoch=\1.0,", state["removal"])
        for key, value in self.settings().items():
            if state.get(key) != value:
                raise OtherSetting(f"the checkpoint was trained with {key}={state.get(key)!r} and this run has "
                                   f"{key}={value!r}; resume with the same settings, or start a new run directory",
                                   key, had=state.get(key), now=value)
        self.batch_had_cot = state.get("batch_had_cot")

    def _announce(self, run: Run, step: int, reset: bool) -> str | None:
        """The line announcing the removal from `step` on (None off the main process)."""
        if not run.is_main:
            return None
        scheduled = self.scheduled(step)
        what = "the whole CoT" if scheduled == REMOVE_ALL else f"{scheduled} CoT token{'s' * (scheduled != 1)}"
        smoothed = isinstance(self.removal, RemovalSchedule) and self.removal.smoothing_lambda != float("inf")
        offsets = " + smoothing offsets" if scheduled != REMOVE_ALL and smoothed else ""
        # Numbered like the progress line and metrics.jsonl: step s + 1 is the one that begins now.
        return f"step {step + 1}: removing {what}{offsets} per example{'; optimizer re-created' if reset else ''}"


def describe_removal(removal) -> str:
    return repr(removal) if isinstance(removal, RemovalSchedule) else removal


class SaveTokenizer(Callback):
    """Write the tokenizer into every checkpoint, so each one is a model directory `--model` can start from."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def on_save(self, run: Run, directory) -> None:
        self.tokenizer.save(directory)


class ValidationAccuracy(Callback):
    """Every `every` steps (and at the last), greedy-decode `examples` and log `valid_accuracy` with the step.
    On `stream` (default stderr): the accuracy line, after a progress line every 10 s while decoding.

    select_best  keep the weights of the best validation accuracy reached once the CoT is fully removed,
                 and load them into the model when the run ends (the official code reports the epoch of
                 best validation accuracy among those whose batches had no CoT left). A step whose batch
                 kept a CoT token (`cot_rows_left` > 0, logged by CoTRemoval, which must come first among
                 the callbacks) starts the selection over; without CoTRemoval every evaluation counts.
                 The best weights travel in the checkpoints (one more copy of the model), with a digest of
                 the examples they were selected on, so a resumed run keeps them, and a resume on other
                 examples is refused (a checkpoint saved before the digest was kept is taken). `selected`
                 is then {"step", "accuracy"} of the kept weights (None: no evaluation came after the CoT
                 was gone, and the final weights stay). One process only.
    """

    def __init__(self, tokenizer, examples, every: int, *, batch_size: int = 256, select_best: bool = False,
                 stream=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.tokenizer, self.examples, self.every = tokenizer, check_evaluation_examples(examples, batch_size), every
        self.examples_digest = content_digest(self.examples)  # None where the content cannot be told
        self.batch_size, self.select_best, self.stream = batch_size, bool(select_best), stream
        self._best: dict | None = None  # {"step", "accuracy", "weights"} once an evaluation follows the CoT's removal
        self.selected: dict | None = None
        self._restored = False  # load_state_dict ran in this fit (before on_fit_start)

    def on_fit_start(self, run: Run) -> None:
        # Nothing of an earlier fit with this callback carries over: a fresh run, or a resumed one whose checkpoint
        # holds no state of it (its first session ran without it), starts its selection empty.
        if run.checkpoint is None or not self._restored:  # a flag left by a resume refused after loading it
            self._best = None
        self.selected, self._restored = None, False
        if self.select_best and run.env.world_size > 1:
            raise ValueError("ValidationAccuracy(select_best=True) evaluates in one process; run it without torchrun")
        if is_sharded(run.model):  # rank 0 would decode alone, and a sharded model's forward needs every process
            raise ValueError("ValidationAccuracy evaluates on rank 0 alone, and needs a whole model there, not one "
                             "sharded across processes (parallel='fsdp'): train with parallel='ddp', or evaluate "
                             "the checkpoint after training (kpro.internalize.evaluate)")
        # Refused now, not after `every` steps of training.
        needed = evaluation_positions(self.examples, self.tokenizer)
        limit = lora.unwrap(run.model).config.max_position_embeddings  # an AdaptedModel's is its model's
        if needed > limit:
            raise ValueError(f"evaluating the validation examples takes up to {needed} positions (the longest prompt "
                             f"+ the longest reference + {MARGIN_TOKENS}), more than the model's "
                             f"max_position_embeddings={limit}")

    def on_step_end(self, run: Run, metrics: dict) -> None:
        if self.select_best and metrics.get("cot_rows_left", 0) > 0:
            self._best = None  # this batch still had CoT: the official code starts its selection over
        if not run.is_main or (run.step % self.every and run.step != run.total_steps):
            return
        run.model.eval()
        # a line every 10 s while decoding: 1,000 examples of a real model decode for minutes on a CPU
        validating = CountProgress(f"step {run.step}: validating", "examples decoded", stream=self.stream or sys.stderr)
        with validating:
            result = evaluate(run.model, self.tokenizer, self.examples, batch_size=self.batch_size, progress=validating)
        run.model.train()
        metrics["valid_accuracy"] = result.accuracy
        metrics["valid_cot_tokens"] = round(mean_cot_tokens(result, self.tokenizer.eos_id), 3)
        best = ""
        if self.select_best and metrics.get("cot_rows_left", 0) == 0 and (
                self._best is None or result.accuracy > self._best["accuracy"]):
            self._best = {"step": run.step, "accuracy": result.accuracy,
                          "weights": {k: v.detach().clone() for k, v in run.model.state_dict().items()}}
            best = "; the best since the CoT is gone"
        print(f"step {run.step}: valid accuracy {result.accuracy:.3f} ({result.correct}/{result.total}), "
              f"{metrics['valid_cot_tokens']:.1f} CoT tokens written per example{best}",
              file=self.stream or sys.stderr, flush=True)

    def on_fit_end(self, run: Run) -> None:
        if not self.select_best:
            return
        if self._best is None:
            self.selected = None
            print("no validation after the CoT was fully removed: keeping the final weights",
                  file=self.stream or sys.stderr, flush=True)
            return
        self.selected = {"step": self._best["step"], "accuracy": self._best["accuracy"]}
        if self._best["step"] != run.step:
            run.model.load_state_dict(self._best["weights"])
        print(f"kept the weights of step {self._best['step']} (valid accuracy {self._best['accuracy']:.3f}), "
              "the best once the CoT was fully removed", file=self.stream or sys.stderr, flush=True)

    def state_dict(self) -> dict:
        if self._best is None:
            return {}  # nothing to remember (and an evaluation-only callback may come and go between resumes)
        return {"best_step": self._best["step"], "best_accuracy": self._best["accuracy"],
                "best_weights": self._best["weights"], "examples_digest": self.examples_digest, "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        # The checkpoint's best, or none (not the one this object kept from another run or a later step).
        self._best, self._restored = None, True
        saved = state.get("examples_digest")  # absent from checkpoints saved before it was kept: taken as they are
        if "best_step" in state and self.select_best and None not in (saved, self.examples_digest) \
                and saved != self.examples_digest:  # the best's accuracy would be compared with another set's
            raise ValueError(f"the checkpoint's best weights (step {state['best_step']}, valid accuracy "
                             f"{state['best_accuracy']:.3f}) were selected on other validation examples than these "
                             f"{len(self.examples)} (content digest {saved[:12]}... then, "
                             f"{self.examples_digest[:12]}... now): resume with the same examples (the same --valid "
                             "or --eval-size, and --eval-examples), or start a new run directory")
        every = state.get("every")  # absent from checkpoints saved before it was kept: taken as they are
        if "best_step" in state and self.select_best and every not in (None, self.every):
            # the best so far was picked among other steps than this run would validate at
            raise ValueError(f"the checkpoint's best weights (step {state['best_step']}, valid accuracy "
                             f"{state['best_accuracy']:.3f}) were selected among validations every {every} steps, "
                             f"and this run validates every {self.every}: resume with every={every} (the command's "
                             f"--eval-every {every}), or start a new run directory")
        if "best_step" in state and self.select_best:
            self._best = {"step": state["best_step"], "accuracy": state["best_accuracy"],
                          "weights": state["best_weights"]}


def mean_cot_tokens(result, eos_id: int) -> float:
    """The CoT tokens the model wrote (before its first eos), on average over an Evaluation's predictions."""
    lengths = [p.ids.index(eos_id) if eos_id in p.ids else len(p.ids) for p in result.predictions]
    return sum(lengths) / len(lengths)


OFFICIAL_WEIGHT_DECAY = 0.01  # the official code's torch.optim.AdamW(model.parameters(), lr): its default decay


def fit_internalization(model: nn.Module, examples: Sequence[TokenizedExample], out_dir: str | os.PathLike, *,
                        removal, steps: int, batch_size: int, pad_id: int, lr: float, seed: int = 0,
                        reset_optimizer: bool = True, weight_decay: float = 0.0, tokenizer=None, callbacks=(),
                        stream=None, schedule="constant", **fit_options) -> Run:
    """Train `model` on `examples` for `steps` steps of `batch_size`, removing CoT tokens by `removal`.

    removal          a RemovalSchedule (stepwise internalization), "none" (explicit CoT) or "all" (no CoT)
    lr               AdamW's peak learning rate; gradients are clipped to norm 1.0
    schedule         the learning rate's schedule, as `kpro.train.fit` takes it: "constant" (the default, as the
                     official code), or `lr_schedule(steps, N, W)` to decay it to 0 over the last N steps
                     (and warm it up over the first W)
    weight_decay     AdamW's decoupled weight decay on every parameter, norms and embeddings included, as the
                     official code (OFFICIAL_WEIGHT_DECAY = 0.01 there); 0 (the default) decays nothing
    seed             the data order (reshuffled every epoch) and the smoothing offsets
    reset_optimizer  a fresh AdamW wherever the scheduled count goes up while the previous batch had CoT left
                     (False: one optimizer throughout)
    tokenizer        written into every checkpoint when given (checkpoints become `--model` directories)
    callbacks        more callbacks, after the removal: `ValidationAccuracy(tok, valid, every, select_best=True)`
                     keeps the best model once the CoT is gone, as the official code reports
    fit_options      passed to `kpro.train.fit`: save_every, keep_last, resume, precision, grad_accum, ...

    Calling it again with the same `out_dir` resumes from the newest checkpoint, exactly.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < 1:
        raise ValueError(f"weight_decay must be a number in [0, 1), got {weight_decay!r}")
    # Checked now: the first forward would blame input_ids
    config = getattr(lora.unwrap(model), "config", None)  # an AdaptedModel's is its model's
    pad_id = check_special_id(pad_id, "pad_id", vocab_size=getattr(config, "vocab_size", None))
    examples = list(examples)
    _check_vocabulary(examples, tokenizer, getattr(config, "vocab_size", None))
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(range(len(examples)), key=lambda i: len(getattr(examples[i], "ids", ())), default=None)
    if limit is not None and longest is not None and len(getattr(examples[longest], "ids", ())) > limit:
        # evaluate refuses such a model's examples: training on them would go past the positions it has
        raise ValueError(f"example {longest + 1} ({describe_tokenized(examples[longest], tokenizer)}) takes "
                         f"{len(examples[longest].ids)} tokens, more than the model's max_position_embeddings={limit}")
    batches = Batches(examples, batch_size, partial(collate, pad_id=pad_id), seed=seed)
    removal_callback = CoTRemoval(removal, seed, reset_optimizer=reset_optimizer, stream=stream)
    extra = [SaveTokenizer(tokenizer)] if tokenizer is not None else []
    optimizer = (lambda m: adamw(m, lr)) if weight_decay == 0 else partial(adamw_every_parameter, lr=lr,
                                                                           weight_decay=weight_decay)
    return fit(model, batches, out_dir, steps=steps, optimizer=optimizer, schedule=schedule,
               clip_grad_norm=1.0, callbacks=[removal_callback, *extra, *callbacks], stream=stream, **fit_options)


def _check_vocabulary(examples, tokenizer, vocab_size: int | None) -> None:
    """Checked now, as evaluate checks it: the first forward would refuse input_ids, naming no example, and
    leave a run directory behind."""
    if vocab_size is None:
        return
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, vocab_size)
    for number, example in enumerate(examples, start=1):
        ids = getattr(example, "ids", ())
        top = int(max(ids)) if len(ids) else -1  # ids as a tuple, a list, a tensor or an array
        if top >= vocab_size:  # negative ids are collate's and the model's to refuse
            raise ValueError(f"example {number} ({describe_tokenized(example, tokenizer)}) holds token id {top}, "
                             f"outside the model's vocabulary of {vocab_size} (ids 0 ... {vocab_size - 1})")


def lr_schedule(steps: int, decay_steps: int = 0, warmup_steps: int = 0):
    """`fit_internalization`'s `schedule` for a run of `steps`: constant (both 0, as the official code), rising
    linearly over the first `warmup_steps` steps, decaying linearly to 0 over the last `decay_steps` steps."""
    for name, value in (("steps", steps), ("decay_steps", decay_steps), ("warmup_steps", warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "steps" else 0):
            raise ValueError(f"{name} must be an integer >= {1 if name == 'steps' else 0}, got {value!r}")
    if warmup_steps + decay_steps > steps:  # the rate would never reach its peak
        raise ValueError(f"warmup_steps {warmup_steps} and decay_steps {decay_steps} together are longer than the "
                         f"run ({steps} steps)")
    if decay_steps == 0:
        return "constant" if warmup_steps == 0 else Schedule("constant", warmup_steps=warmup_steps)
    return Schedule("linear", warmup_steps=warmup_steps, total_steps=steps, decay_steps=decay_steps)


def adamw_every_parameter(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one weight decay on every trainable parameter, as `torch.optim.AdamW(model.parameters())`
    in the official code (kpro's `adamw` spares norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    # Python floats, as kpro's adamw keeps them: the param groups go into checkpoints, which hold no NumPy numbers
    return torch.optim.AdamW(params, lr=optim.check_lr(lr), weight_decay=optim.check_weight_decay(weight_decay),
                             **optim.implementation(model))
