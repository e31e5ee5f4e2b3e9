"""Training data: packed token streams, (prompt, answer) batches, a resumable batch sampler, and JSONL files.

Batches are dicts of tensors [B, ...] with labels aligned to `input_ids` (see `kpro.train.loss`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from array import array
from collections.abc import Mapping
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .._numbers import MAX_SEED, is_integer
from ..errors import ResumeRefused
from ..tokenizer import checked_ids
from .loss import IGNORE_INDEX


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, eos_id: int, *,
                   bos_id: int | None = None) -> torch.Tensor:
    """Tokenized documents -> rows [N, seq_len] of one stream `[bos] doc eos [bos] doc eos ...`, no padding.

    Consecutive rows overlap by one token (row k starts at k·(seq_len - 1)), so with the shifted loss every
    token after the first is predicted exactly once, including those at row boundaries. The tail that does
    not fill a row is dropped. Attention is not cut at document boundaries: the eos marks them.
    """
    if not is_integer(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    seq_len = int(seq_len)
    check_special_id(eos_id, "eos_id")
    bos = [] if check_special_id(bos_id, "bos_id", optional=True) is None else [torch.tensor([bos_id])]
    eos = torch.tensor([eos_id])
    pieces = [piece for i, doc in enumerate(documents) for piece in (*bos, document_tensor(doc, i), eos)]
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if len(stream) < seq_len:
        raise ValueError(f"the documents hold {len(stream)} tokens (with separators), fewer than one row of {seq_len}")
    return stream.unfold(0, seq_len, seq_len - 1).contiguous()


def check_special_id(value, name: str, optional: bool = False, vocab_size: int | None = None):
    """An eos, bos or pad id: an integer >= 0, below `vocab_size` if given (None too where `optional`);
    returned as a Python int (a NumPy one too: ids go into JSON indexes and checkpoints)."""
    if value is None and optional:
        return None
    if not is_integer(value) or value < 0 or \
            (vocab_size is not None and value >= vocab_size):
        bound = "(an integer >= 0)" if vocab_size is None else f"of the model (an integer in [0, {vocab_size}))"
        raise ValueError(f"{name} must be a token id {bound}, got {value!r}")
    return int(value)


def check_flag(value, name: str, also: str = "") -> bool:
    """A True/False argument as a Python bool (a NumPy one too: it goes into checkpoints); anything else is
    refused, since a string such as "False" is truthy. `also` adds to the message (what else it may be)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False{also}, got {value!r}")
    return bool(value)


def document_tensor(doc, index: int) -> torch.Tensor:
    """A tokenized document as a flat int64 tensor; float or bool ids (which a cast would truncate or take as
    0/1), text and a single id (one document's ids passed as the list of documents) are refused, naming the
    document."""
    try:
        tensor = torch.as_tensor(doc)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"document {index} is not a sequence of token ids (got {type(doc).__name__})") from None
    if tensor.numel() and (tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"document {index} holds {tensor.dtype} values; token ids are integers")
    if tensor.dim() == 0:  # one document's ids passed as the documents: each id framed as a document of its own
        raise TypeError(f"document {index} is one token id ({tensor.item()}), not a document: pass a list of "
                        "documents (one document's ids, tok.encode(text), as [ids])")
    if tensor.dim() > 2 or (tensor.dim() == 2 and tensor.shape[0] != 1):  # flattened, rows would run together
        raise ValueError(f"document {index} has shape {list(tensor.shape)}: a document is 1-D token ids (or one row, "
                         "[1, T]); pass a batch of documents as a list of rows, or the [N, T] tensor itself")
    return tensor.to(torch.long).flatten()


def collate_packed(rows: Sequence[torch.Tensor]) -> dict:
    """Rows of `pack_documents` -> {input_ids, labels}: every token is both input and target (two tensors, so
    a callback may mask labels in place)."""
    if len(rows) and isinstance(rows[0], dict):  # rows may be one [B, T] tensor
        raise ValueError(f"collate_packed (Batches' default collate) stacks rows of token ids, and these examples "
                         f"are dicts (keys {', '.join(map(str, rows[0]))}): pass Batches(..., collate=...), a function "
                         "that stacks each key into a tensor [B, T] (torch.utils.data.default_collate does for "
                         "tensor values, not for lists of ids); fit's default loss reads input_ids, labels and an "
                         "optional attention_mask")
    rows = [torch.as_tensor(row) for row in rows]
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"collate_packed (Batches' default collate) stacks rows of one length, and these have "
                         f"{lengths[0]} to {lengths[-1]} tokens: pack documents into rows with pack_documents, or pass "
                         "Batches(..., collate=...) that pads them (collate_prompt_answer for prompt/answer pairs)")
    ids = torch.stack(rows)
    return {"input_ids": ids, "labels": ids.clone()}  # not one tensor: masking labels in place kept the inputs


