"""Causal language-model loss in fp32 (float64 for float64 inputs), with labels of -100 left out.

Labels are aligned with `input_ids` (the Hugging Face convention): the logits at position t predict
`labels[:, t + 1]`, so `labels = input_ids` trains on every token and -100 masks a prompt or padding.

`causal_lm_loss` takes logits; `causal_lm_loss_from_hidden` takes the final hidden states and the head's
weight and never makes the logits (`kpro.ops.linear_cross_entropy`). `lm_loss`, fit's default, takes the
second way on a kpro.Llama whose head is its weight alone (`kpro.model.head_is_its_weight`), else the first.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import lora, ops
from ..model import Llama, head_is_its_weight, module_hooks
from ..ops.backend import values_readable

IGNORE_INDEX = -100


class LossSum(NamedTuple):
    """A loss summed over `count` tokens. `fit` divides by the count of the whole optimizer step (every
    micro-batch on every process), so batches with more loss tokens weigh more, exactly as one big batch."""

    total: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions `causal_lm_loss` scores: labels after the first position that are not -100."""
    _check_label_dtype(labels)  # -100 is 156 in uint8
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of `logits` [B, T, V] against `labels` [B, T], computed in fp32 (float64 for
    float64 logits, as `causal_lm_loss_from_hidden` does).

    `reduction="mean"` averages over the scored tokens: a batch with none is an error (a mean over nothing
    is NaN, and it usually means the prompts filled the whole sequence). `"sum"` adds them up (0 for none:
    one micro-batch may have none when the others of its step have some; `fit` checks the step).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    _check_label_dtype(labels)
    # bf16 and fp16 logits are widened to fp32; float64 ones stay float64 (linear_cross_entropy keeps it too)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(dtype), labels[:, 1:].flatten().long(),  # int32 too
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return _reduce(total, labels, reduction)


def _check_label_dtype(labels: torch.Tensor) -> None:
    """Token ids: int64 or int32. Float labels were cast to int64, 3.7 read as token 3, silently (soft targets
    or probabilities, which a float tensor may hold, are not what this loss takes); in uint8 the -100 given to
    the last position (next_token_targets) wrapped to 156, a token trained on, and int8 and int16 hold only
    part of a vocabulary (ids cast to them wrapped before they came here)."""
    if labels.dtype not in (torch.int64, torch.int32):
        narrow = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
        raise ValueError(f"labels must be an integer tensor of token ids (or -100), int64 or int32, got {labels.dtype}"
                         + (": ids, or -100, wrap in it; make them int64 where they are built" if narrow else ""))


def _reduce(total: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """The summed loss as asked: "sum" as it is, "mean" over the loss tokens (none is an error)."""
    if reduction == "sum":
        return total
    count = count_loss_tokens(labels)
    message = no_loss_tokens_message(f"the batch of {labels.shape[0]} row(s)")
    if not values_readable(count):  # compiling (no graph break), or fake or meta tensors
        torch._assert_async(count > 0, message)
    elif int(count) == 0:
        raise ValueError(message)
    return total / count


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] shifted left: position t's target is labels[t + 1], the last position's none
    (IGNORE_INDEX). Shifting the labels, not the hidden states, leaves the latter uncopied."""
    _check_label_dtype(labels)  # the IGNORE_INDEX added here would wrap to 156 in uint8
    return torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)), dim=1)


def no_loss_tokens_message(what: str) -> str:
    return (f"{what} has no loss tokens: every label after the first position is {IGNORE_INDEX} "
            "(prompts too long for the sequence length?)")


def causal_lm_loss_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, *,
                               reduction: str = "mean") -> torch.Tensor:
    """`causal_lm_loss` of the logits `hidden @ head_weight.T`, computed without them.

    hidden [B, T, d] is what the head reads (a kpro.Llama's `model(ids, mask, head=False)`), head_weight
    [V, d] the head's weight (`lm_head.weight`), labels [B, T] as for `causal_lm_loss`; same reductions,
    same result (fp32, float64 for float64 inputs) up to rounding, and no [B, T, V] tensor: `kpro.ops.linear_cross_entropy` goes through
    the vocabulary in chunks (torch) or tiles (Triton), and computes no weight gradient for a frozen head.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, d] and labels [B, T]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    _check_label_dtype(labels)
    targets = next_token_targets(labels)
    total = ops.linear_cross_entropy(hidden, head_weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return _reduce(total, labels, reduction)


def output_head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The head weight of the kpro.Llama that `model` is, or wraps transparently (DDP, torch.compile, a
    `lora.AdaptedModel`), so its forward takes `head=False`, for a loss to take with those hidden states in
    place of the logits. None for any other model, for a head that is more than its weight (a bias, hooks,
    another module: `kpro.model.head_is_its_weight`), and where a hook watches the model or a wrapper: given
    `head=False`, it would see (and could change) the hidden states in place of the logits. The logits must then
    come from the model's forward."""
    while True:
        if any(not _distributed_own(hook) for hook in module_hooks(model)):
            return None
        if isinstance(model, Llama):
            break
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, lora.AdaptedModel):
            model = model.model
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return None
    return model.lm_head.weight if head_is_its_weight(model.lm_head) else None


