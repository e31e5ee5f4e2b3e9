"""Post-pretraining of an expanded model's new blocks on a text corpus (`python -m kpro train-expanded`).

The corpus is tokenized with the checkpoint's own tokenizer and packed into rows of `seq_len` tokens (no
padding); `kpro.train.fit` runs the loop (checkpoints, resume, metrics) with only the new blocks training
(`kpro.train_only`). At the end the model is saved as a normal LLaMA checkpoint in the source's dtype,
with the source's tokenizer files.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import _write_checkpoint, atomic_directory, load_pretrained, parse_size, tensor_locations
from ..tokenizer import load_tokenizer
from ..train import Batches, Callback, Schedule, adamw, fit, pack_documents
from ..train.data import read_jsonl
from .checkpoint import _copy_other_files, _read_header, read_expansion_record
from .freezing import train_only

FINAL_DIR = "final"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_corpus(paths) -> list[str]:
    """Documents of text files: a `.jsonl` file holds one JSON object with a "text" string per line; any
    other file is plain text with documents separated by blank lines."""
    documents = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        if path.suffix == ".jsonl":
            for number, record in read_jsonl(path):
                if not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: expected an object with a \"text\" string")
                documents.append(record["text"])
        else:
            text = path.read_text(encoding="utf-8")
            documents += [doc.strip() for doc in re.split(r"\n[ \t]*\n", text) if doc.strip()]
    if not documents:
        raise ValueError(f"the corpus ({', '.join(map(str, paths))}) holds no text")
    return documents


def corpus_rows(documents: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenized documents packed into rows [N, seq_len]: `<bos> doc <eos> <bos> doc <eos> ...`."""
    return pack_documents((tokenizer.encode(doc, bos=False) for doc in documents), seq_len,
                          eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id)


class CopyFilesIntoCheckpoints(Callback):
    """Put the source checkpoint's tokenizer (and other non-weight files) into every training checkpoint,
    so each one works with `python -m kpro generate`."""

    def __init__(self, source: Path):
        self.source = source

    def on_save(self, run, directory):
        _copy_other_files(self.source, Path(directory))


def blocks_to_train(directory: Path, blocks) -> list[int]:
    """The given block indices, else the new blocks named in the checkpoint's kpro_expansion.json."""
    if blocks is not None:
        return list(blocks)
    record = read_expansion_record(directory)
    if record is None:
        raise ValueError(f"{directory} has no kpro_expansion.json (written by `python -m kpro expand`); "
                         "name the blocks to train (--train-blocks 4,9,14)")
    return record["new_blocks"]


def checkpoint_dtype(directory: Path) -> torch.dtype:
    """The floating-point dtype the checkpoint's block weights are stored in."""
    file = sorted(set(tensor_locations(directory).values()))[0]
    dtypes = {s.dtype for name, s in _read_header(file).items() if ".layers." in name}
    return SAFETENSORS_DTYPES.get(dtypes.pop() if len(dtypes) == 1 else "F32", torch.float32)


def train_expanded(directory, data, out_dir, *, blocks=None, steps: int = 1000, seq_len: int | None = None,
                   batch_size: int = 8, grad_accum: int = 1, lr: float = 2e-4, weight_decay: float = 0.0,
                   warmup_steps: int | None = None, min_lr_ratio: float = 0.1, clip_grad_norm: float | None = 1.0,
                   recompute_frozen: bool = False, dtype: torch.dtype = torch.float32, device=None,
                   precision: str = "auto", save_every: int | None = None, keep_last: int = 2, seed: int = 0,
                   log_every: int | None = None, stream=None) -> Path:
    """Train the new blocks of the expanded checkpoint `directory` on the text files `data`; returns the
    directory of the final model (`out_dir/final`). Running it again with the same `out_dir` resumes."""
    directory, out_dir = Path(directory), Path(out_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    block_ids = blocks_to_train(directory, blocks)
    tokenizer = load_tokenizer(directory)
    model = load_pretrained(directory, dtype=dtype, device=device)
    if seq_len is None:
        seq_len = min(512, model.config.max_position_embeddings)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    plan = train_only(model, block_ids, recompute_frozen=recompute_frozen)
    rows = corpus_rows(read_corpus(data), tokenizer, seq_len)
    if len(rows) < batch_size:
        raise ValueError(f"the corpus fills {len(rows)} row(s) of {seq_len} tokens, fewer than one batch of {batch_size}")
    print(f"{plan.describe()}\n{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
          f"parameters; corpus: {len(rows):,} rows of {seq_len} tokens", file=stream)
    warmup = steps // 20 if warmup_steps is None else warmup_steps
    schedule = Schedule("cosine", warmup_steps=warmup, total_steps=steps, min_ratio=min_lr_ratio)
    fit(model, Batches(rows, batch_size, seed=seed), out_dir, steps=steps, schedule=schedule, grad_accum=grad_accum,
        optimizer=lambda m: adamw(m, lr, weight_decay=weight_decay, betas=(0.9, 0.95)), clip_grad_norm=clip_grad_norm,
        precision=precision, save_every=save_every, keep_last=keep_last, log_every=log_every, stream=stream,
        callbacks=[CopyFilesIntoCheckpoints(directory)])
    final = out_dir / FINAL_DIR
    model.to(checkpoint_dtype(directory))
    with atomic_directory(final, drop=lambda name: True) as tmp:  # weights and tokenizer appear together
        _write_checkpoint(model, tmp, parse_size("5GB"))
        _copy_other_files(directory, tmp)
    return final
