"""AdamW over parameter groups, and learning-rate schedules as plain functions of the step.

A schedule holds no state: the learning rate of step s is `peak · schedule(s)`, so resuming, or
re-creating the optimizer mid-run, can never put it out of step. `peak` is each param group's
`peak_lr` (set from its `lr` when the optimizer is made), so groups may have different peaks.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import nn

from .._numbers import is_integer
from .data import check_flag

SCHEDULES = ("constant", "linear", "cosine")


def check_lr(lr, what: str = "learning rate") -> float:
    """`lr` as a float. Any real number (a NumPy float32 from a sweep too), as for the counts below: the values go
    into checkpoints, which take Python numbers only."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0 or math.isinf(lr):
        raise ValueError(f"{what} must be a positive finite number, got {lr!r}")
    return float(lr)


def check_weight_decay(weight_decay) -> float:
    """`weight_decay` as a float: any real number >= 0 (a NumPy one too), as check_lr takes the lr."""
    if not _is_real(weight_decay) or not 0 <= weight_decay < math.inf:  # NaN fails 0 <= x
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    return float(weight_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (decayed) and vectors — norms, biases, any 1-D
    parameter — which weight decay would only pull towards zero for no benefit. Frozen ones are left out."""
    weight_decay = check_weight_decay(weight_decay)
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():  # parameters() yields a tied weight once
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(model: nn.Module, lr: float = 3e-4, *, weight_decay: float = 0.0, betas=(0.9, 0.999),
          eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, without weight decay on norms and biases.

    `fused=None` uses the fused CUDA implementation for parameters on a GPU. On the CPU, torch's multi-tensor
    (`foreach`) implementation: the same element-wise operations as its per-parameter default, bit for bit,
    in fewer Python calls.
    """
    lr = check_lr(lr)
    # Python floats, as lr and weight_decay: the param groups go into checkpoints, which take no NumPy numbers
    # eps = 0: a zero gradient (the embedding row of a token not in the batch) makes a step of 0 / 0, a NaN weight
    if not _is_real(eps) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps!r} (AdamW divides by sqrt(v) + eps, and a "
                         "zero gradient makes v 0)")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        beta1 = beta2 = None
    if not all(_is_real(beta) and 0 <= beta < 1 for beta in (beta1, beta2)):
        raise ValueError(f"betas must be two numbers in [0, 1) (beta1, beta2), got {betas!r}")
    if fused is not None:
        fused = check_flag(fused, "fused", " (or None: fused on a GPU)")
    eps, betas = float(eps), (float(beta1), float(beta2))
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **implementation(model, fused, eps))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_eps_holds(model: nn.Module, eps: float, fused: bool = False) -> None:
    """Refuse trainable float16 parameters, and parameters of a dtype where `eps` rounds to 0 (float32 with 1e-50):
    AdamW's unfused implementations compute in the parameter's dtype, op by op, so a zero gradient (a fresh
    expansion's new blocks at step 1), or one whose square underflows, makes a step divided by 0: NaN. The fused
    kernel computes bfloat16 and float32 parameters in float32: there `eps` must hold in float32. Float16
    is refused whatever `eps` (`_refuse_float16`)."""
    holds = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dtype == torch.float16:
            _refuse_float16(name)
        computed = torch.float32 if fused and p.dtype == torch.bfloat16 else p.dtype
        if computed not in holds:
            holds[computed] = torch.tensor(eps, dtype=computed).item() != 0
        if holds[computed]:
            continue
        if computed != p.dtype:
            raise ValueError(f"parameter {name} is {str(p.dtype).removeprefix('torch.')}, which AdamW's fused kernel "
                             f"computes in float32, where eps={eps} is 0: a zero or tiny gradient divides by 0 (a NaN "
                             f"step); pass an eps that float32 holds (at least {_smallest(torch.float32):.2g})")
        dtype = str(p.dtype).removeprefix("torch.")
        raise ValueError(f"parameter {name} is {dtype}, where AdamW's eps={eps} is 0: a zero or tiny gradient divides "
                         f"by 0 (a NaN step); pass an eps that {dtype} holds (at least {_smallest(p.dtype):.2g})")


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive number `dtype` holds (a subnormal: an eps only needs not to be 0)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


FLOAT16_REFUSED = ("AdamW cannot train: its second moment, kept in float16, underflows to 0 for gradients below about "
                   "5e-3 (beta2 0.999), and their steps blow up (a NaN loss within a few steps); keep the weights in "
                   "float32 (bf16 autocast, fit's precision on a GPU, still computes in half precision) or bfloat16")


