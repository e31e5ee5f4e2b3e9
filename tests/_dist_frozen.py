"""Worker for tests/test_train_distributed.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_frozen.py OUT SINGLE_RUN

fit(save_frozen=False) under DDP and then FSDP2, on a model whose embedding and first block are frozen: a run of 4
steps from scratch (checkpoints at 2 and 4, without the frozen weights), a run resumed from step 2 of the
single-process run in SINGLE_RUN onto a model whose trained weights start elsewhere, and a resume onto a model whose
frozen weights differ, refused on every process (each writes its error to OUT/frozen-rankR.json).
"""
import json
import sys
from pathlib import Path

import torch

import kpro.train as kt
from _dist_fit import FIT, exit_now
from test_train_fit import batches, make_model

FROZEN = ("embed_tokens.", "layers.0.")


def sgd(model):  # _dist_fit's, over the trainable parameters
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)


FROZEN_FIT = {**FIT, "optimizer": sgd}


def partly_frozen(shift: float = 0.0, frozen_shift: float = 0.0):
    """make_model() with FROZEN frozen; `shift` added to the trained weights, `frozen_shift` to the frozen ones."""
    model = make_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(FROZEN))
            p.add_(shift if p.requires_grad else frozen_shift)
    return model


def main(out: Path, single: Path) -> None:
    torch.set_num_threads(1)
    env = kt.init_distributed()
    assert env.world_size == 2, env
    result = {}
    for mode in ("ddp", "fsdp"):
        kt.fit(partly_frozen(), batches(), out / mode / "run", parallel=mode, save_frozen=False, **FROZEN_FIT)
        kt.fit(partly_frozen(shift=0.5), batches(), out / mode / "resumed", parallel=mode, save_frozen=False,
               resume=single / "step-00000002", **FROZEN_FIT)
        try:
            kt.fit(partly_frozen(frozen_shift=1e-3), batches(), out / mode / "refused", parallel=mode,
                   save_frozen=False, resume=single / "step-00000002", **FROZEN_FIT)
            result[mode] = None
        except Exception as err:  # noqa: BLE001 (recorded for the test)
            result[mode] = f"{type(err).__name__}: {err}"
    (out / f"frozen-rank{env.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
