"""`fit`: the ready training loop, made of the pieces in kpro.train.

One optimizer step = one item of `batches` (the global batch) -> optional transform by callbacks ->
split across processes and `grad_accum` micro-batches -> forward/backward (bf16 autocast on GPU) ->
gradients averaged over the step's loss tokens -> clipping -> optimizer step -> metrics, hooks,
checkpoint. Everything that decides the next step (weights, optimizer, data position, RNG states,
callback states) is in the checkpoint, so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import math
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, NoReturn

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from .._numbers import is_integer
from .._run_lock import holding
from .._signals import STOP_SIGNALS, stop_name
from ..checkpoint import CheckpointError
from .. import errors
from ..errors import OtherSettings, ResumeRefused, StoppedAndSaid, listed
from . import distributed
from .callbacks import Callback, callback_keys, callback_states, check_metrics, load_callback_states
from .checkpointing import (FROZEN_AT_START, IMPLEMENTATION_FLAGS, STEP_DIR, check_loadable,
                            check_param_groups_loadable, check_savable, checkpoint_step, frozen_digests,
                            latest_checkpoint, list_checkpoints, read_optimizer, read_model, refuse_past_steps,
                            restore_checkpoint, rng_state, save_checkpoint, set_rng_state, type_name)
from .data import Batches, OtherSetting
from .loss import LossSum, lm_loss, no_loss_tokens_message
from .optim import Schedule, adamw, remember_peak_lr, set_lr
from .progress import MetricsLog, ProgressLine
from .shards import TokenShards

PRECISIONS = ("auto", "fp32", "bf16")


class Run:
    """The state of a `fit` call that callbacks see and steer."""

    def __init__(self, model: nn.Module, train_model: nn.Module, make_optimizer: Callable, total_steps: int,
                 out_dir: Path, env: distributed.DistEnv):
        self.model = model  # unwrapped (a sharded model is sharded in place)
        self.train_model = train_model  # what the loss function calls: the DDP wrapper, or the model
        self.total_steps, self.out_dir, self.env = total_steps, out_dir, env
        self.step = 0
        self.metrics: dict = {}
        self.checkpoint: Path | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._make_optimizer = make_optimizer
        self._save_requested = self._stop_requested = False
        # DDP averages the gradients of the parameters that were trainable when it wrapped the model, of no others
        self._ddp_trainable = self._trainable() if isinstance(train_model, DistributedDataParallel) else None
        # Under DDP, from the first step on: (name, parameter, whether it got no gradient there and DDP leaves it out)
        # of each trainable parameter
        self._ddp_idle: list[tuple[str, nn.Parameter, bool]] | None = None

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def reset_optimizer(self) -> None:
        """Replace the optimizer by a fresh one from the factory (moments and step counts start over).

        Takes effect at once; the learning rate still follows the schedule of the global step.
        """
        self._check_ddp_trainable()
        optimizer = self._make_optimizer(self.model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if optimizer is self.optimizer:  # its moments would go on: no reset at all
            raise ValueError("the optimizer factory returned the optimizer in use; it must build a new one each call "
                             "(fit calls it again wherever a fresh optimizer is asked for)")
        names = {id(p): name for name, p in self.model.named_parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = sum(id(p) not in names for p in held)
        if foreign:  # the model's own parameters would never change, silently
            raise ValueError(f"the optimizer holds {foreign} parameter(s) that are not the model's; build it from the "
                             "model the factory is given")
        frozen = [names[id(p)] for p in held if not p.requires_grad]
        if frozen:
            raise ValueError(f"the optimizer holds {len(frozen)} frozen parameter(s) ({listed(frozen)}); give it only "
                             "parameters with requires_grad")
        remember_peak_lr(optimizer)
        # A NumPy eps or lr would go into every checkpoint, which no resume could load: refused before it trains
        check_param_groups_loadable(optimizer)
        self.optimizer = optimizer
        self.check_optimizer_covers_the_trainable()

    def check_optimizer_covers_the_trainable(self) -> None:
        """A trainable parameter the optimizer lacks (made trainable after the optimizer was built, say) would
        gather gradients step after step, outside clipping, and never change: refused, naming it. So is, under
        DDP, a change of which parameters train since fit wrapped the model."""
        self._check_ddp_trainable()
        # read off the optimizer each time: a group added with optimizer.add_param_group counts
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        left_out = [name for name, p in self.model.named_parameters() if p.requires_grad and id(p) not in optimized]
        if left_out:
            raise ValueError(f"{len(left_out)} trainable parameter(s) are not in the optimizer "
                             f"({listed(left_out)}): freeze them "
                             "(requires_grad False), or call run.reset_optimizer() after changing which parameters "
                             "train")

    def _trainable(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}

    def _check_ddp_trainable(self) -> None:
        """Under DDP a parameter made trainable after fit wrapped the model trained apart on each process (its
        gradients never averaged), silently; one frozen since left DDP's reduction unfinished: a step on the
        processes' own gradients, then DDP's error about unused parameters at the next."""
        if self._ddp_trainable is None:
            return
        now = self._trainable()
        if now == self._ddp_trainable:
            return
        changes = [f"{what} since: {listed(names)}" for what, names in
                   (("made trainable", sorted(now - self._ddp_trainable)),
                    ("frozen", sorted(self._ddp_trainable - now))) if names]
        raise ValueError(f"the parameters that train changed after DDP wrapped the model at the start of fit "
                         f"({'; '.join(changes)}), and DDP averages the gradients of those trainable then, of no "
                         "others: the processes would train apart. Under DDP set requires_grad before calling fit "
                         "(to train other parameters later, start another fit from the model in a new directory), "
                         "or use parallel='fsdp', which follows the change")

    def save_checkpoint(self) -> None:
        """Save a checkpoint at the end of the current step."""
        self._save_requested = True

    def stop(self) -> None:
        """End the run after the current step, with a checkpoint; asked for in `on_fit_start`, before the first
        step, with no new checkpoint (`on_fit_end` runs either way)."""
        self._stop_requested = True


def fit(model: nn.Module, batches: Iterable, out_dir: str | Path, *, steps: int | None = None,
        loss_fn: Callable = lm_loss, optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
        lr: float | None = None, weight_decay: float = 0.0, schedule: str | Schedule = "constant",
        grad_accum: int = 1, clip_grad_norm: float | None = 1.0, precision: str = "auto",
        parallel: str = "auto", save_every: int | None = None, keep_last: int = 3, resume: bool | str | Path = True,
        callbacks: Iterable[Callback] = (), log_every: int | None = None, stream=None,
        save_frozen: bool = True) -> Run:
    """Train `model` for `steps` optimizer steps; returns the `Run` (step, metrics, optimizer, checkpoint).

    batches      iterable of global batches, one per optimizer step (dicts of tensors [B, ...] when they must be
                 split). `kpro.train.Batches` resumes exactly; any other iterable is fast-forwarded on resume.
                 Batches with `per_process = True` (`kpro.train.TokenShards`) give each process its own rows of
                 the global batch already: fit splits those only into micro-batches.
    out_dir      run directory: `metrics.jsonl` (one line per step) and checkpoints `step-XXXXXXXX/`.
    steps        total optimizer steps of the run (default: len(batches)); batches that run out before (on any
                 process) are an error (after a checkpoint of the steps done).
    loss_fn      loss_fn(model, batch) -> a scalar mean, or a `LossSum(total, count)`, which averages over
                 every loss token of the step exactly; default: `lm_loss` (causal LM, labels -100 ignored).
                 Under DDP/FSDP `model` is the wrapped module: call it (its forward), not other methods.
    optimizer    factory model -> optimizer, called again by `run.reset_optimizer()`; default AdamW
                 (`kpro.train.adamw`) with `lr` (default 3e-4) and `weight_decay` (not on norms and biases).
    schedule     "constant", "linear", "cosine" (decaying to 0 at `steps`), or a `Schedule` (warmup, floor; one
                 decaying to 0 must last the run: total_steps >= steps).
    grad_accum   micro-batches per optimizer step on each process.
    clip_grad_norm  max global gradient norm (None: no clipping; the norm is logged either way).
    precision    "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16" (autocast) or "fp32"; the loss is fp32 (float64 for a
                 float64 model).
    parallel     "auto" (DDP when torchrun started several processes), "none", "ddp", "fsdp" (FSDP2, a unit per block).
    save_every   checkpoint every that many steps; one is also written at the end, on Ctrl-C or SIGTERM (or a
                 closed progress pipe), and where the steps stop early (a batch refused, the batches run out).
    keep_last    how many checkpoints to keep.
    resume       True: continue from the newest checkpoint in out_dir if there is one; a path: from that
                 checkpoint; False: start afresh (refused if out_dir already holds checkpoints).
    callbacks    `kpro.train.Callback` instances (hooks, batch transforms, optimizer resets, saved state).
    log_every, stream  the progress line: printed every that many steps when not on a terminal (default:
                 every 5% of the run), to `stream` (default stderr: progress, not a result); rank 0 only.
    save_frozen  False: checkpoints leave out the parameters that require no gradient and still hold their values of
                 the run's start (a LoRA base), recording a digest of each; a resume keeps the model's own, refusing
                 by name those that differ from the run's.
    """
    env = distributed.init_distributed()
    out_dir = Path(out_dir)
    steps = _total_steps(steps, batches)
    callbacks = _check_callbacks(callbacks)
    _check_args(optimizer, lr, weight_decay, grad_accum, clip_grad_norm, precision, save_every, keep_last, log_every,
                resume, out_dir)
    if not isinstance(save_frozen, bool):
        raise TypeError(f"save_frozen must be True or False, got {save_frozen!r}")
    # Python numbers from here (a NumPy one passed the checks): the settings are saved in checkpoints
    lr, clip_grad_norm = (None if value is None else float(value) for value in (lr, clip_grad_norm))
    grad_accum, keep_last = int(grad_accum), int(keep_last)
    save_every, log_every = (None if value is None else int(value) for value in (save_every, log_every))
    _check_partial_batch(batches, env.world_size * grad_accum, steps)
    _check_same_data(batches, env)
    if isinstance(schedule, str):
        schedule = Schedule(schedule, total_steps=steps if schedule != "constant" else None)
    _check_schedule_covers(schedule, steps)
    # One run at a time in out_dir: a second would resume from this one's checkpoints and write over its metrics.
    # Rank 0 holds it; a refusal there reaches every rank (on_main), none waiting in a later collective.
    with contextlib.ExitStack() as hold:
        distributed.on_main(lambda: hold.enter_context(holding(out_dir)), env, f"hold {out_dir}")
        return _fit(model, batches, out_dir, env=env, steps=steps, loss_fn=loss_fn, optimizer=optimizer, lr=lr,
                    weight_decay=weight_decay, schedule=schedule, grad_accum=grad_accum,
                    clip_grad_norm=clip_grad_norm, precision=precision, parallel=parallel, save_every=save_every,
                    keep_last=keep_last, resume=resume, callbacks=callbacks, log_every=log_every, stream=stream,
                    save_frozen=save_frozen)


def _fit(model, batches, out_dir, *, env, steps, loss_fn, optimizer, lr, weight_decay, schedule, grad_accum,
         clip_grad_norm, precision, parallel, save_every, keep_last, resume, callbacks, log_every, stream,
         save_frozen) -> Run:
    check_savable(model)  # a checkpoint refused at the first save would lose the steps before it
    model.train()
    train_model, parallel = distributed.prepare(model, parallel, env)
    make_optimizer = optimizer or (lambda m: adamw(m, 3e-4 if lr is None else lr, weight_decay=weight_decay))
    run = Run(model, train_model, make_optimizer, steps, out_dir, env)
    del train_model  # run.train_model from here: DDP's first step replaces it, and the old one's buckets would stay
    run.reset_optimizer()

    checkpoint = distributed.main_decides(lambda: _checkpoint_to_resume(out_dir, resume),
                                          f"find the checkpoint to resume in {out_dir}", env)
    settings = {"schedule": dataclasses.asdict(schedule) if isinstance(schedule, Schedule) else None,
                "clip_grad_norm": clip_grad_norm, "precision": _precision(precision, model),
                "param_dtypes": ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})),
                # also where the optimizer state holds none (plain SGD), which the checks below read them from
                "optimizer": type_name(run.optimizer), "param_groups": _param_groups(run.optimizer)}
    _check_same_settings({"steps": steps, "lr": lr, "weight_decay": weight_decay, "grad_accum": grad_accum,
                          "parallel": parallel, "save_every": save_every, "keep_last": keep_last,
                          "save_frozen": save_frozen, **settings,
                          "schedule": settings["schedule"] or _describe(schedule)}, env)
    fast_forward = checkpoint is not None and not hasattr(batches, "load_state_dict")
    # A plain iterable's batch size (rows of its first batch), checked where a resume fast-forwards it.
    batch_rows = data = None
    # The frozen weights as the run started, which a save without them leaves out where unchanged: the model's as given,
    # before a resume loads the checkpoint's over them (a block trained and then frozen in a session saved whole), or
    # those a checkpoint saved without them recorded (kept through resumes)
    frozen_at_start = None if save_frozen else frozen_digests(model, env)
    if checkpoint is not None:
        saved_data, data, recorded_start = _resume(run, checkpoint, batches, callbacks, settings, fast_forward)
        batch_rows = saved_data.get("rows")
        if recorded_start is not None and not save_frozen:
            frozen_at_start = recorded_start
    check_rows_after_resume = fast_forward
    if data is None:
        if checkpoint is None and isinstance(batches, (Batches, TokenShards)):
            # A new run starts its data from the start, wherever an earlier fit or a look at a batch left the
            # object: a fresh script then makes the same run, and the run's first checkpoint its own position.
            batches.restart()
        data = iter(batches)

    # A checkpoint of another directory has its history there: this directory's lines are of no step of it.
    kept = run.step if checkpoint is not None and _inside(checkpoint, out_dir) else 0
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", resume_step=kept) if env.is_main else None
    progress = ProgressLine(steps, run.step, stream=stream, every=log_every) if env.is_main else None
    if env.is_main and checkpoint is not None:
        print(f"resumed from {checkpoint} at step {run.step}/{steps}", file=sys.stderr if stream is None else stream)
    autocast = _autocast(precision, model)
    device = next(model.parameters()).device
    per_process = bool(getattr(batches, "per_process", False))

    # Several processes fetch each step's batch before they agree on the step (`look_ahead`), after the step before
    # it may ask for a checkpoint: that checkpoint holds the RNG states and data position as they were before the
    # fetch, as one process's does. So does one saved where a step's batch is refused (`_RefusedBatch`).
    before_fetch = None

    def remember_before_fetch():
        nonlocal before_fetch
        data_now = batches.state_dict() if hasattr(batches, "state_dict") else None
        before_fetch = {"rng": rng_state(), "data": copy.deepcopy(data_now)}  # a state the fetch may change

    def data_state():
        if not hasattr(batches, "state_dict"):
            return {"steps": run.step, "rows": batch_rows}
        state = before_fetch["data"] if before_fetch is not None else batches.state_dict()
        check_loadable(state, f"{type(batches).__name__}.state_dict()")
        return state

    def save(callbacks_before_batch=None):
        """callbacks_before_batch: the states of the callbacks that take batches, as before a refused step's
        on_batch, to save in place of their states now."""
        def write_extra(directory):
            for cb in callbacks:
                cb.on_save(run, directory)
        # As the optimizer is now (reset, or given a group, since the run started): what a resume must build.
        settings["optimizer"], settings["param_groups"] = type_name(run.optimizer), _param_groups(run.optimizer)
        state = {"callbacks": {**callback_states(callbacks), **(callbacks_before_batch or {})}, "metrics": run.metrics,
                 "settings": settings, "data": data_state()}
        now = None
        if before_fetch is not None:
            now = rng_state()
            set_rng_state(before_fetch["rng"])
        try:
            run.checkpoint = save_checkpoint(out_dir, run.step, model, run.optimizer, state, env, keep_last=keep_last,
                                             summary={"metrics": run.metrics, "total_steps": steps},
                                             write_extra=write_extra, save_frozen=save_frozen,
                                             frozen_at_start=frozen_at_start if env.is_main else None)
        finally:
            if now is not None:
                set_rng_state(now)
        run._save_requested = False

    def save_before_batch(step_start, callbacks_before_batch):
        """A checkpoint of the steps done where a step's batch is refused: the data position, RNGs and callback
        states as they were before that batch (`step_start`: `before_fetch` as the batch was fetched)."""
        nonlocal before_fetch
        before_fetch = step_start
        save(callbacks_before_batch=callbacks_before_batch)

    def fetch():
        """The next step's batch; _RAN_OUT where the batches ran out, _INTERRUPTED where fetching failed after
        Ctrl-C (it reached the data's own workers too: a torch DataLoader's, which exit quietly), which saves the
        steps done as any Ctrl-C does."""
        try:
            return _as_dict(next(data))
        except StopIteration:
            return _RAN_OUT
        except Exception:
            if not interrupt.requested:
                raise
            return _INTERRUPTED

    def look_ahead(interrupted: bool):
        """Several processes: fetch the next step's batch, and agree on it with the requests (save, stop, Ctrl-C)
        in the one collective of `_agree_on_requests`, before the step's own: batches running out on some
        processes stop every process (those going on would wait in the step's collectives, the others in the
        save's, until the process group timed out). Returns the batch (`_RAN_OUT` on every process where any ran
        out), whether any process was interrupted, and the processes that ran out."""
        nonlocal before_fetch
        batch = before_fetch = None
        if run.step < steps and not (interrupted or run._stop_requested):  # not a fetch this process knows is lost
            remember_before_fetch()
            batch = fetch()
        interrupted, ran_out = _agree_on_requests(run, interrupted or batch is _INTERRUPTED, batch is _RAN_OUT)
        return (_RAN_OUT if ran_out else batch), interrupted, ran_out

    interrupted = exhausted = False
    reader_gone = False  # a write of the progress, or of a callback's report, met a closed pipe (`2>&1 | head`)
    ran_out_on = []  # the processes whose batches ran out, where several agree on it
    with _InterruptToStop(announce=env.is_main) as interrupt:
        try:
            # What on_fit_start draws (a random evaluation subset) must not move the random streams, as in on_save: a
            # resume has just restored them as they were at the save, and the uninterrupted run went on from there.
            drawn_from = rng_state()
            try:
                for cb in callbacks:
                    cb.on_fit_start(run)
            finally:
                set_rng_state(drawn_from)
            callback_states(callbacks), data_state()  # states a checkpoint cannot load back: refused before training
            ahead = None  # several processes: the next step's batch, fetched before they agree on the step
            if env.world_size > 1:  # a stop asked for in on_fit_start on any process is for all
                ahead, interrupted_at_start, ran_out_on = look_ahead(False)
                if interrupted_at_start:  # fetching failed after Ctrl-C on some process: none starts the step
                    ahead = _INTERRUPTED
            # A stop asked for in on_fit_start (an early stop that a callback's restored state remembers) ends the run
            # before its first step, saving nothing new: a run requeued after it stopped does not grow a step per launch
            stopped_at_start = run._stop_requested
            # The stateful callbacks that take batches (CoTRemoval): their states before a step's on_batch are what a
            # checkpoint saved where that step's batch is refused holds (on_batch may count, or mark the batch seen)
            batch_takers = [(key, cb) for key, cb in zip(callback_keys(callbacks), callbacks)
                            if type(cb).on_batch is not Callback.on_batch and hasattr(cb, "state_dict")]
            while run.step < steps and not stopped_at_start:
                if env.world_size > 1:
                    batch, ahead = ahead, None
                else:
                    remember_before_fetch()
                    batch = fetch()
                if batch is _RAN_OUT:
                    exhausted = True
                    break
                if batch is _INTERRUPTED:
                    interrupted = True
                    break
                # the batch is this step's: a checkpoint from here is at this step's end
                step_start, before_fetch = before_fetch, None
                if not hasattr(batches, "state_dict"):
                    batch_rows = _plain_batch_rows(batch, batch_rows, check_rows_after_resume, run, grad_accum,
                                                   per_process)
                    check_rows_after_resume = False
                before_batch = {key: copy.deepcopy(cb.state_dict()) for key, cb in batch_takers}
                batch = _on_batch(callbacks, run, batch)
                lr_now = set_lr(run.optimizer, schedule, run.step)
                start = time.perf_counter()
                try:
                    loss, grad_norm, interrupted = _train_step(run, batch, loss_fn, grad_accum, clip_grad_norm,
                                                               autocast, device, lambda: interrupt.requested,
                                                               per_process)
                except _RefusedBatch as refused:  # before the step changed a weight: the steps done are saved
                    _raise_refused(run, refused.error, lambda: save_before_batch(step_start, before_batch))
                run.step += 1
                tokens = _count_tokens(batch) * (env.world_size if per_process else 1)  # per process: full rows
                step_time = time.perf_counter() - start
                run.metrics = {"step": run.step, "loss": loss, "lr": lr_now, "grad_norm": grad_norm, "tokens": tokens,
                               "step_time": round(step_time, 6), "tokens_per_s": round(tokens / step_time, 1)}
                for cb in callbacks:
                    try:
                        cb.on_step_end(run, run.metrics)
                    except BrokenPipeError:  # its report's reader went away: taken as Ctrl-C (below)
                        reader_gone = interrupt.requested = True
                    check_metrics(run.metrics, f"{type(cb).__qualname__}.on_step_end at step {run.step}")
                # A Ctrl-C during the callbacks (an evaluation, say) stops at this step, not after one more.
                interrupted = interrupted or interrupt.requested
                if env.world_size > 1:  # a save or stop asked for on any process (rank 0's early stopping) is for all
                    ahead, interrupted, ran_out_on = look_ahead(interrupted)
                if env.is_main:
                    metrics_log.write(run.metrics)
                    try:
                        if not reader_gone:
                            progress.update(run.step, loss, lr_now, tokens)
                    except OSError as err:  # as Ctrl-C: the steps done are saved, then it is raised
                        if err.errno not in (errno.EPIPE, errno.EIO):  # the reader gone, or the terminal hung up
                            raise
                        reader_gone = interrupt.requested = True
                if run._save_requested or (save_every and run.step % save_every == 0):
                    save()
                if interrupted or run._stop_requested:
                    break
                if env.world_size == 1 and interrupt.requested:  # came during the metrics write or a save
                    interrupted = True  # (several processes agree on it at the next step's all-reduce)
                    break
            if not stopped_at_start and (run.checkpoint is None or checkpoint_step(run.checkpoint) != run.step):
                save()  # the end of the run, a stop, or Ctrl-C
        finally:
            if progress is not None and not reader_gone:
                progress.close()
            if metrics_log is not None:
                metrics_log.close()
    # a Ctrl-C requested during the last step's end or the final save counts: not ignored
    _raise_if_ended_early(run, steps, reader_gone=reader_gone, interrupted=interrupted or interrupt.requested,
                          exhausted=exhausted, ran_out_on=ran_out_on)
    for cb in callbacks:
        cb.on_fit_end(run)
    return run


def _plain_batch_rows(batch, batch_rows: int | None, check_after_resume: bool, run: Run, grad_accum: int,
                      per_process: bool) -> int | None:
    """A plain iterable's batch size (`batch_rows`, or this batch's rows where unknown yet); where a resume has just
    fast-forwarded it (`check_after_resume`), a batch of other rows than the checkpoint's run had is refused."""
    rows = _batch_rows(batch)
    if check_after_resume and None not in (rows, batch_rows) and rows != batch_rows:
        # the batch a refusal stopped the run at, given again: refused again as such
        _refuse_unsplittable(batch, run, grad_accum, per_process)
        raise OtherSetting(f"the batches have {rows} rows, the checkpoint's run had {batch_rows}: a "
                           f"plain iterable resumes by skipping {run.step} batches, which of another "
                           "size are not the examples the checkpointed steps used; resume with the first "
                           "run's batches (or kpro.train.Batches, which refuses another batch size by "
                           "name)", "batch_size", had=batch_rows, now=rows)
    return batch_rows or rows


