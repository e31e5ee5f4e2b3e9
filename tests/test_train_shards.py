"""Token shards: the format against `pack_documents`, the order (a permutation per seed and epoch), rank
splits, exact resume (mid-epoch, through fit, after SIGKILL), flat resident memory over a corpus many times
the bound it is given, and `python -m kpro tokenize` with the real SentencePiece models of tests/data
(resumed after SIGKILL, equal to train-expanded's in-memory tokenization)."""
import errno
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import tempfile
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import kpro
from kpro import train as kt
from kpro._run_lock import LOCK_FILE
from kpro._signals import sigterm_as_ctrl_c
from kpro.cli import main
from kpro.errors import DirectoryInUse
from kpro.expansion.posttrain import corpus_batches, corpus_rows, read_corpus
from kpro.train.shards import corpus_id, permute
from kpro.train.tokenize import check_tokenizer, iter_documents, tokenizer_identity

from conftest import child_processes, held_by_another_run, process_running, randomize_norms, tiny_config

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit must reduce in the same order
    yield
    torch.set_num_threads(threads)


def documents(n=120, vocab=67, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g) for k in torch.randint(1, 40, (n,), generator=g)]


def all_rows(shards):
    return shards.read_rows(np.arange(shards.num_rows))


@pytest.mark.parametrize("shard_tokens", [7, 100, 10_000], ids=["shards-shorter-than-a-row", "small", "one-shard"])
def test_rows_are_pack_documents_rows_across_shard_boundaries(tmp_path, shard_tokens):
    docs = documents(n=30 if shard_tokens < 10 else 120)  # each shard is written and fsynced: few of them
    index = kt.write_token_shards(tmp_path / "s", docs, vocab_size=67, eos_id=2, bos_id=1, shard_tokens=shard_tokens)
    assert index["complete"] and index["dtype"] == "uint16" and index["documents"] == len(docs)
    assert index["tokens"] == sum(len(d) + 2 for d in docs)
    assert [s["tokens"] for s in index["shards"][:-1]] == [shard_tokens] * (len(index["shards"]) - 1)
    starts = np.concatenate([np.load(tmp_path / "s" / s["starts"]) + i * shard_tokens
                             for i, s in enumerate(index["shards"])])
    assert starts.tolist() == np.cumsum([0] + [len(d) + 2 for d in docs[:-1]]).tolist()  # document boundaries
    for seq_len in (2, 16, 33):
        shards = kt.TokenShards(tmp_path / "s", seq_len=seq_len, batch_size=1, shuffle=False)
        assert torch.equal(all_rows(shards), kt.pack_documents(docs, seq_len, eos_id=2, bos_id=1))


def test_large_vocabularies_take_uint32(tmp_path):
    docs = [torch.tensor([70_000, 3, 99_999]), torch.tensor([65_536, 5])]
    index = kt.write_token_shards(tmp_path / "s", docs, vocab_size=100_000, eos_id=2, shard_tokens=4)
    assert index["dtype"] == "uint32" and (tmp_path / "s" / "tokens-00000.bin").stat().st_size == 16
    shards = kt.TokenShards(tmp_path / "s", seq_len=3, batch_size=1, shuffle=False)
    assert torch.equal(all_rows(shards), kt.pack_documents(docs, 3, eos_id=2))
    with pytest.raises(ValueError, match=r"document 0 holds token id 70000, outside the vocabulary \(0 ... 31999, "
                                         r"vocab_size 32000\)"):
        kt.write_token_shards(tmp_path / "t", docs, vocab_size=32_000, eos_id=2)
    with pytest.raises(TypeError, match="document 0 holds torch.float64 values"):  # truncated before
        kt.write_token_shards(tmp_path / "u", [np.array([5.7, 6.2])], vocab_size=100, eos_id=2)
    with pytest.raises(TypeError, match=r"document 0 is one token id \(10\), not a document: pass a list of documents"):
        kt.write_token_shards(tmp_path / "w", [10, 11, 12], vocab_size=100, eos_id=2)  # each id a document before
    with pytest.raises(ValueError, match="eos_id must be a token id"):  # 2.5 stored as 2, 2.5 in the index
        kt.write_token_shards(tmp_path / "v", [[5, 6]], vocab_size=100, eos_id=2.5)
    assert not (tmp_path / "v").exists()
    for ids, name in ((dict(eos_id=100), "eos_id"), (dict(eos_id=2, bos_id=100), "bos_id")):  # the documents blamed
        with pytest.raises(ValueError, match=rf"{name} must be a token id of the model \(an integer in \[0, 100\)\), "
                                             "got 100"):
            kt.write_token_shards(tmp_path / "w", [[5, 6]], vocab_size=100, **ids)


def test_shards_are_little_endian_and_an_index_naming_another_dtype_is_refused(tmp_path):
    """The index's "uint16" was read in the machine's byte order, where the docs say little-endian; a dtype
    kpro never writes (another byte order, signed, 8 bytes) was read as it said, giving other token ids."""
    docs = [[5, 600, 7], [65_000]]
    index = kt.write_token_shards(tmp_path / "s", docs, vocab_size=65_536, eos_id=2, bos_id=1)
    assert index["dtype"] == "uint16"  # the name indexes have always held: the corpus fingerprint is unchanged
    stream = [1, 5, 600, 7, 2, 1, 65_000, 2]
    assert (tmp_path / "s" / "tokens-00000.bin").read_bytes() == np.array(stream, dtype="<u2").tobytes()
    shards = kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=1)
    assert shards.dtype == np.dtype("<u2") and shards.read_rows([0]).tolist() == [stream]
    for dtype in (">u2", "int64", "<u2", None):
        (tmp_path / "s" / "index.json").write_text(json.dumps({**index, "dtype": dtype}))
        with pytest.raises(ValueError, match=rf"index.json has dtype {re.escape(repr(dtype))}; token shards hold "
                                             r"uint16 or uint32 \(little-endian\)"):
            kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=1)


@pytest.mark.parametrize("change, message", [
    (lambda index: index.pop("shards"), r"has no \"shards\" list"),
    (lambda index: index.update(shards={"a": 1}), r"has no \"shards\" list"),
    (lambda index: index.update(complete=False) or index.pop("shards"), r"has no \"shards\" list"),
    (lambda index: index["shards"][1].pop("tokens"), r"shard 1 .* needs a \"file\" name and a \"tokens\" count"),
    (lambda index: index["shards"][0].update(tokens="10"), r"shard 0 .* needs a \"file\" name and a \"tokens\" count"),
    (lambda index: index["shards"].__setitem__(0, "tokens-00000.bin"), r"shard 0 .* needs a \"file\" name"),
    (lambda index: index["shards"][0].update(file="../t/tokens-00000.bin"), r"shard 0 .* needs a \"file\" name"),
], ids=["missing", "not a list", "incomplete and missing", "entry without tokens", "tokens a string",
        "entry not an object", "file outside the directory"])
def test_an_index_whose_shard_list_is_malformed_is_named(tmp_path, change, message):
    """A shard list missing or not a list, or an entry without its "tokens", ended in a bare KeyError or
    TypeError; a count given as a string was read as a number."""
    index = kt.write_token_shards(tmp_path / "t", [list(range(1, 20)), list(range(5, 30))], vocab_size=100,
                                  eos_id=0, shard_tokens=10)
    change(index)
    (tmp_path / "t" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 't' / 'index.json'))} {message}"):
        kt.TokenShards(tmp_path / "t", seq_len=4, batch_size=2, rank=0, world_size=1)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_the_order_is_a_permutation_per_seed_and_epoch(n):
    p = permute(np.arange(n), n, seed=0, epoch=0)
    assert sorted(p.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(p, np.arange(n))
        assert not np.array_equal(p, permute(np.arange(n), n, seed=0, epoch=1))
        assert not np.array_equal(p, permute(np.arange(n), n, seed=1, epoch=0))
        assert np.array_equal(p[5:9], permute(np.arange(5, 9), n, seed=0, epoch=0))  # computed position by position


def test_an_epoch_draws_each_row_once_and_ranks_split_each_global_batch(tmp_path):
    kt.write_token_shards(tmp_path / "s", documents(), vocab_size=67, eos_id=2, shard_tokens=50)
    whole = kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=6, seed=5)
    per_epoch = len(whole)
    it = iter(whole)
    global_batches = [next(it)["input_ids"] for _ in range(2 * per_epoch)]
    rows = np.concatenate([whole.batch_rows(0, i) for i in range(per_epoch)])
    assert len(set(rows.tolist())) == len(rows) == per_epoch * 6  # without replacement
    assert not np.array_equal(whole.batch_rows(0, 0), whole.batch_rows(1, 0))  # reshuffled each epoch
    assert torch.equal(global_batches[per_epoch], whole.read_rows(whole.batch_rows(1, 0)))
    ranks = [iter(kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=6, seed=5, rank=r, world_size=3)) for r in range(3)]
    for batch in global_batches:
        parts = [next(r)["input_ids"] for r in ranks]
        assert all(p.shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat(parts), batch)  # rank r holds rows 2r, 2r+1 of the global batch
    with pytest.raises(ValueError, match="cannot be split evenly over 4 processes"):
        next(iter(kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=6, rank=0, world_size=4)))
    share = kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=6, rank=1, world_size=3)
    with pytest.raises(ValueError, match="takes the rows of process 1 of 3, and this run has one process"):
        kt.fit(kpro.Llama(tiny_config(num_hidden_layers=1)), share, tmp_path / "run", steps=1)  # a third, before


