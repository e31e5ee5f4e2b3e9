"""TokenShards under torchrun with 2 gloo processes on the CPU: each process reads only its rows of every
global batch, the two together cover the epoch once, and the run (losses, weights) is the single-process
run's within fp32 rounding, resumed from a single-process checkpoint too; `python -m kpro train-expanded
--data TOKENS/` under torchrun gives the single-process run's losses and final model."""
import numpy as np
import pytest
import torch

import kpro
from kpro import train as kt
from kpro.cli import main

from conftest import randomize_norms, tiny_config
from test_train_distributed import assert_close_losses, assert_close_models, torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

FIT = dict(lr=1e-2, save_every=2, grad_accum=2, clip_grad_norm=1.0)
STEPS = 7


def make_model(seed=0):
    torch.manual_seed(seed)
    model = kpro.Llama(tiny_config())
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def shards(directory):
    return kt.TokenShards(directory, seq_len=20, batch_size=8, seed=4)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in kt.read_metrics(run_dir / "metrics.jsonl")]


def train_expanded_args(directory, run_dir):
    """`python -m kpro train-expanded` on a shard directory, the same alone and under torchrun."""
    return ["train-expanded", str(directory / "big"), "--data", str(directory / "big-tokens"), "--out", str(run_dir),
            "--seq-len", "16", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--steps", "3"]


def expanded_checkpoint_and_shards(directory):
    alphabet = "abcdefgh \n"
    torch.manual_seed(0)
    kpro.save_pretrained(kpro.Llama(tiny_config(num_hidden_layers=2, vocab_size=3 + len(alphabet))), directory / "src")
    kpro.CharTokenizer(alphabet).save(directory / "src")
    assert main(["expand", str(directory / "src"), str(directory / "big"), "--blocks", "1", "--position", "top"]) == 0
    (directory / "corpus.txt").write_text("\n\n".join("abc def gh " * (i % 4 + 1) for i in range(40)))
    assert main(["tokenize", "--tokenizer", str(directory / "big"), "--data", str(directory / "corpus.txt"),
                 "--out", str(directory / "big-tokens"), "--shard-tokens", "300", "--workers", "1"]) == 0


def test_two_processes_read_disjoint_rows_and_train_as_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 67, (int(n),), generator=g) for n in torch.randint(5, 30, (60,), generator=g)]
    kt.write_token_shards(tmp_path / "tokens", docs, vocab_size=67, eos_id=2, bos_id=1, shard_tokens=128)
    corpus = shards(tmp_path / "tokens")
    assert len(corpus) == STEPS  # one epoch exactly
    single = make_model()
    kt.fit(single, shards(tmp_path / "tokens"), tmp_path / "single", steps=STEPS, **FIT)
    expanded_checkpoint_and_shards(tmp_path)
    assert main(train_expanded_args(tmp_path, tmp_path / "te-single")) == 0

    done = torchrun("_dist_shards.py", tmp_path / "tokens", tmp_path, tmp_path / "single")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count("saved the post-trained model") == 1, done.stdout  # rank 0's line (every rank's before)

    rows = [torch.load(tmp_path / f"rows-rank{r}.pt") for r in range(2)]  # [steps, 4, seq_len] each
    for step in range(STEPS):
        want = corpus.read_rows(corpus.batch_rows(0, step))  # the global batch one process sees
        assert torch.equal(torch.cat([rows[0][step], rows[1][step]]), want), step
    row_ids = np.concatenate([corpus.batch_rows(0, s) for s in range(STEPS)])
    assert len(set(row_ids.tolist())) == STEPS * 8  # both ranks together: every row of the epoch once
    assert_close_losses(losses(tmp_path / "run"), losses(tmp_path / "single"))
    assert [m["tokens"] for m in kt.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [8 * 20] * STEPS
    assert_close_models(kpro.load_pretrained(tmp_path / "run" / f"step-{STEPS:08d}"), single)
    assert_close_losses(losses(tmp_path / "resumed"), losses(tmp_path / "single")[4:])
    # train-expanded on the shard directory under torchrun: the single-process run, new block only trained
    assert_close_losses(losses(tmp_path / "te-run"), losses(tmp_path / "te-single"))
    assert len(losses(tmp_path / "te-run")) == 3
    final, want = (kpro.load_pretrained(tmp_path / name / "final") for name in ("te-run", "te-single"))
    assert_close_models(final, want)
    source = kpro.load_pretrained(tmp_path / "big")
    changed = {n.split(".")[1] for n, p in final.state_dict().items() if not torch.equal(p, source.state_dict()[n])}
    assert changed == {"2"}, changed  # only the new block (top, index 2) trained
