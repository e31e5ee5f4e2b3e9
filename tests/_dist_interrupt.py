"""Worker for the torchrun Ctrl-C test in tests/test_train_distributed.py (2 gloo processes):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_interrupt.py OUT

DDP, the 4 steps of _dist_fit.FIT. The first time, rank 0 sends SIGINT to torchrun's process group as a
terminal's Ctrl-C does while step 3 runs (torchrun forwards it to every worker, each in a session of its own);
run again, it resumes and finishes.
"""
import os
import signal
import sys
from pathlib import Path

import torch

import kpro.train as kt
from _dist_fit import FIT, exit_now
from test_train_fit import batches, make_model


class CtrlCOnce(kt.Callback):
    def __init__(self, marker: Path):
        self.marker = marker

    def on_batch(self, run, batch):
        if run.step == 2 and run.is_main and not self.marker.exists():
            self.marker.touch()
            os.killpg(os.getpgid(os.getppid()), signal.SIGINT)  # torchrun's group, which forwards it to every worker
        return batch


def main(out: Path) -> None:
    torch.set_num_threads(1)
    kt.init_distributed()
    try:
        kt.fit(make_model(), batches(), out / "run", parallel="ddp", callbacks=[CtrlCOnce(out / "interrupted")], **FIT)
    finally:
        torch.distributed.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
