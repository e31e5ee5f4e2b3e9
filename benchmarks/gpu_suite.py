"""The GPU suite: one command that runs, on one CUDA GPU (made for an H100/H200; no network, no install,
from the source tree), the cuda-marked tests, a sweep of the attention tile configurations, a profile of
one expansion training step, and every benchmark at its headline shapes, in at most 8 minutes, and writes
one JSON and one Markdown report.

    benchmarks/gpu_suite.sh OUT_DIR [--stages tests,autotune,profile,benchmarks] [--force] [--budget NAME=SECONDS] [--list] [--report-only]

Stages, in order, each in a child process with its own time budget (BUDGETS, 440 s in all; the rest of the
8 minutes covers start-up and reports). A pytest stage stops starting tests `margin` seconds before its
budget and is killed at it; either way what finished is kept, and what did not is counted as "not run
(budget)" (killed, the test that was running is named). When pytest itself fails (exit status 2, 3 or 4: a file that
does not collect, an internal error, a bad option), the stage's status is "error" and its error is pytest's
message from the log, naming the file.
  tests       `pytest -m cuda -q tests`: the summary, and each failure's id and message; the quick tests
              first, those at GPU sizes or compiling a model after them (test_priority).
  autotune    every candidate tile configuration of the attention kernels (attention_tiles.candidate_configs)
              at one representative causal shape: the forward timed alone, dK/dV and dQ through forward +
              backward with the other kernels at their defaults; each candidate's result is checked against
              the default configuration's first (a wrong or failing candidate is recorded, never chosen).
              bf16 at head dims 128 and 64, then fp16 if time is left. Up to WARMUP_PROCESSES children
              first compile the candidates in parallel (Triton's on-disk cache; at most half the budget,
              and WARMUP_GRACE to finish), then one child checks and times them one at a time, started
              only with TIMING_START left (a budget under AUTOTUNE_FULL_BUDGET may be spent compiling: the
              result says so). A winner must beat the default by more than 3% (NOISE_GUARD).
              OUT_DIR/tuned_tiles.json is the repository's table with the measured sweeps updated, ready to
              copy over kpro/ops/triton_kernels/tuned_tiles.json (the command is printed; the suite never
              writes into the repository).
  profile     benchmarks/profile_step.py: the expansion benchmark's step for eager, kpro-frozen (the same
              model, flags and step) and kpro-train_only (building the models takes most of the time), each
              timed, with the host time to issue it; then the GPU's busy time, kernel launches and device
              syncs (torch.profiler): whether Python or the GPU sets the step time (the second H200 run
              measured the GPU busy 74 ms of kpro's 180 ms step, and train_only's step slower than
              kpro-frozen's, unexplained); then the host's cost of one call of each kpro op beside the
              PyTorch ops it replaces, and of its parts (custom op, launcher alone). OUT_DIR/profile.json
              (the measurements), host_costs.json and profile.md, written anew by each attempt (an earlier
              attempt's are deleted first).
  benchmarks  `pytest --benchmark` over benchmarks/ (CUDA-event timing, checks before timing: conftest.py),
              the cases behind SPEC.md's performance goals first (benchmark_priority). A full pass of
              every GPU case may well take longer than the budget (an estimate: mostly torch.compile and
              FlexAttention compilations); what is left is listed as "not run (budget)" and the next run
              of the same command continues it.

Outputs in OUT_DIR: gpu_suite.json (device, versions, per-stage status, timings, results, errors) and
gpu_suite.md (tables to paste into benchmarks/RESULTS.md; it names the device, commit and command of any
stage's results that an earlier run produced); per stage NAME.stage.json (its result, with the environment
and command that produced it, and each attempt's device, commit and command), NAME.jsonl
(one line per finished test or candidate, written as it finishes; a benchmark's again at its process's end
where a later case added to its extra_info, as the ratios do) and NAME.log (the child's output);
pytest-benchmark-N.json from each benchmarks attempt.

Resuming: a stage whose NAME.stage.json says complete is skipped (and says so); an incomplete one reruns and
skips what its NAME.jsonl already holds, so a second run of the same command continues where the budget
stopped the first. A test or candidate that was running when its child was killed or died runs once more
on the next attempt, and is recorded as failed if that happens again. A test or candidate that fails and
leaves the CUDA context broken (a sticky error, such as an illegal memory access: every later CUDA call of
the process fails) is recorded as failed and ends its child; the stage goes on in a fresh one. `--force`
deletes the selected stages' files and reruns them from scratch.

Stopped by SIGTERM or SIGINT (a command limit's `timeout`, Ctrl-C), the driver kills the running child's
process group, records the stage as "interrupted" with what it finished, writes both reports and exits
128 + the signal's number; `--report-only` writes the reports again from OUT_DIR's NAME.stage.json files,
running nothing and needing no GPU (after a run killed before it could write them).

Without CUDA the suite prints "no CUDA device" and exits 2, as it does, in one line naming it, for an OUT_DIR
that is a file or cannot be created or written; `--list` needs no GPU. Exit status: 0 when
every selected stage is complete (failing tests and wrong kernels are results, in the reports), 1 when
one is not.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPO_TUNED_TABLE = ROOT / "kpro" / "ops" / "triton_kernels" / "tuned_tiles.json"

STAGES = ("tests", "autotune", "profile", "benchmarks")
BUDGETS = {"tests": 150.0, "autotune": 60.0, "profile": 60.0, "benchmarks": 170.0}  # seconds; 440 of the 480
MARGINS = {"tests": 15.0, "autotune": 8.0, "profile": 0.0, "benchmarks": 30.0}  # stop starting work this long before the budget
DESCRIPTIONS = {
    "tests": "the cuda-marked tests: pytest -m cuda -q tests",
    "autotune": "attention tile sweep (bf16 d128/d64, then fp16) -> OUT_DIR/tuned_tiles.json",
    "profile": "one expansion step per implementation, profiled: host vs GPU time -> OUT_DIR/profile.md",
    "benchmarks": "pytest --benchmark benchmarks/ at the headline shapes -> OUT_DIR/pytest-benchmark-N.json",
}
NOISE_GUARD = 0.03  # a candidate replaces the default only if its median time is more than 3% lower
PROFILE_FILES = ("profile.json", "profile.md", "host_costs.json")  # what benchmarks/profile_step.py writes
BUDGET_SKIP = "gpu suite: this stage's time budget is spent"
KILLED = "still running when its process was killed (time budget) or died, twice; not retried"
CONTEXT_LOST_EXIT = 6  # a pytest child whose CUDA context a failed test broke (pytest's own codes are 0 to 5)
INTERRUPTED = "interrupted: still running when its process was killed (time budget) or died; runs once more"

# Autotune: (dtype, head dim, required); the fp16 sweeps run only if the budget allows.
AUTOTUNE_PLAN = (("bfloat16", 128, True), ("bfloat16", 64, True), ("float16", 128, False), ("float16", 64, False))
AUTOTUNE_SHAPE = {128: (4, 4096, 16), 64: (4, 4096, 32)}  # head dim -> (batch, tokens, query heads); GQA 4:1
AUTOTUNE_TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2}  # relative error against the default configuration
WARMUP_PROCESSES = 8  # processes compiling the candidates in parallel before the timing (at most half the CPUs)
WARMUP_GRACE = 10.0  # seconds the compile processes get after their deadline to finish the compile in hand
TIMING_START = 15.0  # the timing process starts only with this much of the budget left
# the least budget that leaves TIMING_START after a full warm-up (half the budget, plus its grace)
AUTOTUNE_FULL_BUDGET = 2 * (WARMUP_GRACE + TIMING_START)

# The order of the benchmark files within a priority tier (a file not named here comes after them).
BENCHMARK_FILES = ("test_norm_swiglu.py", "test_attention.py", "test_expansion.py", "test_bitune_step.py",
                   "test_linear_cross_entropy.py", "test_model.py", "test_train.py")


# ----------------------------------------------------------------------------------------- small helpers

def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def result_path(out_dir: Path, stage: str) -> Path:
    """OUT_DIR/NAME.stage.json, a stage's result: apart from what its child writes (profile_step.py's
    measurements are OUT_DIR/profile.json)."""
    return Path(out_dir) / f"{stage}.stage.json"


def write_json(path: Path, data) -> None:
    """Write atomically (a temporary file, then a rename), so a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_records(path: Path) -> list[dict]:
    """The JSON lines of `path` (a line cut short by a kill is ignored)."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def append_record(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Progress:
    """Progress lines with the time since the suite started."""

    def __init__(self, stream=None):
        self.start = time.monotonic()
        self.stream = stream

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=self.stream or sys.stdout, flush=True)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the driver (a command limit's `timeout`, Ctrl-C). Raised in the main thread
    (a BaseException: no stage's `except Exception` takes it), it unwinds through run_child, whose `finally`
    kills the child's process group; the stage running attaches what it finished (`result`), run_stages
    records it as interrupted and attaches every stage's result (`results`), and main writes the reports."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame, self.result, self.results = signame, None, None


def on_stop_signal(signum, frame):
    # Once: further signals are ignored while the child is killed and the reports written (a few seconds).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


# ------------------------------------------------------------------------------------ stage bookkeeping

@dataclass
class Context:
    out_dir: Path
    budget: float
    margin: float
    log: Callable[[str], None]
    started: float = field(default_factory=time.time)

    @property
    def deadline(self) -> float:
        """Wall-clock time (time.time()) after which no new test or candidate starts."""
        return self.started + max(self.budget - self.margin, 1.0)

    @property
    def hard_deadline(self) -> float:
        return self.started + self.budget

    def left(self) -> float:
        return self.hard_deadline - time.time()


@dataclass
class Stage:
    name: str
    run: Callable[[Context], dict]  # returns the stage's result; result["complete"] says whether it finished
    budget: float
    margin: float = 10.0
    description: str = ""

    def files(self, out_dir: Path) -> list[Path]:
        """What the stage owns in OUT_DIR (deleted by --force): every file it or its children write."""
        found = [p for p in out_dir.glob(f"{self.name}.*")]
        if self.name == "autotune":
            found.append(out_dir / "tuned_tiles.json")
        if self.name == "profile":
            found += [out_dir / name for name in PROFILE_FILES if out_dir / name not in found]
        if self.name == "benchmarks":
            found += list(out_dir.glob("pytest-benchmark-*.json"))
        return found


def run_stages(stages: list[Stage], out_dir: Path, *, force: bool = False, log=print,
               environment: dict | None = None, command: str | None = None) -> dict[str, dict]:
    """Run `stages` in order: a stage whose OUT_DIR/NAME.stage.json is complete is skipped unless `force` (which
    first deletes its files); an exception in a stage is recorded in its result and the next stage runs. Each
    result, and each of its new attempts, records the `environment` (device, commit) and suite `command` that
    produced it: a later run in the same OUT_DIR reports it beside its own."""
    results = {}
    try:
        _run_stages(stages, out_dir, force, log, environment, command, results)
    except Interrupted as err:
        err.results = results
        raise
    return results


def _run_stages(stages, out_dir, force, log, environment, command, results) -> None:
    for stage in stages:
        path = result_path(out_dir, stage.name)
        previous = read_json(path)
        if isinstance(previous, dict) and previous.get("complete") and not force:
            log(f"{stage.name}: complete in {path}, skipped (--force reruns it)")
            results[stage.name] = dict(previous, ran_this_time=False)
            continue
        if force:
            for file in stage.files(out_dir):
                file.unlink(missing_ok=True)
            previous = None
        attempt = (previous or {}).get("attempt", 0) + 1
        log(f"{stage.name}: start (budget {stage.budget:.0f} s{f', attempt {attempt}' if attempt > 1 else ''})")
        context = Context(out_dir, stage.budget, stage.margin, log)
        start = time.monotonic()
        stopped = None
        try:
            result = stage.run(context)
        except Interrupted as err:  # recorded with what the stage finished; no later stage starts
            stopped = err
            result = dict(err.result or {}, complete=False, status="interrupted",
                          error=f"interrupted by {err.signame}: its child was killed; what finished is kept, and "
                                "the same command continues the stage")
        except Exception as err:  # noqa: BLE001 - a broken stage is a result; the next stage still runs
            result = {"complete": False, "status": "error", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()}
        result = dict(result)
        result.setdefault("status", "complete" if result.get("complete") else "incomplete")
        result.update(stage=stage.name, attempt=attempt, seconds=round(time.monotonic() - start, 1),
                      budget_s=stage.budget, finished_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        if environment is not None:
            result.update(environment=environment, suite_command=command)
            for record in result.get("attempts") or []:  # an earlier attempt keeps where it ran
                record.setdefault("device", environment.get("device"))
                record.setdefault("commit", environment.get("commit"))
                record.setdefault("suite_command", command)
        write_json(path, result)
        results[stage.name] = dict(result, ran_this_time=True)
        log(f"{stage.name}: {result['status']} in {result['seconds']:.0f} s"
            + (f" ({result['error']})" if result.get("error") else ""))
        if stopped is not None:
            raise stopped


# ----------------------------------------------------------------------------- child processes

def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_child(args: list[str], log_path: Path, hard_deadline: float, poll: Callable[[], None] = lambda: None,
              every: float = 2.0) -> tuple[int | None, bool]:
    """Run `python args...` from the repository root with its output appended to `log_path`; call `poll`
    every `every` seconds; kill its whole process group at `hard_deadline`, or if anything here fails, so
    that no child outlives its stage. (exit code, killed)."""
    def safe_poll():
        try:
            poll()
        except Exception as err:  # noqa: BLE001 - progress lines only: never stop the stage for them
            print(f"(progress line failed: {type(err).__name__}: {err})", file=sys.stderr)

    with open(log_path, "a") as log_file:
        log_file.write(f"\n$ {sys.executable} {' '.join(args)}\n")
        log_file.flush()
        child = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        try:
            while True:
                try:
                    code = child.wait(timeout=max(0.1, min(every, hard_deadline - time.time())))
                    break
                except subprocess.TimeoutExpired:
                    safe_poll()
                    if time.time() >= hard_deadline:
                        killed = True
                        _kill_group(child)
                        code = child.returncode
                        break
        finally:
            if child.poll() is None:
                _kill_group(child)
        safe_poll()
        return code, killed


def run_children(commands: list[list[str]], log_paths: list[Path], hard_deadline: float) -> list[int | None]:
    """Run several `python args...` at once (logs apart); kill those still running at `hard_deadline`."""
    children = []
    for args, log_path in zip(commands, log_paths):
        log_file = open(log_path, "a")
        log_file.write(f"\n$ {sys.executable} {' '.join(args)}\n")
        log_file.flush()
        children.append((subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=log_file,
                                          stderr=subprocess.STDOUT, start_new_session=True), log_file))
    codes = []
    try:
        for child, log_file in children:
            try:
                codes.append(child.wait(timeout=max(0.1, hard_deadline - time.time())))
            except subprocess.TimeoutExpired:
                _kill_group(child)
                codes.append(None)
    finally:  # no child outlives its stage, whatever happens here
        for child, log_file in children:
            if child.poll() is None:
                _kill_group(child)
            log_file.close()
    return codes


def _kill_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (compile workers too), SIGKILL 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------- pytest stages: plugin and results

def final_records(records: list[dict]) -> dict[str, dict]:
    """nodeid -> its last record (a teardown error after a pass overrides the pass)."""
    last = {}
    for record in records:
        if "nodeid" in record:
            last[record["nodeid"]] = record
    return last


def finished_ids(records: list[dict]) -> set[str]:
    """Tests a previous attempt finished: everything recorded except budget skips and bare start marks."""
    return {nodeid for nodeid, r in final_records(records).items()
            if r.get("outcome") != "started" and not (r.get("outcome") == "skipped" and r.get("budget"))}


def benchmark_priority(nodeid: str, params: dict) -> tuple:
    """Sort key of a benchmark case: the cases behind SPEC.md's goals first (RMSNorm/SwiGLU forward+
    backward, the Bitune dual pass at SPEC's shape, attention forward causal d128 at 4k tokens, the
    expansion step), then the other headline shapes, then the short and long sequences and the training
    loop; within a tier, by file (BENCHMARK_FILES) and in collection order (the sort is stable, so the
    implementations of one case stay together)."""
    path, _, rest = nodeid.partition("::")
    file, function = path.rsplit("/", 1)[-1], rest.split("[", 1)[0]
    goal = ((file == "test_norm_swiglu.py" and function == "test_forward_backward")
            or (function == "test_bitune_dual_pass" and params.get("size") == "spec")
            or (function == "test_attention_forward" and params.get("mask") == "causal"
                and params.get("dim") == 128 and params.get("seq") == 4096)
            or file == "test_expansion.py")
    # The Bitune dual pass's "long" size stays in the middle: at SPEC's size the plain-attention comparison
    # is bound by the host's launches (second H200 run), so only a longer one tests the fusion's kernel cost.
    # the token shards' benchmarks time the host's CPU, not the GPU: last
    late = params.get("seq") in (1024, 16384) or file in ("test_train.py", "test_token_shards.py")
    tier = 0 if goal else 2 if late else 1
    return tier, BENCHMARK_FILES.index(file) if file in BENCHMARK_FILES else len(BENCHMARK_FILES)


# Test functions that take seconds each on a GPU (GPU-size shapes, every candidate tile, compiling a model):
# the tests stage runs them after the quick ones, so that a budget spent on them leaves no op untested.
SLOW_TESTS = ("gpu_sizes", "gpu_tiles", "benchmark_size", "candidate", "compile")


def test_priority(nodeid: str) -> tuple[int, int]:
    """Sort key of a cuda-marked test: the slow ones (SLOW_TESTS in the function's name) last, and within the
    quick and the slow, kpro's kernels (Triton, CUDA C++) before its torch backend on the GPU, which tests
    PyTorch's ops more than kpro's; collection order within each (the sort is stable). On the first H200
    run (2026-12-04) the tests stage spent its budget on the attention files' GPU-size cases and a model
    compilation, and the RMSNorm, SwiGLU, cross-entropy and Bitune op tests behind them never started."""
    function, _, params = nodeid.partition("::")[2].partition("[")
    return int(any(word in function for word in SLOW_TESTS)), int("torch-cuda" in params)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def pytest_hookimpl(**kwargs):
    """pytest.hookimpl where pytest is installed (the pytest children); the driver needs no pytest."""
    try:
        import pytest
    except ImportError:
        return lambda fn: fn
    return pytest.hookimpl(**kwargs)


class SuitePlugin:
    """The pytest plugin of the pytest stages: writes one JSON line per test as soon as it finishes (its
    outcome, message, and a benchmark's statistics), skips tests a previous attempt finished, records a
    test that was running when the process died, orders benchmarks by `benchmark_priority`, and skips
    every test that would start after the stage's soft deadline. At the session's end it writes a
    benchmark's line again where a later case changed its extra_info (`record_ratios`, `record_memory`).
    A failed test that leaves the CUDA context broken ends the process (CONTEXT_LOST_EXIT) once it is
    recorded: every later test would fail of it, each recorded as finished and never rerun."""

    def __init__(self, record_path: Path, deadline: float, order: str | None = None):
        self.record_path, self.deadline, self.order = Path(record_path), deadline, order
        self.benchmarks: dict[str, tuple[dict, dict]] = {}  # nodeid -> (its last record, the case's extra_info)
        self.context_lost = None  # the failed test after which the CUDA context no longer works

    def pytest_collection_modifyitems(self, session, config, items):
        records = read_records(self.record_path)
        interrupted_before = {r["nodeid"] for r in records if r.get("interrupted")}
        for nodeid, record in final_records(records).items():
            if record.get("outcome") == "started":  # it was running when the previous attempt died
                if nodeid in interrupted_before:  # for the second time: a hang or a crash, not bad luck
                    append_record(self.record_path, dict(nodeid=nodeid, outcome="failed", phase="call",
                                                         message=KILLED, t=time.time()))
                else:
                    append_record(self.record_path, dict(nodeid=nodeid, outcome="skipped", budget=True,
                                                         interrupted=True, message=INTERRUPTED, t=time.time()))
        done = finished_ids(read_records(self.record_path))
        kept = [item for item in items if item.nodeid not in done]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
            items[:] = kept
        if self.order == "benchmarks":
            items.sort(key=lambda item: benchmark_priority(item.nodeid, _params(item)))
        elif self.order == "tests":
            items.sort(key=lambda item: test_priority(item.nodeid))

    def pytest_collection_finish(self, session):
        """Record what this attempt will run (after every deselection): a test in it that never finishes, the
        child killed first, is counted as not run (pytest_result)."""
        append_record(self.record_path, dict(collected=[item.nodeid for item in session.items], t=time.time()))

    @pytest_hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if time.time() > self.deadline:
            import pytest
            pytest.skip(BUDGET_SKIP)
        append_record(self.record_path, dict(nodeid=item.nodeid, outcome="started", t=time.time()))

    @pytest_hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when == "call" or (report.when == "setup" and not report.passed) or \
                (report.when == "teardown" and report.failed):
            self.write(item, report)

    def write(self, item, report) -> None:
        self.benchmarks.pop(item.nodeid, None)  # a teardown error after the call supersedes its record
        record = dict(nodeid=item.nodeid, outcome=report.outcome, phase=report.when,
                      duration=round(report.duration, 3), t=time.time())
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            record["message"] = reason.removeprefix("Skipped: ")
            record["budget"] = record["message"] == BUDGET_SKIP
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            record["message"] = (crash.message if crash is not None else str(report.longrepr))[-2000:]
            if cuda_context_lost():
                record["context_lost"], self.context_lost = True, item.nodeid
        bench = getattr(item, "funcargs", {}).get("benchmark")
        if bench is not None and report.when == "call":
            record.update(params={k: _jsonable(v) for k, v in _params(item).items()}, group=bench.group,
                          extra_info={k: _jsonable(v) for k, v in bench.extra_info.items()})
            stats = bench.stats.stats if bench.stats is not None else None
            if stats:
                record["stats"] = {k: getattr(stats, k) for k in ("median", "min", "max", "mean", "stddev", "rounds")}
            self.benchmarks[item.nodeid] = (record, bench.extra_info)
        append_record(self.record_path, record)

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.context_lost is not None:  # the tests not yet run start in a fresh process (pytest_stage)
            import pytest
            pytest.exit(f"the CUDA context is lost after {self.context_lost} failed; the tests after it run in "
                        "a fresh process", returncode=CONTEXT_LOST_EXIT)

    def pytest_sessionfinish(self, session):
        """Rows of implementations timed earlier get ratios when the later ones finish (fit's
        `time_over_plain-loop`): write each benchmark's record again whose extra_info changed since."""
        for record, info in self.benchmarks.values():
            extra_info = {k: _jsonable(v) for k, v in info.items()}
            if extra_info != record["extra_info"]:
                append_record(self.record_path, dict(record, extra_info=extra_info, rewritten=True, t=time.time()))


def cuda_context_lost() -> bool:
    """Whether this process has used CUDA and its context no longer works (after a sticky error)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    return not _context_alive(torch.device("cuda"))


def _params(item) -> dict:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def pytest_child(stage: str, out_dir: Path, deadline: float, args: list[str]) -> int:
    import pytest
    if str(HERE) in sys.path:  # benchmarks/ on the path would shadow tests/ modules of the same name
        sys.path.remove(str(HERE))
    plugin = SuitePlugin(out_dir / f"{stage}.jsonl", deadline, order=stage)
    return int(pytest.main(args, plugins=[plugin]))


def summary_line(log_path: Path) -> str | None:
    """pytest's last summary line ("3 failed, 190 passed in 98.1s") from the log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    pattern = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b.* in [\d.]+s")
    for line in reversed(lines):
        if line.startswith("$ "):  # where the last attempt's output begins
            break
        if pattern.search(line):
            return line.strip("= ").strip()
    return None


# pytest's exit statuses that mean pytest itself failed (a collection error, its own bug, a bad option)
PYTEST_ERRORS = {2: "interrupted", 3: "internal error", 4: "usage error"}


def pytest_error(log_path: Path) -> str:
    """Why pytest stopped, from the last attempt's output in the log: each file that failed to collect with
    the exception's last line ("ERROR collecting tests/test_x.py: ImportError: ..."), else pytest's own
    error line (an unknown option, a path not found, an internal error), else the output's last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"no log ({log_path})"
    lines = lines[max((i for i, line in enumerate(lines) if line.startswith("$ ")), default=-1) + 1:]
    collecting: dict[str, str] = {}  # file -> the last "E   " line of its collection error
    current = None
    for line in lines:
        header = re.match(r"_+ ERROR collecting (.+?) _+$", line)
        if header:
            current = header.group(1)
            collecting[current] = ""
        elif line.startswith("=") or line.startswith("_"):
            current = None
        elif current is not None and line.startswith("E  "):
            collecting[current] = line[1:].strip()
    if collecting:
        return "; ".join(f"ERROR collecting {file}: {message}".rstrip(": ") for file, message in collecting.items())
    lines = [line.strip() for line in lines if line.strip()]
    return (next((line for line in reversed(lines) if line.startswith("INTERNALERROR>")), None)
            or next((line for line in reversed(lines) if re.search(r"\berror\b", line, re.IGNORECASE)), None)
            or (lines[-1] if lines else "no output"))[:1000]


def pytest_result(stage: str, out_dir: Path, attempts: list[dict]) -> dict:
    """A pytest stage's result from its records: counts, failures with messages, and completeness. A test the
    last attempt collected but never finished (it was running, or after the one running, when the child was
    killed or died) counts as not run (budget); the one that was running is named (`in_flight`). When pytest
    itself failed (PYTEST_ERRORS: a file that does not collect stops the session before any test runs), its
    message from the log is the stage's error, and the tests it did not run are not blamed on the budget."""
    all_records = read_records(out_dir / f"{stage}.jsonl")
    records = final_records(all_records)
    last = attempts[-1] if attempts else {}
    error = None
    if not last.get("killed") and last.get("exit_code") in PYTEST_ERRORS:
        code = last["exit_code"]
        error = f"pytest exited with status {code} ({PYTEST_ERRORS[code]}): {pytest_error(out_dir / f'{stage}.log')}"
    interrupted = f"interrupted by {last['interrupted']}" if last.get("interrupted") else None
    collected = next((r["collected"] for r in reversed(all_records) if "collected" in r), [])
    unfinished = [nodeid for nodeid, r in records.items() if r.get("outcome") == "started"]  # the one running
    in_flight = unfinished[0] if unfinished else None
    for nodeid in unfinished + [nodeid for nodeid in collected if nodeid not in records]:
        if error or interrupted:  # not the budget's doing
            records[nodeid] = dict(nodeid=nodeid, outcome="not run (pytest error)" if error else
                                   "not run (interrupted)", message=error or interrupted, in_flight=nodeid == in_flight)
            continue
        records[nodeid] = dict(nodeid=nodeid, outcome="skipped", budget=True, in_flight=nodeid == in_flight,
                               message="running when its process was killed or died" if nodeid == in_flight
                               else "not started: its process was killed or died first")
    counts: dict[str, int] = {}
    for record in records.values():
        key = "not run (budget)" if record.get("budget") else record.get("outcome", "?")
        counts[key] = counts.get(key, 0) + 1
    failures = [dict(id=nodeid, message=r.get("message", ""), context_lost=r.get("context_lost", False))
                for nodeid, r in records.items() if r.get("outcome") == "failed"]
    complete = (not last.get("killed") and last.get("exit_code") in (0, 1, 5)
                and counts.get("not run (budget)", 0) == 0)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    if interrupted:
        summary = f"{interrupted}{f' during {in_flight}' if in_flight else ''}; " + summary
    elif last.get("killed"):
        summary = f"killed at the time budget{f' during {in_flight}' if in_flight else ''}; " + summary
    elif last.get("exit_code") == CONTEXT_LOST_EXIT:
        summary = "stopped: a failed test broke the CUDA context, the budget left no fresh process; " + summary
    elif error:
        summary = f"pytest failed (status {last['exit_code']}, {PYTEST_ERRORS[last['exit_code']]})" \
                  + (f"; {summary}" if summary else "")
    result = dict(complete=complete, counts=counts, failures=failures, attempts=attempts, summary=summary,
                  in_flight=in_flight, pytest_summary=summary_line(out_dir / f"{stage}.log"))
    if error:
        result.update(status="error", error=error)
    if stage == "benchmarks":
        result["cases"] = [dict(r, id=nodeid) for nodeid, r in records.items()]
    return result


def pytest_stage(stage: str, args: list[str]) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        record_path = ctx.out_dir / f"{stage}.jsonl"
        before = len(read_records(record_path))
        previous = read_json(result_path(ctx.out_dir, stage)) or {}
        attempts = list(previous.get("attempts", []))
        seen, last_count = [before], [time.monotonic()]

        def poll():
            records = read_records(record_path)
            for record in records[seen[0]:]:
                report_record(stage, record, ctx.log)
            seen[0] = len(records)
            if time.monotonic() - last_count[0] >= 20:
                finals = [r for r in final_records(records).values() if r.get("outcome") != "started"]
                failed = sum(r.get("outcome") == "failed" for r in finals)
                ctx.log(f"{stage}: {len(finals)} finished, {failed} failed, {ctx.left():.0f} s of the budget left")
                last_count[0] = time.monotonic()

        while True:  # a failed test that broke the CUDA context ends the child: the rest go on in a fresh one
            extra = []
            if stage == "benchmarks":
                extra = [f"--benchmark-json={ctx.out_dir / f'pytest-benchmark-{len(attempts) + 1}.json'}"]
            try:
                code, killed = run_child([str(Path(__file__).resolve()), "_pytest-child", stage, str(ctx.out_dir),
                                          repr(ctx.deadline), "--", *args, *extra],
                                         ctx.out_dir / f"{stage}.log", ctx.hard_deadline, poll)
            except Interrupted as err:  # the child is killed: hand on what it finished
                attempts.append(dict(exit_code=None, killed=False, interrupted=err.signame,
                                     command="pytest " + " ".join(args + extra)))
                err.result = pytest_result(stage, ctx.out_dir, attempts)
                raise
            attempts.append(dict(exit_code=code, killed=killed, command="pytest " + " ".join(args + extra)))
            if code != CONTEXT_LOST_EXIT or time.time() >= ctx.deadline:
                break
            ctx.log(f"{stage}: a failed test broke the CUDA context (recorded as failed); continuing in a fresh "
                    "process")
        return pytest_result(stage, ctx.out_dir, attempts)
    return run


def report_record(stage: str, record: dict, log) -> None:
    """One progress line per finished test worth seeing: failures always; for benchmarks, every timed case."""
    outcome, nodeid = record.get("outcome"), record.get("nodeid", "?")
    short = nodeid.split("/")[-1]
    if record.get("rewritten"):  # the same case with its final extra_info: reported when it finished
        return
    if outcome == "failed":
        log(f"{stage}: FAILED {short}: {record.get('message', '').splitlines()[-1] if record.get('message') else ''}"[:400])
    elif outcome == "passed" and stage == "benchmarks" and record.get("stats"):
        info = record.get("extra_info", {})
        figure = next((f"{info[k]} {unit}" for k, unit in (("tflops", "TFLOP/s"), ("gb_per_s", "GB/s"),
                                                           ("tokens_per_s", "tokens/s")) if k in info), "")
        log(f"{stage}: {short} {record['stats']['median'] * 1e3:.3f} ms {figure}")


# ----------------------------------------------------------------------------------------- autotune

def choose_winner(default, results: dict, guard: float = NOISE_GUARD) -> tuple[tuple, str]:
    """(configuration to use, why) from `results`: configuration -> {"status": "ok" | "wrong" | "error" |
    "crashed", "median_s": seconds}. Only candidates whose result matched the default's ("ok") compete;
    the fastest replaces the default only when its median is more than `guard` below the default's."""
    default = tuple(default)
    results = {tuple(config): r for config, r in results.items()}
    base = results.get(default)
    if not base or base.get("status") != "ok":
        return default, "the default configuration did not run: kept, nothing compared"
    ok = sorted((r["median_s"], config) for config, r in results.items() if r.get("status") == "ok")
    best_time, best = ok[0]
    if best != default and best_time < (1 - guard) * base["median_s"]:
        return best, f"{100 * (1 - best_time / base['median_s']):.1f}% faster than the default"
    return default, f"no candidate beats the default by more than {100 * guard:g}%"


def summarize_autotune(records: list[dict], table: dict) -> tuple[list[dict], dict]:
    """(one summary per sweep, the tuned table updated with every complete sweep's decision: the winner,
    or no entry when the default stays)."""
    table = dict(table)
    sweeps, results = [], {}
    for record in records:
        if record.get("type") == "candidate" and record.get("status") not in ("started", "interrupted"):
            results.setdefault(record["key"], {})[tuple(record["config"])] = record
    seen = set()
    for record in records:
        if record.get("type") != "sweep" or record["key"] in seen:
            continue
        seen.add(record["key"])
        key, candidates = record["key"], [tuple(c) for c in record["candidates"]]
        measured = results.get(key, {})
        summary = dict(key=key, kind=record["kind"], head_dim=record["head_dim"], dtype=record["dtype"],
                       arch=record["arch"], shape=record.get("shape"), default=list(record["default"]),
                       candidates=[dict(config=list(c), **{k: measured[c].get(k) for k in
                                                           ("status", "median_s", "rel_err", "error")})
                                   if c in measured else dict(config=list(c), status="not run")
                                   for c in candidates])
        summary["complete"] = all(c in measured for c in candidates)
        if summary["complete"]:
            winner, why = choose_winner(record["default"], measured)
            summary.update(winner=list(winner), why=why)
            base = measured[tuple(record["default"])].get("median_s")
            summary["default_ms"] = round(base * 1e3, 4) if base else None
            win = measured[winner].get("median_s")
            summary["winner_ms"] = round(win * 1e3, 4) if win else None
            if winner != tuple(record["default"]):
                table[key] = list(winner)
            else:
                table.pop(key, None)
        sweeps.append(summary)
    return sweeps, table


def autotune_stage(ctx: Context) -> dict:
    record_path = ctx.out_dir / "autotune.jsonl"
    log_path = ctx.out_dir / "autotune.log"
    attempts = []
    seen = [len(read_records(record_path))]

    def poll():
        records = read_records(record_path)
        for record in records[seen[0]:]:
            if record.get("type") == "candidate" and record.get("status") not in ("started", "interrupted"):
                time_ms = f"{record['median_s'] * 1e3:.3f} ms" if record.get("median_s") else ""
                detail = record.get("error") or (f"relative error {record['rel_err']:.2g}" if record.get("status") == "wrong" else "")
                ctx.log(f"autotune: {record['key']} {tuple(record['config'])} {record['status']} {time_ms} {detail}"[:300])
        seen[0] = len(records)

    # Compiling ~17 candidates per head dim and dtype one after another would take most of the budget:
    # WARMUP_PROCESSES children compile a share each first (filling Triton's on-disk cache; no records),
    # then one child checks and times every candidate alone on the GPU, loading the compiled kernels.
    try:
        return _autotune_stage(ctx, record_path, log_path, attempts, poll)
    except Interrupted as err:  # the sweeps measured before the child was killed
        err.result = dict(sweeps=summarize_autotune(read_records(record_path), read_json(REPO_TUNED_TABLE) or {})[0],
                          attempts=attempts)
        raise


def _autotune_stage(ctx: Context, record_path: Path, log_path: Path, attempts: list, poll) -> dict:
    shards = max(1, min(WARMUP_PROCESSES, (os.cpu_count() or 2) // 2))
    warm_start = time.time()
    warm_deadline = min(ctx.deadline, warm_start + 0.5 * ctx.budget)  # at least half the budget is for timing
    run_children([[str(Path(__file__).resolve()), "_autotune-child", str(ctx.out_dir), repr(warm_deadline),
                   f"--compile-only={i}/{shards}"] for i in range(shards)],
                 [ctx.out_dir / f"autotune.compile-{i}.log" for i in range(shards)],
                 min(warm_deadline + WARMUP_GRACE, ctx.hard_deadline))  # no child outlives the stage's budget
    warm_s = time.time() - warm_start
    ctx.log(f"autotune: kernels compiled by {shards} processes in {warm_s:.0f} s")
    for _ in range(4):  # a candidate that breaks the CUDA context ends the child (exit 3): start a fresh one
        if ctx.left() < TIMING_START:
            break
        code, killed = run_child([str(Path(__file__).resolve()), "_autotune-child", str(ctx.out_dir), repr(ctx.deadline)],
                                 log_path, ctx.hard_deadline, poll)
        attempts.append(dict(exit_code=code, killed=killed))
        if code != 3:
            break
        ctx.log("autotune: a candidate broke the CUDA context (recorded as failed); continuing in a fresh process")
    records = read_records(record_path)
    repo_table = read_json(REPO_TUNED_TABLE) or {}
    sweeps, table = summarize_autotune(records, repo_table)
    ends = [r for r in records if r.get("type") == "end"]
    complete = bool(ends) and ends[-1].get("complete", False) and attempts and attempts[-1]["exit_code"] == 0
    required = {f"{dtype}/d{dim}" for dtype, dim, need in AUTOTUNE_PLAN if need}
    out_table = ctx.out_dir / "tuned_tiles.json"
    out_table.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    copy = f"cp {out_table} {REPO_TUNED_TABLE}"
    for sweep in sweeps:
        if sweep.get("complete"):
            ctx.log(f"autotune: {sweep['key']}: {tuple(sweep['winner'])} ({sweep['why']})")
    ctx.log(f"autotune: winners in {out_table}; to adopt them: {copy}")
    error = None
    if not attempts:
        error = (f"the time budget was spent compiling: the warm-up took {warm_s:.0f} s of the {ctx.budget:g} s "
                 f"budget and left under the {TIMING_START:g} s the timing process needs, so nothing was timed "
                 f"(a budget of at least {AUTOTUNE_FULL_BUDGET:g} s leaves them after a full warm-up)")
    elif not complete:
        last = attempts[-1]
        error = ("the time budget ran out" if last.get("killed") or (ends and ends[-1].get("reason"))
                 else f"the sweep process exited with status {last.get('exit_code')}: {last_line(log_path)}")
    return dict(complete=bool(complete), sweeps=sweeps, table=table, table_path=str(out_table), copy_command=copy,
                required=sorted(required), attempts=attempts, error=error)


def profile_stage(ctx: Context) -> dict:
    """benchmarks/profile_step.py in a child: the expansion step of eager, kpro-frozen and kpro-train_only,
    each timed (host clock, synchronised) with the time to issue it, then the host costs, then each step
    profiled (its device syncs counted): every clock reading before the first profiler session."""
    log_path = ctx.out_dir / "profile.log"
    # Each attempt measures everything again: an earlier attempt's files would pass for this one's.
    for name in PROFILE_FILES:
        (ctx.out_dir / name).unlink(missing_ok=True)
    try:
        code, killed = run_child([str(HERE / "profile_step.py"), str(ctx.out_dir)], log_path, ctx.hard_deadline)
    except Interrupted as err:  # what the child measured before it was killed
        err.result = dict(results=read_json(ctx.out_dir / "profile.json") or [],
                          markdown_path=str(ctx.out_dir / "profile.md"))
        raise
    results = read_json(ctx.out_dir / "profile.json") or []
    for r in results:
        profiled = (f", GPU busy {r.get('gpu_busy_ms')} ms, {r['launches']} launches, syncs {r['syncs'] or 'none'}"
                    if "launches" in r else ", not profiled (the child stopped first)")
        ctx.log(f"profile: {r['impl']}: step {r['step_ms']} ms, issued in {r['enqueue_ms']} ms{profiled}")
    complete = code == 0 and not killed
    error = None if complete else ("the time budget ran out" if killed
                                   else f"exited with status {code}: {last_line(log_path)}")
    if error and not results:
        error = f"profile_step.py measured nothing (no profile.json): {error}"
    return dict(complete=complete, results=results, attempts=[dict(exit_code=code, killed=killed)], error=error,
                summary=f"{len(results)} implementations profiled" if results else "nothing measured",
                markdown_path=str(ctx.out_dir / "profile.md"))


def last_line(log_path: Path) -> str:
    """The last non-empty line of a child's log (its error, when it died of one)."""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def autotune_child(out_dir: Path, deadline: float, *, device=None, arch: int | None = None, plan=AUTOTUNE_PLAN,
                   shapes=AUTOTUNE_SHAPE, timer=None, compile_only: tuple[int, int] | None = None) -> int:
    """Check and time every candidate not yet recorded in OUT_DIR/autotune.jsonl, one record per candidate as
    it finishes; return 3 if a candidate broke the CUDA context (the driver starts a fresh process), else 0.
    `compile_only=(i, n)`: run the i-th of every n pending candidates once, to compile it, and record
    nothing. `device`, `arch`, `plan`, `shapes` and `timer` (call -> median seconds) are for tests on the CPU."""
    import contextlib

    import torch

    from kpro import ops
    from kpro.ops.triton_kernels import attention_tiles as tiles

    device = torch.device("cuda") if device is None else device
    if arch is None:
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    if timer is None:
        from gpu_timing import median_time
        timer = lambda call: median_time(call, warmup_ms=10, rep_ms=40, min_reps=10, max_reps=200)  # noqa: E731
    record_path = out_dir / "autotune.jsonl"
    records = read_records(record_path)
    status = {}
    for record in records:
        if record.get("type") == "candidate":
            status[(record["key"], tuple(record["config"]))] = record
    interrupted_before = {(r["key"], tuple(r["config"])) for r in records
                          if r.get("type") == "candidate" and r.get("status") == "interrupted"}
    done = set()
    for candidate, record in status.items():
        if compile_only is not None:  # anything recorded is the timing child's business
            done.add(candidate)
        elif record["status"] == "started":  # it was running when the previous process died
            if candidate in interrupted_before:  # the second time: a hang or a crash, never retried again
                append_record(record_path, dict(record, status="crashed", error=KILLED, t=time.time()))
                done.add(candidate)
            else:
                append_record(record_path, dict(record, status="interrupted", error=INTERRUPTED, t=time.time()))
        elif record["status"] != "interrupted":
            done.add(candidate)
    swept = {r["key"] for r in records if r.get("type") == "sweep"}
    if compile_only is not None:
        shard, shards = compile_only
        position = 0

    def forced(configs):
        stack = contextlib.ExitStack()
        for kind, config in configs.items():
            stack.enter_context(tiles.forced_tiles(kind, config))
        return stack

    for dtype_name, dim, required in plan:
        dtype = getattr(torch, dtype_name)
        defaults = {kind: tuple(tiles.default_tile_config(kind, dim, dtype, arch)) for kind in tiles.KERNELS}
        sweeps = [(kind, tiles.tuned_key(kind, dim, dtype, arch),
                   [tuple(c) for c in tiles.candidate_configs(kind, dim, dtype, arch)]) for kind in tiles.KERNELS]
        if all((key, c) in done for _, key, candidates in sweeps for c in candidates):
            continue
        batch, seq, heads = shapes[dim]
        gen = torch.Generator(device=device).manual_seed(0)
        make = lambda h: torch.randn(batch, seq, h, dim, device=device, dtype=dtype, generator=gen)  # noqa: E731
        q, k, v, dout = make(heads), make(heads // 4), make(heads // 4), make(heads)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def forward():
            with torch.no_grad(), ops.backend("triton"):
                return [ops.attention(q, k, v, causal=True)]

        def forward_backward():
            for t in leaves:
                t.grad = None
            with ops.backend("triton"):
                ops.attention(*leaves, causal=True).backward(dout)
            return [t.grad for t in leaves]

        reference = {}  # "forward": [out], "backward": [dq, dk, dv], all kernels at their defaults
        for kind, key, candidates in sweeps:
            if key not in swept and compile_only is None:
                append_record(record_path, dict(type="sweep", key=key, kind=kind, head_dim=dim, dtype=dtype_name,
                                                arch=arch, default=list(defaults[kind]),
                                                candidates=[list(c) for c in candidates],
                                                shape=[batch, seq, heads, heads // 4, dim], required=required))
                swept.add(key)
            run, ref_key = (forward, "forward") if kind == "forward" else (forward_backward, "backward")
            for config in candidates:
                if (key, config) in done:
                    continue
                if compile_only is not None:
                    position += 1
                    if (position - 1) % shards != shard or time.time() > deadline:
                        continue
                    try:
                        with forced(dict(defaults, **{kind: config})):
                            run()
                    except Exception:  # noqa: BLE001 - the timing child meets and records the same error
                        if not _context_alive(device):
                            return 3
                    continue
                if time.time() > deadline:
                    append_record(record_path, dict(type="end", complete=not required and _required_done(out_dir, plan),
                                                    reason="time budget spent", t=time.time()))
                    return 0
                base = dict(type="candidate", key=key, kind=kind, config=list(config), t=time.time())
                append_record(record_path, dict(base, status="started"))
                configs = dict(defaults, **{kind: config})
                try:
                    if ref_key not in reference:
                        with forced(defaults):
                            reference[ref_key] = [t.detach().clone() for t in run()]
                    with forced(configs):
                        got = run()
                    err = max(_rel_err(a, b) for a, b in zip(got, reference[ref_key]))
                    del got
                    if not err <= AUTOTUNE_TOLERANCE[dtype_name]:  # NaN too
                        append_record(record_path, dict(base, status="wrong", rel_err=err))
                        done.add((key, config))
                        continue

                    def call():
                        with forced(configs):
                            run()
                    append_record(record_path, dict(base, status="ok", median_s=timer(call), rel_err=err))
                except Exception as exc:  # noqa: BLE001 - a failing candidate is a result
                    text = str(exc).strip()
                    message = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]
                    lost = not _context_alive(device)
                    append_record(record_path, dict(base, status="error", error=message, context_lost=lost))
                    if lost:
                        return 3
                done.add((key, config))
    if compile_only is None:
        append_record(record_path, dict(type="end", complete=True, t=time.time()))
    return 0


def _required_done(out_dir: Path, plan=AUTOTUNE_PLAN) -> bool:
    """Whether every required sweep of `plan` has all its candidates recorded."""
    sweeps, _ = summarize_autotune(read_records(out_dir / "autotune.jsonl"), {})
    required = {(dtype, dim) for dtype, dim, need in plan if need}
    relevant = [s for s in sweeps if (s["dtype"], s["head_dim"]) in required]
    return len(relevant) == 3 * len(required) and all(s["complete"] for s in relevant)


def _rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.norm())
    return float((got - want).norm()) / (scale if scale > 0 else 1.0)


def _context_alive(device) -> bool:
    """Whether the CUDA context still works after an error (an illegal address breaks it for good)."""
    import torch
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------- reports

def environment() -> dict:
    """Device and versions (the driver process: CUDA is initialised here only to read the device)."""
    import importlib.metadata as metadata
    import platform

    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    for package in ("triton", "pytest", "pytest-benchmark", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    info.update(device=props.name, device_count=torch.cuda.device_count(), capability=f"sm{major}{minor}",
                sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1))
    info["commit"] = source_commit()
    return info


def source_commit() -> str | None:
    """The tree's commit, "-dirty" appended when tracked files differ from it (untracked ones do not count);
    a copy without .git (a device machine's) names it through KPRO_COMMIT."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("KPRO_COMMIT") or None


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _figure(info: dict) -> tuple[str, str]:
    """(throughput, fraction of its ceiling) of a benchmark case."""
    if "tflops" in info:
        fraction = f"{100 * info['fraction_of_matmul']:.0f}% of bf16 matmul" if "fraction_of_matmul" in info else ""
        return f"{info['tflops']} TFLOP/s", fraction
    if "gb_per_s" in info:
        return f"{info['gb_per_s']} GB/s", f"{100 * info['fraction_of_copy']:.0f}% of copy"
    if "tokens_per_s" in info:
        fraction = f"MFU {info['mfu']}" if "mfu" in info else ""
        return f"{info['tokens_per_s']:,} tokens/s", fraction
    return "", ""


def _notes(info: dict) -> str:
    notes = []
    if info.get("sdpa_backend"):
        notes.append(f"SDPA backend {info['sdpa_backend']}")
    for key, label in (("saved_activation_mb", "saved {} MiB"), ("saved_vs_eager", "{}× eager's saved"),
                       ("peak_allocated_mb", "peak {} MiB"), ("step_peak_mb", "step peak {} MiB"),
                       ("peak_memory_gb", "peak {} GiB"), ("step_peak_gb", "step peak {} GiB"),
                       ("fraction_of_plain_tflops", "{} of plain-attention TFLOP/s")):
        if key in info:
            notes.append(label.format(info[key]))
    return ", ".join(notes)


def benchmark_tables(cases: list[dict]) -> list[str]:
    """Markdown tables, one per benchmark function, one block of rows per case (group): each
    implementation's median, throughput, its fraction of the ceiling measured in the same run, and the
    fastest kpro implementation's time over this implementation's (below 1: kpro faster; the case's own
    `time_over_<impl>` where it recorded one, as the training loop does for its steady-state steps)."""
    families: dict[str, dict[str, list[dict]]] = {}
    for case in cases:
        if case.get("outcome") != "passed" or not case.get("stats"):
            continue
        family = case["id"].split("[", 1)[0].split("/")[-1]
        families.setdefault(family, {}).setdefault(case.get("group") or case["id"], []).append(case)
    lines = []
    for family, groups in families.items():
        lines += [f"### {family}", "", "| case | implementation | median | throughput | of ceiling | "
                  "fastest kpro time ÷ this | notes |", "|---|---|---|---|---|---|---|"]
        for group, rows in groups.items():
            kpro_rows = [r for r in rows if _is_kpro(r)]
            fastest = min(kpro_rows, key=lambda r: r["stats"]["median"]) if kpro_rows else None
            for row in sorted(rows, key=lambda r: r["stats"]["median"]):
                info = row.get("extra_info", {})
                throughput, fraction = _figure(info)
                ratio = "—"
                if fastest is not None and row is not fastest and not _is_kpro(row):
                    # the ratio the case recorded where there is one (fit's: steady-state steps, no checkpoint)
                    recorded = fastest.get("extra_info", {}).get(f"time_over_{_impl(row)}")
                    value = recorded if recorded is not None else fastest["stats"]["median"] / row["stats"]["median"]
                    ratio = f"{value:.2f} ({_impl(fastest)})"
                lines.append(f"| {group} | {_impl(row)} | {_ms(row['stats']['median'])} | {throughput} | {fraction} "
                             f"| {ratio} | {_notes(info)} |")
        lines.append("")
    return lines


def skipped_lines(cases: list[dict], shown: int = 5) -> list[str]:
    """The cases skipped for a reason (a baseline not installed, a size for the other device; not the budget's),
    one line per reason with the first `shown` ids: the tables hold timed cases only, and a missing baseline
    must not just drop out of the comparison."""
    reasons: dict[str, list[str]] = {}
    for case in cases:
        if case.get("outcome") == "skipped" and not case.get("budget"):
            message = (case.get("message") or "").strip()
            reasons.setdefault(message.splitlines()[-1] if message else "no reason given", []).append(
                case["id"].split("/")[-1])
    if not reasons:
        return []
    lines = ["Skipped (not timed), by reason:", ""]
    for reason, ids in reasons.items():
        more = f", … and {len(ids) - shown} more (gpu_suite.json lists each)" if len(ids) > shown else ""
        lines.append(f"- {reason}: {len(ids)} case{'s' if len(ids) > 1 else ''}: "
                     + ", ".join(f"`{i}`" for i in ids[:shown]) + more)
    return lines + [""]


def _impl(case: dict) -> str:
    params = case.get("params") or {}
    for key in ("impl", "path"):
        if key in params:
            return str(params[key])
    return case["id"].rsplit("[", 1)[-1].rstrip("]")


def _is_kpro(case: dict) -> bool:
    impl = _impl(case)
    return impl.startswith("kpro") or impl in ("fused", "fit")


def stage_origins(stage: dict) -> dict[tuple, list[int]]:
    """(device, commit, suite command) -> the attempts (1-based) of `stage` made there; the stage's own where
    its attempts do not say. Empty for a result written before the suite recorded them."""
    origins: dict[tuple, list[int]] = {}
    for number, record in enumerate(stage.get("attempts") or [], 1):
        if "device" in record or "suite_command" in record:
            origins.setdefault((record.get("device"), record.get("commit"), record.get("suite_command")),
                               []).append(number)
    if not origins and (stage.get("environment") or stage.get("suite_command")):
        env = stage.get("environment") or {}
        origins[(env.get("device"), env.get("commit"), stage.get("suite_command"))] = []
    return origins


def origin_lines(stages: dict, current: tuple) -> list[str]:
    """One line per stage whose results (or some attempts of it) another device, commit or command produced."""
    lines = []
    for name in STAGES:
        if name not in stages:
            continue
        origins = stage_origins(stages[name])
        if not origins:
            if not stages[name].get("ran_this_time", True):
                lines.append(f"- {name}: an earlier run, whose device, commit and command were not recorded")
            continue
        if set(origins) == {current}:
            continue
        parts = [f"{device}, commit {commit}, `{command}`"
                 + (f" (attempt{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))})"
                    if numbers and len(origins) > 1 else "")
                 for (device, commit, command), numbers in origins.items()]
        lines.append(f"- {name}: " + "; ".join(parts))
    return (["Not produced by this run's device, commit and command (an earlier run in this OUT_DIR, or earlier "
             "attempts of a resumed stage):", ""] + lines + [""]) if lines else []


def render_markdown(report: dict) -> str:
    """gpu_suite.md: the run's device and command, each stage's status, and tables ready to paste into
    benchmarks/RESULTS.md."""
    env, stages = report.get("environment", {}), report.get("stages", {})
    command = report.get("command", "benchmarks/gpu_suite.sh OUT_DIR")
    lines = [f"## GPU suite: {env.get('device', 'unknown device')} ({report.get('started', '')})", "",
             f"Device: {env.get('device')} ({env.get('capability')}, {env.get('sms')} SMs, {env.get('memory_gb')} GiB), "
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
             f"pytest-benchmark {env.get('pytest-benchmark')}, Python {env.get('python')}"
             + (f", commit {env['commit']}" if env.get("commit") else "") + ".",
             "", f"Command: `{command}` (from the repository root; no network).", "",
             "| stage | status | time | budget | summary |", "|---|---|---|---|---|"]
    for name in STAGES:
        if name not in stages:
            continue
        s = stages[name]
        summary = s.get("summary") or s.get("error") or ""
        if name == "autotune" and s.get("sweeps"):
            done = [w for w in s["sweeps"] if w.get("complete")]
            changed = [w for w in done if w.get("winner") != w.get("default")]
            summary = f"{len(done)} of {len(s['sweeps'])} sweeps complete, {len(changed)} new winners"
        status = s.get("status", "?") + ("" if s.get("ran_this_time", True) else " (earlier run)")
        lines.append(f"| {name} | {status} | {s.get('seconds', '—')} s | {s.get('budget_s', '—')} s | {summary} |")
    lines.append("")
    lines += origin_lines(stages, (env.get("device"), env.get("commit"), command))

    tests = stages.get("tests")
    if tests:
        lines += ["### Tests (`pytest -m cuda -q tests`)", "", f"Summary (all attempts): {tests.get('summary')}"
                  + (f"; pytest's last line: {tests['pytest_summary']}" if tests.get("pytest_summary") else ""), ""]
        if tests.get("error"):
            lines += [f"Error: {tests['error']}", ""]
        for failure in tests.get("failures", []):
            message = failure["message"].strip()
            lines.append(f"- FAILED `{failure['id']}`: {message.splitlines()[-1] if message else ''}"
                         + (" (the CUDA context was lost: the tests after it ran in a fresh process)"
                            if failure.get("context_lost") else ""))
        lines.append("")

    tune = stages.get("autotune")
    if tune and tune.get("sweeps"):
        shape = next((s.get("shape") for s in tune["sweeps"] if s.get("shape")), None)
        lines += ["### Attention tiles (autotune)", "",
                  f"Causal attention, [batch, tokens, heads, kv heads, head dim] = {shape} (the d64 sweeps use 32 "
                  "heads), median of CUDA-event times; forward alone, dK/dV and dQ through forward + backward with "
                  f"the other kernels at their defaults. A winner beats the default by more than {100 * NOISE_GUARD:g}%.",
                  "", "| key | default (BLOCK_M, BLOCK_N, warps, stages) | default time | chosen | chosen time | "
                  "candidates ok / wrong / failed | why |", "|---|---|---|---|---|---|---|"]
        for sweep in tune["sweeps"]:
            states = [c.get("status") for c in sweep["candidates"]]
            counts = f"{states.count('ok')} / {states.count('wrong')} / {sum(s in ('error', 'crashed') for s in states)}"
            if not sweep.get("complete"):
                counts += f" ({states.count('not run')} not run)"
            ms = lambda value: "—" if value is None else f"{value} ms"  # noqa: E731
            lines.append(f"| {sweep['key']} | {tuple(sweep['default'])} | {ms(sweep.get('default_ms'))} | "
                         f"{tuple(sweep['winner']) if sweep.get('winner') else '—'} | {ms(sweep.get('winner_ms'))} | "
                         f"{counts} | {sweep.get('why', 'incomplete: not decided')} |")
        lines += ["", f"Adopt: `{tune.get('copy_command')}` (then commit kpro/ops/triton_kernels/tuned_tiles.json).", ""]

    prof = stages.get("profile")
    if prof and prof.get("results"):
        lines += ["### Where an expansion step's time goes (profile)", "",
                  "benchmarks/profile_step.py: the expansion benchmark's step, host clock around a synchronised "
                  "step (median of 3); the host time to issue it without waiting; the GPU's busy time and kernel "
                  "launches, and device syncs, from torch.profiler over one step; then what one call of each op "
                  "costs the host, on tensors small enough that the host sets the pace.", ""]
        lines.append(Path(prof.get("markdown_path", "")).read_text() if prof.get("markdown_path")
                     and Path(prof["markdown_path"]).is_file() else "")
    bench = stages.get("benchmarks")
    if bench:
        lines += ["### Benchmarks", "",
                  f"Command: `{bench.get('suite_command') or command}` — stage `benchmarks`: "
                  f"`{(bench.get('attempts') or [{}])[-1].get('command', 'pytest --benchmark benchmarks')}`. "
                  "GPU times are medians of CUDA-event times with the L2 flushed before each call; every "
                  "implementation was checked against the reference before it was timed; the ceilings (copy "
                  "bandwidth, bf16 matmul) were measured in the same run.", ""]
        if bench.get("error"):
            lines += [f"Error: {bench['error']}", ""]
        if bench.get("pytest_summary"):
            lines += [f"pytest's last line: {bench['pytest_summary']}", ""]
        lines += benchmark_tables(bench.get("cases", []))
        failed = [c for c in bench.get("cases", []) if c.get("outcome") == "failed"]
        if failed:
            lines += ["Failed or wrong (not timed):", ""]
            lines += [f"- `{c['id']}`: {(c.get('message') or '').strip().splitlines()[-1] if (c.get('message') or '').strip() else ''}"
                      for c in failed]
            lines.append("")
        lines += skipped_lines(bench.get("cases", []))
        budget = [c["id"] for c in bench.get("cases", []) if c.get("budget")]
        if budget:
            lines += [f"Not run (time budget; run the same command again to continue): {len(budget)} cases"
                      + (f" (the stage's process ended while `{bench['in_flight']}` ran)" if bench.get("in_flight") else "") + ".", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- main

def stages_for(budgets: dict[str, float]) -> list[Stage]:
    runs = {
        "tests": pytest_stage("tests", ["-m", "cuda", "-q", "tests", "-rfE", "--tb=short", "-p", "no:cacheprovider"]),
        "autotune": autotune_stage,
        "profile": profile_stage,
        "benchmarks": pytest_stage("benchmarks", ["--benchmark", "benchmarks", "-q", "-p", "no:cacheprovider",
                                                  "--benchmark-columns=median,rounds"]),
    }
    return [Stage(name, runs[name], budgets[name], MARGINS[name], DESCRIPTIONS[name]) for name in STAGES]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_suite.sh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="where results go (created; reused to resume)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages from scratch")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=SECONDS",
                        help="change one stage's time budget")
    parser.add_argument("--list", action="store_true", help="print the stages and exit (needs no GPU)")
    parser.add_argument("--report-only", action="store_true",
                        help="write gpu_suite.json and .md again from OUT_DIR's stage results, run nothing "
                             "(needs no GPU)")
    args = parser.parse_args(argv)
    selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in selected if s not in STAGES]
    if unknown or not selected:
        parser.error(f"unknown stage(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(STAGES)}")
    args.selected = [s for s in STAGES if s in selected]
    args.budgets = dict(BUDGETS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in STAGES:
            parser.error(f"--budget {item}: unknown stage {name!r}")
        try:
            args.budgets[name] = float(seconds)
        except ValueError:
            parser.error(f"--budget {item}: seconds must be a number")
        # NaN and infinity would disable the deadlines; at or below the margin the stage would start nothing
        least, why = MARGINS[name], f" (it starts no work in its last {MARGINS[name]:g} s)" if MARGINS[name] else ""
        if name == "autotune":  # and under TIMING_START, the timing process would never start
            least, why = TIMING_START, f" (its timing process starts only with {TIMING_START:g} s left)"
        if not least < args.budgets[name] < float("inf"):
            parser.error(f"--budget {item}: the {name} stage's budget must be a finite number of seconds above "
                         f"{least:g}{why}, got {seconds}")
    if not args.list and not args.out_dir:
        parser.error("OUT_DIR is required")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_pytest-child"]:
        stage, out_dir, deadline = argv[1], Path(argv[2]), float(argv[3])
        return pytest_child(stage, out_dir, deadline, argv[argv.index("--") + 1:])
    if argv[:1] == ["_autotune-child"]:
        shard = next((a.partition("=")[2] for a in argv[3:] if a.startswith("--compile-only=")), None)
        return autotune_child(Path(argv[1]), float(argv[2]),
                              compile_only=tuple(int(x) for x in shard.split("/")) if shard else None)
    args = parse_args(argv)
    if args.list:
        for name in STAGES:
            print(f"{name:<11} {args.budgets[name]:4.0f} s  {DESCRIPTIONS[name]}")
        return 0
    if args.report_only:
        return report_only(Path(args.out_dir).resolve())
    try:
        import torch
        has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as err:  # noqa: BLE001 - a broken torch is no CUDA device either
        print(f"no CUDA device (torch cannot be imported: {type(err).__name__}: {err})".splitlines()[0], file=sys.stderr)
        return 2
    if not has_cuda:
        print("no CUDA device", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir).resolve()
    try:  # before the device is read: a bad OUT_DIR is one line, not a traceback after CUDA's start-up
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError("it exists and is not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError("it is not writable")
    except OSError as err:
        print(f"error: OUT_DIR {args.out_dir} cannot be used: {err.strerror or err}; give a folder that can be "
              "created and written", file=sys.stderr)
        return 2
    log = Progress()
    env = environment()
    log(f"{env['device']} ({env['capability']}), torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; "
        f"results in {out_dir}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "benchmarks/gpu_suite.sh " + " ".join([args.out_dir] + [a for a in argv if a != args.out_dir])
    stages = [s for s in stages_for(args.budgets) if s.name in args.selected]
    handlers = {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopped = None
    try:
        try:
            results = run_stages(stages, out_dir, force=args.force, log=log, environment=env, command=command)
        except Interrupted as err:
            stopped, results = err, dict(err.results or {})
            log(f"interrupted by {err.signame}: the child was killed; writing the reports of what finished")
        for sig in handlers:  # the reports are written whatever comes now
            signal.signal(sig, signal.SIG_IGN)
        stage_results = {**stored_results(out_dir), **results}  # the results in OUT_DIR, run now or before
        report = dict(command=command, started=started, seconds=round(time.monotonic() - log.start, 1),
                      environment=env, budgets=args.budgets,
                      stages={n: stage_results[n] for n in STAGES if n in stage_results})
        write_reports(out_dir, report, log)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if "autotune" in results and results["autotune"].get("copy_command"):
        log(f"tuned tiles: {results['autotune']['copy_command']}")
    if stopped is not None:
        return 128 + getattr(signal, stopped.signame)
    incomplete = [n for n in args.selected if not results.get(n, {}).get("complete")]
    if incomplete:
        log(f"not complete: {', '.join(incomplete)} (run the same command again to continue)")
    return 1 if incomplete else 0


def stored_results(out_dir: Path) -> dict[str, dict]:
    """Every stage's result in OUT_DIR (NAME.stage.json), marked as not run this time."""
    stored = {name: read_json(result_path(out_dir, name)) for name in STAGES}
    return {name: dict(result, ran_this_time=False) for name, result in stored.items() if isinstance(result, dict)}


def write_reports(out_dir: Path, report: dict, log) -> None:
    write_json(out_dir / "gpu_suite.json", report)
    (out_dir / "gpu_suite.md").write_text(render_markdown(report))
    log(f"reports: {out_dir / 'gpu_suite.json'}, {out_dir / 'gpu_suite.md'}")


def report_only(out_dir: Path) -> int:
    """--report-only: gpu_suite.json and .md rebuilt from OUT_DIR's stage results, with no GPU (after a run
    killed before it wrote them). The device, commit and command are those of the stage that finished last."""
    stages = {name: dict(result, ran_this_time=True) for name, result in stored_results(out_dir).items()}
    if not stages:
        print(f"error: --report-only: {out_dir} holds no stage results (NAME.stage.json)", file=sys.stderr)
        return 2
    last = max(stages.values(), key=lambda result: result.get("finished_at", ""))
    previous = read_json(out_dir / "gpu_suite.json") or {}
    report = dict(command=last.get("suite_command") or previous.get("command") or "benchmarks/gpu_suite.sh OUT_DIR",
                  started=f"report rebuilt {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                  environment=last.get("environment") or previous.get("environment") or {},
                  stages={name: stages[name] for name in STAGES if name in stages})
    write_reports(out_dir, report, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
