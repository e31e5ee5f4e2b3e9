"""A batch of `prompt + answer` rows as Bitune's token streams, and the answer stream's targets.

Rows are right-padded and may all have different prompt and answer lengths. The prompt streams hold
`prompt[:P-1]` (read twice, causally and bidirectionally); the answer stream `[prompt[P-1], answer…]`.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import ops
from ..ops.backend import values_readable
from ..tokenizer import checked_ids


COMPILE_HINT = (
    "Bitune's stream shapes come from the values of prompt_lens and attention_mask, which torch.compile "
    "cannot trace: split the batch before the compiled call, streams = kpro.bitune.split_streams(input_ids, "
    "prompt_lens, attention_mask) (e.g. in the collate function), and pass the streams alone: "
    "torch.compile(bitune, fullgraph=True)(streams), torch.compile(bitune.loss, fullgraph=True)(streams)")


@dataclasses.dataclass
class Streams:
    """One batch as Bitune's token streams, right-padded: the prompt streams `prompt[:P-1]` and the
    answer stream `[prompt[P-1], answer…]`."""
    prompt_ids: torch.Tensor  # [B, Tp]
    answer_ids: torch.Tensor  # [B, Ta]
    prompt_lens: torch.Tensor  # [B] valid tokens of the prompt streams (P − 1)
    answer_lens: torch.Tensor  # [B] valid tokens of the answer stream

    def __post_init__(self):
        # Shapes, dtypes and devices only: the lengths' values are checked where they are used
        # (`check_bitune_values`), without a device read or, under torch.compile, a graph break.
        for name in ("prompt_ids", "answer_ids", "prompt_lens", "answer_lens"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
                raise ValueError(f"Streams.{name} must be an integer tensor, got "
                                 f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
        if self.prompt_ids.dim() != 2 or self.answer_ids.dim() != 2:
            raise ValueError(f"Streams.prompt_ids and answer_ids must be [B, T], got {tuple(self.prompt_ids.shape)} "
                             f"and {tuple(self.answer_ids.shape)}")
        batch = self.answer_ids.shape[0]
        for name in ("prompt_ids", "prompt_lens", "answer_lens"):
            value = getattr(self, name)
            if (name.endswith("lens") and value.dim() != 1) or value.shape[0] != batch:
                raise ValueError(f"Streams.{name} must have the answer stream's batch size B={batch} "
                                 f"({'[B]' if name.endswith('lens') else '[B, Tp]'}), got {tuple(value.shape)}")
            if value.device != self.answer_ids.device:
                raise ValueError(f"Streams.{name} is on {value.device}, answer_ids on {self.answer_ids.device}")

    @property
    def prompt_valid(self):
        return torch.arange(self.prompt_ids.shape[1], device=self.prompt_ids.device) < self.prompt_lens[:, None]

    @property
    def answer_valid(self):
        return torch.arange(self.answer_ids.shape[1], device=self.answer_ids.device) < self.answer_lens[:, None]


def split_streams(input_ids, prompt_lens, attention_mask=None, need_answer=True) -> Streams:
    """Split right-padded `prompt + answer` rows into the prompt and answer streams. The streams' lengths
    are the batch's longest prompt and answer, values of `prompt_lens` and the mask: split in the data
    pipeline (e.g. the collate function), outside a torch.compile region."""
    if torch.compiler.is_compiling():
        raise ValueError(COMPILE_HINT)
    if input_ids.dim() != 2 or not _integer(input_ids.dtype):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {tuple(input_ids.shape)} {input_ids.dtype}")
    batch, length = input_ids.shape
    device = input_ids.device
    prompt_lens = torch.as_tensor(prompt_lens, device=device)
    if prompt_lens.shape != (batch,) or not _integer(prompt_lens.dtype):  # a bool mask would read as lengths 0, 1
        raise ValueError(f"prompt_lens must be an integer tensor [B={batch}] of lengths, got "
                         f"{tuple(prompt_lens.shape)} {prompt_lens.dtype}")
    if attention_mask is None:
        lengths = torch.full((batch,), length, device=device)
    else:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be [B={batch}, T={length}], got {tuple(attention_mask.shape)}")
        # 1 and 0 only, as the model's mask: a 2 would count as two tokens, and the answer stream would take
        # the row's last token once more, a phantom answer token in the logits and the loss.
        ops.check_attention_mask(attention_mask, (batch, length), "Bitune")
        lengths = attention_mask.long().sum(1)
        if not torch.equal(attention_mask.bool(), torch.arange(length, device=device) < lengths[:, None]):
            raise ValueError("attention_mask must be right-padded (ones, then zeros) for Bitune")
    if (prompt_lens < 1).any():
        raise ValueError(f"prompt lengths must be >= 1, got {prompt_lens.tolist()}")
    if need_answer and (prompt_lens >= lengths).any():
        raise ValueError(f"every row needs at least one answer token after its prompt: prompt_lens "
                         f"{prompt_lens.tolist()} vs sequence lengths {lengths.tolist()}")
    if not need_answer and (prompt_lens > lengths).any():
        raise ValueError(f"prompt_lens {prompt_lens.tolist()} exceed the sequence lengths {lengths.tolist()}")
    lp = prompt_lens - 1
    la = (lengths if need_answer else prompt_lens) - lp
    tp, ta = int(lp.max()), int(la.max())
    index = (lp[:, None] + torch.arange(ta, device=device)).clamp(max=length - 1)
    answer_ids = torch.gather(input_ids, 1, index).masked_fill(torch.arange(ta, device=device) >= la[:, None], 0)
    prompt_ids = input_ids[:, :tp].masked_fill(torch.arange(tp, device=device) >= lp[:, None], 0)
    return Streams(prompt_ids, answer_ids, lp, la)


def _integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def answer_targets(streams: Streams) -> torch.Tensor:
    """Next-token targets of the answer stream: token t + 1 where it is an answer token, else -100."""
    targets = torch.full_like(streams.answer_ids, -100)
    targets[:, :-1] = streams.answer_ids[:, 1:]
    valid = torch.arange(targets.shape[1], device=targets.device) < (streams.answer_lens - 1)[:, None]
    return targets.masked_fill(~valid, -100)


def check_answers_to_predict(streams: Streams, where: str) -> None:
    """Refuse Streams with a row whose answer stream holds no answer token (answer_lens 1: the prompt's last token
    alone, which generate's prefill takes but a loss has nothing to predict from): the row would drop out of the
    loss unsaid, as split_streams refuses ids with no answer. One read of the lengths (free on the CPU); under
    torch.compile or for fake tensors `torch._assert_async` (no graph break)."""
    ok = (streams.answer_lens >= 2).all()
    message = (f"{where}: every row of the Streams needs an answer token to predict (answer_lens >= 2: the answer "
               "stream is the prompt's last token, then the answer)")
    if not values_readable(streams.answer_lens):
        torch._assert_async(ok, message)
    elif not bool(ok):
        rows = (streams.answer_lens < 2).nonzero().flatten().tolist()
        raise ValueError(f"{message}; rows {rows} have none (answer_lens {streams.answer_lens.tolist()})")


def token_lists(sequences, what: str, where: str, vocab_size: int | None = None) -> list[list[int]]:
    """`sequences` (lists, tuples or 1-D tensors of token ids, or the rows of a 2-D tensor) as lists of Python
    ints (`kpro.tokenizer.checked_ids` each, in [0, vocab_size) where given). A flat list of ids, a string, a bool
    or no sequence at all is refused, naming the first culprit (`what` 0, 1, … in `where`)."""
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__") or \
            (isinstance(sequences, torch.Tensor) and sequences.dim() != 2):
        raise ValueError(f"{where} takes a list of {what}s, each a sequence of token ids, got {sequences!r:.80}")
    lists = []
    for i, seq in enumerate(sequences):
        try:
            lists.append(checked_ids(seq, vocab_size, f"{where}: {what} {i}"))
        except TypeError:
            hint = f" (one {what}: [ids])" if not hasattr(seq, "__iter__") else ""
            raise ValueError(f"{where} takes a list of {what}s, each a sequence of token ids: {what} {i} is "
                             f"{seq!r:.80}{hint}") from None
    if not lists:
        raise ValueError(f"{where} needs at least one {what}")
    return lists


def right_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] right-padded, lengths [B])."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("need at least one sequence and no empty sequence")
    length = max(map(len, sequences))
    ids = torch.tensor([list(s) + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long, device=device)
    return ids, torch.tensor([len(s) for s in sequences], device=device)
