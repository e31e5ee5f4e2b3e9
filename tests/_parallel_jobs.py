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


def train_until_interrupted(directory: str, name: str) -> None:
    """kpro.train.fit for far more steps than a test waits; its pid file appears once a step has run, then
    every step sleeps a little, so that Ctrl-C finds it training."""
    import torch

    import kpro
    import kpro.train as kt

    class Started(kt.Callback):
        def on_step_end(self, run, metrics):
            Path(directory, f"{os.getpid()}.pid").touch()
            time.sleep(0.05)

    torch.manual_seed(0)
    model = kpro.Llama(kpro.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    ids = torch.randint(3, 32, (8, 12), generator=torch.Generator().manual_seed(1))
    kt.fit(model, iter(lambda: {"input_ids": ids, "labels": ids}, None), Path(directory, name), steps=100_000,
           lr=1e-3, save_every=100_000, callbacks=[Started()], stream=None)


def die_once_another_started(directory: str) -> None:
    """SIGKILL this worker, as the system's out-of-memory killer does, once a sleep_reporting_pid job has started."""
    import signal

    while not any(Path(directory).glob("*.pid")):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def signal_dispositions() -> tuple:
    """What this worker does with SIGINT and SIGTERM while a job runs (SIG_IGN, SIG_DFL or a handler's name)."""
    import signal

    return tuple(getattr(signal.getsignal(signum), "name", getattr(signal.getsignal(signum), "__name__", "?"))
                 for signum in (signal.SIGINT, signal.SIGTERM))


def page_faults_reallocating(return_freed_memory: bool = False) -> list[int]:
    """Minor page faults of four rounds of allocating and freeing 64 activation-sized tensors (1.4 MB each, as the
    internalization act's step makes). `return_freed_memory`: first set glibc's starting thresholds (128 KiB) for
    good, so that every freed tensor goes back to the system (glibc's own adaptive thresholds stop doing so after
    a varying number of rounds, which would make a control that faults only sometimes)."""
    import resource

    import torch

    from kpro.demo.parallel import set_malloc_thresholds
    if return_freed_memory:
        assert set_malloc_thresholds(mmap=128 << 10, trim=128 << 10)
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensors = [torch.ones(360_000) for _ in range(64)]
        del tensors
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def value_after(value: int, seconds: float) -> int:
    """A job for run_jobs: `value`, after `seconds` (module level: spawned workers import it)."""
    time.sleep(seconds)
    return value
