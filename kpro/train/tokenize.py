"""Text corpora -> token shards (`python -m kpro tokenize`): streamed, tokenized on several processes,
written shard by shard, resumable.

Inputs are read as `train-expanded` reads them: a `.jsonl` file holds one JSON object with a "text" string
per line; any other file is plain text with documents separated by blank lines; a directory stands for
its `*.txt` and `*.jsonl` files (any case, hidden folders skipped), sorted by path; a `.json` file is
refused (one JSON document, or text?). Each document becomes `[bos] tokens eos` with the
tokenizer's own eos, and its bos where it adds one (the framing of `kpro.train.pack_documents`), so
`TokenShards` over the result gives exactly the rows that `train-expanded` packs in memory.

The main process reads and cuts documents and writes shards; workers (spawned processes running
kpro/_tokenize_worker.py, each with its own tokenizer and no torch) parse and tokenize chunks of about a
megabyte, at most two chunks per worker in flight, in order; each result comes back as a file in a scratch
directory inside the output directory (see `kpro._tokenize_worker.encode_to_file`). After each full shard
the index records where the input stands (file, byte offset, line, and how many tokens of the document in
progress are already written); a run started again with the same arguments checks that the tokenizer, the
documents' framing and the inputs up to the file it resumes in are unchanged and goes on from there.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

from .. import _tokenize_worker as worker
from .._numbers import is_integer
from .._run_lock import holding
from .._signals import sigterm_as_ctrl_c, start_resource_tracker, stop_as_sigterm
from .._spawn import spawn_imports_main
from .._tokenize_worker import jsonl_text
from ..errors import StoppedAndSaid
from ..tokenizer import TOKENIZER_FILES, document_bos_id, load_tokenizer
from .progress import StatusLine, format_duration
from .shards import (DEFAULT_SHARD_TOKENS, INDEX_FILE, ShardWriter, check_shard_tokens, is_shard_directory, new_index,
                     prepare_directory, read_index, write_index)

SUFFIXES = (".txt", ".jsonl")
SCRATCH_PREFIX = ".tokenize-scratch-"  # the workers' results, in --out
CHUNK_BYTES = 1 << 20


def is_jsonl(path: Path) -> bool:
    """A .jsonl file (one JSON object a line), else plain text. A .json file is refused: one JSON document
    or text to read as it is? Not guessed."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise ValueError(f"{path} is a .json file: kpro reads .jsonl files (one JSON object with a \"text\" "
                         "string per line) and plain text; convert it, or rename it .txt to read it as text")
    return suffix == ".jsonl"


