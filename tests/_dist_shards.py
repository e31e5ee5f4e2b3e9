"""Worker for tests/test_train_shards_distributed.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_shards.py SHARDS OUT SINGLE_RUN

fit (DDP) on TokenShards for one epoch, each rank writing the rows it was given; then a run resumed from
step 4 of the single-process run in SINGLE_RUN; then `python -m kpro train-expanded` on the shard directory
OUT/big-tokens into OUT/te-run. The test compares them with the single-process runs.
"""
import sys
from pathlib import Path

import torch

import kpro.train as kt
from _dist_fit import exit_now
from kpro.cli import main as kpro_main
from test_train_shards_distributed import FIT, STEPS, make_model, shards, train_expanded_args


class RecordRows(kt.Callback):
    def __init__(self):
        self.rows = []

    def on_batch(self, run, batch):
        self.rows.append(batch["input_ids"].clone())
        return batch


def main(corpus: Path, out: Path, single: Path) -> None:
    torch.set_num_threads(1)
    env = kt.init_distributed()
    assert env.world_size == 2, env
    record = RecordRows()
    kt.fit(make_model(), shards(corpus), out / "run", steps=STEPS, callbacks=[record], **FIT)
    torch.save(torch.stack(record.rows), out / f"rows-rank{env.rank}.pt")
    kt.fit(make_model(seed=7), shards(corpus), out / "resumed", steps=STEPS, resume=single / "step-00000004", **FIT)
    assert kpro_main(train_expanded_args(out, out / "te-run")) == 0
    torch.distributed.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