def test_numpy_counts_and_seeds_are_python_ints(tmp_path):
    """A NumPy vocab_size, shard_tokens, seq_len, batch_size or seed was refused as no integer; taken now, as ints
    (the index is JSON, the state is checkpointed, and the seed's mixing takes the int path: the same rows)."""
    index = kt.write_token_shards(tmp_path / "s", documents(), vocab_size=np.int64(67), eos_id=np.int64(2),
                                  shard_tokens=np.int64(50), bos_id=np.int32(1))
    assert (index["vocab_size"], index["shard_tokens"], index["eos_id"], index["bos_id"]) == (67, 50, 2, 1)
    assert all(type(index[key]) is int for key in ("vocab_size", "shard_tokens", "eos_id", "bos_id"))
    numpy_args = kt.TokenShards(tmp_path / "s", seq_len=np.int64(8), batch_size=np.int32(6), seed=np.int64(5),
                                rank=np.int64(1), world_size=np.int64(3))
    plain = kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=6, seed=5, rank=1, world_size=3)
    assert json.dumps(numpy_args.state_dict()) == json.dumps(plain.state_dict())
    assert torch.equal(next(iter(numpy_args))["input_ids"], next(iter(plain))["input_ids"])
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*61 - 2, got .* \(float64\)$"):
        kt.TokenShards(tmp_path / "s", seed=np.float64(5))
    # the order mixes the seed modulo 2**64: -1 drew what 2**64 - 1 draws. Batches' range, as train-expanded's
    # --seed feeds either
    for seed in (-1, 2 ** 61 - 1, 2 ** 64):
        with pytest.raises(ValueError, match=rf"seed must be an integer from 0 to 2\*\*61 - 2, got {seed}"):
            kt.TokenShards(tmp_path / "s", seed=seed)


def test_resume_mid_epoch_is_exact_and_refuses_other_data(tmp_path):
    kt.write_token_shards(tmp_path / "s", documents(), vocab_size=67, eos_id=2, shard_tokens=64)
    straight = kt.TokenShards(tmp_path / "s", seq_len=10, batch_size=4, seed=1)
    epoch, straight = len(straight), iter(straight)
    expected = [next(straight)["input_ids"] for _ in range(epoch + 8)]  # past an epoch boundary
    for stop in (17, epoch + 3):  # in epoch 0, and in epoch 1 (another order: the saved epoch must be restored)
        first = kt.TokenShards(tmp_path / "s", seq_len=10, batch_size=4, seed=1)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # plain data, as checkpoints hold it
        resumed = kt.TokenShards(tmp_path / "s", seq_len=10, batch_size=4, seed=1)
        resumed.load_state_dict(state)
        it = iter(resumed)
        assert all(torch.equal(next(it)["input_ids"], want) for want in expected[stop:])
    for other, key in [(dict(seq_len=11), "seq_len"), (dict(seed=2), "seed"), (dict(batch_size=2), "batch_size")]:
        with pytest.raises(ValueError, match=f"had {key}="):
            kt.TokenShards(tmp_path / "s", **{"seq_len": 10, "batch_size": 4, "seed": 1, **other}).load_state_dict(state)
    kt.write_token_shards(tmp_path / "t", documents(seed=1), vocab_size=67, eos_id=2, shard_tokens=64)
    with pytest.raises(ValueError, match="the checkpoint was trained on another corpus"):
        kt.TokenShards(tmp_path / "t", seq_len=10, batch_size=4, seed=1).load_state_dict(state)


def test_a_bad_id_is_traced_to_its_document_and_the_directory_left_is_named_incomplete(tmp_path):
    """An id outside the vocabulary was reported as the range of the whole framed stream (eos included), not
    naming its document; a retry into the directory the failed call left said only that it "already holds
    token shards"."""
    docs = [[5, 6, 7] for _ in range(1000)]
    docs[742] = [5, 100, -3, 7]
    with pytest.raises(ValueError, match=r"^document 742 holds token id 100, outside the vocabulary \(0 ... 99, "
                                         r"vocab_size 100\)$"):
        kt.write_token_shards(tmp_path / "a", docs, vocab_size=100, eos_id=1, shard_tokens=50)
    docs[742] = [5, 99, 7]
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(tmp_path / 'a'))} holds an incomplete token shard "
                                              r"directory \(an earlier write failed or was stopped\), which "
                                              r"write_token_shards does not resume: delete it, or pass another "
                                              r"directory$"):
        kt.write_token_shards(tmp_path / "a", docs, vocab_size=100, eos_id=1, shard_tokens=50)
    shutil.rmtree(tmp_path / "a")
    assert kt.write_token_shards(tmp_path / "a", docs, vocab_size=100, eos_id=1, shard_tokens=50)["complete"]


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a token shard directory"):
        kt.TokenShards(tmp_path)
    kt.write_token_shards(tmp_path / "s", documents(n=10), vocab_size=67, eos_id=2, shard_tokens=16)
    for rank, world in ((0, 0), (-1, 2), (2, 2), (0.0, 2), (True, 2)):  # a ZeroDivisionError, a wrong message before
        with pytest.raises(ValueError, match="rank and world_size must be integers with 0 <= rank < world_size"):
            kt.TokenShards(tmp_path / "s", seq_len=4, rank=rank, world_size=world)
    with pytest.raises(ValueError, match="fewer than one row of 2048"):
        kt.TokenShards(tmp_path / "s")
    with pytest.raises(ValueError, match="fewer than one batch of 100"):
        kt.TokenShards(tmp_path / "s", seq_len=4, batch_size=100)
    (tmp_path / "s" / "tokens-00001.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="tokens-00001.bin should hold 16 tokens"):
        kt.TokenShards(tmp_path / "s", seq_len=4)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="incomplete.*run the same `python -m kpro tokenize`"):
        kt.TokenShards(tmp_path / "s", seq_len=4)
    with pytest.raises(FileExistsError, match="holds an incomplete token shard directory"):
        kt.write_token_shards(tmp_path / "s", [], vocab_size=67, eos_id=2)
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(FileExistsError, match="already holds token shards"):
        kt.write_token_shards(tmp_path / "s", [], vocab_size=67, eos_id=2)
    # no documents: a complete-looking directory of 0 tokens was written, refused only when training started
    with pytest.raises(ValueError, match=r"write_token_shards got no documents: nothing to write to .*empty; pass"):
        kt.write_token_shards(tmp_path / "empty", iter([]), vocab_size=67, eos_id=2)
    assert not (tmp_path / "empty").exists()


# -------------------------------------------------------------------------------------------- with fit

def make_model(seed=0):
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config())
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


FIT = dict(lr=1e-2, save_every=2, clip_grad_norm=1.0, grad_accum=2)


def shard_corpus(directory):
    if not (directory / "index.json").is_file():
        kt.write_token_shards(directory, documents(n=300), vocab_size=67, eos_id=2, bos_id=1, shard_tokens=500)
    return kt.TokenShards(directory, seq_len=24, batch_size=4, seed=0)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in kt.read_metrics(run_dir / "metrics.jsonl")]


def test_fit_on_shards_resumes_bit_for_bit(tmp_path):
    straight = make_model()
    kt.fit(straight, shard_corpus(tmp_path / "s"), tmp_path / "straight", steps=6, **FIT)
    halves = make_model()
    kt.fit(halves, shard_corpus(tmp_path / "s"), tmp_path / "halves", steps=3, **FIT)  # checkpoint at 2 and 3
    kt.fit(make_model(seed=9), shard_corpus(tmp_path / "s"), tmp_path / "halves", steps=6, **FIT)
    resumed = kpro.load_pretrained(tmp_path / "halves" / "step-00000006")
    assert losses(tmp_path / "halves") == losses(tmp_path / "straight")
    for name, tensor in kpro.load_pretrained(tmp_path / "straight" / "step-00000006").state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert kt.read_metrics(tmp_path / "straight" / "metrics.jsonl")[0]["tokens"] == 4 * 24


def test_a_new_run_starts_used_token_shards_from_their_start(tmp_path):
    """A second fit into a new directory (resume=False) went on where the first left the object."""
    kt.fit(make_model(), shard_corpus(tmp_path / "s"), tmp_path / "fresh", steps=3, **FIT)
    used = shard_corpus(tmp_path / "s")
    kt.fit(make_model(), used, tmp_path / "earlier", steps=2, **FIT)
    kt.fit(make_model(), used, tmp_path / "again", steps=3, resume=False, **FIT)
    assert losses(tmp_path / "again") == losses(tmp_path / "fresh")
    assert used.state_dict() == shard_corpus(tmp_path / "s").state_dict() | {"index": 3}