def input_files(paths) -> list[Path]:
    """The files to read, in order: each file as given, each directory's *.txt and *.jsonl (any case) sorted
    by path, outside hidden folders (an editor's `.ipynb_checkpoints/` copy would be read twice)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise FileNotFoundError(f"{path} holds no {' or '.join(SUFFIXES)} files (hidden ones are skipped)")
            files += found
        elif path.is_file():
            is_jsonl(path)  # a .json file refused now, not when the reader reaches it
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus file {path} does not exist")
    if not files:
        raise ValueError("no corpus files given")
    refuse_repeated_files(files)
    return files


def refuse_repeated_files(files: list[Path]) -> None:
    """A file named twice (directly, through a directory, or by another path): read twice, or meant once?
    Refused, not guessed."""
    seen = {}
    for file in files:
        if seen.setdefault(file.resolve(), file) is not file:
            raise ValueError(f"{file} is given twice (also as {seen[file.resolve()]}, directly or through a directory); "
                             "name each corpus file once (repeat a file's text in it to weigh it more)")


def read_documents(files: list[Path], file: int = 0, offset: int = 0, line: int = 1) -> Iterator[tuple]:
    """(file index, line, byte offset, payload) for every document from (file, offset, line) on: payload is
    the text of a plain-text document, or the raw line of a .jsonl record (parsed by the workers)."""
    for index in range(file, len(files)):
        path = files[index]
        jsonl = is_jsonl(path)
        with open(path, "rb") as f:
            if index == file:
                f.seek(offset)
            else:
                offset, line = 0, 1
            lines, first = [], None
            for raw in f:
                if jsonl:
                    if not _blank_jsonl_line(raw, first_line=offset == 0):
                        yield index, line, offset, raw
                else:
                    try:  # a BOM opens some editors' files (Notepad's "UTF-8"): not text, as in .jsonl files
                        text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
                    except UnicodeDecodeError as err:
                        raise ValueError(f"{path}:{line}: not UTF-8 ({err.reason})") from None
                    text = text[:-1] if text.endswith("\n") else text
                    text = text[:-1] if text.endswith("\r") else text
                    if text.strip(" \t"):
                        if not lines:
                            first = (line, offset)
                        lines.append(text)
                    elif lines:  # a blank line ends a document
                        document = "\n".join(lines).strip()
                        if document:
                            yield index, first[0], first[1], document
                        lines = []
                offset += len(raw)
                line += 1
            if lines and (document := "\n".join(lines).strip()):
                yield index, first[0], first[1], document


def _blank_jsonl_line(raw: bytes, first_line: bool = False) -> bool:
    """A .jsonl line of whitespace only, skipped as `read_jsonl` (train-expanded) skips it: whitespace as
    str.strip() sees it, Unicode's (U+00A0, a BOM opening the file) included, where bytes.strip() sees ASCII's."""
    stripped = raw.strip()
    if not stripped or stripped[:1] == b"{":  # no text, or a record: nearly every line, told without decoding
        return not stripped
    try:
        return not raw.decode("utf-8-sig" if first_line else "utf-8").strip()
    except UnicodeDecodeError:
        return False  # not UTF-8: the worker names the line


def iter_documents(paths) -> Iterator[str]:
    """The text of every document of the corpus files `paths`, streamed."""
    files = input_files(paths)
    for index, line, _, payload in read_documents(files):
        yield payload if isinstance(payload, str) else jsonl_text(payload, files[index], line)


def tokenizer_identity(directory: Path, tokenizer=None) -> dict:
    """Which tokenizer: its file, the file's SHA-256, its class, vocabulary size and special ids. `tokenizer`:
    the one loaded from `directory`, where the caller has it."""
    directory = Path(directory)
    tokenizer = load_tokenizer(directory) if tokenizer is None else tokenizer
    # the file load_tokenizer read (a tokenizer.json where tokenizer.model lacks the config's added tokens)
    file = getattr(tokenizer, "path", None) or next(directory / name for name in TOKENIZER_FILES
                                                    if (directory / name).is_file())
    return {"file": file.name, "sha256": _sha256(file), "class": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What makes two tokenizers the same: tokenizer.json's bos and eos are set by tokenizer_config.json or
# config.json beside it (a base and an instruct checkpoint often differ only there), so the file's hash alone
# would take documents ended by another eos as the same corpus.
IDENTITY = ("sha256", "class", "vocab_size", "bos_id", "eos_id")


def tokenizer_differences(saved: dict, here: dict, labels=("there", "here")) -> list[str]:
    """What differs between two `tokenizer_identity`s, each as "name (saved's there, here's here)"."""
    def shown(key, value):
        return f"{value[:12]}..." if key == "sha256" and isinstance(value, str) else repr(value)
    names = {"sha256": f"{here['file']}'s sha256"}
    return [f"{names.get(key, key)} ({shown(key, saved.get(key))} {labels[0]}, {shown(key, here[key])} {labels[1]})"
            for key in IDENTITY if saved.get(key) != here[key]]


def check_tokenizer(index: dict, directory: Path, what: str) -> None:
    """Refuse shards tokenized with another tokenizer than the one in `directory` (its file, class,
    vocabulary size, bos or eos)."""
    here = tokenizer_identity(directory)
    saved = index.get("tokenizer")
    if not saved:  # two tokenizers can share vocabulary size, bos and eos (LLaMA 2's and Mistral's): not a check
        raise ValueError(f"{what} record no tokenizer (written by write_token_shards without tokenizer=), so "
                         f"nothing shows they hold {directory}'s ids; write them with tokenizer="
                         "kpro.train.tokenize.tokenizer_identity(TOKENIZER_DIR), or with `python -m kpro tokenize`")
    differences = tokenizer_differences(saved, here)
    if differences:
        raise ValueError(f"{what} was tokenized with another tokenizer than {directory}'s: {'; '.join(differences)}")


def _chunks(documents, size: int):
    chunk, nbytes = [], 0
    for document in documents:
        chunk.append(document)
        nbytes += len(document[3])
        if nbytes >= size:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------------------ main

def tokenize_corpus(tokenizer_dir, data, out_dir, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                    workers: int | None = None, chunk_bytes: int = CHUNK_BYTES, stream=None) -> dict:
    """Tokenize the corpus files `data` with the tokenizer in `tokenizer_dir` into shards in `out_dir`;
    returns the index. Called again on an interrupted `out_dir`, it resumes; on a complete one, it checks
    the arguments and returns its index. One run at a time in `out_dir` (kpro._run_lock): a second, started
    while one writes (a job submitted twice), would resume from the same index and write the same shards.
    SIGTERM (a scheduler's notice) stops it as Ctrl-C does: the shards written kept, the workers' scratch removed."""
    if workers is not None and (not is_integer(workers) or workers < 1):  # before holding(out_dir) creates it
        raise ValueError(f"workers must be a positive integer or None (one process per usable core), got {workers!r}")
    with holding(out_dir), sigterm_as_ctrl_c():
        return _tokenize_corpus(tokenizer_dir, data, out_dir, shard_tokens, workers, chunk_bytes, stream)


def _tokenize_corpus(tokenizer_dir, data, out_dir, shard_tokens, workers, chunk_bytes, stream) -> dict:
    stream = sys.stderr if stream is None else stream
    tokenizer_dir, out = Path(tokenizer_dir), Path(out_dir)
    files = input_files(data)
    inputs = [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    tokenizer = load_tokenizer(tokenizer_dir)
    identity = tokenizer_identity(tokenizer_dir, tokenizer)
    bos_id = document_bos_id(tokenizer)  # the index's bos_id: the one framing documents, None where none does
    workers = workers or usable_cores()
    check_shard_tokens(shard_tokens, identity["vocab_size"])  # before anything is written
    prepare_directory(out)
    index, start = _start_or_resume(out, identity, bos_id, inputs, shard_tokens, files, stream)
    if index["complete"]:
        return index
    writer = ShardWriter(out, index)
    progress = _Progress(stream, sum(i["bytes"] for i in inputs), [i["bytes"] for i in inputs], index["tokens"])
    skip_first = start["skip"]
    ordinal = start["document"]

    def consume(result) -> None:
        nonlocal skip_first, ordinal
        positions, flat, lengths = result
        end = 0
        for (file_number, line, offset), length in zip(positions, lengths.tolist()):
            tokens, end = flat[end:end + length], end + length
            skip, skip_first = skip_first, 0
            if skip > length:
                raise ValueError(f"cannot resume: {files[file_number]}:{line} now gives {length} tokens, fewer than "
                                 f"the {skip} already written (a tokenizer that does not repeat itself?)")
            resume_at = functools.partial(_resume_point, file=file_number, line=line, offset=offset, document=ordinal,
                                          skip=skip)
            writer.add(tokens[skip:], starts_document=skip == 0, resume_at=resume_at)
            ordinal += 1
        progress.update(positions[-1][0], positions[-1][2], writer)

    documents = read_documents(files, start["file"], start["offset"], start["line"])
    started = time.perf_counter()
    try:
        # closed before the handlers below run, so a pool is shut down first, as leaving its `with` does
        encoded = _encoded_results(workers, tokenizer_dir, files, documents, chunk_bytes, out)
        with contextlib.closing(encoded) as results:
            for result in results:
                consume(result)
    except BrokenProcessPool:
        progress.close()
        # A ValueError, as the command line reports in one line: a worker killed (the OOM killer) is no bug of kpro's
        startup = ""
        if ordinal == start["document"] and spawn_imports_main():  # no chunk came back: maybe none could start
            startup = ("; if none started: spawned workers import the main module again, so call tokenize_corpus "
                       "under `if __name__ == \"__main__\":`, or pass workers=1")
        raise ValueError(f"a tokenizing worker process died, most often killed by the system for lack of memory; the "
                         f"{len(index['shards'])} shard(s) written to {out} are kept: run the same command again to "
                         f"resume (with fewer --workers if memory is short){startup}") from None
    except ValueError as err:  # bad input: say what a fix keeps
        progress.close()
        if not index["shards"]:  # a rerun starts over with the inputs as they are then
            raise
        at = index["resume"]
        read = files[at["file"]]
        raise ValueError(f"{err}; the {len(index['shards'])} shard(s) written to {out} are kept, and once the input "
                         f"is fixed the same command resumes at {read}:{at['line']} if {read} and the files before it "
                         "are unchanged (editing one of those, already tokenized, forces a restart in a new --out)"
                         ) from None
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: {len(index['shards'])} shard(s) written to {out}; run the same command again to resume",
              file=stream)
        raise StoppedAndSaid from None
    if ordinal == 0:  # else a "complete" directory that TokenShards refuses only when training starts
        progress.close()
        raise ValueError(f"the corpus ({', '.join(map(str, data))}) holds no documents: nothing to tokenize")
    index = writer.finish()
    progress.update(len(files) - 1, inputs[-1]["bytes"], writer, final=True)  # the whole input read: 100%
    progress.close()
    elapsed = time.perf_counter() - started
    print(f"wrote {index['tokens']:,} tokens ({index['documents']:,} documents, {index['dtype']}) in "
          f"{len(index['shards'])} shard(s) to {out}/ in {format_duration(elapsed)}", file=stream)
    return index


def usable_cores() -> int:
    """The cores this process may run on (taskset, a Slurm job's or a container's cpuset), where the system says
    (Linux); else all the machine's: one worker per core of a 128-core node in a job given 4 oversubscribes it."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _start_or_resume(out: Path, identity: dict, bos_id: int | None, inputs: list, shard_tokens: int, files: list,
                     stream) -> tuple[dict, dict]:
    """The index to write into `out` and the input position to start from: a new one, or the run there
    resumed (checked to be the same run). A complete run's index is returned as it is (with no position),
    having said so."""
    index = read_index(out, complete=False) if is_shard_directory(out) else None
    if index is not None and not index["complete"] and not index["shards"]:
        # A run that wrote no shard (its input refused, say) resumes from the start anyway: nothing to protect,
        # so inputs fixed since start over rather than be refused as another run's.
        _remove_leftovers(out, index)
        (out / INDEX_FILE).unlink()
        index = None
    if index is not None:
        _check_same_run(index, identity, bos_id, inputs, shard_tokens, out)
        if index["complete"]:
            print(f"{out} is already complete: {index['tokens']:,} tokens in {len(index['shards'])} shard(s)", file=stream)
            return index, None
        start = index["resume"]
        _remove_leftovers(out, index)
        changed = sum(then != now for then, now in zip(index["inputs"], inputs))
        if changed:  # files after the resume position only (_check_same_run): recorded as they are now
            index["inputs"] = inputs
            write_index(out, index)
        print(f"resuming {out} after {len(index['shards'])} shard(s), at {files[start['file']]}:{start['line']}"
              f"{f'; {changed} later input file(s) changed since, read as they are now' if changed else ''}",
              file=stream)
    else:
        start = {"file": 0, "line": 1, "offset": 0, "document": 0, "skip": 0}
        index = new_index(identity["vocab_size"], shard_tokens, bos_id, identity["eos_id"],
                          tokenizer=identity, inputs=inputs)
        index["resume"] = start
        write_index(out, index)
    return index, start