def _distributed_own(hook) -> bool:
    """A hook torch.distributed puts on the modules it wraps (FSDP2's all-gather before the forward and reshard
    after it), which changes no value the model computes."""
    return getattr(hook, "__module__", "").startswith("torch.distributed.")


def head_cross_entropy(out: torch.Tensor, head_weight: torch.Tensor | None, targets: torch.Tensor, *,
                       reduction: str) -> torch.Tensor:
    """The cross-entropy of `targets` (IGNORE_INDEX: none) as `kpro.ops.linear_cross_entropy` computes it from
    the hidden states `out` and `head_weight` (`output_head_weight`); with `head_weight` None, `out` are the
    logits the model's own head made, taken the same way (fp32, float64 for float64; "sum" or "none")."""
    if head_weight is not None:
        return ops.linear_cross_entropy(out, head_weight, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none' for logits, got {reduction!r}")
    dtype = torch.promote_types(out.dtype, torch.float32)
    nll = F.cross_entropy(out.flatten(0, -2).to(dtype), targets.flatten().long(), ignore_index=IGNORE_INDEX,
                          reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll


def lm_loss(model: torch.nn.Module, batch: dict) -> LossSum:
    """fit's default loss: the model's next-token loss over a batch {input_ids, labels, attention_mask?}.

    On a kpro.Llama (alone, under DDP or FSDP, or adapted with LoRA) whose lm_head is a plain bias-free
    nn.Linear without hooks, the loss comes from the final hidden states and the head's weight
    (`causal_lm_loss_from_hidden`): the logits are never made. Any other model, or head, is called for its
    logits (`causal_lm_loss`), so a hook or bias on the head counts as in the model's own forward.
    """
    if not isinstance(batch, Mapping):  # a dict, or a mapping such as Hugging Face's BatchEncoding
        raise TypeError(f"lm_loss, fit's default loss, takes dict batches {{input_ids, labels, attention_mask?}}, got "
                        f"{type(batch).__name__}: collate to dicts (kpro.train.Batches does), or give fit a loss_fn")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"lm_loss needs batch[{key!r}]; the batch has {sorted(batch)}")
    labels, mask = batch["labels"], batch.get("attention_mask")
    for key in ("input_ids", "labels"):
        if not isinstance(batch[key], torch.Tensor):  # default_collate makes a list of T tensors of lists of ids
            raise TypeError(f"lm_loss needs batch[{key!r}] as a tensor [B, T], got {type(batch[key]).__name__}: "
                            "collate rows of token ids with torch.stack or torch.tensor")
    _check_padding_is_not_scored(labels, mask)
    if output_head_weight(model) is None:
        logits = model(batch["input_ids"], mask)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"lm_loss calls the model for its logits, and it returned a {type(logits).__name__}: "
                            "give fit a loss_fn that reads the logits (a Hugging Face model's output.logits)")
        return LossSum(causal_lm_loss(logits, labels, reduction="sum"), count_loss_tokens(labels))
    hidden = model(batch["input_ids"], mask, head=False)
    # The weight is read after the forward: an FSDP model holds it unsharded only from its forward on.
    total = causal_lm_loss_from_hidden(hidden, output_head_weight(model), labels, reduction="sum")
    return LossSum(total, count_loss_tokens(labels))


def _check_padding_is_not_scored(labels: torch.Tensor, mask) -> None:
    """A label on padding, or one predicted from padding, would be trained on: labels equal to input_ids with
    the pads included, or (left padding, labels[mask == 0] = -100 alone) each padded row's first real token,
    whose label the position before it, a pad, predicts."""
    if not isinstance(mask, torch.Tensor) or mask.shape != labels.shape:
        return  # the model names a mask of another shape
    pad, scored = mask == 0, labels[:, 1:] != IGNORE_INDEX  # position 0 is never scored
    on_pad = (pad[:, 1:] & scored).sum()
    after_pad = (pad[:, :-1] & ~pad[:, 1:] & scored).sum()
    fix = f"set labels[attention_mask == 0] = {IGNORE_INDEX}"
    fix_after = f"set labels[:, 1:][attention_mask[:, :-1] == 0] = {IGNORE_INDEX}"
    if not values_readable(on_pad):  # compiling (no graph break; a failed device assert ends the process,
        # though), or fake or meta tensors (no values: the assertion is traced, or skipped)
        torch._assert_async(on_pad + after_pad == 0, f"lm_loss: positions that attention_mask marks as padding "
                            f"carry labels, or labels follow padding, which predicts them: {fix}, and {fix_after}")
        return
    on_pad, after_pad = torch.stack([on_pad, after_pad]).tolist()  # one host sync on a GPU, as the loss's own checks
    if on_pad:
        raise ValueError(f"{on_pad} position(s) that attention_mask marks as padding carry labels, and would be "
                         f"trained on: {fix}" + (f"; and {fix_after}" if after_pad else ""))
    if after_pad:
        raise ValueError(f"{after_pad} label(s) come right after padding (with left padding, each padded row's "
                         f"first real token), and the padding position before would be trained to predict them: "
                         f"{fix_after} (as well as labels[attention_mask == 0])")