def _on_batch(callbacks: list[Callback], run: Run, batch):
    """The step's batch as the callbacks' on_batch hooks, in order, transform it."""
    for cb in callbacks:
        batch = cb.on_batch(run, batch)
        if batch is None:
            raise TypeError(f"{type(cb).__qualname__}.on_batch returned None at step {run.step + 1}: it "
                            "must return the batch, changed or not")
        batch = _as_dict(batch)
    return batch


def _raise_refused(run: Run, error: Exception, save_steps_done: Callable[[], None]) -> NoReturn:
    """Raises `error`, the refusal of a batch before its step changed a weight, once `save_steps_done` has saved
    the steps before it (where there are some that no checkpoint holds yet), naming that checkpoint."""
    if run.step == 0:
        raise error from None
    if run.checkpoint is None or checkpoint_step(run.checkpoint) != run.step:
        save_steps_done()
    raise type(error)(f"{error} (saved {run.checkpoint}: the {run.step} steps before it; run again "
                      "to resume)") from None


def _raise_if_ended_early(run: Run, steps: int, *, reader_gone: bool, interrupted: bool, exhausted: bool,
                          ran_out_on: list[int]) -> None:
    """Where fit's run ended before its `steps` (the steps done saved), says why by raising."""
    env = run.env
    if reader_gone:  # nothing more can be said there; the command line ends quietly (exit status 141)
        raise BrokenPipeError(errno.EPIPE, f"the progress's reader went away: stopped at step {run.step} of {steps}, "
                              f"saved {run.checkpoint}; run again to resume")
    if interrupted:
        if env.is_main:
            with contextlib.suppress(OSError):  # a hung-up terminal (EIO): saved all the same
                print(f"interrupted: saved {run.checkpoint}; run again to resume", file=sys.stderr)
        raise StoppedAndSaid
    if exhausted:  # a run that silently trained fewer steps than asked would mislead
        where = (f" on process{'es' if len(ran_out_on) > 1 else ''} {', '.join(map(str, ran_out_on))} (of "
                 f"{env.world_size})" if env.world_size > 1 else "")
        raise ValueError(f"the batches ran out{where} after {run.step} of steps={steps} (saved {run.checkpoint}); pass "
                         "steps= no larger than the batches hold, or use kpro.train.Batches, which reshuffles every "
                         "epoch" + ("; under torchrun every process must iterate the same global batches" if where
                                    else ""))