def _resume_point(done: int, *, file: int, line: int, offset: int, document: int, skip: int) -> dict:
    """Where a resume starts once `done` more tokens of the document at (file, line, offset) are written."""
    return {"file": file, "line": line, "offset": offset, "document": document, "skip": skip + done}


def _encoded_results(workers: int, tokenizer_dir: Path, files: list, documents, chunk_bytes: int, out: Path):
    """The tokenizer's results for `documents`, chunk by chunk in order: in this process, or in `workers`
    spawned ones (their results passed through a scratch directory in `out`)."""
    if workers == 1:
        worker.start(str(tokenizer_dir), files)
        try:
            for chunk in _chunks(documents, chunk_bytes):
                yield worker.encode(chunk)
        finally:
            worker.stop()
        return
    # Results come back through files (worker.encode_to_file: a worker killed mid-send would hang the pool).
    # The scratch is in --out, not TMPDIR: a run killed outright leaves it where the rerun removes it.
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=out) as scratch, \
            _worker_pool(workers, tokenizer_dir, files) as pool:
        pending = collections.deque()
        for number, chunk in enumerate(_chunks(documents, chunk_bytes)):
            pending.append(pool.submit(worker.encode_to_file, chunk, os.path.join(scratch, f"{number}.pickle")))
            if len(pending) >= 2 * workers:
                yield worker.read_result(pending.popleft().result())
        while pending:
            yield worker.read_result(pending.popleft().result())


