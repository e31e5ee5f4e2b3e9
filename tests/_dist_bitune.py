"""Worker for tests/test_bitune_training.py, run under torchrun with 2 gloo processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_bitune.py RECORD BITUNE_ARGS...

The `bitune` command with BITUNE_ARGS; each rank writes RECORD/writes-rank{R}.json: the adapters directories and
results.json files it wrote, and its exit status. The process group times out after a minute, not torchrun's 30:
a process left waiting fails the test soon.
"""
import datetime
import json
import os
import sys
from pathlib import Path

import torch

import kpro._files
from kpro import bitune, cli
from kpro.train.distributed import leave_process_group


def main(record: Path, args: list[str]) -> int:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    writes = []
    save_adapters, write_atomic = bitune.training.save_tuned_adapters, kpro._files.write_atomic

    def saving(tuned, directory):
        writes.append(str(directory))
        return save_adapters(tuned, directory)

    def writing(path, *rest, **kwargs):
        if Path(path).name == "results.json":
            writes.append(str(path))
        return write_atomic(path, *rest, **kwargs)
    bitune.training.save_tuned_adapters, kpro._files.write_atomic = saving, writing
    status = cli.main(args)
    leave_process_group()  # joined here, so not left by cli.main
    (record / f"writes-rank{os.environ['RANK']}.json").write_text(json.dumps({"writes": writes, "status": status}))
    return status


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