def collate_prompt_answer(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict:
    """(prompt_ids, answer_ids) pairs -> a right-padded batch whose loss covers the answers only.

    Returns input_ids, attention_mask (1 = real token), labels (-100 on prompts and padding) and
    prompt_lens, all [B, T] or [B].
    """
    if isinstance(examples, (torch.Tensor, np.ndarray, Mapping)):
        raise TypeError(f"collate_prompt_answer takes a list of (prompt_ids, answer_ids) pairs, got a "
                        f"{type(examples).__name__}")
    if not examples:
        raise ValueError("collate_prompt_answer got no examples")
    check_special_id(pad_id, "pad_id")
    rows, labels, prompt_lens = [], [], []
    for i, pair in enumerate(examples):
        if not isinstance(pair, (tuple, list)):
            raise TypeError(f"example {i} must be a (prompt_ids, answer_ids) pair, got a {type(pair).__name__}")
        if len(pair) != 2:
            raise ValueError(f"example {i} must be a (prompt_ids, answer_ids) pair, got {len(pair)} items")
        prompt, answer = checked_ids(pair[0], None, f"example {i} prompt"), checked_ids(pair[1], None, f"example {i} answer")
        if not prompt or not answer:
            raise ValueError(f"example {i} has an empty {'prompt' if not prompt else 'answer'}; both need tokens")
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
        prompt_lens.append(len(prompt))
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    target = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, :len(row)] = torch.tensor(row)
        target[i, :len(row)] = torch.tensor(label)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": target, "prompt_lens": torch.tensor(prompt_lens)}