def _refuse_float16(name: str) -> None:
    """AdamW keeps its moments in the parameter's dtype (torch's fused kernel too, computing in float32 between):
    in float16 the second moment, (1 - beta2)·g², is 0 for every gradient below about 5.5e-3 (beta2 0.999), and
    such a weight's step is lr·g/eps, not about lr: with eps 1e-6 a tiny LLaMA's loss went from 4.2 to 67 in one
    step (1e-7: NaN at step 2); a larger eps only damps every update, the others' too."""
    raise ValueError(f"parameter {name} is float16, which {FLOAT16_REFUSED}")


def implementation(model: nn.Module, fused: bool | None = None, eps: float = 1e-8) -> dict:
    """AdamW's `fused`/`foreach` keywords for the model's trainable parameters (see `adamw`); float16 parameters
    are refused, and others where `eps` is 0 in the dtype their step computes in (`check_eps_holds`: their own
    unfused, float32 for bfloat16 fused)."""
    devices = {p.device.type for p in model.parameters() if p.requires_grad}
    if fused is None:
        fused = devices == {"cuda"}
    check_eps_holds(model, eps, fused=bool(fused))
    return {"fused": fused or None, "foreach": True if not fused and devices == {"cpu"} else None}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The fraction of the peak learning rate at each optimizer step s (0-based).

    Warmup: (s + 1) / warmup_steps for s < warmup_steps, so the first step already learns.
    Then `constant` stays at 1; `linear` and `cosine` decay from 1 at s = warmup_steps to `min_ratio`
    at s = total_steps and stay there. With `decay_steps`, they hold 1 until total_steps − decay_steps
    and decay over the last decay_steps only (warmup, stable, decay).
    """

    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_ratio: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose from {', '.join(SCHEDULES)}")
        if not is_integer(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if isinstance(self.min_ratio, bool) or not isinstance(self.min_ratio, numbers.Real) or \
                not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be a number in [0, 1], got {self.min_ratio!r}")
        if self.kind != "constant":
            if not is_integer(self.total_steps):
                raise ValueError(f"a {self.kind} schedule needs total_steps > warmup_steps, an integer (where its "
                                 f"decay ends), got total_steps={self.total_steps!r}")
            if self.total_steps <= self.warmup_steps:
                raise ValueError(f"a {self.kind} schedule needs total_steps > warmup_steps "
                                 f"(got total_steps={self.total_steps}, warmup_steps={self.warmup_steps})")
        if self.kind == "constant" and self.total_steps is not None:  # it would be ignored
            raise ValueError(f"total_steps is where a linear or cosine schedule ends its decay; a constant one has "
                             f"none (got total_steps={self.total_steps!r}): leave it out")
        if self.kind == "constant" and self.min_ratio != 0.0:
            raise ValueError(f"min_ratio needs a linear or cosine schedule (a constant one never decays), got "
                             f"min_ratio={self.min_ratio!r}")
        if self.decay_steps is not None:
            if self.kind == "constant":
                raise ValueError("decay_steps needs a linear or cosine schedule (a constant one never decays)")
            if not is_integer(self.decay_steps) or not 1 <= self.decay_steps <= self.total_steps - self.warmup_steps:
                raise ValueError(f"decay_steps must be an integer from 1 to total_steps - warmup_steps "
                                 f"({self.total_steps - self.warmup_steps}), got {self.decay_steps!r}")
        # Python numbers (a NumPy one is an integer too): the schedule is saved in checkpoints and compared on resume
        for name in ("warmup_steps", "total_steps", "decay_steps", "min_ratio"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value) if name == "min_ratio" else int(value))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        start = self.warmup_steps if self.decay_steps is None else self.total_steps - self.decay_steps
        progress = min(1.0, max(0, step - start) / (self.total_steps - start))
        if self.kind == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def remember_peak_lr(optimizer: torch.optim.Optimizer) -> None:
    """Record each group's `lr` as its `peak_lr` (once), checking that it is positive."""
    for i, group in enumerate(optimizer.param_groups):
        peak = group.setdefault("peak_lr", group["lr"])
        check_lr(float(peak), f"learning rate of param group {i}")


def set_lr(optimizer: torch.optim.Optimizer, schedule, step: int) -> float:
    """Set every group's lr to peak_lr · schedule(step) (peak_lr: the group's lr at the first call);
    returns the first group's lr. The factor may be any real number >= 0, a NumPy one too (taken as a float)."""
    factor = schedule(step)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 <= factor < math.inf:
        # a negative factor trains uphill, a NaN one turns every weight NaN: neither is a learning rate
        raise ValueError(f"the schedule gave the factor {factor!r} at step {step}; a schedule's factor must be a "
                         "finite number >= 0 (the lr is peak_lr times it)")
    # a NumPy factor (np.cos) made every lr a NumPy number, which metrics.jsonl and checkpoints cannot hold
    factor = float(factor)
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("peak_lr", group["lr"]) * factor
    return optimizer.param_groups[0]["lr"]
