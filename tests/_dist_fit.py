"""Worker for tests/test_train_distributed.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_fit.py OUT SINGLE_RUN

For DDP and then FSDP2: a run of 4 steps from scratch (checkpoints at 2 and 4), a run resumed from step 2
of the single-process run in SINGLE_RUN, and a run with AdamW, gradient accumulation and tied embeddings
(FIT_ACCUM); the FSDP2 model is then saved with kpro.save_pretrained (a collective). The test compares them
with single-process runs.
"""
import os
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import kpro
import kpro.train as kt
from test_train_fit import batches, make_model


def sgd(model):  # momentum: an optimizer state to shard and cross-load; linear in the gradient, so
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)  # rounding is not amplified like Adam's


FIT = dict(steps=4, optimizer=sgd, save_every=2, clip_grad_norm=1.0)
# 2 processes x 2 micro-batches of the 8-example global batch; the default AdamW; one tied weight to shard.
FIT_ACCUM = dict(steps=3, grad_accum=2, lr=1e-3, clip_grad_norm=1.0)
TIED = dict(tie_word_embeddings=True)


def main(out: Path, single: Path) -> None:
    torch.set_num_threads(1)
    env = kt.init_distributed()
    assert env.world_size == 2, env
    for mode in ("ddp", "fsdp"):
        model = make_model()
        run = kt.fit(model, batches(), out / mode / "run", parallel=mode, **FIT)
        if mode == "ddp":
            assert isinstance(run.train_model, DistributedDataParallel)
        else:  # sharded in place, one unit per block plus the root
            assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.layers)
            assert all(isinstance(p, DTensor) for p in model.parameters())
            assert kt.loss.module_hooks(model)  # FSDP2's own, which change no value: the loss still fuses the head
        assert kt.loss.output_head_weight(run.train_model) is model.lm_head.weight
        kt.fit(make_model(seed=7), batches(), out / mode / "resumed", parallel=mode,
               resume=single / "step-00000002", **FIT)
        if mode == "fsdp":
            kpro.save_pretrained(model, out / mode / "saved")  # every rank calls it; rank 0 writes
        kt.fit(make_model(**TIED), batches(), out / mode / "accum", parallel=mode, **FIT_ACCUM)
    torch.distributed.destroy_process_group()  # a gloo group left for interpreter exit can abort the process
    exit_now()


def exit_now() -> None:
    """End the worker once its work is written, without interpreter teardown: there, a gloo thread still
    being destroyed was seen to abort rank 0 ("terminate called without an active exception") under load,
    turning a finished, correct run into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