class TooFewBatches(ResumeRefused, ValueError):
    """A resume refused because a plain iterable ran out after `found` of the `steps` batches it must skip."""

    def __init__(self, message: str, found: int, steps: int):
        super().__init__(message)
        self.found, self.steps = found, steps


PastSteps = errors.PastSteps  # kpro.errors's, named here as commands and docs/training.md name it


# What fit's fetch of the next batch gives where it got none
_RAN_OUT, _INTERRUPTED = object(), object()


def _agree_on_requests(run: Run, interrupted: bool, ran_out: bool = False) -> tuple[bool, list[int]]:
    """`run.save_checkpoint()`, `run.stop()`, Ctrl-C and batches that ran out, on any process, on every process:
    saving is a collective, and a process stopping alone would leave the others waiting in the next step's. One
    small all-reduce a step; it cannot join the step's own, which comes before the callbacks' on_step_end. Returns
    whether any process was interrupted, and the processes whose batches ran out (one entry each, to name them)."""
    env = run.env
    requests = torch.zeros(3 + env.world_size, dtype=torch.float64)
    requests[:3] = torch.tensor([run._save_requested, run._stop_requested, interrupted], dtype=torch.float64)
    requests[3 + env.rank] = float(ran_out)
    agreed = distributed.all_reduce_sum(requests, env).cpu() > 0
    run._save_requested, run._stop_requested, interrupted = agreed[:3].tolist()
    return interrupted, agreed[3:].nonzero().flatten().tolist()