class Batches:
    """Batches of `batch_size` examples drawn without replacement, reshuffled each epoch, forever.

    The order depends only on (seed, epoch), and `state_dict()` records how far iteration got, so a
    run restarted from a checkpoint sees exactly the batches it would have seen. With `fit`, each batch
    is one optimizer step's global batch: fit splits it across processes and accumulation steps.
    """

    def __init__(self, examples: Sequence, batch_size: int, collate: Callable[[list], dict] = collate_packed, *,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        if not is_integer(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(examples, Mapping):  # {"input_ids": [...], "labels": [...]}: columns, not examples
            raise TypeError(f"Batches draws from a sequence of examples, and got a {type(examples).__name__} (keys "
                            f"{', '.join(map(str, list(examples)[:4]))}): pass a list with one entry per example "
                            "(a dict per example, with a collate that stacks them)")
        if not hasattr(examples, "__len__") or not hasattr(examples, "__getitem__"):
            raise TypeError(f"Batches draws from a sequence of examples (a list, a tensor of rows), got a "
                            f"{type(examples).__name__}: pass list(...) of it")
        # hash() of other types changes from process to process, and hash(-1) == hash(-2)
        if not is_integer(seed) or seed < 0:
            raise ValueError(f"seed must be an integer from 0 to 2**61 - 2, got {seed!r}")
        if seed > MAX_SEED:  # order() would draw another seed's order: the one below 2**61 - 1 it hashes as
            raise ValueError(f"seed {seed} is past 2**61 - 2: Batches shuffles with Python's hash, which takes an "
                             f"integer modulo 2**61 - 1, so it would draw seed {int(seed) % (MAX_SEED + 1)}'s order; "
                             "pass a seed from 0 to 2**61 - 2")
        batch_size, seed = int(batch_size), int(seed)
        shuffle, drop_last = check_flag(shuffle, "shuffle"), check_flag(drop_last, "drop_last")
        if len(examples) == 0:
            raise ValueError("Batches got no examples")
        if len(examples) < batch_size and drop_last:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size} (drop_last=True)")
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.index = 0, 0  # position: batches already taken from this epoch
        self._digest: str | None | bool = False  # the examples' content digest, computed once when first asked

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.examples))
        generator = torch.Generator().manual_seed(hash((self.seed, epoch)) & (2**63 - 1))
        return torch.randperm(len(self.examples), generator=generator)

    def __iter__(self):
        self._content_digest()  # of the examples as the run starts, before any collate could change them
        while True:
            order = self.order(self.epoch)
            while self.index < len(self):
                picked = order[self.index * self.batch_size:(self.index + 1) * self.batch_size].tolist()
                self.index += 1  # counted before yielding: a checkpoint taken now resumes after this batch
                yield self.collate([self.examples[i] for i in picked])
            self.epoch, self.index = self.epoch + 1, 0

    def restart(self) -> None:
        """Go back to the first batch of epoch 0, where a new `Batches` starts. `fit` calls it when a run starts
        afresh (no checkpoint to resume), so the run is the one a fresh script makes, whatever iterated before."""
        self.epoch, self.index = 0, 0
        self._digest = False  # of the examples as they are now: they may have changed since the last run

    def _content_digest(self) -> str | None:
        if self._digest is False:
            self._digest = content_digest(self.examples)
        return self._digest

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.examples), "shuffle": self.shuffle, "drop_last": self.drop_last,
                "digest": self._content_digest()}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` left off; other data (seed, batch size, count, shuffling, drop_last, or
        content: the same number of other examples) is refused. A digest missing on either side (an older
        checkpoint, examples without a stable content), or drop_last missing in an older checkpoint, leaves
        that unchecked."""
        self._digest = False  # the examples as they are now, not as an earlier run in this process found them
        mine = self.state_dict()
        if not isinstance(state, dict) or not {"seed", "batch_size", "num_examples", "shuffle", "epoch", "index"} \
                <= set(state):
            raise OtherSetting(f"cannot resume these batches: the checkpoint's data position is not a Batches' "
                               f"({state!r:.120}): the run took its batches from another kind of source; resume "
                               "with it", "source", had=None, now="Batches")
        for key in ("seed", "batch_size", "num_examples", "shuffle"):
            if state[key] != mine[key]:
                message = f"cannot resume these batches: the checkpoint's data had {key}={state[key]!r}, these have " \
                          f"{key}={mine[key]!r}"
                if key == "num_examples":
                    raise OtherExamples(message + ": other data, or the same cut into rows of another length "
                                        "(seq_len)", had=state[key], now=mine[key])
                raise OtherSetting(message, key, had=state[key], now=mine[key])
        # Another drop_last keeps or drops each epoch's last, smaller batch: other batches from the next epoch on.
        saved = state.get("drop_last")  # None: a checkpoint written before it was kept
        if saved is not None and saved != mine["drop_last"]:
            raise OtherSetting(f"cannot resume these batches: the checkpoint's data had drop_last={saved!r}, these "
                             f"have drop_last={mine['drop_last']!r}; pass Batches(..., drop_last={saved!r}) to "
                             "continue that run", "drop_last", had=saved, now=mine["drop_last"])
        if state.get("digest") is not None and mine["digest"] is not None and state["digest"] != mine["digest"]:
            raise OtherExamples(f"cannot resume these batches: they hold as many examples as the checkpoint's data "
                                f"({mine['num_examples']}), but other ones (content digest {mine['digest'][:12]}, the "
                                f"checkpoint's {state['digest'][:12]}); resume with the run's own data, or start a new "
                                "run", had=state["num_examples"], now=mine["num_examples"])
        self.epoch, self.index = state["epoch"], state["index"]


class OtherExamples(ResumeRefused, ValueError):
    """A resume refused because the examples are not the checkpoint's: `had` examples then, `now` these (as many,
    where only their content differs). A command says it in its own terms (bitune: its --data and --max-length)."""

    def __init__(self, message: str, had: int, now: int):
        super().__init__(message)
        self.had, self.now = had, now


class OtherSetting(ResumeRefused, ValueError):
    """A resume refused because a setting is not the checkpoint's run's: `setting`, the parameter's name (Batches'
    seed, batch_size, ...; TokenShards' corpus, seq_len, ...; a callback's), `had` its value then, `now` this one.
    "source": the checkpoint's batches came from another kind of source (`had` None) than this one (`now`: "Batches"
    or "TokenShards"). A command says it in its flags."""

    def __init__(self, message: str, setting: str, had, now):
        super().__init__(message)
        self.setting, self.had, self.now = setting, had, now


class _NoStableContent(Exception):
    pass


def content_digest(examples: Sequence) -> str | None:
    """SHA-256 of the examples' content (token lists, tensors, arrays of numbers, strings, numbers, and tuples,
    lists, mappings and dataclasses of them), or None if an example holds anything else (NumPy arrays of
    strings or objects included), whose content cannot be told from its identity."""
    digest = hashlib.sha256()
    try:
        if isinstance(examples, (torch.Tensor, np.ndarray)):  # rows [N, T] (pack_documents): one pass
            _feed(digest, examples)
        else:
            for example in examples:
                _feed(digest, example)
    except _NoStableContent:
        return None
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, (list, tuple)):
        try:  # a token list: C speed, and every example of a large dataset is one
            digest.update(b"q%d;" % len(value) + array("q", value).tobytes())
            return
        except (TypeError, OverflowError):
            pass
        digest.update(b"%s%d;" % (type(value).__name__.encode(), len(value)))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        try:
            tensor = torch.as_tensor(value).detach().cpu().contiguous()
        except TypeError:  # a NumPy array of strings, objects, dates, ...: not checked, as other objects
            raise _NoStableContent from None
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.flatten().view(torch.uint8).numpy()))  # the bytes in place: no copy
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        text = repr(value).encode()
        digest.update(b"%s%d;" % (type(value).__name__.encode(), len(text)) + text)
    elif isinstance(value, Mapping):
        digest.update(b"map%d;" % len(value))
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode() + b";")
        for field in dataclasses.fields(value):
            _feed(digest, getattr(value, field.name))
    else:
        raise _NoStableContent


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a line that is not a JSON object is named."""
    rows = []
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is named with its number
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM opens some editors' files
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            rows.append((number, row))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows
