"""Post-pretraining of an expanded model's new blocks on a text corpus (`python -m kpro train-expanded`).

The corpus is text files, tokenized with the checkpoint's own tokenizer and packed into rows of `seq_len`
tokens in memory (no padding), or a token shard directory of any size (`python -m kpro tokenize`, made
with the same tokenizer), read from disk by `kpro.train.TokenShards`; `kpro.train.fit` runs the loop
(checkpoints, resume, metrics, torchrun) with only the new blocks training (`kpro.train_only`). At the end
the model is saved as a normal LLaMA checkpoint, each tensor in its dtype in the source, with the source's
tokenizer files.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch

from .._files import atomic_directory
from .._run_lock import holding
from .._safetensors import TensorBytes, check_checkpoint_directory, read_header
from ..adapters import base_fingerprint
from ..checkpoint import _write_checkpoint, checked_dtype, hf_name, load_pretrained, parse_size, tensor_locations
from ..tokenizer import document_bos_id, load_tokenizer, special_token_in
from ..distributed import on_main
from ..train import Batches, Callback, Schedule, TokenShards, adamw, fit, init_distributed, pack_documents
from ..train.checkpointing import saved_schedule
from ..train.optim import FLOAT16_REFUSED
from ..train.data import read_jsonl
from ..train.shards import is_shard_directory
from ..train.tokenize import check_tokenizer, framing, is_jsonl, read_documents, refuse_repeated_files
from .checkpoint import _copy_other_files, read_expansion_record
from .freezing import train_only

FINAL_DIR = "final"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_corpus(paths) -> list[str]:
    """Documents of text files: a `.jsonl` file holds one JSON object with a "text" string per line; any
    other file (but .json, refused) is plain text with documents separated by blank lines."""
    documents = []
    refuse_repeated_files([Path(p) for p in paths])
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        if is_jsonl(path):
            for number, record in read_jsonl(path):
                if not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: expected an object with a \"text\" string")
                documents.append(record["text"])
        else:  # read as `kpro tokenize` reads it, a line that is not UTF-8 named by its file and number
            documents += [text for _, _, _, text in read_documents([path])]
    if not documents:
        raise ValueError(f"the corpus ({', '.join(map(str, paths))}) holds no text")
    return documents


def corpus_rows(documents: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenized documents packed into rows [N, seq_len]: `[bos] doc <eos> [bos] doc <eos> ...`, a bos where the
    tokenizer adds one (`encode(text)`: LLaMA's; SmolLM2's bos is a chat marker it adds to no text)."""
    def encoded():
        for number, doc in enumerate(documents, start=1):
            try:
                ids = tokenizer.encode(doc, bos=False, eos=False)
            except ValueError as err:  # a character the tokenizer lacks: which of the corpus's documents
                raise ValueError(f"document {number} of the corpus ({doc[:40]!r}): {err}") from None
            special = special_token_in(tokenizer, ids)  # `<|im_end|>` written in text is the eos with a tokenizer.json
            if special is not None:
                raise ValueError(f"document {number} of the corpus ({doc[:40]!r}): the text spells the tokenizer's "
                                 f"{special} token, which would end or restart the document there; remove it from "
                                 "the data")
            yield ids
    return pack_documents(encoded(), seq_len, eos_id=tokenizer.eos_id, bos_id=document_bos_id(tokenizer))


class CopyFilesIntoCheckpoints(Callback):
    """Put the source checkpoint's tokenizer (and other non-weight files) into every training checkpoint,
    so each one works with `python -m kpro generate` (a whole one: not one saved with --no-save-frozen)."""

    def __init__(self, source: Path):
        self.source = source

    def on_save(self, run, directory):
        _copy_other_files(self.source, Path(directory))


class SourceFingerprint(Callback):
    """Records in the run's checkpoints a digest of the checkpoint the run started from, and refuses a resume
    onto another one (`expand --overwrite` of another source into the same directory): the resume would load
    the run's weights over it, and the final model's frozen blocks would silently be the first source's."""

    def __init__(self, directory: Path, out_dir: Path, fingerprint: str):
        self.directory, self.out_dir, self.fingerprint = directory, out_dir, fingerprint

    def state_dict(self) -> dict:
        return {"source": str(self.directory), "source_model": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("source_model", self.fingerprint) != self.fingerprint:
            raise ValueError(f"{self.out_dir} was started from another source checkpoint than {self.directory} holds "
                             f"now (the run's source {state.get('source')} had the weight digest "
                             f"{state['source_model']}, {self.directory} has {self.fingerprint}): was it expanded "
                             "again? Resume with the checkpoint the run started from, or train into another out "
                             "directory")


def check_out_dir(directory: Path, out_dir: Path, name: str) -> None:
    """The run's directory must lie outside the checkpoint: its steps and metrics would be copied with the model."""
    source, out = Path(directory).resolve(), Path(out_dir).resolve()
    if out == source or source in out.parents:
        raise ValueError(f"{name} {out_dir} is {'the checkpoint' if out == source else 'inside the checkpoint'} "
                         f"{directory}: the run writes beside it; choose another {name}")


def blocks_to_train(directory: Path, blocks) -> list[int]:
    """The given block indices, else the new blocks named in the checkpoint's kpro_expansion.json."""
    if blocks is not None:
        if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__") or getattr(blocks, "ndim", None) == 0:
            raise TypeError(f"blocks must be a list of block indices, such as [4, 9, 14], got {blocks!r}")
        return list(blocks)
    record = read_expansion_record(directory)
    if record is None:
        raise ValueError(f"{directory} has no kpro_expansion.json (written by `python -m kpro expand`); "
                         "name the blocks to train (--train-blocks 4,9,14)")
    return record["new_blocks"]


def checkpoint_dtype(directory: Path) -> torch.dtype:
    """The floating-point dtype holding most of the checkpoint's parameters, over every shard (the one its
    fingerprint is taken in)."""
    return _majority_dtype(_listed_tensors(directory))


def _listed_tensors(directory: Path) -> dict[str, TensorBytes]:
    """Each tensor of the checkpoint by its name, as its header describes it (the index decides the file)."""
    locations = tensor_locations(directory)
    return {name: source for file in sorted(set(locations.values()))
            for name, source in read_header(file).items() if locations.get(name) == file}


def _majority_dtype(tensors: dict[str, TensorBytes]) -> torch.dtype:
    counts: dict[str, int] = {}
    for source in tensors.values():
        counts[source.dtype] = counts.get(source.dtype, 0) + math.prod(source.shape)
    return SAFETENSORS_DTYPES.get(max(counts, key=counts.get) if counts else "F32", torch.float32)


def train_expanded(directory, data, out_dir, *, blocks=None, steps: int = 1000, seq_len: int | None = None,
                   batch_size: int = 8, grad_accum: int = 1, lr: float = 2e-4, weight_decay: float = 0.0,
                   warmup_steps: int | None = None, min_lr_ratio: float = 0.1, clip_grad_norm: float | None = 1.0,
                   recompute_frozen: bool = False, dtype: torch.dtype = torch.float32, device=None,
                   precision: str = "auto", save_every: int | None = None, keep_last: int = 2, seed: int = 0,
                   log_every: int | None = None, stream=None, save_frozen: bool = True) -> Path:
    """Train the new blocks of the expanded checkpoint `directory` on `data`, text files or one token shard
    directory; returns the directory of the final model (`out_dir/final`). Running it again with the same
    `out_dir` resumes. Under torchrun each process trains on its device (DDP) and rank 0 writes. `save_frozen=False`:
    checkpoints without the frozen weights (`fit`'s); the final model is whole either way."""
    directory, out_dir = Path(directory), Path(out_dir)
    if checked_dtype(dtype) == torch.float16:  # AdamW's refusal would come once the corpus is tokenized
        raise ValueError(f"dtype float16 is a dtype {FLOAT16_REFUSED}")
    stream = sys.stderr if stream is None else stream  # progress and status; fit's default too
    check_checkpoint_directory(directory)
    check_out_dir(directory, out_dir, "out_dir")
    given = data
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data) if hasattr(data, "__iter__") else None
    if isinstance(given, bytes) or data is None or not all(isinstance(path, (str, os.PathLike)) for path in data):
        raise TypeError(f"data must be a path (text files or a token shard directory) or a list of paths, "
                        f"got {given!r}")
    env = init_distributed()
    # One run at a time in out_dir, from the start to out_dir/final: fit holds it only while it trains, and a
    # second run started before this one wrote its final model would have its own replaced by it. Rank 0 holds it,
    # as fit does (which holds it again: re-entrant).
    with contextlib.ExitStack() as hold:
        on_main(lambda: hold.enter_context(holding(out_dir)), env, f"hold {out_dir}")
        # None or "auto": cuda:LOCAL_RANK under torchrun, else cuda when there is one, else cpu
        device = torch.device(device) if device not in (None, "auto") else env.device
        block_ids = blocks_to_train(directory, blocks)
        tokenizer = load_tokenizer(directory)
        model = load_pretrained(directory, dtype=dtype, device=device)
        tensors = _listed_tensors(directory)  # load_pretrained has refused any dtype but the floating-point ones
        source_dtype = _majority_dtype(tensors)
        source_dtypes = {name: SAFETENSORS_DTYPES[source.dtype] for name, source in tensors.items()}
        # in the source's dtype: the values as stored, whatever --dtype the run trains in (fit checks that apart)
        source = SourceFingerprint(directory, out_dir, base_fingerprint(model, source_dtype))
        if seq_len is None:
            seq_len = min(512, model.config.max_position_embeddings)
        if seq_len > model.config.max_position_embeddings:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                             f"({model.config.max_position_embeddings})")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                             f"{model.config.vocab_size}")
        plan = train_only(model, block_ids, recompute_frozen=recompute_frozen)
        say = (lambda text: print(text, file=stream, flush=True)) if env.is_main else (lambda text: None)
        batches = corpus_batches(data, tokenizer, directory, seq_len, batch_size, seed, say=say)
        if env.is_main:
            rows = batches.num_rows if isinstance(batches, TokenShards) else len(batches.examples)
            print(f"{plan.describe()}\n{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
                  f"parameters; corpus: {rows:,} rows of {seq_len} tokens", file=stream)
        if warmup_steps is None:  # 5% of the steps; a resumed run keeps its own, so that more steps extend it
            saved = saved_schedule(out_dir, steps)
            warmup_steps = saved["warmup_steps"] if saved is not None else steps // 20
        warmup = warmup_steps
        schedule = Schedule("cosine", warmup_steps=warmup, total_steps=steps, min_ratio=min_lr_ratio)
        fit(model, batches, out_dir, steps=steps, schedule=schedule, grad_accum=grad_accum,
            optimizer=lambda m: adamw(m, lr, weight_decay=weight_decay, betas=(0.9, 0.95)),
            clip_grad_norm=clip_grad_norm, precision=precision, save_every=save_every, keep_last=keep_last,
            log_every=log_every, stream=stream, callbacks=[CopyFilesIntoCheckpoints(directory), source],
            save_frozen=save_frozen)
        final = out_dir / FINAL_DIR
        # each tensor back in its source dtype, not the whole model in the majority one: a mixed source's float32
        # norms beside bfloat16 matrices stay float32, and the frozen tensors are the source's bit for bit (where
        # --dtype holds their values: float32 holds bfloat16's). In place, one tensor at a time: no second copy.
        for name, parameter in model.named_parameters():  # a tied head is the embedding: one parameter
            parameter.data = parameter.data.to(source_dtypes[hf_name(name)])

        def write_final():
            with atomic_directory(final, drop=lambda name: True) as tmp:  # weights and tokenizer appear together
                _write_checkpoint(model, tmp, parse_size("5GB"))
                _copy_other_files(directory, tmp)
        on_main(write_final, env, f"write {final}")  # DDP: every process holds the same weights
        return final