@contextlib.contextmanager
def _worker_pool(workers: int, tokenizer_dir: Path, files: list):
    """A pool of `workers` processes running kpro._tokenize_worker (no torch), shut down on leaving. Spawned, not
    forked: the caller may hold threads (torch's, a trainer's) that a fork would copy half-way. An executor, not a
    Pool: a worker that cannot start is an error, not a hang.

    A pool broken by workers that SIGTERM ended is a stop, as SIGTERM to this process is (KeyboardInterrupt), not a
    crash: a scheduler's notice reaches every process of the job, and this process may see a worker dead of it
    before its own handler runs, or get its own later (one sent process by process) or never (one sent to the
    workers). The pool SIGTERMs the workers left only once it is broken, so a crash (a worker killed by the OOM
    killer's SIGKILL, one that failed to start) leaves another exit code among them, and stays one. (The pool also
    breaks, and SIGTERMs every worker, on a reply this process cannot unpickle; the workers send paths and built-in
    errors, which unpickle.)"""
    context = multiprocessing.get_context("spawn")
    start_resource_tracker()  # before the pool starts it, hung up with the terminal
    pool = ProcessPoolExecutor(workers, context, worker.start, (str(tokenizer_dir), files, True))
    processes = getattr(pool, "_processes", {})  # CPython's {pid: process}, filled as workers start
    try:
        with pool:  # leaving it waits for the workers: their exit codes are known below
            yield pool
    except BrokenProcessPool:
        if _ended_by_sigterm(list(processes.values())):
            stop_as_sigterm()
        raise