def test_labels_masked_in_place_keep_the_inputs(tmp_path):
    """TokenShards' labels were its input_ids, one tensor: a callback masking labels in place (no loss on the
    bos opening each document) rewrote the inputs, and fit refused ids of -100."""
    class NoLossOnBos(kt.Callback):
        def on_batch(self, run, batch):
            assert (batch["input_ids"] == 1).any()
            batch["labels"][batch["labels"] == 1] = -100
            return batch

    shards = shard_corpus(tmp_path / "s")
    batch = next(iter(shards))
    batch["labels"][:] = -100
    assert torch.equal(batch["input_ids"], shards.read_rows(shards.batch_rows(0, 0)))
    kt.fit(make_model(), shards, tmp_path / "run", steps=2, callbacks=[NoLossOnBos()], **FIT)


def test_fit_on_shards_resumes_exactly_after_sigkill(tmp_path):
    """The process dies by SIGKILL in step 4 (checkpoint at 2): nothing is flushed or cleaned up."""
    kt.write_token_shards(tmp_path / "s", documents(n=300), vocab_size=67, eos_id=2, bos_id=1, shard_tokens=500)
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        torch.set_num_threads(1)
        from kpro import train as kt
        from test_train_shards import FIT, make_model, shard_corpus
        from pathlib import Path

        class Die(kt.Callback):
            def on_step_end(self, run, metrics):
                if run.step == int(sys.argv[2]):
                    os.kill(os.getpid(), signal.SIGKILL)

        kt.fit(make_model(), shard_corpus(Path({str(tmp_path / 's')!r})), sys.argv[1], steps=6, callbacks=[Die()], **FIT)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), "3"], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert [p.name for p in kt.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), "0"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    kt.fit(make_model(), shard_corpus(tmp_path / "s"), tmp_path / "straight", steps=6, **FIT)
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    got = kpro.load_pretrained(tmp_path / "run" / "step-00000006").state_dict()
    for name, tensor in kpro.load_pretrained(tmp_path / "straight" / "step-00000006").state_dict().items():
        assert torch.equal(got[name], tensor), name


# -------------------------------------------------------------------------------------- resident memory

RSS_SCRIPT = """
import sys, numpy as np
from kpro import train as kt

def rss():  # resident set of this process, file-backed mapped pages included
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

shards = kt.TokenShards(sys.argv[1], seq_len=2048, batch_size=64, seed=0)
if sys.argv[2] == "memmap":  # the same rows through np.memmap, to show that the measurement sees mapped pages
    maps = [np.memmap(f, dtype=np.uint16, mode="r") for f in shards.files]
    def read(rows):
        out = []
        for start in (rows * 2047).tolist():
            shard = int(np.searchsorted(shards.ends, start, side="right"))
            at = start - int(shards.starts[shard])
            out.append(np.concatenate([maps[shard][at:at + 2048], maps[min(shard + 1, len(maps) - 1)][:max(0, at + 2048 - len(maps[shard]))]]))
        return np.stack(out).astype(np.int64)
    batches = (read(shards.batch_rows(0, i)) for i in range(len(shards)))
else:
    batches = iter(shards)
next(batches)
base, peak = rss(), 0
for _ in range(len(shards) - 1):
    next(batches)
    peak = max(peak, rss())
print(peak - base, len(shards) * 64 * 2048 * 2)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_resident_memory_stays_flat_over_a_corpus_many_times_the_bound(tmp_path):
    """10^8 tokens (200 MB of uint16) read through in shuffled order: the process may grow by 24 MB, an
    eighth of the corpus, and grows by less. The same rows read through np.memmap grow it by most of the
    corpus (mapped pages are resident), so the measurement would see a reader that maps the corpus."""
    total, piece = 10**8, 10**7
    rng = np.random.default_rng(0)
    kt.write_token_shards(tmp_path / "big", (rng.integers(3, 32000, piece, dtype=np.uint16) for _ in range(total // piece)),
                          vocab_size=32000, eos_id=2, shard_tokens=25_000_000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def grow(reader):
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big"), reader], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return [int(x) for x in done.stdout.split()]

    grown, streamed = grow("shards")
    assert streamed > 190e6 and grown < 24e6, (grown, streamed)
    mapped, _ = grow("memmap")
    assert mapped > 100e6, mapped


# ----------------------------------------------------------------------------------------- tokenize

def sentencepiece_dir(tmp_path, model):
    directory = tmp_path / model.split(".")[0]
    directory.mkdir()
    shutil.copy(DATA / model, directory / "tokenizer.model")
    return directory


CORPUS_TEXT = ["The quick brown fox jumps over the lazy dog.",
               "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich.", "数字 3719 × 3349 = 12454931",
               "  indented\r\nwindows lines\r\n", "tabs\tand   spaces", "classic\rMac\r\rline ends"]
# a.txt's documents: lines end at \n or \r\n (a blank \r\n line ends a document too) but a lone CR is text to
# both readers (read_corpus split at it before); a document's leading and trailing whitespace is dropped
A_TXT_DOCUMENTS = [*CORPUS_TEXT[:3], "indented\nwindows lines", *CORPUS_TEXT[4:]] * 6 + ["last", "crlf\n  ends"]


def write_corpus(directory):
    directory.mkdir()
    text = CORPUS_TEXT
    (directory / "a.txt").write_text("\n\n".join(text * 6) + "\n \t\n\n\nlast\r\n\r\n\tcrlf\r\n  ends\r\n",
                                     encoding="utf-8")
    (directory / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(text * 4))
                                       + "\n\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    (directory / "notes.md").write_text("not read: only *.txt and *.jsonl of a directory\n")
    return [directory / "a.txt", directory / "b.jsonl"]


@pytest.mark.parametrize("model,workers", [("mistral_7b_tokenizer.model", 2), ("sentencepiece_test_model.model", 1)])
def test_tokenize_gives_train_expandeds_rows(tmp_path, model, workers):
    files = write_corpus(tmp_path / "corpus")
    tok_dir = sentencepiece_dir(tmp_path, model)
    assert list(iter_documents([tmp_path / "corpus"])) == read_corpus(files)
    assert read_corpus(files[:1]) == A_TXT_DOCUMENTS
    log = io.StringIO()
    index = kt.tokenize_corpus(tok_dir, [tmp_path / "corpus"], tmp_path / "tokens", shard_tokens=97,
                               workers=workers, chunk_bytes=200, stream=log)
    tok = kpro.load_tokenizer(tok_dir)
    assert index["tokenizer"]["vocab_size"] == tok.vocab_size and index["documents"] == len(read_corpus(files))
    assert index["tokenizer"]["file"] == "tokenizer.model" and index["tokenizer"]["class"] == "Tokenizer"
    assert index["tokenizer"]["sha256"] == hashlib.sha256((DATA / model).read_bytes()).hexdigest()
    assert index["dtype"] == "uint16" and index["tokens"] == sum(s["tokens"] for s in index["shards"])
    progress = log.getvalue().splitlines()  # not a terminal: a line every 5% of the input, the last at 100%
    assert len(progress) >= 3 and all(re.match(r"tokenize +\d+% .* tokens .* shards .* tok/s  eta ", line)
                                       for line in progress[:-1]), progress
    assert progress[-2].startswith("tokenize 100% ") and f"{index['tokens']:,} tokens" in progress[-2]
    assert progress[-1].startswith(f"wrote {index['tokens']:,} tokens ({index['documents']:,} documents, uint16)")
    for seq_len in (16, 64):
        shards = kt.TokenShards(tmp_path / "tokens", seq_len=seq_len, batch_size=1, shuffle=False)
        assert torch.equal(all_rows(shards), corpus_rows(read_corpus(files), tok, seq_len))


def test_tokenizing_in_this_process_keeps_no_tokenizer_after_it_returns_or_fails(tmp_path):
    """workers=1 tokenizes in the calling process through kpro._tokenize_worker, whose globals kept the tokenizer
    and the file list after the call (a notebook's memory, until the next call replaced them)."""
    from kpro import _tokenize_worker
    files = write_corpus(tmp_path / "corpus")
    tok_dir = sentencepiece_dir(tmp_path, "sentencepiece_test_model.model")
    kt.tokenize_corpus(tok_dir, files, tmp_path / "tokens", workers=1, stream=io.StringIO())
    assert _tokenize_worker._TOKENIZER is None and _tokenize_worker._FILES == []
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        kt.tokenize_corpus(tok_dir, [tmp_path / "bad.jsonl"], tmp_path / "bad", workers=1, stream=io.StringIO())
    assert _tokenize_worker._TOKENIZER is None and _tokenize_worker._FILES == []


def test_tokenize_workers_import_no_torch():
    """Each spawned worker imports kpro._tokenize_worker: a tokenizer, numpy, no torch (a second and 300 MB a
    worker, one worker per core)."""
    code = ("import sys, kpro._tokenize_worker\n"
            "assert 'torch' not in sys.modules and 'kpro.train' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


class _KillingPool(kt.tokenize.ProcessPoolExecutor):
    """tokenize_corpus's pool, one of whose workers is SIGKILLed (as the OOM killer does) at the `kill_at`th
    submitted chunk; without `kill_at`, it records what a worker does with SIGINT and SIGTERM."""
    kill_at = None
    submits = 0
    sigint = []
    sigterm = []

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        type(self).submits += 1
        if type(self).submits == 1 and self.kill_at is None:
            type(self).sigint.append(super().submit(signal.getsignal, signal.SIGINT).result())
            type(self).sigterm.append(super().submit(signal.getsignal, signal.SIGTERM).result())
        if type(self).submits == self.kill_at:
            process = next(iter(self._processes.values()))
            process.kill()
            process.join()
        return future


def killing_pool(monkeypatch, kill_at):
    pool = type("Pool", (_KillingPool,), {"kill_at": kill_at, "submits": 0, "sigint": [], "sigterm": []})
    monkeypatch.setattr(kt.tokenize, "ProcessPoolExecutor", pool)
    return pool


def main_module(monkeypatch, script=None):
    """The caller's __main__ as spawned workers see it: `python -m kpro`'s, or a script file's (re-imported)."""
    module = types.ModuleType("__main__")
    if script is None:
        module.__spec__ = importlib.util.find_spec("kpro.__main__")
    else:
        script.write_text("")
        module.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", module)


def test_a_killed_tokenizing_worker_is_one_error_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    """A worker killed for lack of memory gave a RuntimeError traceback, whose advice (a script's `if __name__ ==
    "__main__":`, or `python -m kpro tokenize`) was for API callers whose workers could not start."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(200)))
    monkeypatch.setitem(kt.tokenize_corpus.__kwdefaults__, "chunk_bytes", 200)
    main_module(monkeypatch)
    pool = killing_pool(monkeypatch, kill_at=12)
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "c.txt"), "--out",
            str(tmp_path / "out"), "--shard-tokens", "100", "--workers", "2"]
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    shards = len(json.loads((tmp_path / "out" / "index.json").read_text())["shards"])
    assert shards > 0 and pool.submits >= 12
    assert err == (f"error: a tokenizing worker process died, most often killed by the system for lack of memory; the "
                   f"{shards} shard(s) written to {tmp_path / 'out'} are kept: run the same command again to resume "
                   "(with fewer --workers if memory is short)"), err
    pool = killing_pool(monkeypatch, kill_at=None)
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().err and kt.TokenShards(tmp_path / "out", seq_len=8).num_rows > 0


@pytest.mark.parametrize("script", [False, True])
def test_workers_dying_at_start_up_name_the_main_module_only_where_workers_import_it(tmp_path, monkeypatch, script):
    """Spawned workers import a script's main module again (one calling tokenize_corpus unguarded starts them over
    and over); `python -m kpro`'s is not, so the CLI is not told about `if __name__ == "__main__":`."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc\n\ndef\n")
    main_module(monkeypatch, tmp_path / "script.py" if script else None)
    killing_pool(monkeypatch, kill_at=1)
    with pytest.raises(ValueError, match="^a tokenizing worker process died, .* the 0 shard") as error:
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "out", workers=2)
    hint = "spawned workers import the main module again, so call tokenize_corpus under `if __name__ == \"__main__\":`"
    assert (hint in str(error.value)) == script, str(error.value)


