import contextlib
import os
import threading
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; it is read when a kernel is
# defined, so it is set before kpro imports any (they are imported on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kpro  # noqa: E402
from kpro.ops.backend import IMPLEMENTED, interpreter_bf16_problem  # noqa: E402

CUDA = torch.cuda.is_available()

# Under pytest-xdist (`pytest -n auto`) each worker takes its share of the cores for torch's threads, and so
# do the processes its tests start (a child pytest, torchrun, a CLI run: OMP_NUM_THREADS, unless set already):
# two of tests/test_gpu_suite.py's child pytest runs took 53 CPU-seconds on two threads and 44 on one, CPU time
# the other worker lacked. The child pytest processes must not take themselves for workers (pytest-benchmark would
# switch itself off in them).
XDIST_WORKERS = int(os.environ.pop("PYTEST_XDIST_WORKER_COUNT", "0"))
if XDIST_WORKERS:
    os.environ.pop("PYTEST_XDIST_WORKER", None)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // XDIST_WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


if not CUDA:
    # kpro fixes the interpreter (bfloat16; loop bounds on Triton 3.6 with numpy >= 2.4) when its triton
    # backend first runs: do it now, for the tests that launch kernels directly (and refuse bf16 in the ones
    # that go through the backend, if it cannot).
    interpreter_bf16_problem()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole files to a worker (a module's fixtures, such as the real model, are built once), in the order
    collected (below: the compile report's file first, so its minutes overlap the other worker's tests)."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if XDIST_WORKERS:  # a stable sort: the rest keep their order
        items.sort(key=lambda item: item.path.name != "test_triton_gpu_compile.py")


def pytest_collection_finish(session):
    # The compile report takes minutes of one core: start it now, beside the tests that run before its own.
    # Under xdist the worker whose file it is starts it when that file's test runs, the other worker's
    # tests beside it.
    if not XDIST_WORKERS and any(item.path.name == "test_triton_gpu_compile.py" for item in session.items):
        import importlib.util

        if importlib.util.find_spec("triton.backends.nvidia") is not None:
            import _compile_report
            _compile_report.start()


def pytest_sessionfinish(session):
    import _compile_report
    _compile_report.stop()


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not CUDA:
        pytest.skip("needs an NVIDIA GPU")


def backend_devices(op: str):
    """(backend, device) pairs to test `op` with, among the backends kpro implements it in: Triton on the
    GPU where there is one, else in the CPU interpreter; the CUDA C++ kernels only on a GPU (marked, skipped
    elsewhere). Asking by op keeps a test from requesting a kernel that does not exist (an H200 run
    failed 14 such cases, which no CPU run could see)."""
    # Triton on the GPU is marked cuda: the GPU suite's tests stage runs `-m cuda`, and left 176 of them out
    pairs = [pytest.param("torch", "cpu", id="torch-cpu"),
             pytest.param("triton", "cuda" if CUDA else "cpu", id="triton-" + ("cuda" if CUDA else "cpu"),
                          marks=pytest.mark.cuda if CUDA else ())]
    pairs += [pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.cuda),
              pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda)]
    return [pair for pair in pairs if pair.values[0] in IMPLEMENTED[op]]


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖out − ref‖ / max(‖ref‖, floor·√n) in float64; NaN anywhere in out makes it NaN (never passes).
    The floor keeps a reference that is exactly zero (a gradient that vanishes) comparable."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    return float((out - ref).norm() / max(float(ref.norm()), floor * out.numel() ** 0.5))


# The relative error (above) a kernel's output may have against float64, by dtype. bf16: 1e-2, docs/testing.md's
# rule; the largest seen on the CPU, over the seeds of rms_norm's, swiglu's and linear_cross_entropy's tests and 3
# others each, is 2.6e-3 (bf16 rounding of the output alone leaves ~2.3e-3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def tiny_config(**overrides) -> kpro.LlamaConfig:
    """A small but complete model: GQA, odd-ish sizes, every code path exercised."""
    fields = dict(vocab_size=67, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.15)
    fields.update(overrides)
    return kpro.LlamaConfig(**fields)


def randomize_norms(model: kpro.Llama, generator: torch.Generator) -> None:
    """Norm weights start at 1; make them random so a mistake in their use cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))


@pytest.fixture
def make_model():
    def make(seed=0, dtype=torch.float64, **overrides):
        torch.manual_seed(seed)
        model = kpro.Llama(tiny_config(**overrides)).to(dtype)
        randomize_norms(model, torch.Generator().manual_seed(seed + 1))
        return model
    return make


@pytest.fixture
def lock_folder(monkeypatch):
    """lock_folder(folder) makes `folder` read-only (writable again after the test); as root, who may write there
    anyway, by failing the mkdir of an entry in it."""
    locked = []

    def lock(folder):
        os.chmod(folder, 0o555)
        locked.append(folder)
        if os.geteuid() == 0:
            real_mkdir = os.mkdir

            def mkdir(path, *args, **kwargs):
                if os.path.dirname(os.path.abspath(path)) == str(folder):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_mkdir(path, *args, **kwargs)
            monkeypatch.setattr(os, "mkdir", mkdir)
    yield lock
    for folder in locked:
        os.chmod(folder, 0o755)


@contextlib.contextmanager
def held_by_another_run(directory):
    """`directory`'s run lock held, for the block, by another thread, as another process's run would hold it."""
    from kpro._run_lock import holding

    held, release = threading.Event(), threading.Event()

    def other_run():
        with holding(directory):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        thread.join()


def _stat_fields(stat: Path) -> list[str] | None:
    """A /proc/PID/stat's fields after the command name (state first, then the parent's pid); None once gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's exit may never be reaped in a container)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def child_processes(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (Linux /proc)."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if (fields := _stat_fields(stat)) is not None and int(fields[1]) == pid and fields[0] != "Z"]


@pytest.fixture
def sighup_default():
    """The default SIGHUP disposition for the test: nohup (a CI runner started with it, a test run left in the
    background) ignores it, and kpro rightly leaves an ignored SIGHUP alone."""
    import signal
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)