def _ended_by_sigterm(processes: list) -> bool:
    """Whether every one of a broken pool's worker processes (ended and waited for) died of SIGTERM."""
    return bool(processes) and all(process.exitcode == -signal.SIGTERM for process in processes)


def _check_same_run(index: dict, identity: dict, bos_id: int | None, inputs: list, shard_tokens: int,
                    out: Path) -> None:
    differences = [f"the tokenizer's {difference}"
                   for difference in tokenizer_differences(index.get("tokenizer") or {}, identity, ("then", "now"))]
    if index.get("bos_id") != bos_id:  # an index from before a bos was left to tokenizers adding one differs here
        differences.append(f"the documents' framing ({framing(index.get('bos_id'))} then, {framing(bos_id)} now"
                           f"{'' if bos_id is not None else ': the tokenizer adds none to text'})")
    if index.get("inputs") != inputs and not _unread_files_changed_only(index, inputs):
        differences.append(f"the input files ({input_differences(index.get('inputs') or [], inputs)})")
    if index.get("shard_tokens") != shard_tokens:
        differences.append(f"--shard-tokens ({index.get('shard_tokens')} then, {shard_tokens} now)")
    if differences:
        raise ValueError(f"{out} was written with other arguments: {'; '.join(differences)} differ; use a new "
                         "--out directory (or delete this one)")


