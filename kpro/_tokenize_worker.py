"""The work of `python -m kpro tokenize`'s worker processes (kpro/train/tokenize.py): parse and tokenize
chunks of documents.

It lives outside kpro.train so that a spawned worker imports only this module, numpy and kpro.tokenizer:
no torch (about a second and 300 MB of memory per worker, times one worker per core).
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import threading
import time

import numpy as np

from ._files import naming_write_failures
from .tokenizer import document_bos_id, load_tokenizer, special_token_in

_TOKENIZER = None
_FILES: list = []


def start(tokenizer_dir: str, files: list, pool_worker: bool = False) -> None:
    """A worker's initializer: load the tokenizer once. A pool worker ignores SIGINT: a terminal's Ctrl-C reaches
    the whole process group, and the main process handles it (it saves and says how to resume). Not SIGTERM: the
    pool ends the workers of a broken pool with it (Process.terminate), and waits for them; workers that all died of
    it are the main process's notice too (kpro.train.tokenize._worker_pool). So that no worker
    outlives a main process killed outright, each ends itself within half a second of its parent's end."""
    global _TOKENIZER, _FILES
    if pool_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "SIGHUP"):  # a closed terminal's reaches the group too: the main process takes it
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        threading.Thread(target=_end_with_parent, args=(os.getppid(),), name="kpro-end-with-parent",
                         daemon=True).start()
    _TOKENIZER, _FILES = load_tokenizer(tokenizer_dir), files


def stop() -> None:
    """Forget what start loaded: tokenizing in the calling process (workers=1) keeps no tokenizer or file list
    in this module after it returns or fails."""
    global _TOKENIZER, _FILES
    _TOKENIZER, _FILES = None, []


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def jsonl_text(raw: bytes, path, line: int) -> str:
    """The "text" string of one .jsonl line; a bad line is an error naming the file and line."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}:{line}: not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{line}: expected an object with a \"text\" string")
    return record["text"]


def encode(chunk: list) -> tuple[list, np.ndarray, np.ndarray]:
    """A chunk of (file index, line, byte offset, payload) -> (the documents' positions, their framed tokens
    `[bos] tokens eos` end to end, the bos where the tokenizer adds one, each one's length)."""
    tok = _TOKENIZER
    head = [] if document_bos_id(tok) is None else [tok.bos_id]
    pieces = []
    for index, line, _, payload in chunk:
        text = payload if isinstance(payload, str) else jsonl_text(payload, _FILES[index], line)
        try:
            ids = tok.encode(text, bos=False, eos=False)
        except ValueError as err:  # a character the tokenizer lacks: where, of thousands of lines
            raise ValueError(f"{_FILES[index]}:{line}: {err}") from None
        special = special_token_in(tok, ids)  # `<|im_end|>` written in text is the eos with a tokenizer.json
        if special is not None:
            raise ValueError(f"{_FILES[index]}:{line}: the text spells the tokenizer's {special} token, which would "
                             "end or restart the document there; remove it from the data")
        pieces.append(head + ids + [tok.eos_id])
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
    return [item[:3] for item in chunk], flat, lengths


def encode_to_file(chunk: list, path: str) -> str:
    """encode(chunk) written to `path` (a pool worker's way): only the path goes back through the pool's pipe.
    A result of megabytes is sent in several writes, and a worker killed between two of them (the OOM killer)
    left the executor reading the rest of the message forever; a path is sent in one write under the pipe's
    atomic size, so a killed worker's result arrives whole or not at all, and the pool reports the death."""
    result = encode(chunk)
    with naming_write_failures(path), open(path, "wb") as f:  # a full disk's error names no file otherwise
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def read_result(path: str) -> tuple[list, np.ndarray, np.ndarray]:
    """The result encode_to_file wrote, its file removed."""
    with open(path, "rb") as f:
        result = pickle.load(f)
    os.unlink(path)
    return result
