"""Jobs for the run_jobs tests in tests/test_demo.py, at module level so that spawned workers can import them."""
import os
import time
from pathlib import Path


def sleep_reporting_pid(directory: str, seconds: float) -> None:
    """Write this worker's pid to `directory`, then sleep: a stand-in for a long training run."""
    Path(directory, f"{os.getpid()}.pid").touch()
    time.sleep(seconds)


def fail_once_another_started(directory: str) -> None:
    """Raise once a sleep_reporting_pid job has started, so that there is a running job to end."""
    while not any(Path(directory).glob("*.pid")):
        time.sleep(0.05)
    raise ValueError("this job failed")
