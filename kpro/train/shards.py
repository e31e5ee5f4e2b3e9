"""Token shards: a tokenized corpus on disk, any size, and `TokenShards`, the batch source that reads it
from disk for `fit` or any loop.

A shard directory holds `index.json` and fixed-size shards `tokens-00000.bin`, ... of raw little-endian
uint16 tokens (uint32 when the vocabulary has more than 65,536 entries), the last one shorter. The shards
are one stream `[bos] doc eos [bos] doc eos ...`, the framing of `pack_documents`, cut wherever a shard is
full: documents run on across shard boundaries. Beside each shard, `tokens-00000.starts.npy` holds the
offsets inside it where documents begin. The index names the tokenizer (file and SHA-256), the counts, the
shards, and, until the writing is complete, where an interrupted writer resumes.

`python -m kpro tokenize` writes shards from text (kpro/train/tokenize.py); `write_token_shards` writes
already tokenized documents.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .._numbers import is_integer, is_seed
from .._files import atomic_file, write_atomic
from .._run_lock import LOCK_FILE
from ..distributed import current_env
from .data import OtherSetting, check_flag, check_special_id, document_tensor

FORMAT = "kpro-token-shards"
VERSION = 1
INDEX_FILE = "index.json"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 a shard
MAX_OPEN_SHARDS = 64  # file descriptors a TokenShards keeps open (least recently used closed first)
_M64 = (1 << 64) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies of up to 65,536 tokens, uint32 above (little-endian)."""
    if not is_integer(vocab_size) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# The index names the dtype as numpy does ("uint16"), which numpy reads in the machine's byte order; the
# shards are little-endian on every machine, so the name maps to an explicit one.
STORED_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def stored_dtype(index: dict) -> np.dtype:
    """The little-endian dtype of an index's shards."""
    return STORED_DTYPES[index["dtype"]]


def shard_name(i: int) -> str:
    return f"tokens-{i:05d}.bin"


def is_shard_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def read_index(directory: str | os.PathLike, *, complete: bool = True) -> dict:
    """The index of a shard directory; with `complete`, refuses one whose writing was interrupted."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a token shard directory (no {INDEX_FILE}); write one with "
                                "`python -m kpro tokenize`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kpro token shard index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != VERSION:
        raise ValueError(f"{path} has format version {index.get('version')!r}; this kpro reads version {VERSION}")
    if index.get("dtype") not in STORED_DTYPES:  # another dtype or byte order would read as wrong token ids
        raise ValueError(f"{path} has dtype {index.get('dtype')!r}; token shards hold {' or '.join(STORED_DTYPES)} "
                         "(little-endian): write them again with `python -m kpro tokenize`")
    _check_shard_list(path, index.get("shards"))
    if complete and not index.get("complete"):
        raise ValueError(f"{directory} is incomplete: its writing stopped after {len(index['shards'])} shard(s); "
                         "run the same `python -m kpro tokenize` command again to finish it")
    return index


def _check_shard_list(path: Path, shards) -> None:
    """Each entry of an index's "shards" names its file (in the directory) and how many tokens it holds."""
    if not isinstance(shards, list):
        raise ValueError(f"{path} has no \"shards\" list (got {json.dumps(shards)[:60]}): it is corrupt; write the "
                         "shards again with `python -m kpro tokenize`")
    for i, shard in enumerate(shards):
        file = shard.get("file") if isinstance(shard, dict) else None
        tokens = shard.get("tokens") if isinstance(shard, dict) else None
        if not (isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file
                and is_integer(tokens) and tokens >= 0):
            raise ValueError(f"{path} shard {i} ({json.dumps(shard)[:80]}) needs a \"file\" name and a \"tokens\" "
                             "count: it is corrupt; write the shards again with `python -m kpro tokenize`")


def corpus_id(index: dict) -> str:
    """A fingerprint of the token stream: dtype, tokenizer, bos and eos, and every shard's length and SHA-256
    (taken when it was written). Shards written before kpro recorded their SHA-256 keep the fingerprint
    they had then, of the dtype, the tokenizer file's hash and the shards' lengths."""
    tokenizer = index.get("tokenizer") or {}
    if index["shards"] and all("sha256" in s for s in index["shards"]):
        key = json.dumps([index["dtype"], tokenizer.get("sha256"), index.get("bos_id"), index.get("eos_id"),
                          [[s["tokens"], s["sha256"]] for s in index["shards"]]])
    else:
        key = json.dumps([index["dtype"], tokenizer.get("sha256"), [s["tokens"] for s in index["shards"]]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ writing

def _write_array_atomic(path: Path, array: np.ndarray, npy: bool = False) -> None:
    """Write an array's bytes (or an .npy file) under a temporary name, fsync, and rename into place."""
    with atomic_file(path) as f:
        if npy:
            np.save(f, array)
        else:
            array.tofile(f)


def write_index(directory: Path, index: dict) -> None:
    write_atomic(Path(directory) / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def check_shard_tokens(shard_tokens, vocab_size: int) -> None:
    """`shard_tokens` a positive integer whose shard fits in this machine's memory: a writer assembles each shard
    in a buffer that size (one beyond memory would fail at its allocation, after the directory and index are
    written, or be killed filling it)."""
    if not is_integer(shard_tokens) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    itemsize = token_dtype(vocab_size).itemsize
    memory = _physical_memory()
    if memory is not None and shard_tokens * itemsize > memory:
        raise ValueError(f"shard_tokens {shard_tokens:,} needs {shard_tokens * itemsize / 1e9:,.0f} GB of memory to "
                         f"assemble a shard in, more than this machine's {memory / 1e9:,.1f} GB: give fewer (the "
                         f"default, {DEFAULT_SHARD_TOKENS:,}, takes {DEFAULT_SHARD_TOKENS * itemsize / 1e6:,.0f} MB)")


def _physical_memory() -> int | None:
    """This machine's memory in bytes, None where the system does not say (no sysconf: Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def new_index(vocab_size: int, shard_tokens: int, bos_id: int | None, eos_id: int, **extra) -> dict:
    check_shard_tokens(shard_tokens, vocab_size)
    # The dtype's name, as indexes have always held it (the corpus fingerprint includes it): "uint16", "uint32".
    return {"format": FORMAT, "version": VERSION, "complete": False, "dtype": token_dtype(vocab_size).name,
            "vocab_size": int(vocab_size), "shard_tokens": int(shard_tokens), "bos_id": bos_id, "eos_id": eos_id,
            **extra, "tokens": 0, "documents": 0, "shards": []}


class ShardWriter:
    """Appends framed documents to fixed-size shards; each full shard is written under a temporary name and
    renamed into place, then the index is rewritten (atomically) to list it, with `resume_at`'s position:
    a writer killed at any moment leaves only whole shards that the index lists, and a position to go on
    from."""

    def __init__(self, directory: Path, index: dict):
        self.directory, self.index = Path(directory), index
        self.dtype = stored_dtype(index)
        self.limit = index["vocab_size"] - 1
        self.buffer = np.empty(index["shard_tokens"], dtype=self.dtype)
        self.filled, self.starts = 0, []

    def add(self, tokens: np.ndarray, *, starts_document: bool = True, resume_at=None) -> None:
        """Append one document's tokens (already framed). `resume_at(n)` gives the position to record if a
        shard fills after n of these tokens."""
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > self.limit):
            raise ValueError(f"token ids must lie in 0 ... {self.limit} (vocab_size {self.limit + 1}), got "
                             f"{int(tokens.min())} ... {int(tokens.max())}")
        if starts_document:
            self.starts.append(self.filled)
        done, size = 0, len(self.buffer)
        while done < len(tokens):
            n = min(len(tokens) - done, size - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[done:done + n]
            self.filled, done = self.filled + n, done + n
            if self.filled == size:
                self.commit(resume_at(done) if resume_at is not None else None)

    def commit(self, resume: dict | None) -> None:
        """Write the shard being filled (if it holds anything) and the index that lists it."""
        if self.filled:
            i = len(self.index["shards"])
            _write_array_atomic(self.directory / shard_name(i), self.buffer[:self.filled])
            starts_file = shard_name(i).replace(".bin", ".starts.npy")
            _write_array_atomic(self.directory / starts_file, np.asarray(self.starts, dtype=np.int64), npy=True)
            self.index["shards"].append({"file": shard_name(i), "tokens": self.filled, "documents": len(self.starts),
                                         "starts": starts_file,
                                         "sha256": hashlib.sha256(self.buffer[:self.filled]).hexdigest()})
            self.index["tokens"] += self.filled
            self.index["documents"] += len(self.starts)
            self.filled, self.starts = 0, []
        if resume is None:
            self.index.pop("resume", None)
        else:
            self.index["resume"] = resume
        write_index(self.directory, self.index)

    def finish(self) -> dict:
        """Write the last, partial shard and mark the directory complete."""
        self.index["complete"] = True
        self.commit(None)
        return self.index


# A writer's temporary (`.NAME.tmp-PID`) of a shard, its starts or the index: what a writer killed before its
# first index.json was in place can have left.
WRITER_TEMPORARY = re.compile(r"\.(tokens-\d{5}\.(bin|starts\.npy)|index\.json)\.tmp-\d+")


def prepare_directory(directory: Path) -> None:
    """Create `directory`, refusing one that holds files but no shard index (it is not ours to fill). One
    that holds only a writer's temporaries (killed while writing its first index) is a fresh start: they go."""
    directory.mkdir(parents=True, exist_ok=True)
    if is_shard_directory(directory):
        return
    present = [path for path in directory.iterdir() if path.name != LOCK_FILE]  # tokenize_corpus's own, held
    if not all(path.is_file() and WRITER_TEMPORARY.fullmatch(path.name) for path in present):
        raise FileExistsError(f"{directory} exists and is not a token shard directory; choose an empty or new one")
    for path in present:  # nothing else there: no file of anyone else's goes
        path.unlink(missing_ok=True)


def write_token_shards(directory: str | os.PathLike, documents: Iterable[Sequence[int]], *, vocab_size: int,
                       eos_id: int, bos_id: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                       tokenizer: dict | None = None) -> dict:
    """Tokenized documents -> a new shard directory holding `[bos] doc eos [bos] doc eos ...` (the framing of
    `pack_documents`, so `TokenShards` gives the rows `pack_documents` would). Returns the index."""
    vocabulary = int(vocab_size) if is_integer(vocab_size) else None
    eos_id = check_special_id(eos_id, "eos_id", vocab_size=vocabulary)  # else the documents' ids would be blamed
    bos_id = check_special_id(bos_id, "bos_id", vocab_size=vocabulary, optional=True)
    check_shard_tokens(shard_tokens, vocab_size)  # before the directory is made
    directory = Path(directory)
    existed = directory.exists()
    prepare_directory(directory)
    if is_shard_directory(directory):
        if not read_index(directory, complete=False).get("complete"):  # what a call that failed midway leaves
            raise FileExistsError(f"{directory} holds an incomplete token shard directory (an earlier write failed "
                                  "or was stopped), which write_token_shards does not resume: delete it, or pass "
                                  "another directory")
        raise FileExistsError(f"{directory} already holds token shards")
    writer = ShardWriter(directory, new_index(vocab_size, shard_tokens, bos_id, eos_id, tokenizer=tokenizer))
    head = np.array([] if bos_id is None else [bos_id], dtype=np.int64)
    tail = np.array([eos_id], dtype=np.int64)
    count = 0
    for count, doc in enumerate(documents, 1):
        ids = document_tensor(doc, count - 1).numpy()
        outside = (ids < 0) | (ids > writer.limit)
        if outside.any():  # checked here, before framing, to name the document and the id
            raise ValueError(f"document {count - 1} holds token id {ids[outside][0]}, outside the vocabulary "
                             f"(0 ... {writer.limit}, vocab_size {writer.limit + 1})")
        writer.add(np.concatenate((head, ids, tail)))
    if count == 0:  # else a complete-looking directory of 0 tokens, refused only when training starts
        if not existed:
            directory.rmdir()  # nothing was written into it
        raise ValueError(f"write_token_shards got no documents: nothing to write to {directory}; pass the tokenized "
                         "documents (a list of token id lists), not an empty or used-up iterable")
    return writer.finish()


# ------------------------------------------------------------------------------------------------ reading

def _mix64(z):
    """splitmix64's finaliser on numpy uint64 arrays or Python ints (wrapping at 64 bits)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The images of `positions` (in 0 ... n-1) under a pseudo-random permutation of 0 ... n-1 chosen by
    (seed, epoch): a 4-round Feistel network on the smallest even number of bits that holds n, walked until
    it lands below n. Computed per position, so no permutation of n rows is ever held in memory."""
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(_mix64((seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + r) & _M64)) for r in range(4)]

    def feistel(x):
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << half) | right

    out = feistel(np.asarray(positions, dtype=np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: at most a few rounds, the domain is under 4n
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def _read_at(fd: int, target: memoryview, offset: int) -> int:
    """Fill `target` from byte `offset` of the file; returns the bytes read (fewer only at its end)."""
    done = 0
    while done < len(target):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [target[done:]], offset + done)
        else:  # Windows: no positioned reads in os
            os.lseek(fd, offset + done, os.SEEK_SET)
            chunk = os.read(fd, len(target) - done)
            target[done:done + len(chunk)] = chunk
            n = len(chunk)
        if n == 0:
            break
        done += n
    return done


class TokenShards:
    """Packed rows of a token shard directory, batch after batch, for `fit` or any loop; the corpus stays on
    disk, whatever its size.

    Row k is the `seq_len` tokens starting at k·(seq_len - 1) of the stream (consecutive rows overlap by one
    token, as in `pack_documents`), read across shard boundaries. Each item is `{input_ids, labels}` [b,
    seq_len] (int64), two tensors. `batch_size` is the global batch, one optimizer step's: under torchrun each process
    gets and reads only its rows of it, rows rank·b ... (rank+1)·b - 1 with b = batch_size / world size, so
    the run is the same on any number of processes (`fit` knows this from `per_process`). Rows are drawn
    without replacement in an order that depends only on (seed, epoch) and is computed row by row (no
    permutation of the corpus in memory); `state_dict()` resumes exactly.

    Rows are read with positioned reads (pread) from the kernel's page cache, not through a memory map: a
    fault on a mapped file maps whole folios around the page (up to megabytes on current kernels), so a
    mapping's resident size grows with the corpus read; this process holds one batch, and the page cache,
    which the kernel reclaims at will, holds the rest. (The shards are raw arrays: `np.memmap` reads them too.)
    """

    per_process = True  # each item holds this process's rows of the global batch; fit does not split it by rank

    def __init__(self, directory: str | os.PathLike, seq_len: int = 2048, batch_size: int = 8, *, seed: int = 0,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None):
        for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
            if not is_integer(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not is_seed(seed):  # permute mixes it modulo 2**64 (-1 drew 2**64 - 1's order): Batches' range
            raise ValueError(f"seed must be an integer from 0 to 2**61 - 2, got {seed!r} ({type(seed).__name__})")
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together (or neither: torchrun's are used)")
        if world_size is not None and (not (is_integer(rank) and is_integer(world_size))
                                       or world_size < 1 or not 0 <= rank < world_size):
            raise ValueError(f"rank and world_size must be integers with 0 <= rank < world_size, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        # Python ints (a NumPy one passed): the seed's mixing takes the int path, and the state is checkpointed
        seq_len, batch_size, seed = int(seq_len), int(batch_size), int(seed)
        shuffle = check_flag(shuffle, "shuffle")
        rank, world_size = (None, None) if rank is None else (int(rank), int(world_size))
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.dtype = stored_dtype(self.index)
        sizes = np.array([s["tokens"] for s in self.index["shards"]], dtype=np.int64)
        self.files = [self.directory / s["file"] for s in self.index["shards"]]
        for file, size in zip(self.files, sizes):
            actual = file.stat().st_size if file.is_file() else None
            if actual != size * self.dtype.itemsize:
                raise ValueError(f"{file} should hold {size:,} tokens ({size * self.dtype.itemsize:,} bytes), but "
                                 + ("it is missing" if actual is None else f"it has {actual:,} bytes"))
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.sizes = sizes
        self.tokens = int(self.ends[-1]) if len(sizes) else 0
        if self.tokens < seq_len:
            raise ValueError(f"{directory} holds {self.tokens:,} tokens, fewer than one row of {seq_len}")
        self.num_rows = (self.tokens - seq_len) // (seq_len - 1) + 1
        if self.num_rows < batch_size:
            raise ValueError(f"{directory} fills {self.num_rows:,} row(s) of {seq_len} tokens, fewer than one "
                             f"batch of {batch_size}")
        self.corpus_id = corpus_id(self.index)
        self.epoch, self.position = 0, 0  # batches already taken from this epoch
        self._open: dict[int, int] = {}  # shard -> file descriptor, least recently used first

    def __len__(self) -> int:
        """Batches per epoch (the rows that do not fill a last batch wait for another epoch's order)."""
        return self.num_rows // self.batch_size

    def __getstate__(self):  # file descriptors are per process: a copy (a DataLoader worker, say) opens its own
        return {**self.__dict__, "_open": {}}

    def __del__(self):
        self.close()

    def close(self) -> None:
        """Close the shard files this object holds open (reading again reopens them)."""
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)
        self._open = {}

    def process(self) -> tuple[int, int]:
        """(rank, world size): as given, else torchrun's (the process group fit joins), else (0, 1)."""
        if self.rank is not None:
            rank, world = self.rank, self.world_size
        else:
            env = current_env()
            rank, world = env.rank, env.world_size
        if self.batch_size % world or not 0 <= rank < world:
            raise ValueError(f"a global batch of {self.batch_size} rows cannot be split evenly over {world} "
                             f"processes (rank {rank}); make batch_size a multiple of the process count")
        return rank, world

    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        """The row numbers of global batch `index` of `epoch` (every process's rows, in process order).
        Unshuffled, each epoch starts where the last one stopped, so the rows left over come first."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size, dtype=np.int64)
        if self.shuffle:
            return permute(positions, self.num_rows, self.seed, epoch)
        return (positions + epoch * len(self) * self.batch_size) % self.num_rows

    def read_rows(self, rows) -> torch.Tensor:
        """Rows [len(rows), seq_len] (int64), read from the shards."""
        rows = np.asarray(rows, dtype=np.int64)
        length, itemsize = self.seq_len, self.dtype.itemsize
        buffer = np.empty((len(rows), length), dtype=self.dtype)
        for j, start in enumerate((rows * (length - 1)).tolist()):
            shard = int(np.searchsorted(self.ends, start, side="right"))
            done = 0
            while done < length:  # a row runs on into the next shard where one ends
                at = start + done - int(self.starts[shard])
                n = min(length - done, int(self.sizes[shard]) - at)
                target = memoryview(buffer[j, done:done + n]).cast("B")
                if _read_at(self._fd(shard), target, at * itemsize) != n * itemsize:
                    raise OSError(f"{self.files[shard]} ended early: it changed after it was opened")
                done += n
                shard += 1
        return torch.from_numpy(buffer.astype(np.int64))

    def _fd(self, shard: int) -> int:
        fd = self._open.pop(shard, None)
        if fd is None:
            fd = os.open(self.files[shard], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            if len(self._open) >= MAX_OPEN_SHARDS:
                os.close(self._open.pop(next(iter(self._open))))
        self._open[shard] = fd  # most recently used last
        return fd

    def __iter__(self):
        rank, world = self.process()
        per = self.batch_size // world
        while True:
            while self.position < len(self):
                rows = self.batch_rows(self.epoch, self.position)[rank * per:(rank + 1) * per]
                self.position += 1  # counted before yielding: a checkpoint taken now resumes after this batch
                ids = self.read_rows(rows)
                yield {"input_ids": ids, "labels": ids.clone()}  # two tensors: labels masked in place keep the inputs
            self.epoch, self.position = self.epoch + 1, 0

    def restart(self) -> None:
        """Go back to the first batch of epoch 0, where a new `TokenShards` starts (`fit` calls it when a run
        starts afresh, as `Batches.restart`)."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        """Where iteration stands, the same on every process (global batches), and what it is of."""
        return {"epoch": self.epoch, "index": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_rows": self.num_rows, "shuffle": self.shuffle, "corpus": self.corpus_id}

    def load_state_dict(self, state: dict) -> None:
        # OtherSetting, a ValueError naming the parameter: a command says it in its flags (train-expanded does)
        mine = self.state_dict()
        if not isinstance(state, dict) or not set(mine) <= set(state):
            raise OtherSetting(f"cannot resume these token shards: the checkpoint's data position is not a "
                               f"TokenShards' ({state!r:.120}): the run took its batches from another kind of "
                               "source; resume with it", "source", had=None, now="TokenShards")
        for key in ("corpus", "seq_len", "num_rows", "seed", "batch_size", "shuffle"):
            if key == "corpus" and state[key] != mine[key]:
                raise OtherSetting(f"cannot resume on these token shards: the checkpoint was trained on another "
                                   f"corpus (fingerprint {state[key]!r}, these {mine[key]!r}): its tokenizer, its "
                                   "tokens or where its shards are cut differ", key, had=state[key], now=mine[key])
            if state[key] != mine[key]:
                raise OtherSetting(f"cannot resume these token shards: the checkpoint's data had {key}="
                                   f"{state[key]!r}, these have {key}={mine[key]!r}", key, had=state[key],
                                   now=mine[key])
        self.epoch, self.position = state["epoch"], state["index"]

    def describe(self) -> str:
        return (f"{self.directory}: {self.tokens:,} tokens in {len(self.files)} shard(s), {self.num_rows:,} rows of "
                f"{self.seq_len}, {len(self):,} batches of {self.batch_size} an epoch")