def _resume(run: Run, checkpoint: Path, batches, callbacks, settings: dict, fast_forward: bool):
    """Weights, optimizer, RNG states, step, callback states and data position from a checkpoint.

    A resume continues the same run: another kind of learning-rate schedule (warmup, floor), other
    optimizer hyperparameters (every param-group key but lr and the implementation flags) or optimizer class,
    clipping, precision or parameter dtypes than the checkpoint's are refused, naming what differs, rather than
    one set silently winning over the other. More (or fewer) total steps are allowed, which extends the run; a
    schedule that decays to its last step then decays to the new one. Whatever refuses the resume (these
    settings, the optimizer state, the data, a callback) does so before anything is loaded into the model, the
    data or the RNGs (a callback refusing its state: once those before it in the list loaded theirs). Returns
    the checkpoint's data position (a dict), where `fast_forward` the plain iterable's iterator past the steps
    done (else None), and the digests of the frozen weights as the run started where it recorded them (else None).
    """
    refuse_past_steps(checkpoint, run.total_steps)

    def check(state):
        lacking = [key for key in ("step", "callbacks") if key not in state]
        if lacking:  # a checkpoint of a hand-written loop (kpro.train.save_checkpoint with a state of its own)
            raise CheckpointError(f"{checkpoint} was not written by fit (its state lacks "
                                  f"{', '.join(map(repr, lacking))}), so fit cannot continue its run. Continue it "
                                  "with the loop that wrote it, or start fit in a new directory")
        differences = _settings_differences(checkpoint, state, settings, run.env)
        if differences:
            lines = [f"{name}: {saved!r} in the checkpoint, {now!r} now" + _dtypes_hint(name, saved, now)
                     for name, (saved, now) in differences.items()]
            raise OtherSettings(f"{checkpoint} was trained with other settings than this call asks for:\n  "
                                + "\n  ".join(lines) + "\nresume with the same settings (another number of "
                                "total steps is fine: it extends or shortens the run), or start a new run directory "
                                "(a checkpoint's weights alone load with kpro.load_pretrained)", differences)

    data = None

    def take(state):
        nonlocal data
        # The callbacks last, any of which may refuse its state: the RNGs (the fast-forward draws) and the data
        # position are put back then. (A callback before it in the list keeps the state it loaded: a callback's
        # state, best weights say, may be large, and its load_state_dict may record that it ran.)
        rng = rng_state()
        data_before = batches.state_dict() if hasattr(batches, "load_state_dict") and hasattr(batches, "state_dict") \
            else None
        try:
            if fast_forward:
                # A plain iterable may draw from the global RNGs (a shuffling DataLoader when iterated, a generator
                # at each batch): it re-makes the batches of the steps done from the state fit was called with, as
                # the first session did (the checkpoint's RNG states are loaded after this).
                data = iter(batches)
                _skip_consumed(data, state["step"])
            elif hasattr(batches, "load_state_dict"):
                batches.load_state_dict(state["data"])
            load_callback_states(callbacks, state["callbacks"])
        except BaseException:
            set_rng_state(rng)
            if data_before is not None:
                batches.load_state_dict(data_before)
            raise

    state = restore_checkpoint(checkpoint, run.model, run.optimizer, run.env, check=check, take=take)
    run.step, run.checkpoint, run.metrics = state["step"], checkpoint, state.get("metrics", {})
    # Said once the resume is taken: nothing refuses it from here
    saved, schedule = state.get("settings", {}).get("schedule"), settings["schedule"]
    if isinstance(saved, dict) and isinstance(schedule, dict) and saved.get("total_steps") != schedule["total_steps"] \
            and run.is_main:
        print(f"continuing the run with total_steps={schedule['total_steps']} (the checkpoint's run had "
              f"{saved.get('total_steps')}): the {schedule['kind']} schedule follows the new total from here",
              file=sys.stderr)
    return (state["data"] if isinstance(state.get("data"), dict) else {}), data, state.get(FROZEN_AT_START)


