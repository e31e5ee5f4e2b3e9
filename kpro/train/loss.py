"""Causal language-model loss in fp32, with labels of -100 left out.

Labels are aligned with `input_ids` (the Hugging Face convention): the logits at position t predict
`labels[:, t + 1]`, so `labels = input_ids` trains on every token and -100 masks a prompt or padding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

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
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of `logits` [B, T, V] against `labels` [B, T], computed in fp32.

    `reduction="mean"` averages over the scored tokens: a batch with none is an error (a mean over nothing
    is NaN, and it usually means the prompts filled the whole sequence). `"sum"` adds them up (0 for none:
    one micro-batch may have none when the others of its step have some; `fit` checks the step).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    count = count_loss_tokens(labels)
    if int(count) == 0:
        raise ValueError(no_loss_tokens_message(f"the batch of {labels.shape[0]} row(s)"))
    return total / count


def no_loss_tokens_message(what: str) -> str:
    return (f"{what} has no loss tokens: every label after the first position is {IGNORE_INDEX} "
            "(prompts too long for the sequence length?)")


def lm_loss(model: torch.nn.Module, batch: dict) -> LossSum:
    """fit's default loss: the model's next-token loss over a batch {input_ids, labels, attention_mask?}."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"lm_loss needs batch[{key!r}]; the batch has {sorted(batch)}")
    labels = batch["labels"]
    logits = model(batch["input_ids"], batch.get("attention_mask"))
    return LossSum(causal_lm_loss(logits, labels, reduction="sum"), count_loss_tokens(labels))
