"""Token shards: the throughput of `python -m kpro tokenize` (kpro.train.tokenize_corpus), of the batch source
kpro.train.TokenShards, and the batch source's share of a CPU training step under kpro.train.fit.

    pytest --benchmark -k token_shards -s

tokenize: a 24 MB English text corpus (this repository's docs and README, paragraphs shuffled and repeated,
in 64 .txt files) with the 32,000-piece Mistral 7B SentencePiece model of tests/data, 1 and 2 worker
processes; the timed call is the whole command (spawning and importing the workers included). batch source:
10^8 synthetic tokens (200 MB of uint16 in 4 shards, in the page cache: just written), shuffled rows of 2048
tokens, batches of 8 and 64 rows. loader share: fit on the `cpu-small` kpro model (d=256, 4 layers, 4 × 256
tokens a step) over a shard directory; the time spent getting each batch from TokenShards against the step
time fit measures (forward, backward, clipping, AdamW).
"""
import io
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kpro
from conftest import describe_device
from kpro import train as kt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, pytestconfig):
    """64 files of about 375 KB: the repository's prose, paragraphs shuffled, repeated (4 files when the
    benchmarks run once untimed, as in CI)."""
    files = 4 if pytestconfig.getoption("benchmark_disable", False) else 64
    paragraphs = [p.strip() for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                  for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("text")
    for i in range(files):
        chunk, size = [], 0
        while size < 375_000:
            p = rng.choice(paragraphs)
            chunk.append(p)
            size += len(p.encode()) + 2
        (out / f"part-{i:03d}.txt").write_text("\n\n".join(chunk), encoding="utf-8")
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    shutil.copy(ROOT / "tests" / "data" / "mistral_7b_tokenizer.model", tokenizer / "tokenizer.model")
    return out, tokenizer


@pytest.mark.parametrize("workers", [1, 2])
def test_token_shards_tokenize(benchmark, text_corpus, tmp_path, workers):
    corpus, tokenizer = text_corpus
    benchmark.group = "token shards: tokenize"
    runs = iter(range(100))
    results = []

    def run():
        index = kt.tokenize_corpus(tokenizer, [corpus], tmp_path / f"out{next(runs)}", workers=workers,
                                   shard_tokens=2_000_000, stream=io.StringIO())
        results.append(index)

    start = time.perf_counter()
    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 2, iterations=1)
    index = results[-1]
    seconds = median(benchmark) or (time.perf_counter() - start)
    nbytes = sum(p.stat().st_size for p in corpus.iterdir())
    benchmark.extra_info.update(device=describe_device(torch.device("cpu")), workers=workers, tokens=index["tokens"],
                                documents=index["documents"], text_mb=round(nbytes / 1e6, 1),
                                tokens_per_s=round(index["tokens"] / seconds), mb_per_s=round(nbytes / seconds / 1e6, 2))
    print(f"\ntokenize, {workers} worker(s): {index['tokens']:,} tokens from {nbytes / 1e6:.1f} MB in {seconds:.2f} s: "
          f"{index['tokens'] / seconds:,.0f} tokens/s")


def median(benchmark):
    return benchmark.stats.stats.median if benchmark.stats is not None else None


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "tokens"
    rng = np.random.default_rng(0)
    kt.write_token_shards(out, (rng.integers(3, 32000, 10**7, dtype=np.uint16) for _ in range(10)), vocab_size=32000,
                          eos_id=2, shard_tokens=25_000_000)
    return out


@pytest.mark.parametrize("batch_size", [8, 64])
def test_token_shards_batches(benchmark, big_shards, batch_size):
    shards = kt.TokenShards(big_shards, seq_len=2048, batch_size=batch_size, seed=0)
    it = iter(shards)
    benchmark.group = "token shards: batch source"
    benchmark(lambda: next(it))
    seconds = median(benchmark)
    if seconds is not None:
        tokens = batch_size * 2048
        benchmark.extra_info.update(tokens_per_batch=tokens, tokens_per_s=round(tokens / seconds),
                                    device=describe_device(torch.device("cpu")))
        print(f"\nTokenShards, batches of {batch_size} x 2048: {seconds * 1e3:.3f} ms a batch, "
              f"{tokens / seconds / 1e6:,.1f} M tokens/s")


class TimedShards(kt.TokenShards):
    """TokenShards that records how long each batch took to get."""

    def __iter__(self):
        self.seconds = []
        inner = super().__iter__()
        while True:
            start = time.perf_counter()
            batch = next(inner)
            self.seconds.append(time.perf_counter() - start)
            yield batch


class StepTimes(kt.Callback):
    def __init__(self):
        self.seconds = []

    def on_step_end(self, run, metrics):
        self.seconds.append(metrics["step_time"])


def test_token_shards_share_of_a_cpu_step(benchmark, tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the CPU step")
    rng = np.random.default_rng(0)
    kt.write_token_shards(tmp_path / "tokens", (rng.integers(3, 4096, 10**6, dtype=np.uint16) for _ in range(4)),
                          vocab_size=4096, eos_id=2, shard_tokens=1_000_000)
    cfg = kpro.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256)
    steps = 6
    shares, loads, step_times, runs = [], [], [], iter(range(100))
    benchmark.group = "token shards: share of a CPU step"

    def run():
        torch.manual_seed(0)
        shards, times = TimedShards(tmp_path / "tokens", seq_len=256, batch_size=4, seed=0), StepTimes()
        kt.fit(kpro.Llama(cfg), shards, tmp_path / f"run{next(runs)}", steps=steps, callbacks=[times],
               stream=io.StringIO())
        loads.extend(shards.seconds[1:steps])
        step_times.extend(times.seconds[1:])
        shares.append(sum(shards.seconds[1:steps]) / (sum(shards.seconds[1:steps]) + sum(times.seconds[1:])))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    load, step = statistics.median(loads), statistics.median(step_times)
    benchmark.extra_info.update(device=describe_device(device), batch_ms=round(load * 1e3, 4),
                                step_ms=round(step * 1e3, 1), loader_share=float(f"{statistics.median(shares):.2g}"))
    print(f"\nloader share of a cpu-small step: {load * 1e3:.3f} ms to get a batch, {step * 1e3:.0f} ms a step: "
          f"{statistics.median(shares):.2%}")