def _dtypes_hint(name: str, saved, now) -> str:
    """Where a run's weights were all of one dtype and the model given holds that one and others (float32 norms
    beside bfloat16 matrices, as load_pretrained(dtype="auto") now keeps them), how to give the run its model."""
    if name != "param_dtypes" or not isinstance(saved, str) or ", " in saved or saved not in str(now).split(", "):
        return ""
    return (f" (load_pretrained(dtype=\"auto\") keeps each tensor's stored dtype, where it once cast every tensor "
            f"to the dtype of most parameters: load the model with dtype=torch.{saved}, as this run's was)")


def _settings_differences(checkpoint: Path, state: dict, settings: dict, env) -> dict[str, tuple]:
    """The settings of this call that differ from those the checkpoint's run recorded: each setting's name (as the
    refusal says it: "schedule warmup_steps", "optimizer param group 0 peak_lr") to (its recorded value, this
    call's). Checkpoints written before (some) settings were saved, and schedules that are not a Schedule:
    unchecked."""
    recorded = state.get("settings", {})
    saved, schedule = recorded.get("schedule"), settings["schedule"]
    differences = {}
    if isinstance(saved, dict) and isinstance(schedule, dict):
        differences |= {_setting_name("schedule", key): (saved.get(key), schedule.get(key))
                        for key in sorted(set(saved) | set(schedule))
                        if key != "total_steps" and saved.get(key) != schedule.get(key)}
    differences |= {key: (recorded[key], value) for key, value in settings.items()
                    if key not in ("schedule", "param_groups") and key in recorded and recorded[key] != value}
    # A checkpoint of an older kpro has no param_groups setting: they are read from its optimizer state. One
    # without trained_params recorded its groups as the run started, not as it saved (a group added or a parameter
    # unfrozen since): there, the parameters were checked against its optimizer state instead, by name.
    groups = recorded.get("param_groups")
    if groups is None:
        groups = distributed.main_decides(lambda: _saved_hyperparameters(checkpoint, state),
                                          f"read the optimizer state of {checkpoint}", env)
    as_saved = "trained_params" in state
    if len(groups) != len(settings["param_groups"]) and "param_groups" in recorded and as_saved:
        differences["optimizer param groups"] = (len(groups), len(settings["param_groups"]))
    differences |= {_setting_name(i, key): (saved[key], value)
                    for i, (now, saved) in enumerate(zip(settings["param_groups"], groups))
                    for key, value in now.items() if key in saved and saved[key] != value
                    and (as_saved or key != "params")}
    return differences


def _saved_hyperparameters(checkpoint: Path, state: dict) -> list[dict]:
    """The param groups' hyperparameters in a checkpoint's optimizer state ([] where it holds none)."""
    if not state.get("has_optimizer_state"):
        return []
    return [_group_hyperparameters(group) for group in read_optimizer(checkpoint).get("param_groups", ())]


def _batch_rows(batch) -> int | None:
    """Rows of a batch of token ids (a [B, T] tensor, or a dict holding one as input_ids); None for others."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() else None


def _skip_consumed(data, steps_done: int) -> None:
    """Fast-forward a plain iterable past the batches of the checkpointed steps."""
    for skipped in range(steps_done):
        try:
            next(data)
        except StopIteration:
            raise TooFewBatches(f"cannot resume at step {steps_done}: the batches ran out after {skipped}, and a plain "
                                f"iterable is resumed by skipping the {steps_done} batches the checkpointed steps used; "
                                "pass the batches of the first run (or kpro.train.Batches, which resumes exactly)",
                                found=skipped, steps=steps_done) from None


def _param_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{**hyper, "params": len(group["params"])} for hyper, group in
            zip(_hyperparameters(optimizer), optimizer.param_groups)]


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings that a resume must not change: every key (torch's loader would copy the saved
    ones over the new optimizer's, silently), but its parameters (counted apart), its lr (the schedule sets it from
    peak_lr) and the implementation flags, which load_checkpoint leaves as the new optimizer has them."""
    return [_group_hyperparameters(group) for group in optimizer.param_groups]


def _group_hyperparameters(group: dict) -> dict:
    skip = {"params", "param_names", "lr", *IMPLEMENTATION_FLAGS}
    return {key: _plain(value) for key, value in group.items() if key not in skip}


