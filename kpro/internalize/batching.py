"""Training batches with part of the CoT removed.

`collate` pads full examples into a CoTBatch; `remove_cot` cuts a number of tokens from the left of each
row's CoT and re-packs the rows, on whatever device the batch is on, with no per-row Python;
`training_batch` does both for one step of a RemovalSchedule. Removal only ever touches
`ids[cot_start:cot_end]`: the input, both eos separators, `####`, the answer and the final eos stay.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..train.data import check_special_id
from ..train.loss import causal_lm_loss, causal_lm_loss_from_hidden, output_head_weight
from .schedule import RemovalSchedule
from .tokenization import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class CoTBatch:
    """Full examples, right-padded: input_ids [B, T], and per row its length and CoT span [B] (int64)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    cot_start: torch.Tensor
    cot_end: torch.Tensor
    pad_id: int

    def to(self, device) -> "CoTBatch":
        return CoTBatch(self.input_ids.to(device), self.lengths.to(device), self.cot_start.to(device),
                        self.cot_end.to(device), self.pad_id)


@dataclass(frozen=True)
class TrainingBatch:
    """Right-padded rows ready for the model and the loss.

    labels are aligned with input_ids (position t's logits predict labels[t + 1]; see `loss`) and are
    IGNORE_INDEX up to and including the first eos and on padding. `cot_removed` and `cot_left` [B] count
    the CoT tokens each row lost and kept.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    cot_removed: torch.Tensor
    cot_left: torch.Tensor

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled positions; logits [B, T, vocab]."""
        return next_token_loss(logits, self.labels)

    def model_loss(self, model) -> torch.Tensor:
        """The same mean loss straight from a kpro.Llama (or a model wrapping one, as `kpro.train.lm_loss`
        takes it), from its final hidden states and head weight: no logits in memory, as in training. A head
        that is more than its weight (a bias, hooks) makes the logits, as `lm_loss` does."""
        if output_head_weight(model) is None:
            return causal_lm_loss(model(self.input_ids, self.attention_mask), self.labels)
        return causal_lm_loss_from_hidden(model(self.input_ids, self.attention_mask, head=False),
                                          output_head_weight(model), self.labels)


def collate(examples, pad_id: int, device=None) -> CoTBatch:
    """Pad TokenizedExamples on the right into one CoTBatch."""
    examples = list(examples)
    if not examples:
        raise ValueError("collate needs at least one example")
    if not all(isinstance(example, TokenizedExample) for example in examples):
        raise TypeError("collate takes TokenizedExamples (see tokenize_examples)")
    pad_id = check_special_id(pad_id, "pad_id")  # 2.7 was cut to 2, an eos id; -1 was blamed on input_ids later
    lengths = [len(example.ids) for example in examples]
    input_ids = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :lengths[row]] = torch.tensor(example.ids, dtype=torch.long)
    spans = torch.tensor([(example.cot_start, example.cot_end) for example in examples], dtype=torch.long)
    return CoTBatch(input_ids.to(device), torch.tensor(lengths, device=device), spans[:, 0].to(device),
                    spans[:, 1].to(device), pad_id)


def remove_cot(batch: CoTBatch, counts) -> TrainingBatch:
    """Cut `counts` tokens (an int, REMOVE_ALL, or int64 [B]) from the left of each row's CoT.

    A count larger than a row's CoT removes the whole CoT and nothing else. Row b becomes
    `ids[:cot_start] + ids[cot_start + removed:length]`, re-padded on the right; the batch shrinks to its
    longest row.
    """
    ids = batch.input_ids
    rows, width = ids.shape
    cot_length = batch.cot_end - batch.cot_start
    if isinstance(counts, torch.Tensor):
        if counts.shape != (rows,) or counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError(f"counts must be an integer tensor [B={rows}], got {tuple(counts.shape)} {counts.dtype}")
        if bool((counts < 0).any()):  # checked where the counts are (the schedule's are on the CPU): no sync
            raise ValueError("counts must be >= 0")
        removed = torch.minimum(counts.to(device=ids.device, dtype=torch.long), cot_length)
    elif counts == math.inf:
        removed = cot_length
    else:
        removed = cot_length.clamp(max=_non_negative_int(counts))
    new_lengths = batch.lengths - removed
    position = torch.arange(width, device=ids.device)
    # Position t of the new row reads old position t before the CoT start, t + removed from there on.
    source = position + removed[:, None] * (position >= batch.cot_start[:, None])
    real = position < new_lengths[:, None]
    new_ids = ids.gather(1, source.clamp(max=width - 1)).masked_fill(~real, batch.pad_id)
    labels = new_ids.masked_fill(~real | (position < batch.cot_start[:, None]), IGNORE_INDEX)
    keep = int(new_lengths.max())
    return TrainingBatch(new_ids[:, :keep], real[:, :keep].long(), labels[:, :keep], removed, cot_length - removed)


def training_batch(examples, schedule: RemovalSchedule, step: int, seed: int, pad_id: int,
                   device=None) -> TrainingBatch:
    """The batch of global step `step`: `examples` with `schedule.removal_counts(step, B, seed)` removed.

    A pure function of its arguments, so a resumed run rebuilds every step's batch exactly.
    """
    examples = list(examples)
    return remove_cot(collate(examples, pad_id, device), schedule.removal_counts(step, len(examples), seed))


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[:, t] against labels[:, t + 1], averaged over labels != IGNORE_INDEX; in float32, or
    float64 for float64 logits (as kpro.train's losses)."""
    scored = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(scored.to(torch.promote_types(scored.dtype, torch.float32)), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def _non_negative_int(value) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        count = -1
    if count < 0 or isinstance(value, bool):
        raise ValueError(f"counts must be a non-negative int, REMOVE_ALL or an int64 tensor [B], got {value!r}")
    return count