def corpus_batches(data: list, tokenizer, directory: Path, seq_len: int, batch_size: int, seed: int,
                   say=lambda text: None):
    """`Batches` of the text files' packed rows, or `TokenShards` of one shard directory (same tokenizer).
    `say` takes a progress line, printed before text files are tokenized (silent for seconds per 10 MB)."""
    shard_dirs = [path for path in data if Path(path).is_dir() and is_shard_directory(path)]
    for path in data:
        if Path(path).is_dir() and not is_shard_directory(path):
            raise ValueError(f"{path} is a directory but not a token shard directory (no index.json); pass text "
                             "files, or tokenize them first with `python -m kpro tokenize`")
    if not shard_dirs:
        size = sum(Path(path).stat().st_size for path in data if Path(path).is_file())
        say(f"tokenizing {len(data)} corpus file{'s' * (len(data) > 1)} ({size / 1e6:,.1f} MB) in memory ...")
        rows = corpus_rows(read_corpus(data), tokenizer, seq_len)
        if len(rows) < batch_size:
            raise ValueError(f"the corpus fills {len(rows)} row(s) of {seq_len} tokens, fewer than one batch of {batch_size}")
        return Batches(rows, batch_size, seed=seed)
    if len(data) > 1:
        raise ValueError(f"--data takes one token shard directory alone ({shard_dirs[0]}), not with other files; "
                         "tokenize them together with `python -m kpro tokenize`")
    shards = TokenShards(shard_dirs[0], seq_len, batch_size, seed=seed)
    check_tokenizer(shards.index, directory, f"the token shards in {shard_dirs[0]}")
    if shards.index.get("bos_id") != document_bos_id(tokenizer):  # rows unlike those of the same text given as files
        raise ValueError(f"the token shards in {shard_dirs[0]} open each document with "
                         f"{framing(shards.index.get('bos_id'))}, {directory}'s tokenizer with "
                         f"{framing(document_bos_id(tokenizer))} (a bos only where it adds one to text); "
                         "tokenize the corpus again with `python -m kpro tokenize`")
    return shards