def _plain(value):
    """A param-group value as a checkpoint holds it and `!=` compares it: tuples as lists, tensors as numbers. (One
    that a checkpoint cannot hold is refused when the optimizer is made: `check_param_groups_loadable`.)"""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def _train_step(run: Run, batch, loss_fn, grad_accum, clip, autocast, device, interrupt_requested: Callable[[], bool],
                per_process: bool = False):
    """Forward/backward over this process's micro-batches, then one optimizer step.

    Returns (the step's global loss, the gradient norm before clipping, whether any process was interrupted).
    """
    env, optimizer = run.env, run.optimizer
    run.check_optimizer_covers_the_trainable()
    # Gradients left from before fit (a check's backward) or by a callback since the last step (a probe's backward
    # in on_step_end or on_batch) would add to this step's
    for p in run.model.parameters():
        p.grad = None
    # A per-process batch is this rank's block of the global one already: cut it into micro-batches only.
    try:
        micro_batches = _refuse_unsplittable(batch, run, grad_accum, per_process)
    except (TypeError, ValueError) as err:
        # Saving the steps done is a collective, which processes whose batches did split would not join
        raise _RefusedBatch(err) if env.world_size == 1 else err
    totals, counts, summed = _backward_micro_batches(run, micro_batches, loss_fn, grad_accum, autocast, device)
    changed = _ddp_idle_changes(run)
    stats = _reduce_step_stats(run, batch, totals, counts, changed, interrupt_requested, per_process)
    _check_processes_agree(run, stats, changed)
    if summed:
        _scale_to_token_mean(run, stats.count)
    loss = stats.total / stats.count
    if not math.isfinite(loss):
        _stop(run, optimizer, f"the loss is {loss}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not math.isfinite(norm):  # a finite loss can still have NaN gradients: they must not reach the weights
        _stop(run, optimizer, f"the gradient norm is {float(norm)} (the loss {loss:.6g} is finite)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(norm), stats.interrupted > 0


def _backward_micro_batches(run: Run, micro_batches: list, loss_fn, grad_accum: int, autocast,
                            device) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Forward/backward over this process's micro-batches; returns their loss totals and loss-token counts (1 each
    for a scalar mean), as float64 tensors, and whether loss_fn returned LossSums."""
    train_model = run.train_model
    totals, counts, summed = [], [], None
    # DDP's first step runs without its reduction: `_ddp_idle_changes` averages it, finding the idle parameters
    first_ddp_step = isinstance(train_model, DistributedDataParallel) and run._ddp_idle is None
    for i, micro in enumerate(micro_batches):
        micro = _to_device(micro, device)
        with distributed.gradient_sync(train_model, i == len(micro_batches) - 1 and not first_ddp_step):
            with autocast():
                out = loss_fn(train_model, micro)
            is_sum = _check_loss(out)
            if summed is not None and is_sum != summed:
                raise TypeError("loss_fn returned a LossSum for some micro-batches and a scalar for others")
            summed = is_sum
            total = out.total if is_sum else out
            if not total.requires_grad and is_sum and _is_zero(out.count):
                raise ValueError(f"loss_fn returned a LossSum of no loss tokens for micro-batch {i} of step "
                                 f"{run.step + 1} whose total depends on no trainable parameter: compute it from the "
                                 "model's output even then (e.g. 0 * logits.sum()), so that every micro-batch runs "
                                 "a backward (under DDP each process must)")
            if not total.requires_grad:
                raise ValueError(f"the loss of step {run.step + 1} depends on no trainable parameter, so there is "
                                 "nothing to train: is every parameter frozen (requires_grad False)? A LoRA model "
                                 "trains with an adapter active: fit kpro.lora.AdaptedModel(model, name)")
            (total if is_sum else total / grad_accum).backward()
        # float64: the sums, and so the logged loss, must not depend on how the batch was split
        totals.append(total.detach().double())
        counts.append(torch.as_tensor(out.count if is_sum else 1, device=total.device).double())
    return totals, counts, summed


def _ddp_idle_changes(run: Run) -> set[str]:
    """Under DDP, after the backward: at the first step, average its gradients and note which trainable parameters
    got none; at a later one, the names of those whose having no gradient changed since (empty elsewhere). One idle
    since would leave DDP's reduction unfinished; one idle at the first, outside DDP, would train apart."""
    if not isinstance(run.train_model, DistributedDataParallel):
        return set()
    if run._ddp_idle is None:
        run.train_model, idle = distributed.finish_first_ddp_step(run.train_model, run.env)
        run._ddp_idle = [(name, p, name in idle) for name, p in run.model.named_parameters() if p.requires_grad]
        return set()
    return {name for name, p, idle in run._ddp_idle if (p.grad is None) != idle}


class _StepStats(NamedTuple):
    """A step's numbers summed over every process by its one collective."""
    total: float  # of the loss: summed LossSum totals, or micro-batch means
    count: float  # loss tokens, or micro-batches where loss_fn returns a mean
    interrupted: float  # processes that got Ctrl-C
    idle_changed: float  # DDP's idle parameters that changed, as each process counts them
    fingerprints: float  # the batch fingerprints f
    squares: float  # f^2


def _reduce_step_stats(run: Run, batch, totals: list[torch.Tensor], counts: list[torch.Tensor], changed: set[str],
                       interrupt_requested: Callable[[], bool], per_process: bool) -> _StepStats:
    """One collective per step: loss, loss-token count, whether any process got Ctrl-C, whether DDP's idle
    parameters changed on any process, and the batch's fingerprint f and f^2, whose sums over the W processes
    satisfy W * sum(f^2) == sum(f)^2 only where every f is the same (exact: f < 2^20)."""
    env = run.env
    fingerprint = torch.zeros((), dtype=torch.int64, device=totals[0].device)
    if env.world_size > 1 and not per_process:  # a per-process batch is this process's own rows
        fingerprint = distributed.batch_fingerprint(batch).to(totals[0].device)
    flags = torch.tensor([float(interrupt_requested()), len(changed)], device=totals[0].device, dtype=torch.float64)
    stats = torch.cat([torch.stack([torch.stack(totals).sum(), torch.stack(counts).sum()]), flags,
                       torch.stack([fingerprint, fingerprint * fingerprint]).double()])
    return _StepStats(*distributed.all_reduce_sum(stats, env).cpu().tolist())


def _check_processes_agree(run: Run, stats: _StepStats, changed: set[str]) -> None:
    """Refuses the step, its gradients dropped, where the processes' batches differ or DDP's idle parameters
    changed on some process."""
    env, optimizer = run.env, run.optimizer
    if env.world_size * int(stats.squares) != int(stats.fingerprints) ** 2:
        optimizer.zero_grad(set_to_none=True)
        raise ValueError(f"the {env.world_size} processes passed different batches at step {run.step + 1}: fit "
                         "expects the same global batches on every process and gives each process its share of the "
                         "rows, so a DataLoader with a DistributedSampler, which gives each process its own rows, "
                         f"would train on 1/{env.world_size} of them; pass every process the same batches (no "
                         "DistributedSampler, the same shuffling seed; or kpro.train.Batches), or a per-process source "
                         "(kpro.train.TokenShards)")
    if stats.idle_changed:
        optimizer.zero_grad(set_to_none=True)
        raise ValueError(f"the trainable parameters that get no gradient changed after the first step under DDP, at "
                         f"step {run.step + 1} ({listed(sorted(changed)) if changed else 'on another process'}): DDP "
                         "averages the gradients of a set of parameters fixed at the first step; use "
                         "parallel='fsdp', or make the loss use the same parameters at every step")


def _scale_to_token_mean(run: Run, count: float) -> None:
    """Gradients hold sum-of-loss gradients, averaged over processes by DDP/FSDP: make them the mean over the step's
    `count` loss tokens, whatever their spread over micro-batches and processes. A step of no loss tokens is
    refused."""
    optimizer = run.optimizer
    if count == 0:  # summed over every process: they all refuse it
        optimizer.zero_grad(set_to_none=True)
        raise _RefusedBatch(ValueError(no_loss_tokens_message(f"the batch of step {run.step + 1}")))
    scale = run.env.world_size / count
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(scale)


def _refuse_unsplittable(batch, run: Run, grad_accum: int, per_process: bool) -> list:
    """The batch's micro-batches; one that cannot be split is refused naming its step."""
    try:
        return distributed.split_batch(batch, run.env, grad_accum, per_process=per_process)
    except (TypeError, ValueError) as err:
        raise type(err)(f"the batch of step {run.step + 1}: {err}") from None


class _RefusedBatch(Exception):
    """`error`, a batch refused by `_train_step` before the step changed any weight, on every process alike."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _is_zero(count) -> bool:
    return bool(torch.as_tensor(count).eq(0).all())


def _stop(run, optimizer, what: str):
    optimizer.zero_grad(set_to_none=True)
    last = (f"the last good checkpoint is {run.checkpoint}" if run.checkpoint is not None
            else "no checkpoint was saved before it")
    # Weights already non-finite (an optimizer step of 0 / 0: a factory's AdamW of eps=0) took a step whose loss
    # and gradient norm were finite: checkpoints since hold them. Looked for here, once, not at every step.
    bad = _non_finite(run.model.named_parameters())
    if bad:
        last = f"the weights were non-finite before it ({listed(bad)}): an earlier step made them so, and " + \
            _last_finite_checkpoint(run)
    raise FloatingPointError(f"{what} at step {run.step + 1}: stopped before its optimizer step; {last} (a lower "
                             "learning rate, float32 or bfloat16 weights instead of float16, or clipping may help)")


def _non_finite(named_tensors) -> list[str]:
    """The names of the tensors holding a NaN or inf (of a sharded parameter: in this process's shard)."""
    return [name for name, t in named_tensors
            if t.is_floating_point() and not bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())]


def _last_finite_checkpoint(run) -> str:
    """Says which of the run's checkpoints, newest first, is the last whose weights are all finite."""
    candidates = [c for c in reversed(list_checkpoints(run.out_dir)) if checkpoint_step(c) <= run.step]
    if run.checkpoint is not None and not any(c.resolve() == Path(run.checkpoint).resolve() for c in candidates):
        candidates.append(Path(run.checkpoint))  # resumed from another directory: before those here
    bad = []
    for checkpoint in candidates:
        if not _non_finite(read_model(checkpoint, run.model).items()):
            break
        bad.append(checkpoint.name)
    else:
        checkpoint = None
    held = f"{', '.join(bad)} hold{'s' if len(bad) == 1 else ''} non-finite weights"
    if checkpoint is not None:
        return f"the last good checkpoint is {checkpoint}" + (f" ({held})" if bad else "")
    return f"no checkpoint of the run holds finite weights ({held})" if bad else "no checkpoint was saved before it"


def _check_loss(out) -> bool:
    """Whether loss_fn's output is a LossSum (else a scalar tensor); anything else is refused, a plain tuple
    such as `(loss, logits)` above all, which must not pass for a (total, count) pair."""
    if isinstance(out, LossSum):
        if not isinstance(out.total, torch.Tensor) or out.total.dim() != 0:
            raise ValueError("loss_fn's LossSum.total must be a scalar tensor")
        count = torch.as_tensor(out.count)
        if count.dim() != 0 or count.is_floating_point() or count.dtype == torch.bool:
            raise ValueError(f"loss_fn's LossSum.count must be a scalar integer (the loss tokens), got {count!r}")
        return True
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor or a kpro.train.LossSum, got {type(out).__name__}"
                        + (" (return the loss alone, not a tuple)" if isinstance(out, tuple) else ""))
    if out.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar loss (or a LossSum), got shape {tuple(out.shape)}")
    return False


def _as_dict(batch):
    """A mapping that is not a dict (Hugging Face's BatchEncoding) as a dict: fit moves, splits and counts dicts."""
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _count_tokens(batch) -> int:
    """Real (non-padding) tokens in a global batch, for tokens/s."""
    if isinstance(batch, dict):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].numel()
    return 0


def _total_steps(steps, batches) -> int:
    if steps is None:
        if not hasattr(batches, "__len__"):
            raise ValueError("pass steps=: the batches have no length to take it from")
        steps = len(batches)
        if steps == 0:  # not the caller's steps=, which it did not pass
            raise ValueError("the batches hold no batch (len(batches) is 0), so there is no step to train: pass "
                             "batches that hold some (an empty list of examples? a DataLoader of an empty dataset?)")
    if not _positive_int(steps):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _check_partial_batch(batches, parts: int, steps: int) -> None:
    """A `Batches` or torch `DataLoader` that keeps its last, smaller batch: refused now if that batch cannot be
    split (it would fail an epoch into the run, or at a DataLoader's last step, the steps before it unsaved). A
    DataLoader only where the run reaches that batch, and where its size is known: a sized dataset batched by
    batch_size (not a batch_sampler of one's own, nor an IterableDataset)."""
    if isinstance(batches, DataLoader):
        _check_dataloader_last_batch(batches, parts, steps)
    if not isinstance(batches, Batches) or batches.drop_last:
        return
    rest = len(batches.examples) % batches.batch_size
    if rest and rest % parts:
        raise ValueError(f"the last batch of each epoch holds {rest} of the {len(batches.examples)} examples "
                         f"(Batches(drop_last=False)), which cannot be split into {parts} micro-batches (processes "
                         "x grad_accum); pass drop_last=True, or a number of examples that splits")


def _check_dataloader_last_batch(loader: DataLoader, parts: int, steps: int) -> None:
    if loader.batch_size is None or loader.drop_last or isinstance(loader.dataset, IterableDataset):
        return
    try:
        examples = len(loader.sampler)
    except TypeError:  # a sampler without a length
        return
    rest, last = examples % loader.batch_size, math.ceil(examples / loader.batch_size)
    if rest and rest % parts and steps >= last:
        raise ValueError(f"the DataLoader's last batch (step {last}) holds {rest} of its {examples} examples "
                         f"(drop_last=False), which cannot be split into {parts} micro-batches (processes x "
                         "grad_accum); pass the DataLoader drop_last=True, a number of examples that splits, or "
                         f"steps= below {last}")


def _check_same_data(batches, env: distributed.DistEnv) -> None:
    """Under torchrun every process must iterate the same global batches, of which fit gives each its rows
    (a per-process source its own rows of them): data told apart by rank (a seed per rank, a TokenShards given
    another rank or world size) would train some rows on several processes and others never. Compared where
    the batches say what they are (`state_dict()`, and `process()` for a per-process source; the position of
    a `Batches` or `TokenShards` aside, which fit sets)."""
    per_process = bool(getattr(batches, "per_process", False)) and hasattr(batches, "process")
    if env.world_size == 1:
        if per_process and tuple(batches.process()) != (0, 1):  # it would train on its share of the rows only
            rank, world_size = batches.process()
            raise ValueError(f"{type(batches).__name__} takes the rows of process {rank} of {world_size}, and this run "
                             "has one process: pass neither rank nor world_size, or run under torchrun")
        return
    state = batches.state_dict() if hasattr(batches, "state_dict") else None
    if isinstance(batches, (Batches, TokenShards)):
        # fit sets where these start (restart() for a new run, the checkpoint's position on resume): where each
        # process's object stood (rank 0 looked at a batch, say) does not matter, what they are of does
        state = {key: value for key, value in state.items() if key not in ("epoch", "index")}
    mine = (tuple(batches.process()) if per_process else None, state)
    everyone = distributed.gather_objects(mine, env)  # every process decides alike: none is left waiting
    wrong = [f"process {rank} takes the rows of process {process[0]} of {process[1]}"
             for rank, (process, _) in enumerate(everyone) if process is not None and process != (rank, env.world_size)]
    if wrong:
        raise ValueError(f"{type(batches).__name__} under {env.world_size} processes: {'; '.join(wrong)}, so rows "
                         "would be trained twice or never; pass it the process group's rank and world_size, or "
                         "neither (torchrun's are used)")
    states = [state for _, state in everyone]
    try:
        same = all(state == states[0] for state in states)
    except (RuntimeError, TypeError, ValueError):  # states holding tensors: cannot be told apart this way
        return
    if not same:
        keys = sorted({key for state in states if isinstance(state, dict) for key in state}, key=str)
        differences = [f"{key}: " + ", ".join(f"{state.get(key)!r} on process {rank}" for rank, state in
                                              enumerate(states)) for key in keys
                       if len({repr(state.get(key)) for state in states if isinstance(state, dict)}) > 1]
        raise ValueError(f"the {env.world_size} processes iterate different data ({type(batches).__name__}.state_dict() "
                         f"differs: {'; '.join(differences) or states}); pass every process the same global batches "
                         "(same examples, seed and position): fit gives each process its rows of them")


def _check_same_settings(settings: dict, env: distributed.DistEnv) -> None:
    """Under torchrun every process must train the same run: another `steps` on one left the others waiting in a
    collective until the process group timed out, another lr or clipping trained the replicas apart, silently.
    Refused on every process (all decide on the same gathered values), naming each setting and its values."""
    if env.world_size == 1:
        return
    everyone = [_flat_settings(mine) for mine in distributed.gather_objects(settings, env)]
    keys = list(dict.fromkeys(key for flat in everyone for key in flat))
    differences = [f"{key}: " + ", ".join(f"{flat.get(key)!r} on process {rank}" for rank, flat in enumerate(everyone))
                   for key in keys if len({repr(flat.get(key)) for flat in everyone}) > 1]
    if differences:
        raise ValueError(f"the {env.world_size} processes were given different fit settings ({'; '.join(differences)})"
                         ": every process must call fit with the same arguments (and optimizer factory), or they "
                         "train apart or wait for each other")