def test_tokenizing_workers_leave_ctrl_c_to_the_main_process(tmp_path, monkeypatch):
    """A terminal's Ctrl-C reaches the whole process group: each worker printed a KeyboardInterrupt traceback
    while the main process saved and said how to resume."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc\n\ndef\n")
    main_module(monkeypatch)
    pool = killing_pool(monkeypatch, kill_at=None)
    # As a terminal's command has it: a process started in the background by a script (CI's, maybe) ignores
    # SIGINT from the start, and its spawned workers would inherit that whatever kpro does
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "out", workers=2)
        # SIGTERM stays: the pool ends a broken pool's workers with it and waits for them (ignored, a killed
        # worker's pool hung)
        assert pool.sigint == [signal.SIG_IGN] and pool.sigterm == [signal.SIG_DFL]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # workers=1 runs here: not ignored
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "one", workers=1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)



SIGTERM_AT_FIRST_SHARD = """
import os, signal, sys
from kpro.cli import main
from kpro.train import shards
commit = shards.ShardWriter.commit
def terminated(self, *args, **kwargs):
    commit(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # what timeout, SLURM or kubernetes send
shards.ShardWriter.commit = terminated
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_to_tokenize_stops_it_as_ctrl_c_does(tmp_path):
    """SIGTERM ended `tokenize --workers 2` at once: its scratch directory of worker results stayed in /tmp, and
    nothing said how to resume. It is now taken as Ctrl-C: the shards written are kept, the scratch removed."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join("abc def gh " * 50 for _ in range(400)))
    (tmp_path / "scratch").mkdir()
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", SIGTERM_AT_FIRST_SHARD, "tokenize", "--tokenizer", tmp_path / "tok",
                             "--data", tmp_path / "c.txt", "--out", tmp_path / "out", "--workers", "2",
                             "--shard-tokens", "50000"], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "TMPDIR": str(tmp_path / "scratch"), "PYTHONPATH": str(root)},
                            timeout=120)
    assert result.returncode == 130, result.stderr
    assert "interrupted: 1 shard(s) written to" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list((tmp_path / "scratch").iterdir()) == []
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_dir()]  # the scratch, in --out now


SIGTERM_TO_THE_WORKERS_AT_FIRST_SHARD = """
import multiprocessing, os, signal, sys
from multiprocessing.connection import wait
from kpro.cli import main
from kpro.train import shards, tokenize
commit, close = shards.ShardWriter.commit, tokenize._Progress.close
def terminated(self, *args, **kwargs):  # a scheduler's notice sent process by process, the workers' first
    commit(self, *args, **kwargs)
    shards.ShardWriter.commit = commit
    workers = multiprocessing.active_children()
    for process in workers:
        os.kill(process.pid, signal.SIGTERM)
    for process in workers:  # dead before this process hears of it: the pool is broken
        wait([process.sentinel])
shards.ShardWriter.commit = terminated
tokenize.tokenize_corpus.__kwdefaults__["chunk_bytes"] = 2000  # chunks still to tokenize after the first shard
def main_told_late(self):  # this process's own notice, while it handles the workers' deaths
    os.kill(os.getpid(), signal.SIGTERM)
    close(self)
if sys.argv.pop(1) == "workers-then-main":
    tokenize._Progress.close = main_told_late
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("notice", ["workers-alone", "workers-then-main"])
def test_sigterm_reaching_the_workers_first_stops_tokenize_as_ctrl_c_does(tmp_path, notice):
    """A scheduler's SIGTERM reaches every process of the job, in any order: workers dead of it before the main
    process's handler ran made the pool broken, and tokenize said a worker had died (most often for lack of memory),
    exit status 1; the main process's own notice, arriving while it handled that, interrupted the handling. A pool
    whose workers all died of SIGTERM is now a stop as Ctrl-C is, and the later notice is the same stop."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join("abc def gh " * 50 for _ in range(400)))
    result = subprocess.run([sys.executable, "-c", SIGTERM_TO_THE_WORKERS_AT_FIRST_SHARD, notice, "tokenize",
                             "--tokenizer", tmp_path / "tok", "--data", tmp_path / "c.txt", "--out", tmp_path / "out",
                             "--workers", "2", "--shard-tokens", "50000"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 130, result.stderr
    assert f"interrupted: 1 shard(s) written to {tmp_path / 'out'}; run the same command again to resume" in \
        result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_dir()]  # the scratch removed


def test_a_second_sigterm_is_the_same_notice():
    """`timeout` sends SIGTERM to the command and again to its group, a scheduler to each process of the job: the
    second raised KeyboardInterrupt again, in the middle of the cleanup the first had started (tokenize's report of
    the shards kept, its scratch's removal). One notice now stops a block once."""
    before = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_ctrl_c():
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                signal.raise_signal(signal.SIGTERM)
                cleaned = True
                raise
    assert cleaned and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():  # the next block takes a notice of its own
        signal.raise_signal(signal.SIGTERM)


PAUSE_AT_FIRST_SHARD = """
import sys, time
from kpro.cli import main
from kpro.train import shards
commit = shards.ShardWriter.commit
def paused(self, *args, **kwargs):
    commit(self, *args, **kwargs)
    print("paused", flush=True)
    time.sleep(600)
shards.ShardWriter.commit = paused
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_tokenizing_workers_end_when_the_main_process_is_killed(tmp_path):
    """Workers must not outlive a main process killed outright (SIGKILL, the OOM killer): each ends itself once its
    parent is gone; before, idle workers waited on their pool for ever."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join("abc def gh " * 50 for _ in range(400)))
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", PAUSE_AT_FIRST_SHARD, "tokenize", "--tokenizer", tmp_path / "tok",
                               "--data", tmp_path / "c.txt", "--out", tmp_path / "out", "--workers", "2",
                               "--shard-tokens", "50000"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert parent.stdout.readline() == "paused\n"
        workers = child_processes(parent.pid)
        assert len(workers) >= 2, workers  # the pool's two (and multiprocessing's resource tracker, maybe)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(process_running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their main process"
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_the_scratch_of_a_main_process_killed_outright_is_in_out_and_the_rerun_removes_it(tmp_path, capsys):
    """The workers' scratch directory was made in TMPDIR: a main process killed outright (SIGKILL, the OOM killer)
    left it there with megabytes of results, which nothing removed (a rerun cleans --out only). It is now inside
    --out, and the same command removes it."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join("abc def gh " * 50 for _ in range(400)))
    (tmp_path / "tmp").mkdir()
    root = Path(__file__).resolve().parents[1]
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "c.txt"), "--out",
            str(tmp_path / "out"), "--workers", "2", "--shard-tokens", "50000"]
    parent = subprocess.Popen([sys.executable, "-c", PAUSE_AT_FIRST_SHARD, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=root,
                              env={**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(root)})
    try:
        assert parent.stdout.readline() == "paused\n"
        workers = child_processes(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(process_running(pid) for pid in workers):  # no worker writes into the scratch the rerun removes
        assert time.monotonic() < deadline, f"workers {workers} outlived their main process"
        time.sleep(0.2)
    assert list((tmp_path / "tmp").iterdir()) == []
    scratch = [p.name for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(scratch) == 1 and scratch[0].startswith(".tokenize-scratch-"), scratch
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_dir()]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="writes to Linux's /dev/full, a disk always full")
def test_a_worker_result_that_cannot_be_written_names_its_file(tmp_path):
    """A full scratch directory gave `error: cannot write or read: No space left on device`, naming no file: the
    user looked at --out while TMPDIR was full. The error, sent back through the pool, names the file."""
    from kpro import _tokenize_worker as worker
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    worker.start(str(tmp_path / "tok"), [tmp_path / "c.txt"])
    with pytest.raises(OSError) as error:
        worker.encode_to_file([(0, 1, 0, "abc def")], "/dev/full")
    sent = pickle.loads(pickle.dumps(error.value))  # as the pool hands it to the main process
    assert isinstance(sent, OSError) and sent.filename == "/dev/full" and sent.errno == errno.ENOSPC, sent


class _ReplySizePool(kt.tokenize.ProcessPoolExecutor):
    """tokenize_corpus's pool, recording the pickled size of each result a worker sends back."""
    replies = []

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        future.add_done_callback(lambda done: type(self).replies.append(len(pickle.dumps(done.result()))))
        return future


def test_tokenizing_workers_send_back_replies_a_pipe_takes_whole(tmp_path, monkeypatch):
    """A worker killed (the OOM killer) while sending a result of megabytes left the pool's result pipe with half
    a message, and the executor waited for the rest forever: about 1 kill in 6 hung the command (a repro killing
    a worker at random moments of a 33 MB corpus in 4 MB chunks). Results now go through files: every reply a
    worker sends fits in one write, which the pipe takes whole or not at all, however large the chunk; and the
    files are gone afterwards."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join("abc def gh " * 50 for _ in range(400)))  # 220 kB: ~1.8 MB of ids
    pool = type("Pool", (_ReplySizePool,), {"replies": []})
    monkeypatch.setattr(kt.tokenize, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    main_module(monkeypatch)
    index = kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "out", workers=2,
                               chunk_bytes=100_000)
    assert index["tokens"] > 200_000 and len(pool.replies) == 3, (index["tokens"], pool.replies)
    assert max(pool.replies) < select.PIPE_BUF, pool.replies
    assert list((tmp_path / "scratch").iterdir()) == []
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_dir()]  # the scratch, in --out now
    one = kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "one", workers=1)
    assert [p.read_bytes() for p in sorted((tmp_path / "out").glob("*.bin"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "one").glob("*.bin"))] and one["tokens"] == index["tokens"]



def test_a_second_tokenize_into_a_directory_in_use_is_refused(tmp_path):
    """Two runs into one --out (a job submitted twice) both resumed from the same index and wrote the same shard
    names over each other; the second is now refused at once, naming the holder, and runs once the first ends."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc def\n\ngh\n")
    with held_by_another_run(tmp_path / "out"):
        with pytest.raises(DirectoryInUse, match="in use by another kpro run"):
            kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "out", workers=1)
    index = kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "out", workers=1)
    assert index["complete"] and index["documents"] == 2
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released at the end


