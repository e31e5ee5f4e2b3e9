"""torchrun's environment, read without torch: the commands check it before any work, and `init_distributed`
joins the process group it describes."""
from __future__ import annotations

import os


def world_size() -> int:
    """torchrun's WORLD_SIZE (1 where unset): the number of processes a run is split across. One that is not a
    positive integer is refused by name (int() said only "invalid literal for int() with base 10: 'abc'")."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"the environment variable WORLD_SIZE (torchrun's number of processes) must be a positive "
                         f"integer, got {text!r}; unset it to run one process, or start the command with torchrun")
    return value


def is_main_process() -> bool:
    """Whether this is rank 0 of torchrun's processes (or the only process): the one that reports what all of them
    do, as the terminal's Ctrl-C, which reaches every process."""
    return os.environ.get("RANK", "0") == "0"


def refuse_processes(command: str, why: str) -> None:
    """Refuse `command` under torchrun, on every process, before any work: each process ran the whole command into
    the same output, one finishing and the others refused there (a failed torchrun), or printing it all twice."""
    if world_size() > 1:
        raise ValueError(f"{command} runs in one process ({why}): run it without torchrun")