def _unread_files_changed_only(index: dict, inputs: list) -> bool:
    """Whether `inputs` differ from the index's only in the size or time of files after the one an incomplete run
    resumes in: the shards hold none of their bytes (a bad line fixed near the end of a corpus keeps them)."""
    then, resume = index.get("inputs") or [], index.get("resume")
    if index["complete"] or resume is None or [i["path"] for i in then] != [i["path"] for i in inputs]:
        return False
    return then[:resume["file"] + 1] == inputs[:resume["file"] + 1]


def framing(bos_id: int | None) -> str:
    """What opens each document of a shard index with `bos_id`, in words."""
    return "no bos" if bos_id is None else f"bos id {bos_id}"


def input_differences(then: list, now: list) -> str:
    """How the files read now differ from those read then: the first file dropped, added and changed."""
    before, after = {i["path"]: i for i in then}, {i["path"]: i for i in now}
    dropped = [p for p in before if p not in after]
    added = [p for p in after if p not in before]
    changed = [p for p in after if p in before and after[p] != before[p]]
    parts = [f"{len(paths)} {what}, {paths[0]} first" for paths, what in
             ((dropped, "no longer read"), (added, "read now, not then"), (changed, "changed in size or time"))
             if paths]
    return "; ".join(parts) or "the same files in another order"


def _remove_leftovers(out: Path, index: dict) -> None:
    """Temporary files of a killed writer, shards it renamed into place but never listed, and the workers' scratch
    directory of a run killed outright."""
    listed = {INDEX_FILE} | {name for s in index["shards"] for name in (s["file"], s["starts"])}
    for path in out.iterdir():  # only the writer's own names: a user's .gitignore or notes stay
        if path.name not in listed and path.is_file() and _WRITER_FILE.fullmatch(path.name):
            path.unlink()
        elif path.is_dir() and path.name.startswith(SCRATCH_PREFIX):
            shutil.rmtree(path)


# A shard or its starts (renamed into place), or a temporary of them or of the index (`.NAME.tmp-PID`).
_WRITER_FILE = re.compile(r"(\.)?(tokens-\d{5}\.(bin|starts\.npy)|index\.json)(?(1)\.tmp-\d+)")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class _Progress:
    """`tokenize  41% 1.23 GB/3.00 GB  25,678,901 tokens  3 shards  1,234,567 tok/s  eta 0:42` on stderr: redrawn
    in place on a terminal (at most ten times a second), a line every 5% of the input elsewhere."""

    def __init__(self, stream, total_bytes: int, sizes: list[int], tokens_before: int):
        self.total, self.tokens_before = max(total_bytes, 1), tokens_before
        self.before = list(itertools.accumulate([0] + sizes))
        self.line = StatusLine(stream)
        self.start, self.last_step = time.perf_counter(), -1
        self.first_bytes = None

    def update(self, file: int, offset: int, writer: ShardWriter, final: bool = False) -> None:
        done = self.before[file] + offset
        if self.first_bytes is None:
            self.first_bytes = done
        tokens = writer.index["tokens"] + writer.filled
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (done - self.first_bytes) / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        step = int(20 * done / self.total)
        milestone, self.last_step = step > self.last_step, max(step, self.last_step)
        self.line.show(f"tokenize {done / self.total:4.0%} {_size(done)}/{_size(self.total)}  {tokens:,} tokens  "
                       f"{len(writer.index['shards'])} shards  {(tokens - self.tokens_before) / elapsed:,.0f} tok/s  "
                       f"eta {format_duration(eta)}", milestone=milestone, final=final)

    def close(self) -> None:
        self.line.close()