KILL_SCRIPT = """
import os, signal, sys
from kpro.train import shards, tokenize

write_index = shards.write_index
def dying(directory, index):  # the 3rd shard is renamed into place; die before the index lists it
    if len(index["shards"]) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    write_index(directory, index)
shards.write_index = dying
tokenize.tokenize_corpus(sys.argv[1], sys.argv[2:-1], sys.argv[-1], shard_tokens=97, workers=1, chunk_bytes=200)
"""


def test_tokenize_resumes_after_sigkill_to_the_same_bytes(tmp_path, capsys):
    files = write_corpus(tmp_path / "corpus")
    tok_dir = sentencepiece_dir(tmp_path, "mistral_7b_tokenizer.model")
    args = [str(tok_dir), *map(str, files)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args, str(tmp_path / "out")], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(json.loads((tmp_path / "out" / "index.json").read_text())["shards"]) == 2
    assert (tmp_path / "out" / "tokens-00002.bin").is_file()  # written, never listed
    with pytest.raises(ValueError, match="incomplete"):
        kt.TokenShards(tmp_path / "out", seq_len=8)

    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", *map(str, files), "--out", str(tmp_path / "out"),
                 "--shard-tokens", "97", "--workers", "1"]) == 0
    assert "resuming" in capsys.readouterr().err
    kt.tokenize_corpus(tok_dir, files, tmp_path / "straight", shard_tokens=97, workers=1, chunk_bytes=200)
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name

    # the same command again: already complete; other arguments: refused
    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", *map(str, files), "--out", str(tmp_path / "out"),
                 "--shard-tokens", "97"]) == 0
    assert "already complete" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(files[0]), "--out", str(tmp_path / "out"),
                 "--shard-tokens", "97"]) == 1
    assert f"the input files (1 no longer read, {files[1].resolve()} first) differ" in capsys.readouterr().err


def test_tokenize_resumes_twice_inside_one_document_to_the_same_bytes(tmp_path, monkeypatch):
    """A document spanning several shards, interrupted twice inside it: the second resume skips the tokens both
    earlier runs wrote (the first resume's skip plus its own). A resume with another --shard-tokens is refused."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefghijklmnopqrstuvwxyz").save(tmp_path / "tok")
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghijklmnopqrstuvwxyz" * 2 + "\n\nxyz\n")

    def tokenize(out, shard_tokens=8):
        return kt.tokenize_corpus(tmp_path / "tok", [corpus], out, shard_tokens=shard_tokens, workers=1,
                                  stream=io.StringIO())
    commit = kt.shards.ShardWriter.commit

    def interrupting(self, resume):  # stop each run after its 2nd shard
        commit(self, resume)
        interrupting.commits += 1
        if interrupting.commits == 2 and not self.index["complete"]:
            raise KeyboardInterrupt
    monkeypatch.setattr(kt.shards.ShardWriter, "commit", interrupting)
    for shards in (2, 4):
        interrupting.commits = 0
        with pytest.raises(KeyboardInterrupt):
            tokenize(tmp_path / "out")
        index = json.loads((tmp_path / "out" / "index.json").read_text())
        assert len(index["shards"]) == shards and index["resume"]["document"] == 0  # inside the first document
    with pytest.raises(ValueError, match=r"--shard-tokens \(8 then, 5 now\) differ"):
        tokenize(tmp_path / "out", shard_tokens=5)
    monkeypatch.undo()
    tokenize(tmp_path / "out")
    tokenize(tmp_path / "straight")
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir()) and len(names) > 4
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


FIRST_INDEX_KILL_SCRIPT = """
import os, signal, sys
from kpro import _files
from kpro.cli import main

fsync = os.fsync
def dying(fd):  # SIGKILL while the very first index.json is written: only its temporary is left
    if os.readlink(f"/proc/self/fd/{fd}").endswith(f".index.json.tmp-{os.getpid()}"):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
