"""A `python -m kpro` command under torchrun: `torchrun ... tests/_dist_command.py internalize --out ...`.

As `python -m kpro`, but the worker ends without interpreter teardown (see _dist_fit.exit_now): there a gloo
thread still being destroyed was seen to abort a finished rank ("terminate called without an active
exception"), turning a correct run into a failed one."""
import os
import sys

import torch

from kpro.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