def _flat_settings(settings: dict) -> dict:
    """`schedule kind`, `optimizer param group 0 peak_lr`: each setting by a name a message can give."""
    flat = {}
    for key, value in settings.items():
        if key == "param_groups":
            flat["optimizer param groups"] = len(value)
            flat.update({_setting_name(i, name): item for i, group in enumerate(value) for name, item in group.items()})
        elif key == "schedule" and isinstance(value, dict):
            flat.update({_setting_name("schedule", name): item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def _setting_name(group: str | int, key: str) -> str:
    """A key of the schedule (group "schedule") or of param group `group` (its index), as both the resume's and
    torchrun's refusals name it: "schedule warmup_steps", "optimizer param group 0 parameter count"."""
    if group == "schedule":
        return f"schedule {key}"
    return f"optimizer param group {group} {'parameter count' if key == 'params' else key}"


def _describe(schedule) -> str:
    """A schedule that is not a `Schedule` (a function of the step), by its name: what processes can compare."""
    return getattr(schedule, "__qualname__", type(schedule).__qualname__)


def _positive_int(value) -> bool:
    return is_integer(value) and value >= 1


def _check_args(optimizer, lr, weight_decay, grad_accum, clip, precision, save_every, keep_last, log_every=None,
                resume=True, out_dir=None) -> None:
    if optimizer is not None and (lr is not None or weight_decay):
        raise ValueError("lr and weight_decay configure the default AdamW; with an optimizer factory, set them there")
    if optimizer is not None and not callable(optimizer):
        raise TypeError("optimizer must be a function model -> torch.optim.Optimizer (fit calls it again to reset it)")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0 or math.isinf(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not _positive_int(grad_accum):
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0):
        raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if save_every is not None and not _positive_int(save_every):
        raise ValueError(f"save_every must be a positive integer or None, got {save_every!r}")
    if not _positive_int(keep_last):
        raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
    if log_every is not None and not _positive_int(log_every):  # on every process: only rank 0 makes the progress line
        raise ValueError(f"log_every must be a positive integer or None (every 5% of the run), got {log_every!r}")
    if not isinstance(resume, (bool, str, os.PathLike)) and resume is not None:
        raise TypeError(f"resume must be True, False or the path of a checkpoint, got {resume!r}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is a file, not a run directory")


def _check_callbacks(callbacks) -> list[Callback]:
    """`callbacks` as a list of `Callback` instances, refused before anything is written: fit calls every hook, so a
    class (not an instance) or an object of some hooks would fail only at the first hook it lacks, out_dir made."""
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a list of kpro.train.Callback instances, got a {type_name(callbacks)}")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if isinstance(cb, type):
            raise TypeError(f"callbacks[{i}] is the class {cb.__module__}.{cb.__qualname__}, not an instance: pass "
                            f"{cb.__qualname__}(...)")
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}] is a {type_name(cb)}, not a kpro.train.Callback: subclass "
                            "kpro.train.Callback (its hooks do nothing until overridden) and pass an instance")
    return callbacks


def _check_schedule_covers(schedule, steps: int) -> None:
    """A Schedule decaying to 0 must last the run: past its total_steps the lr stays 0 and the steps train
    nothing. (Holding a floor above 0 after the decay is a documented use.)"""
    if (isinstance(schedule, Schedule) and schedule.kind != "constant" and schedule.min_ratio == 0
            and schedule.total_steps < steps):
        raise ValueError(f"the {schedule.kind} schedule decays to 0 at total_steps={schedule.total_steps}, before "
                         f"steps={steps}: the last {steps - schedule.total_steps} steps would train at lr 0; give the "
                         f"Schedule total_steps={steps}, or a min_ratio above 0 to hold a floor")


def _precision(precision: str, model: nn.Module) -> str:
    """What `precision` means for this model: "bf16" (autocast) or "fp32"."""
    first = next(model.parameters())
    if first.dtype == torch.float64:  # autocast leaves float64 as it is
        if precision == "bf16":
            raise ValueError("precision='bf16' autocasts float32 operations, and this model is float64: it would run "
                             "in float64 as asked for nothing; pass precision='fp32', or cast the model")
        return "fp32"
    return "bf16" if precision == "bf16" or (precision == "auto" and first.device.type == "cuda") else "fp32"


def _autocast(precision: str, model: nn.Module):
    if _precision(precision, model) == "bf16":
        return lambda: torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _checkpoint_to_resume(out_dir: Path, resume) -> Path | None:
    if resume is True:
        return latest_checkpoint(out_dir)
    if resume is False or resume is None:
        if list_checkpoints(out_dir):
            raise CheckpointError(f"{out_dir} already holds checkpoints ({latest_checkpoint(out_dir).name} is the newest); "
                                  "pass resume=True to continue that run, or choose another directory")
        return None
    path = Path(resume)
    if path.is_file():  # a file of a checkpoint (trainer_state.pt, say): "does not exist" below would mislead
        raise NotADirectoryError(f"resume={str(path)!r} is a file; pass the checkpoint directory (step-XXXXXXXX)"
                                 + (f", {path.parent}" if STEP_DIR.fullmatch(path.parent.name) else ""))
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from does not exist: {path}")
    own = [p.name for p in list_checkpoints(out_dir)]
    if own and not _inside(path, out_dir):  # they, and their metrics, would mix with this run
        raise CheckpointError(f"{out_dir} holds checkpoints of its own ({', '.join(own)}); to continue {path} there "
                              "would mix two runs: resume it into another directory, or pass resume=True to continue "
                              "the run of this one")
    newer = [p.name for p in list_checkpoints(out_dir) if checkpoint_step(p) > checkpoint_step(path)]
    if newer:  # they belong to the run being rewound: a later resume=True would pick them up
        raise CheckpointError(f"{out_dir} holds checkpoints newer than {path.name} ({', '.join(newer)}); to rewind "
                              "to it, move those away first, or resume into another directory")
    return path


def _inside(checkpoint: Path, out_dir: Path) -> bool:
    return Path(checkpoint).resolve().parent == Path(out_dir).resolve()


class _InterruptToStop:
    """Ctrl-C, SIGTERM or SIGHUP during fit asks for a stop at the end of the current step, with a checkpoint.

    SIGTERM is what a scheduler (SLURM, Kubernetes, torchrun) sends before it kills a job: the checkpoint
    must be written within its grace period. A second Ctrl-C, more than a second after the first, quits at
    once without saving. (torchrun forwards the terminal's SIGINT to its workers, which get the terminal's
    own as well: the duplicate, milliseconds apart, must not abort the save.) A second SIGTERM changes
    nothing: the scheduler's SIGKILL follows anyway. SIGHUP (the terminal closed: an ssh session dropped) is
    taken as SIGTERM, where it is not ignored (nohup ignores it); the notice it cannot write to the closed
    terminal is left out. Only the main thread can take signals; elsewhere they behave as usual.
    """

    def __init__(self, announce: bool = True):
        self.announce = announce  # under torchrun rank 0 alone says so: every process gets the signal

    def __enter__(self):
        self.requested, self.first, self.previous = False, 0.0, {}
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            # Not where a signal is ignored on purpose (a background job, nohup): leave that as it is.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested and signum == signal.SIGINT and now - self.first > 1.0:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.first = True, now
            what = stop_name(signum)
            if self.announce:
                again = " again" if what == "Ctrl-C" else ""  # a SIGTERM again changes nothing
                with contextlib.suppress(OSError):  # a hung-up terminal (EIO): the stop goes on unsaid
                    print(f"\n{what}: stopping after this step with a checkpoint (press Ctrl-C{again} to quit "
                          "without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            if previous is None:  # a handler set outside Python; Python's own is the best stand-in
                previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous)