os.fsync = dying
main(sys.argv[1:])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the index's file descriptor in /proc")
def test_a_run_killed_writing_its_first_index_starts_over_with_the_same_command(tmp_path, capsys):
    """The leftover `.index.json.tmp-PID` made the same command fail with "exists and is not a token shard
    directory", where the docs say a run killed at any moment resumes with the same command."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc\n\ndef\n\ngah\n")
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "c.txt"), "--out",
            str(tmp_path / "out"), "--workers", "1"]
    killed = subprocess.run([sys.executable, "-c", FIRST_INDEX_KILL_SCRIPT, *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = [p.name for p in (tmp_path / "out").iterdir() if p.name != LOCK_FILE]  # the lock file, no lock left
    assert len(left) == 1 and re.fullmatch(r"\.index\.json\.tmp-\d+", left[0]), left
    assert main(args) == 0
    assert main(["tokenize", *args[1:-4], "--out", str(tmp_path / "straight"), "--workers", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())  # the temporary is gone
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_only_a_writers_own_temporaries_are_cleaned_from_a_directory_without_an_index(tmp_path):
    leftovers = [".index.json.tmp-123", ".tokens-00000.bin.tmp-123", ".tokens-00000.starts.npy.tmp-9"]
    for others in ([], ["notes.txt"], [".index.json.tmp-x"], ["tokens-00000.bin"]):
        directory = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        for name in leftovers + others:
            (directory / name).write_bytes(b"{")
        if others:  # not all kpro's temporaries: nothing is deleted, the directory is refused
            with pytest.raises(FileExistsError, match="exists and is not a token shard directory"):
                kt.write_token_shards(directory, documents(n=3), vocab_size=67, eos_id=2)
            assert sorted(p.name for p in directory.iterdir()) == sorted(leftovers + others)
        else:
            kt.write_token_shards(directory, documents(n=3), vocab_size=67, eos_id=2)
            assert not any(p.name.startswith(".") for p in directory.iterdir())


def test_tokenize_names_bad_input(tmp_path, capsys):
    tok_dir = sentencepiece_dir(tmp_path, "sentencepiece_test_model.model")
    cases = [("bad.jsonl", b'{"text": "ok"}\n{"txt": "no"}\n', "bad.jsonl:2: expected an object with a \"text\" string"),
             ("bad2.jsonl", b'{"text": "ok"}\n{oops\n', "bad2.jsonl:2: not valid JSON"),
             ("bad.txt", b"fine\n\n\xff\xfe\n", "bad.txt:3: not UTF-8")]
    for name, content, message in cases:
        (tmp_path / name).write_bytes(content)
        assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(tmp_path / name),
                     "--out", str(tmp_path / ("out-" + name)), "--workers", "1"]) == 1
        assert message in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "corpus file" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    (tmp_path / "ok.txt").write_text("text\n")
    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(tmp_path / "ok.txt"),
                 "--out", str(tmp_path / "full")]) == 1
    assert "is not a token shard directory" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(tmp_path), "--data", str(tmp_path / "ok.txt"),
                 "--out", str(tmp_path / "twice")]) == 1  # read twice before
    assert "ok.txt is given twice (also as" in capsys.readouterr().err


def test_a_bad_line_fixed_in_a_file_not_yet_read_keeps_the_shards_written(tmp_path, capsys, monkeypatch):
    """One bad byte near the end of a corpus threw away every shard: the fixed file, which no shard held a byte
    of, was refused on rerun as a changed input, and the error said nothing of the shards or of what editing would
    do. Files after the one the index resumes in may now change; that one and those before it may not."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(60)))
    (tmp_path / "b.txt").write_text("bad\n\nfade\n")
    (tmp_path / "zz.txt").write_bytes(b"gab\n\ncafe \xff\n")
    data = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "zz.txt"]
    monkeypatch.setitem(kt.tokenize_corpus.__kwdefaults__, "chunk_bytes", 200)

    def tokenize(out="out"):
        return main(["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", *map(str, data), "--out",
                     str(tmp_path / out), "--shard-tokens", "100", "--workers", "1"])
    assert tokenize() == 1
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    n, resume = len(index["shards"]), index["resume"]
    assert n > 3 and resume["file"] < 2, resume  # zz.txt: not a byte of it in the shards
    read = data[resume["file"]]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {data[2]}:3: not UTF-8 (invalid start byte); the {n} shard(s) written to {tmp_path / 'out'} are "
        f"kept, and once the input is fixed the same command resumes at {read}:{resume['line']} if {read} and the "
        "files before it are unchanged (editing one of those, already tokenized, forces a restart in a new --out)")
    stat = data[0].stat()
    os.utime(data[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a file the shards hold: refused
    assert tokenize() == 1
    assert f"the input files (1 changed in size or time, {data[0]} first) differ" in capsys.readouterr().err
    os.utime(data[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (tmp_path / "zz.txt").write_bytes(b"gab\n\ncafe \n\nbeaded\n")
    assert tokenize() == 0
    assert f"resuming {tmp_path / 'out'} after {n} shard(s), at {read}:{resume['line']}; 1 later input file(s) " \
        "changed since, read as they are now" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "index.json").read_text())["inputs"][2]["bytes"] == data[2].stat().st_size
    assert tokenize("straight") == 0
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_a_shard_larger_than_memory_is_refused_before_anything_is_written(tmp_path, capsys):
    """--shard-tokens 10**13 (a 20 TB buffer to assemble each shard in) ended in numpy's MemoryError traceback,
    after --out and its index.json had been written."""
    tok_dir = sentencepiece_dir(tmp_path, "sentencepiece_test_model.model")
    (tmp_path / "ok.txt").write_text("text\n")
    assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(tmp_path / "ok.txt"), "--out",
                 str(tmp_path / "out"), "--shard-tokens", str(10 ** 13), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --shard-tokens 10,000,000,000,000 needs 20,000 GB of memory to assemble a shard in, "
                          "more than this machine's ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="^shard_tokens 10,000,000,000,000 needs 40,000 GB of memory"):
        kt.write_token_shards(tmp_path / "api", documents(n=3), vocab_size=70_000, eos_id=2, shard_tokens=10 ** 13)
    assert not (tmp_path / "api").exists()


def test_a_character_the_tokenizer_lacks_is_named_with_its_file_and_line_and_the_fixed_input_runs(tmp_path, capsys):
    """`character 'Q' is not in the alphabet` named no file or line, one line among thousands; and the run that
    failed (no shard written) refused the fixed file as another run's input."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc\n\ndef\n\ngQh\n")
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(corpus), "--out", str(tmp_path / "t"),
            "--workers", "1"]
    assert main(args) == 1
    assert f"{corpus}:5: character 'Q' is not in the alphabet" in capsys.readouterr().err
    corpus.write_text("abc\n\ndef\n\ngah\n")
    (tmp_path / "t" / ".gitignore").write_text("*\n")  # a user's files: a resume deleted unlisted dotfiles
    (tmp_path / "t" / "tokens-00007.bin").write_bytes(b"stray")  # a killed writer's unlisted shard: removed
    assert main(args) == 0 and kt.TokenShards(tmp_path / "t", seq_len=3, batch_size=1).num_rows > 0
    assert (tmp_path / "t" / ".gitignore").is_file() and not (tmp_path / "t" / "tokens-00007.bin").exists()
    torch.manual_seed(0)
    kpro.save_pretrained(kpro.Llama(tiny_config(num_hidden_layers=2, vocab_size=13)), tmp_path / "src")
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    (tmp_path / "bad.txt").write_text("abc\n\nabQ def\n")
    assert main(["train-expanded", str(tmp_path / "src"), "--data", str(tmp_path / "bad.txt"), "--train-blocks", "1",
                 "--out", str(tmp_path / "run"), "--steps", "1", "--seq-len", "4", "--device", "cpu"]) == 1
    assert "document 2 of the corpus ('abQ def'): character 'Q' is not in the alphabet" in capsys.readouterr().err


def test_train_expanded_reads_a_shard_directory(tmp_path, capsys):
    alphabet = "abcdefgh \n"
    torch.manual_seed(0)
    kpro.save_pretrained(kpro.Llama(tiny_config(num_hidden_layers=2, vocab_size=3 + len(alphabet))), tmp_path / "src")
    kpro.CharTokenizer(alphabet).save(tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "big"), "--blocks", "1", "--position", "top"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    assert main(["tokenize", "--tokenizer", str(tmp_path / "big"), "--data", str(corpus), "--out",
                 str(tmp_path / "tokens"), "--shard-tokens", "300", "--workers", "1"]) == 0
    common = ["--seq-len", "16", "--batch-size", "4", "--lr", "1e-2", "--steps", "3"]
    assert main(["train-expanded", str(tmp_path / "big"), "--data", str(tmp_path / "tokens"), "--out",
                 str(tmp_path / "run"), *common]) == 0
    assert "corpus: " in capsys.readouterr().err
    assert [m["step"] for m in kt.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert (tmp_path / "run" / "final" / "config.json").is_file()

    (tmp_path / "other").mkdir()
    kpro.CharTokenizer("hgfedcba \n").save(tmp_path / "other")  # the same size, other ids
    shutil.copy(tmp_path / "other" / "kpro_char_tokenizer.json", tmp_path / "big" / "kpro_char_tokenizer.json")
    cases = [([str(tmp_path / "tokens")], "was tokenized with another tokenizer"),
             ([str(tmp_path / "tokens"), str(corpus)], "one token shard directory alone"),
             ([str(tmp_path / "other")], "not a token shard directory")]
    for data, message in cases:
        assert main(["train-expanded", str(tmp_path / "big"), *[a for d in data for a in ("--data", d)],
                     "--out", str(tmp_path / "run2"), *common]) == 1
        assert message in capsys.readouterr().err


def test_a_tokenizer_with_another_eos_beside_the_same_tokenizer_json_is_another_tokenizer(tmp_path, capsys):
    """tokenizer.json's eos is set by tokenizer_config.json beside it (a base and an instruct checkpoint often
    differ only there). Only the file's hash was compared: a resumed `tokenize` ended half the documents with
    another eos, and `train-expanded` trained on shards framed with another eos than the model's."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    for name, eos in (("base", "<|endoftext|>"), ("instruct", "<|im_end|>")):
        (tmp_path / name).mkdir()
        tok.save(str(tmp_path / name / "tokenizer.json"))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "add_bos_token": False}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick fox\n\nthe lazy dog\n")
    index = kt.tokenize_corpus(tmp_path / "base", [corpus], tmp_path / "tokens", workers=1, stream=io.StringIO())
    assert index["eos_id"] == 0
    with pytest.raises(ValueError, match=r"tokenized with another tokenizer than .*instruct's: eos_id \(0 there, 1 "
                                         r"here\)"):
        check_tokenizer(index, tmp_path / "instruct", "the token shards")
    check_tokenizer(index, tmp_path / "base", "the token shards")
    with pytest.raises(ValueError, match=r"with other arguments: the tokenizer's eos_id \(0 then, 1 now\) differ"):
        kt.tokenize_corpus(tmp_path / "instruct", [corpus], tmp_path / "tokens", workers=1, stream=io.StringIO())
    # Shards written by write_token_shards without tokenizer= record none: nothing to check them against (two
    # tokenizers can share vocabulary size, bos and eos), so they are refused, saying how to record one.
    vocab_size = kpro.load_tokenizer(tmp_path / "base").vocab_size
    untold = kt.write_token_shards(tmp_path / "untold", [[5, 6]], vocab_size=vocab_size, eos_id=0)
    with pytest.raises(ValueError, match=r"record no tokenizer \(written by write_token_shards without tokenizer=\), "
                                         r"so nothing shows they hold .*base's ids; write them with tokenizer="):
        check_tokenizer(untold, tmp_path / "base", "the token shards")
    told = kt.write_token_shards(tmp_path / "told", [[5, 6]], vocab_size=vocab_size, eos_id=0,
                                 tokenizer=tokenizer_identity(tmp_path / "base"))
    check_tokenizer(told, tmp_path / "base", "the token shards")


def test_the_corpus_fingerprint_holds_the_tokens_not_only_their_count(tmp_path):
    """The fingerprint hashed the shards' lengths alone: a run resumed on another corpus of the same size
    trained on without a word."""
    docs = documents()
    kt.write_token_shards(tmp_path / "a", docs, vocab_size=67, eos_id=2, shard_tokens=64)
    kt.write_token_shards(tmp_path / "b", [d.flip(0) for d in docs], vocab_size=67, eos_id=2, shard_tokens=64)
    a, b = (kt.TokenShards(tmp_path / name, seq_len=10, batch_size=4) for name in "ab")
    assert [s["tokens"] for s in a.index["shards"]] == [s["tokens"] for s in b.index["shards"]]
    assert all(s["sha256"] == hashlib.sha256((tmp_path / "a" / s["file"]).read_bytes()).hexdigest()
               for s in a.index["shards"])
    with pytest.raises(ValueError, match="the checkpoint was trained on another corpus"):
        b.load_state_dict(a.state_dict())
    # An index written before the hashes keeps the fingerprint it had: its runs still resume.
    old = json.loads((tmp_path / "a" / "index.json").read_text())
    for shard in old["shards"]:
        del shard["sha256"]
    key = json.dumps([old["dtype"], None, [s["tokens"] for s in old["shards"]]])
    assert corpus_id(old) == hashlib.sha256(key.encode()).hexdigest()[:16]


def test_shuffle_is_a_bool(tmp_path):
    """shuffle="False" (from a config or the command line) was taken as True."""
    kt.write_token_shards(tmp_path / "s", [list(range(2, 60))], vocab_size=64, eos_id=1)
    for value in ("False", 0, None):
        with pytest.raises(TypeError, match=rf"^shuffle must be True or False, got {re.escape(repr(value))}$"):
            kt.TokenShards(tmp_path / "s", seq_len=4, batch_size=2, shuffle=value)
    shards = kt.TokenShards(tmp_path / "s", seq_len=4, batch_size=2, shuffle=np.False_)
    assert shards.shuffle is False


def test_unshuffled_epochs_go_on_where_the_last_stopped(tmp_path):
    """Unshuffled, every epoch took rows 0 ... len·b − 1: the rows that did not fill a last batch were never
    trained on, although the docs said they wait for another epoch."""
    kt.write_token_shards(tmp_path / "s", documents(n=6), vocab_size=67, eos_id=2, shard_tokens=50)
    shards = kt.TokenShards(tmp_path / "s", seq_len=8, batch_size=4, shuffle=False)
    assert shards.num_rows % 4 and len(shards) >= 2
    seen = np.concatenate([shards.batch_rows(e, i) for e in range(4) for i in range(len(shards))])
    assert np.array_equal(seen, np.arange(len(seen)) % shards.num_rows)  # one pass after another, in order
    assert np.array_equal(shards.batch_rows(0, 0), np.arange(4))


def test_corpus_files_are_read_as_named_and_bad_ones_refused(tmp_path, capsys):
    """A directory was searched into hidden folders (a `.ipynb_checkpoints/` copy read twice) and by
    case-sensitive suffix (`A.JSONL` skipped unsaid; named directly, read as plain text: raw JSON trained on);
    a .json file was plain text; a lone surrogate (valid JSON) failed in the tokenizer's C++ naming nothing;
    an empty corpus "succeeded" with 0 tokens; a BOM opening a .jsonl was read by `tokenize`, refused by
    `train-expanded`."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    (corpus / ".ipynb_checkpoints").mkdir(parents=True)
    (corpus / "a.txt").write_text("abc\n")
    (corpus / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("abc\n")
    (corpus / ".hidden.txt").write_text("hid\n")
    (corpus / "B.JSONL").write_text(json.dumps({"text": "def"}) + "\n")
    assert list(iter_documents([corpus])) == ["def", "abc"]  # sorted by path: B.JSONL, a.txt
    assert list(iter_documents([corpus / "B.JSONL"])) == ["def"]
    assert read_corpus([corpus / "B.JSONL"]) == ["def"]
    (tmp_path / "records.json").write_text('[{"text": "abc"}]')
    for read in (lambda p: list(iter_documents(p)), read_corpus):
        with pytest.raises(ValueError, match=r"records.json is a .json file: kpro reads .jsonl files"):
            read([tmp_path / "records.json"])
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "abc"}).encode() + b"\n")
    assert read_corpus([tmp_path / "bom.jsonl"]) == list(iter_documents([tmp_path / "bom.jsonl"])) == ["abc"]

    def tokenize(data, out):
        return main(["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(data), "--out",
                     str(tmp_path / out), "--workers", "1"])
    (tmp_path / "lone.jsonl").write_text('{"text": "ab"}\n{"text": "a\\ud800b"}\n')
    assert tokenize(tmp_path / "lone.jsonl", "lone") == 1
    assert (f"{tmp_path / 'lone.jsonl'}:2: text holds a lone surrogate ('\\ud800' at character 1), which is not "
            "Unicode text") in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"document 2 of the corpus .*: text holds a lone surrogate"):
        corpus_rows(read_corpus([tmp_path / "lone.jsonl"]), kpro.load_tokenizer(tmp_path / "tok"), 4)
    (tmp_path / "empty.txt").write_text("\n \n")
    assert tokenize(tmp_path / "empty.txt", "empty") == 1
    assert f"the corpus ({tmp_path / 'empty.txt'}) holds no documents" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("abc\n")  # fixed: the run starts over
    assert tokenize(tmp_path / "empty.txt", "empty") == 0


@pytest.mark.parametrize("workers", [0, False, True, -1, 2.5, "2"])
def test_tokenize_corpus_refuses_a_workers_that_is_not_a_positive_int_before_out_is_created(tmp_path, workers):
    """workers=-1, 2.5 or "2" failed in ProcessPoolExecutor naming no `workers`, after --out and an index were
    written; 0 and False meant the default unsaid."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc\n\ndef\n")
    message = rf"^workers must be a positive integer or None .*, got {re.escape(repr(workers))}$"
    with pytest.raises(ValueError, match=message):
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists()


class _PoolNotStarted(Exception):
    pass


def test_the_default_workers_are_the_cores_this_process_may_run_on(tmp_path, monkeypatch):
    """The default counted all the machine's cores: under `taskset -c 0` it started 2 workers on 1 core, and in a
    Slurm job given 4 cores of a 128-core node it would start 128 spawned processes, each with its tokenizer."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc\n\ndef\n")
    started = []

    def pool(workers, *args):
        started.append(workers)
        raise _PoolNotStarted
    monkeypatch.setattr(kt.tokenize, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    with pytest.raises(_PoolNotStarted):
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "three")
    assert started == [3]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {7})
    index = kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "one")  # in this process, no pool
    assert index["complete"] and started == [3]
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: the machine's cores
    with pytest.raises(_PoolNotStarted):
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / "c.txt"], tmp_path / "all")
    assert started == [3, 128]


def test_a_bom_opening_a_text_file_is_not_text(tmp_path):
    """A BOM (Notepad's "UTF-8" files) was stripped from .jsonl files, but tokenized at the start of every .txt
    file by `kpro tokenize` and `train-expanded` alike."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "tok")
    (tmp_path / "plain.txt").write_text("abc\n\ndef\n", encoding="utf-8")
    (tmp_path / "bom.txt").write_text("\ufeffabc\n\ndef\n", encoding="utf-8")
    (tmp_path / "alone.txt").write_text("\ufeff\nabc\n\ndef\n", encoding="utf-8")  # a BOM on a line of its own
    for name in ("bom.txt", "alone.txt"):
        assert read_corpus([tmp_path / name]) == list(iter_documents([tmp_path / name])) == ["abc", "def"]
    tokens = {}
    for name in ("plain.txt", "bom.txt"):
        kt.tokenize_corpus(tmp_path / "tok", [tmp_path / name], tmp_path / f"t-{name}", workers=1, stream=io.StringIO())
        tokens[name] = (tmp_path / f"t-{name}" / "tokens-00000.bin").read_bytes()
    assert tokens["bom.txt"] == tokens["plain.txt"]


def test_a_jsonl_line_of_unicode_whitespace_is_blank_to_both_readers(tmp_path):
    """A line holding only U+00A0 was skipped by train-expanded (str.strip) but refused by `kpro tokenize` as
    "not valid JSON" (bytes.strip sees ASCII whitespace only)."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abcdef ").save(tmp_path / "tok")
    path = tmp_path / "c.jsonl"
    lines = ["\ufeff", json.dumps({"text": "abc"}), "\u00a0", "\u3000 \t", "\x1c", json.dumps({"text": "def"}), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    assert read_corpus([path]) == list(iter_documents([path])) == ["abc", "def"]
    assert main(["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(path), "--out",
                 str(tmp_path / "out"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "index.json").read_text())["documents"] == 2
    path.write_bytes(b'{"text": "abc"}\n\xc2\n')  # not UTF-8 (a cut character) is still named, not skipped
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        list(iter_documents([path]))


def chatml_tokenizer_dir(directory):
    """A byte-level BPE tokenizer.json configured as SmolLM2's: bos <|im_start|>, eos <|im_end|>, no bos added."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return directory


def test_documents_open_with_a_bos_only_where_the_tokenizer_adds_one(tmp_path):
    """SmolLM2's tokenizer adds no bos, its bos <|im_start|> being a chat marker: train-expanded and `tokenize`
    put it before every document all the same, training a pretraining corpus as ChatML turns. A shard directory
    written that way is refused by a rerun of `tokenize` and by train-expanded, not mixed with the new framing."""
    tok_dir = chatml_tokenizer_dir(tmp_path / "tok")
    tok = kpro.load_tokenizer(tok_dir)
    assert not tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick fox\n\nthe lazy dog\n")
    docs = [tok.encode(text) for text in ("the quick fox", "the lazy dog")]
    stream = docs[0] + [tok.eos_id] + docs[1] + [tok.eos_id]
    assert corpus_rows(read_corpus([corpus]), tok, len(stream)).tolist() == [stream]
    index = kt.tokenize_corpus(tok_dir, [corpus], tmp_path / "tokens", workers=1, stream=io.StringIO())
    assert index["bos_id"] is None and index["tokenizer"]["bos_id"] == 1
    assert np.fromfile(tmp_path / "tokens" / "tokens-00000.bin", dtype="<u2").tolist() == stream

    # the shards an earlier kpro wrote: each document opened with the bos the tokenizer never adds
    index_file = tmp_path / "tokens" / "index.json"
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), "bos_id": 1}))
    with pytest.raises(ValueError, match=r"with other arguments: the documents' framing \(bos id 1 then, no bos "
                                         r"now: the tokenizer adds none to text\) differ"):
        kt.tokenize_corpus(tok_dir, [corpus], tmp_path / "tokens", workers=1, stream=io.StringIO())
    with pytest.raises(ValueError, match=r"open each document with bos id 1, .*tok's tokenizer with no bos"):
        corpus_batches([tmp_path / "tokens"], tok, tok_dir, 4, 1, 0)


def test_text_spelling_the_bos_or_eos_is_refused_naming_where(tmp_path, capsys):
    """A tokenizer.json turns `<|im_end|>` written in text into the eos id: train-expanded and `tokenize` ended
    the document there without a word, where bitune's and internalize's data refuse it."""
    tok_dir = chatml_tokenizer_dir(tmp_path / "tok")
    tok = kpro.load_tokenizer(tok_dir)
    (tmp_path / "eos.txt").write_text("the quick fox\n\nthe lazy dog <|im_end|> jumps\n")
    (tmp_path / "bos.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("the fox", "<|im_start|>dog")))
    for name, line, special in (("eos.txt", 3, "eos (id 2)"), ("bos.jsonl", 2, "bos (id 1)")):
        message = f"the text spells the tokenizer's {special} token, which would end or restart the document there"
        assert main(["tokenize", "--tokenizer", str(tok_dir), "--data", str(tmp_path / name), "--out",
                     str(tmp_path / f"out-{name}"), "--workers", "1"]) == 1
        assert f"{tmp_path / name}:{line}: {message}" in capsys.readouterr().err
        with pytest.raises(ValueError, match=rf"document 2 of the corpus \(.*\): {re.escape(message)}"):
            corpus_rows(read_corpus([tmp_path / name]), tok, 4)


def test_train_expanded_names_the_line_of_a_text_file_that_is_not_utf8(tmp_path, capsys):
    """`kpro tokenize` said `latin1.txt:3: not UTF-8`, train-expanded a bare UnicodeDecodeError naming no file."""
    (tmp_path / "latin1.txt").write_bytes("fine\n\nZwölf\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:3: not UTF-8 \(invalid start byte\)"):
        read_corpus([tmp_path / "latin1.txt"])
    torch.manual_seed(0)
    kpro.save_pretrained(kpro.Llama(tiny_config(num_hidden_layers=2, vocab_size=13)), tmp_path / "src")
    kpro.CharTokenizer("abcdefgh \n").save(tmp_path / "src")
    assert main(["train-expanded", str(tmp_path / "src"), "--data", str(tmp_path / "latin1.txt"), "--train-blocks",
                 "1", "--out", str(tmp_path / "run"), "--steps", "1", "--seq-len", "4", "--device", "cpu"]) == 1
    assert f"error: {tmp_path / 'latin1.txt'}:3: not UTF-8 (invalid start byte)" in capsys.readouterr().err


def test_the_corpus_fingerprint_covers_bos_and_eos():
    index = {"dtype": "uint16", "tokenizer": {"sha256": "ab"}, "bos_id": 1, "eos_id": 2,
             "shards": [{"file": "tokens-00000.bin", "tokens": 10, "sha256": "cd"}]}
    assert corpus_id({**index, "eos_id": 3}) != corpus_id(index)
    assert corpus_id({**index, "bos_id": None}) != corpus_id(index)


def test_the_shuffled_row_order_is_pinned():
    """S01: TokenShards' order is part of a checkpoint's meaning: a run resumed by another kpro version must draw the
    same rows. Pinned values (HEAD) for a row count whose bit length is odd and one where it is even."""
    assert permute(np.arange(10), 10, 0, 0).tolist() == [1, 7, 3, 6, 0, 2, 8, 4, 9, 5]  # 4 bits
    assert permute(np.arange(5), 5, 7, 2).tolist() == [2, 0, 1, 4, 3]  # 3 bits, rounded up to 4
    assert permute(np.arange(12), 100, 0, 0).tolist() == [15, 52, 36, 34, 44, 60, 77, 84, 10, 31, 81, 75]  # 7 bits, rounded up to 8


def test_tokenize_ends_each_document_with_the_eos_even_where_the_pad_differs(tmp_path):
    """T01: every tokenizer in the tokenize tests had pad == eos, so a worker ending documents with the pad id
    passed. Here tokenizer_config.json names another pad ("<unk>", id 0): the stream must be `[bos] ids eos` per
    document, the eos being the tokenizer's eos, against the tokenizer's own encode."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(DATA / "sentencepiece_test_model.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<unk>"}))
    tok = kpro.load_tokenizer(tok_dir)
    assert tok.pad_id != tok.eos_id
    texts = ["hello world", "the quick brown fox", "abc"]
    (tmp_path / "c.txt").write_text("\n\n".join(texts) + "\n")
    index = kt.tokenize_corpus(tok_dir, [tmp_path / "c.txt"], tmp_path / "out", workers=1, stream=io.StringIO())
    stream = np.fromfile(tmp_path / "out" / index["shards"][0]["file"], dtype=index["dtype"]).tolist()
    expected = [t for text in texts for t in ([tok.bos_id] if kpro.tokenizer.document_bos_id(tok) is not None else [])
                + tok.encode(text, bos=False, eos=False) + [tok.eos_id]]
    assert stream == expected


# Mutation round 11: TOK2 (train/tokenize.py:72 hidden parts taken from the whole path, not from inside the directory
# given)
def test_a_corpus_directory_inside_a_hidden_folder_is_read_and_its_own_hidden_folders_skipped(tmp_path):
    from kpro.train.tokenize import input_files

    corpus = tmp_path / ".cache" / "corpus"  # ~/.cache/..., a dataset cache
    (corpus / ".ipynb_checkpoints").mkdir(parents=True)
    (corpus / "a.txt").write_text("ab cd\n")
    (corpus / ".ipynb_checkpoints" / "a.txt").write_text("ab cd\n")
    assert input_files([corpus]) == [corpus / "a.txt"]


def test_tokenize_names_a_too_large_shard_size_by_its_flag(tmp_path, capsys):
    """Guards: cmd_tokenize's in_flag_terms map broken (`"--shard_tokens"`): the refusal named a flag that does not
    exist. Reference: the parser's own flag, --shard-tokens."""
    (tmp_path / "tok").mkdir()
    kpro.CharTokenizer("abc").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("abc\n")
    assert main(["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "out"), "--shard-tokens", str(10**16), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "--shard-tokens 10,000,000,000,000,000 needs" in err and "shard_tokens" not in err
