"""The GPU suite (benchmarks/gpu_suite.sh, gpu_suite.py) and the GPU timing of the benchmarks, on the CPU:
the scripts are well formed, `--list` and the no-CUDA refusal, stage bookkeeping and resuming with fake
stages and a real pytest child, the autotune winner rule and sweep summary on fake timings, the Markdown
report on a fake result, the replay of CUDA-event times into pytest-benchmark's statistics, the L2-flush
buffer allocated before any case, the training benchmark's two loops computing one loss, and the `-k`
keywords of docs/benchmarks.md each selecting its suite's file only."""
import importlib.util
import json
import os
import py_compile
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_suite.sh"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", BENCHMARKS / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


suite = load_suite()


def run_script(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})))


def test_scripts_are_well_formed(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    for name in ("gpu_suite.py", "gpu_timing.py", "conftest.py"):
        py_compile.compile(str(BENCHMARKS / name), cfile=str(tmp_path / (name + "c")), doraise=True)


def test_list_prints_the_four_stages_in_order():
    done = run_script("--list")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["tests", "autotune", "profile", "benchmarks"]


def test_refuses_without_cuda_in_one_line(tmp_path):
    out = tmp_path / "out"
    done = run_script(str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip() == "no CUDA device" and done.stdout == ""
    assert not out.exists()


def pretend_cuda(monkeypatch, environment=None):
    """main() as on a GPU machine: CUDA reported present, `environment` (default: a fake device's) for the
    device's details, and the stages none."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(suite, "environment", environment or (lambda: dict(
        device="FAKE", capability="sm90", torch="x", cuda="x", triton="x", commit="abc1234")))


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_an_unusable_out_dir_is_refused_in_one_line(tmp_path, monkeypatch, capsys, where):
    """An OUT_DIR that is a file, or cannot be created, ended in a FileExistsError/NotADirectoryError traceback,
    after the device's details were read (CUDA initialised)."""
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" if where == "a-file" else tmp_path / "a-file" / "out"
    pretend_cuda(monkeypatch, environment=lambda: pytest.fail("the device was read before OUT_DIR was checked"))
    assert suite.main([str(out), "--stages", "tests"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    assert captured.err.startswith(f"error: OUT_DIR {out} cannot be used: "), captured.err
    assert "give a folder that can be created and written" in captured.err, captured.err


def test_unknown_stage_is_a_usage_error():
    done = run_script("out", "--stages", "tests,nonsense")
    assert done.returncode == 2 and "unknown stage" in done.stderr


@pytest.mark.parametrize("budget", ["tests=nan", "benchmarks=inf", "tests=-30", "profile=0", "benchmarks=30"])
def test_a_budget_must_be_finite_and_above_the_stages_margin(budget, capsys):
    """NaN or infinity disabled the stage's deadlines; a budget at or below its margin starts nothing."""
    with pytest.raises(SystemExit) as refused:
        suite.parse_args(["out", "--budget", budget])
    name, _, seconds = budget.partition("=")
    assert refused.value.code == 2
    assert f"--budget {budget}: the {name} stage's budget must be a finite number of seconds above " \
           f"{suite.MARGINS[name]:g}" in capsys.readouterr().err
    assert suite.parse_args(["out", "--budget", "benchmarks=30.5"]).budgets["benchmarks"] == 30.5


# ------------------------------------------------------------------------------------ stage bookkeeping

class FakeStage:
    def __init__(self, name, outcomes):
        self.name, self.outcomes, self.calls = name, list(outcomes), 0

    def stage(self):
        return suite.Stage(self.name, self.run, budget=5.0, margin=1.0)

    def run(self, ctx):
        self.calls += 1
        (ctx.out_dir / f"{self.name}.jsonl").write_text("{}\n")
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return {"complete": outcome, "calls": self.calls}


def test_finished_stage_is_skipped_and_unfinished_one_reruns(tmp_path):
    done, partial, broken = FakeStage("a", [True]), FakeStage("b", [False, True]), FakeStage("c", [RuntimeError("boom"), True])
    lines = []
    first = suite.run_stages([done.stage(), partial.stage(), broken.stage()], tmp_path, log=lines.append)
    assert first["a"]["status"] == "complete" and first["b"]["status"] == "incomplete"
    assert first["c"]["status"] == "error" and "boom" in first["c"]["error"]  # the run went on after it
    assert json.loads((tmp_path / "b.stage.json").read_text())["complete"] is False

    lines.clear()
    second = suite.run_stages([done.stage(), partial.stage(), broken.stage()], tmp_path, log=lines.append)
    assert done.calls == 1 and any("a: complete" in line and "skipped" in line for line in lines)
    assert second["a"]["ran_this_time"] is False
    assert partial.calls == 2 and second["b"]["complete"] and second["b"]["attempt"] == 2
    assert broken.calls == 2 and second["c"]["complete"]

    forced = FakeStage("a", [True])
    suite.run_stages([forced.stage()], tmp_path, force=True, log=lines.append)
    assert forced.calls == 1 and json.loads((tmp_path / "a.stage.json").read_text())["attempt"] == 1


def test_pytest_stage_records_each_test_and_resumes_after_the_budget(tmp_path):
    tests = tmp_path / "suite_tests" / "test_fake.py"
    tests.parent.mkdir()
    tests.write_text(textwrap.dedent("""
        import time
        import pytest

        def test_passes():
            pass

        def test_fails():
            assert 1 == 2, "one is not two"

        def test_skips():
            pytest.skip("not here")

        @pytest.mark.parametrize("i", range(5))
        def test_slow(i):
            time.sleep(2.0)
    """))
    out = tmp_path / "out"
    out.mkdir()
    args = [str(tests), "-q", "-p", "no:cacheprovider"]
    # the soft deadline (5 s in) passes during the slow tests: the rest are skipped as "budget", the stage is
    # incomplete (three slow tests take 6 s, so at least two are left whatever the start-up time)
    stage = suite.Stage("tests", suite.pytest_stage("tests", args), budget=60.0, margin=60.0 - 5.0)
    first = suite.run_stages([stage], out, log=lambda line: None)["tests"]
    assert not first["complete"]
    assert first["counts"]["passed"] >= 1 and first["counts"]["failed"] == 1 and first["counts"]["not run (budget)"] >= 2
    assert [f["id"].split("::")[-1] for f in first["failures"]] == ["test_fails"]
    assert "one is not two" in first["failures"][0]["message"]

    stage = suite.Stage("tests", suite.pytest_stage("tests", args), budget=120.0, margin=5.0)
    second = suite.run_stages([stage], out, log=lambda line: None)["tests"]
    assert second["complete"] and second["attempt"] == 2
    assert second["counts"] == {"passed": 6, "failed": 1, "skipped": 1}
    records = [json.loads(line) for line in (out / "tests.jsonl").read_text().splitlines()]
    ran_twice = [nodeid for nodeid in {r["nodeid"] for r in records if "nodeid" in r}
                 if sum(r.get("nodeid") == nodeid and r["outcome"] == "passed" for r in records) > 1]
    assert ran_twice == []  # the second attempt ran only what the first did not finish


def test_a_stage_killed_at_its_budget_counts_the_tests_it_never_finished(tmp_path):
    """Killed at the hard deadline, the stage's counts held only the tests that had finished: the one in flight
    and every later one were in no count, and the Markdown's "Not run (time budget)" line was missing."""
    tests = tmp_path / "suite_tests" / "test_killed.py"
    tests.parent.mkdir()
    tests.write_text(textwrap.dedent("""
        import time
        import pytest

        def test_a_quick():
            pass

        def test_b_hangs():
            time.sleep(120)

        @pytest.mark.parametrize("i", range(3))
        def test_c_after(i):
            pass
    """))
    out = tmp_path / "out"
    out.mkdir()
    stage = suite.Stage("benchmarks", suite.pytest_stage("benchmarks", [str(tests), "-q", "-p", "no:cacheprovider"]),
                        budget=20.0, margin=1.0)
    result = suite.run_stages([stage], out, log=lambda line: None)["benchmarks"]
    assert result["attempts"][-1]["killed"] and not result["complete"], result
    assert result["counts"] == {"passed": 1, "not run (budget)": 4}, result["counts"]
    assert result["in_flight"].endswith("::test_b_hangs"), result
    assert result["summary"].startswith("killed at the time budget during ") and "4 not run (budget)" in result["summary"]
    assert len(result["cases"]) == 5
    text = suite.render_markdown(dict(stages={"benchmarks": result}))
    assert "Not run (time budget; run the same command again to continue): 4 cases" in text, text
    assert "test_b_hangs" in text


def test_when_pytest_itself_fails_the_stage_reports_pytests_error(tmp_path):
    """A collection error (pytest's exit 2) was reported as the time budget ("Not run (time budget; run the
    same command again to continue)", which repeats the failure), and a usage error (exit 4) as nothing at all:
    the file and pytest's message were in neither report. They are now the stage's error."""
    folder = tmp_path / "suite_benchmarks"
    folder.mkdir()
    (folder / "test_ok.py").write_text("def test_x():\n    pass\n")
    (folder / "test_broken.py").write_text("import missing_module_xyz\n\ndef test_y():\n    pass\n")
    collection_error = "test_broken.py: ModuleNotFoundError: No module named 'missing_module_xyz'"
    for name, args, error in (("collection", [str(folder)], collection_error),
                              ("usage", [str(folder / "test_ok.py"), "--no-such-option"],
                               "error: unrecognized arguments: --no-such-option")):
        out = tmp_path / name
        out.mkdir()
        stage = suite.Stage("benchmarks", suite.pytest_stage("benchmarks", [*args, "-q", "-p", "no:cacheprovider"]),
                            budget=120.0, margin=5.0)
        result = suite.run_stages([stage], out, log=lambda line: None)["benchmarks"]
        assert result["status"] == "error" and not result["complete"], result
        assert error in result["error"] and result["error"].startswith("pytest exited with status "), result["error"]
        assert name != "collection" or "ERROR collecting " in result["error"], result["error"]
        assert "not run (budget)" not in result["counts"] and not any(c.get("budget") for c in result["cases"]), result
        text = suite.render_markdown(dict(stages={"benchmarks": result}))
        assert "Not run (time budget" not in text and result["error"] in text, text
    assert result["counts"] == {}, result  # nothing collected


def test_a_driver_stopped_by_sigterm_kills_its_child_and_writes_the_reports(tmp_path):
    """The driver cut off by a command limit (timeout's SIGTERM) wrote no NAME.stage.json, no gpu_suite.json or
    .md, and its pytest child, in a session of its own, went on running (holding the GPU). Now the child's group
    is killed, the stage is recorded as interrupted with what finished, both reports are written, and
    --report-only rebuilds them from OUT_DIR without CUDA."""
    from conftest import process_running

    tests = tmp_path / "suite_tests" / "test_hang.py"
    tests.parent.mkdir()
    pid_file = tmp_path / "child.pid"
    tests.write_text(textwrap.dedent(f"""
        import os, time

        def test_a_quick():
            pass

        def test_b_hangs():
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(120)

        def test_c_after():
            pass
    """))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import gpu_suite as suite
        torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 1)
        suite.environment = lambda: dict(device="FAKE", capability="sm90", torch="x", cuda="x", triton="x")
        run = suite.pytest_stage("tests", [{str(tests)!r}, "-q", "-p", "no:cacheprovider"])
        suite.stages_for = lambda budgets: [suite.Stage(n, run, 200.0, 5.0) for n in suite.STAGES]
        sys.exit(suite.main(sys.argv[1:]))
    """))
    out = tmp_path / "out"
    driver_process = subprocess.Popen([sys.executable, str(driver), str(out), "--stages", "tests"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        child = int(pid_file.read_text())
        driver_process.terminate()
        output, _ = driver_process.communicate(timeout=60)
    finally:
        driver_process.kill()
    assert driver_process.returncode == 128 + 15, output
    assert not process_running(child), "the pytest child outlived its driver"
    stage = json.loads((out / "tests.stage.json").read_text())
    assert stage["status"] == "interrupted" and not stage["complete"], stage
    assert stage["counts"] == {"passed": 1, "not run (interrupted)": 2}, stage
    assert stage["error"].startswith("interrupted by SIGTERM"), stage
    assert json.loads((out / "gpu_suite.json").read_text())["stages"]["tests"]["status"] == "interrupted"
    text = (out / "gpu_suite.md").read_text()
    assert "| tests | interrupted |" in text and "interrupted by SIGTERM" in text, text

    (out / "gpu_suite.md").unlink()
    done = run_script(str(out), "--report-only", env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| tests | interrupted |" in (out / "gpu_suite.md").read_text()
    assert "FAKE" in (out / "gpu_suite.md").read_text().splitlines()[0]
    done = run_script(str(tmp_path / "nothing-here"), "--report-only")
    assert done.returncode == 2 and done.stderr.strip() == \
        f"error: --report-only: {tmp_path / 'nothing-here'} holds no stage results (NAME.stage.json)", done.stderr


def test_a_test_running_when_its_process_died_runs_once_more_then_fails(tmp_path):
    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    class Hook:
        def __init__(self):
            self.deselected = []

        def pytest_deselected(self, items):
            self.deselected += [item.nodeid for item in items]

    config = type("Config", (), {"hook": Hook()})()
    record = tmp_path / "tests.jsonl"
    suite.append_record(record, dict(nodeid="t.py::done", outcome="passed"))
    suite.append_record(record, dict(nodeid="t.py::hung", outcome="started"))
    plugin = suite.SuitePlugin(record, deadline=time.time() + 60)
    items = [Item("t.py::done"), Item("t.py::hung"), Item("t.py::new")]
    plugin.pytest_collection_modifyitems(None, config, items)
    assert [i.nodeid for i in items] == ["t.py::hung", "t.py::new"] and config.hook.deselected == ["t.py::done"]

    suite.append_record(record, dict(nodeid="t.py::hung", outcome="started"))  # ... and it dies again
    items = [Item("t.py::done"), Item("t.py::hung"), Item("t.py::new")]
    plugin.pytest_collection_modifyitems(None, config, items)
    assert [i.nodeid for i in items] == ["t.py::new"]
    final = suite.final_records(suite.read_records(record))["t.py::hung"]
    assert final["outcome"] == "failed" and final["message"] == suite.KILLED


def test_a_test_that_breaks_the_cuda_context_ends_its_process_and_the_rest_run_in_a_fresh_one(tmp_path):
    """After a sticky CUDA error (an illegal memory access) every later CUDA call of the process fails: the
    tests after it failed too, each recorded as finished, and the stage said complete with nothing to retry.
    The failure that left the context broken (here pretended: torch reports CUDA initialised, and its
    synchronisation fails) is recorded, and the others run in a second child."""
    tests = tmp_path / "suite_tests" / "test_sticky.py"
    tests.parent.mkdir()
    tests.write_text(textwrap.dedent("""
        import pytest
        import torch

        def cuda_call():
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def test_a_ok():
            cuda_call()

        def test_b_kernel_with_a_bug():
            def fail(*args, **kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            torch.cuda.is_initialized, torch.cuda.synchronize = (lambda: True), fail
            cuda_call()

        @pytest.mark.parametrize("op", ["rms_norm", "swiglu", "attention", "bitune"])
        def test_c_other_ops(op):
            cuda_call()
    """))
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    stage = suite.Stage("tests", suite.pytest_stage("tests", [str(tests), "-q", "-p", "no:cacheprovider"]),
                        budget=240.0, margin=5.0)
    result = suite.run_stages([stage], out, log=lines.append)["tests"]
    assert result["complete"] and result["counts"] == {"passed": 5, "failed": 1}, result
    assert [a["exit_code"] for a in result["attempts"]] == [suite.CONTEXT_LOST_EXIT, 0], result["attempts"]
    [failure] = result["failures"]
    assert failure["id"].endswith("test_b_kernel_with_a_bug") and failure["context_lost"], failure
    assert any("broke the CUDA context" in line for line in lines), lines
    assert "(the CUDA context was lost: the tests after it ran in a fresh process)" in suite.render_markdown(
        dict(stages={"tests": result}))


def test_benchmark_priority_puts_the_goal_cases_first():
    key = suite.benchmark_priority
    goal = [key("benchmarks/test_norm_swiglu.py::test_forward_backward[rms_norm-4096x4096-eager]", {}),
            key("benchmarks/test_attention.py::test_attention_forward[4096-128-causal-kpro-triton]",
                {"seq": 4096, "dim": 128, "mask": "causal"}),
            key("benchmarks/test_attention.py::test_bitune_dual_pass[spec-forward-kpro-triton]", {"size": "spec"}),
            key("benchmarks/test_expansion.py::test_expansion_step[gpu-pro-eager]", {"size": "gpu-pro"})]
    middle = [key("benchmarks/test_norm_swiglu.py::test_forward[swiglu-4096x4096-eager]", {}),
              key("benchmarks/test_attention.py::test_attention_forward[4096-64-prefix-sdpa]",
                  {"seq": 4096, "dim": 64, "mask": "prefix"}),
              key("benchmarks/test_attention.py::test_bitune_dual_pass[long-forward-kpro-triton-plain]",
                  {"size": "long"})]
    late = [key("benchmarks/test_attention.py::test_attention_forward[16384-128-causal-flex]",
                {"seq": 16384, "dim": 128, "mask": "causal"}),
            key("benchmarks/test_train.py::test_train_throughput[gpu-1b-fit]", {"size": "gpu-1b"})]
    assert max(goal) < min(middle) and max(middle) < min(late)


def test_the_slow_cuda_tests_run_after_the_quick_ones(tmp_path):
    """The plugin's tests order: every op's quick tests before the GPU-size and compilation ones."""
    names = ["tests/test_attention_kernels.py::test_gpu_paths_at_gpu_sizes[causal_long_gqa-tma]",
             "tests/test_ops_attention.py::test_gpu_tiles_match_float64[full_d96-torch.float32]",
             "tests/test_ops_attention.py::test_fp32_matches_float64[one_token-torch-cuda]",
             "tests/test_ops_backend.py::test_model_compiles_on_gpu_with_each_backend[torch]",
             "tests/test_ops_rms_norm.py::test_forward_backward[cuda-cuda]",
             "tests/test_attention_kernels.py::test_bitune_at_the_benchmark_size[tma]",
             "tests/test_ops_swiglu.py::test_forward_backward[cuda-cuda]",
             "tests/test_ops_rms_norm.py::test_forward_backward[triton-cuda]"]
    items = [SimpleNamespace(nodeid=name) for name in names]
    plugin = suite.SuitePlugin(tmp_path / "tests.jsonl", deadline=float("inf"), order="tests")
    config = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: None))
    plugin.pytest_collection_modifyitems(None, config, items)
    # kpro's kernels before its torch backend on the GPU (PyTorch's own ops, mostly)
    assert [i.nodeid for i in items] == [names[4], names[6], names[7], names[2], names[0], names[1], names[3],
                                         names[5]]


def test_triton_on_the_gpu_is_cuda_marked(monkeypatch):
    """The tests stage runs `pytest -m cuda`, and the [triton-cuda] cases carried no mark: 176 op tests of
    Triton on the GPU never ran there."""
    import conftest
    monkeypatch.setattr(conftest, "CUDA", True)
    marked = {param.id: any(mark.name == "cuda" for mark in param.marks) for param in conftest.backend_devices("rms_norm")}
    assert marked == {"torch-cpu": False, "triton-cuda": True, "torch-cuda": True, "cuda-cuda": True}
    monkeypatch.setattr(conftest, "CUDA", False)
    assert [param.id for param in conftest.backend_devices("rms_norm") if not param.marks] == ["torch-cpu", "triton-cpu"]


def test_the_report_names_its_commit_without_git(monkeypatch, tmp_path):
    """A tree copied without .git reported commit None: its figures could not be traced to a version."""
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setenv("KPRO_COMMIT", "abc1234")
    assert suite.source_commit() == "abc1234"
    monkeypatch.delenv("KPRO_COMMIT")
    assert suite.source_commit() is None


def test_the_report_marks_a_commit_with_uncommitted_edits(monkeypatch, tmp_path):
    """The recorded commit was HEAD's even when tracked files were edited: figures measured on uncommitted code
    were attributed to a commit that never produced them."""
    git = lambda *args: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path,
                                       check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "kernel.py").write_text("x = 1\n")
    git("add", "kernel.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setenv("KPRO_COMMIT", "ignored-where-git-answers")
    (tmp_path / "untracked.txt").write_text("results\n")
    assert suite.source_commit() == head  # untracked files are not edits of the code
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert suite.source_commit() == f"{head}-dirty"


# ------------------------------------------------------------------------------------------- autotune

def test_winner_must_beat_the_default_by_more_than_three_percent():
    default, a, b = (64, 64, 8, 2), (128, 64, 8, 2), (32, 128, 8, 2)
    ok = lambda t: {"status": "ok", "median_s": t}
    assert suite.choose_winner(default, {default: ok(1.0), a: ok(0.971)})[0] == default  # 2.9%: noise
    assert suite.choose_winner(default, {default: ok(1.0), a: ok(0.965)})[0] == a  # 3.5%
    assert suite.choose_winner(default, {default: ok(1.0), a: ok(0.90), b: ok(0.95)})[0] == a  # the fastest


def test_wrong_or_failed_candidates_are_never_chosen():
    default, wrong, failed, good = (64, 64, 8, 2), (128, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 1)
    results = {default: {"status": "ok", "median_s": 1.0}, wrong: {"status": "wrong", "median_s": 0.5},
               failed: {"status": "error", "median_s": None}, good: {"status": "ok", "median_s": 0.9}}
    assert suite.choose_winner(default, results)[0] == good
    results[good]["median_s"] = 0.99
    assert suite.choose_winner(default, results)[0] == default
    winner, why = suite.choose_winner(default, {default: {"status": "error"}, good: {"status": "ok", "median_s": 0.1}})
    assert winner == default and "default" in why  # nothing to compare against: keep the default


def sweep_records(key, default, timings, complete=True):
    records = [dict(type="sweep", key=key, kind=key.split("/")[1], head_dim=128, dtype="bfloat16", arch=90,
                    default=list(default), candidates=[list(c) for c in timings], shape=[4, 4096, 16, 4, 128])]
    for i, (config, (status, seconds)) in enumerate(timings.items()):
        if complete or i == 0:
            records.append(dict(type="candidate", key=key, config=list(config), status="started"))
            records.append(dict(type="candidate", key=key, config=list(config), status=status, median_s=seconds))
    return records


def test_sweep_summary_updates_the_tuned_table():
    d, a, b = (64, 64, 8, 2), (128, 64, 8, 2), (32, 128, 8, 2)
    records = (sweep_records("sm90/forward/d128/bfloat16", d, {d: ("ok", 1.0), a: ("ok", 0.8), b: ("wrong", 0.1)})
               + sweep_records("sm90/dkdv/d128/bfloat16", d, {d: ("ok", 1.0), a: ("ok", 0.99)})
               + sweep_records("sm90/dq/d128/bfloat16", d, {d: ("ok", 1.0), a: ("ok", 0.5)}, complete=False))
    table = {"sm90/dkdv/d128/bfloat16": [32, 64, 4, 2], "sm80/forward/d64/bfloat16": [64, 64, 4, 2]}
    sweeps, new = suite.summarize_autotune(records, table)
    assert new == {"sm90/forward/d128/bfloat16": list(a), "sm80/forward/d64/bfloat16": [64, 64, 4, 2]}
    by_key = {s["key"]: s for s in sweeps}
    assert by_key["sm90/forward/d128/bfloat16"]["winner"] == list(a)
    assert by_key["sm90/dkdv/d128/bfloat16"]["winner"] == list(d)  # measured: the default stays, the old entry goes
    assert not by_key["sm90/dq/d128/bfloat16"]["complete"] and "winner" not in by_key["sm90/dq/d128/bfloat16"]


def test_autotune_child_records_every_candidate_and_resumes(tmp_path, monkeypatch):
    """The sweep's bookkeeping, run by the Triton interpreter on tiny CPU tensors with a fake timer (on
    the CPU the launchers ignore forced tiles, so every candidate computes the default's result)."""
    import torch
    from kpro.ops.triton_kernels import attention_tiles as tiles

    if torch.cuda.is_available():
        pytest.skip("the CPU variant of the sweep; the GPU suite runs the real one")
    plan = (("bfloat16", 16, True),)
    fast = tuple(tiles.candidate_configs("forward", 16, torch.bfloat16, 90)[-1])
    forced_seen, timer_calls = [], []
    original = tiles.forced_tiles

    def spying(kind, config):
        forced_seen.append((kind, tuple(config)))
        return original(kind, config)

    def timer(call):
        before = len(forced_seen)
        call()
        timer_calls.append(1)
        return 0.5 if dict(forced_seen[before:])["forward"] == fast else 1.0

    monkeypatch.setattr(tiles, "forced_tiles", spying)
    kwargs = dict(device=torch.device("cpu"), arch=90, plan=plan, shapes={16: (1, 8, 4)}, timer=timer)
    for shard in range(2):  # the compile warm-up: each candidate once across the shards, nothing recorded
        assert suite.autotune_child(tmp_path, time.time() + 600, compile_only=(shard, 2), **kwargs) == 0
    assert not (tmp_path / "autotune.jsonl").exists() and timer_calls == []
    candidates = sum(len(tiles.candidate_configs(kind, 16, torch.bfloat16, 90)) for kind in tiles.KERNELS)
    assert len(forced_seen) == 3 * candidates  # each candidate once, every kernel kind pinned for it
    assert suite.autotune_child(tmp_path, time.time() + 600, **kwargs) == 0
    records = suite.read_records(tmp_path / "autotune.jsonl")
    sweeps, table = suite.summarize_autotune(records, {})
    assert len(sweeps) == 3 and all(s["complete"] for s in sweeps)
    assert all(c["status"] == "ok" for s in sweeps for c in s["candidates"])
    assert table == {tiles.tuned_key("forward", 16, torch.bfloat16, 90): list(fast)}
    assert {kind for kind, _ in forced_seen} == {"forward", "dkdv", "dq"}  # every kernel kind pinned
    assert records[-1] == dict(records[-1], type="end", complete=True)

    calls = len(timer_calls)
    assert suite.autotune_child(tmp_path, time.time() + 600, **kwargs) == 0
    assert len(timer_calls) == calls  # nothing left to time

    # a candidate that was running when its process died is timed once more
    suite.append_record(tmp_path / "autotune.jsonl", dict(type="candidate", key=sweeps[0]["key"],
                                                         config=sweeps[0]["default"], status="started"))
    assert suite.autotune_child(tmp_path, time.time() + 600, **kwargs) == 0
    assert len(timer_calls) == calls + 1
    sweeps, _ = suite.summarize_autotune(suite.read_records(tmp_path / "autotune.jsonl"), {})
    assert sweeps[0]["candidates"][0]["status"] == "ok"



def test_an_autotune_budget_spent_compiling_says_so(tmp_path, monkeypatch, capsys):
    """At budgets the parser accepted (under 50 s) the compile warm-up could leave the timing child too little
    time to start: the error read "the sweep process exited with status None". Under 20 s, the compile
    children were killed after the stage's own hard deadline. The warm-up is now cut at the hard deadline, a
    budget spent compiling says so, and budgets that can never time anything are refused."""
    kills, timing = [], []
    monkeypatch.setattr(suite, "run_children", lambda commands, logs, hard_deadline: kills.append(hard_deadline)
                        or [None] * len(commands))
    monkeypatch.setattr(suite, "run_child", lambda *args, **kwargs: timing.append(args) or (0, False))
    for budget in (12.0, 18.0):
        ctx = suite.Context(tmp_path, budget, suite.MARGINS["autotune"], lambda line: None)
        suite.autotune_stage(ctx)
        assert kills[-1] <= ctx.hard_deadline, (budget, kills[-1] - ctx.started)
    timing.clear()
    ctx = suite.Context(tmp_path, 30.0, suite.MARGINS["autotune"], lambda line: None)
    ctx.started -= 20.0  # the warm-up took 20 s of a 30 s budget (time compressed: nothing waits here)
    result = suite.autotune_stage(ctx)
    assert timing == [] and not result["complete"] and result["attempts"] == []
    assert result["error"].startswith("the time budget was spent compiling"), result["error"]
    assert "at least 50 s" in result["error"], result["error"]
    assert suite.parse_args(["out", "--budget", "autotune=15.5"]).budgets["autotune"] == 15.5
    with pytest.raises(SystemExit):
        suite.parse_args(["out", "--budget", "autotune=15"])
    assert "--budget autotune=15: the autotune stage's budget must be a finite number of seconds above 15 " \
           "(its timing process starts only with 15 s left)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- reports

def fake_report():
    case = lambda impl, median, **info: dict(
        id=f"benchmarks/test_norm_swiglu.py::test_forward_backward[rms_norm-16384x4096-{impl}]", outcome="passed",
        params={"impl": impl}, group="rms_norm forward+backward 16384x4096 bfloat16",
        stats={"median": median, "min": median, "max": median, "mean": median, "stddev": 0.0, "rounds": 100},
        extra_info=dict(info, timer="cuda events, L2 flushed"))
    return {
        "command": "benchmarks/gpu_suite.sh /tmp/out", "started": "2027-01-01 00:00 UTC",
        "environment": {"device": "NVIDIA H200", "capability": "sm90", "sms": 132, "memory_gb": 139.8,
                        "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "pytest-benchmark": "5.1.0",
                        "python": "3.12.3", "commit": "abc1234"},
        "stages": {
            "tests": {"status": "complete", "complete": True, "seconds": 90.0, "budget_s": 120.0,
                      "summary": "1 failed, 193 passed in 88.0s",
                      "failures": [{"id": "tests/test_ops_attention.py::test_x[cuda]", "message": "AssertionError: 0.5 > 0.02"}]},
            "autotune": {"status": "complete", "complete": True, "seconds": 95.0, "budget_s": 100.0,
                         "copy_command": "cp /tmp/out/tuned_tiles.json /repo/kpro/ops/triton_kernels/tuned_tiles.json",
                         "sweeps": [{"key": "sm90/forward/d128/bfloat16", "default": [128, 32, 8, 2],
                                     "winner": [128, 64, 8, 3], "complete": True, "default_ms": 0.8, "winner_ms": 0.7,
                                     "why": "12.5% faster than the default", "shape": [4, 4096, 16, 4, 128],
                                     "candidates": [{"config": [128, 32, 8, 2], "status": "ok"},
                                                    {"config": [128, 64, 8, 3], "status": "ok"},
                                                    {"config": [64, 64, 4, 3], "status": "wrong"}]}]},
            "benchmarks": {"status": "incomplete", "complete": False, "seconds": 220.0, "budget_s": 220.0,
                           "attempts": [{"command": "pytest --benchmark benchmarks/test_norm_swiglu.py"}],
                           "cases": [case("kpro-triton", 0.0004, gb_per_s=3900.0, fraction_of_copy=0.93),
                                     case("torch.compile", 0.0005, gb_per_s=3100.0, fraction_of_copy=0.74),
                                     case("eager", 0.0016, gb_per_s=980.0, fraction_of_copy=0.23),
                                     dict(id="benchmarks/test_norm_swiglu.py::test_forward_backward[rms_norm-16384x4096-liger]",
                                          outcome="failed", message="WrongResult: liger is wrong: output relative error 0.3"),
                                     dict(id="benchmarks/test_train.py::test_train_throughput[gpu-1b-fit]",
                                          outcome="skipped", budget=True, message=suite.BUDGET_SKIP)]},
        },
    }


def test_markdown_report_on_a_fake_result():
    text = suite.render_markdown(fake_report())
    assert "NVIDIA H200" in text and "torch 2.11.0 (CUDA 13.0), triton 3.6.0" in text
    assert "`benchmarks/gpu_suite.sh /tmp/out`" in text
    assert "| tests | complete | 90.0 s | 120.0 s | 1 failed, 193 passed in 88.0s |" in text
    assert "FAILED `tests/test_ops_attention.py::test_x[cuda]`: AssertionError: 0.5 > 0.02" in text
    assert "| sm90/forward/d128/bfloat16 | (128, 32, 8, 2) | 0.8 ms | (128, 64, 8, 3) | 0.7 ms | 2 / 1 / 0 |" in text
    assert "cp /tmp/out/tuned_tiles.json" in text
    rows = [line for line in text.splitlines() if line.startswith("| rms_norm forward+backward")]
    assert [row.split(" | ")[1] for row in rows] == ["kpro-triton", "torch.compile", "eager"]  # fastest first
    assert "3900.0 GB/s | 93% of copy | —" in rows[0]
    assert "| 0.80 (kpro-triton) |" in rows[1] and "| 0.25 (kpro-triton) |" in rows[2]
    assert "liger is wrong" in text and "Not run (time budget" in text


def test_results_of_an_earlier_run_are_shown_with_their_own_device_commit_and_command(tmp_path, monkeypatch):
    """A second run in the same OUT_DIR (another device and commit, another --stages) printed the first run's
    benchmark figures under its own device, commit and command: stage results did not record theirs."""
    case = dict(id="benchmarks/test_expansion.py::test_expansion_step[gpu-pro-kpro-frozen]", outcome="passed",
                group="expansion step gpu-pro", params={"impl": "kpro-frozen"}, stats={"median": 0.0938},
                extra_info={})
    runs = {"tests": lambda ctx: dict(complete=True, summary="10 passed", failures=[]),
            "benchmarks": lambda ctx: dict(complete=True, cases=[case], summary="1 passed",
                                           attempts=[dict(command="pytest --benchmark benchmarks")])}
    monkeypatch.setattr(suite, "stages_for", lambda budgets: [
        suite.Stage(n, runs.get(n, runs["tests"]), budgets[n], suite.MARGINS[n]) for n in suite.STAGES])
    out = tmp_path / "out"
    for device, commit, stage in (("DEVICE-A", "aaa1111", "benchmarks"), ("DEVICE-B", "bbb2222", "tests")):
        pretend_cuda(monkeypatch, lambda: dict(device=device, commit=commit, capability="sm90", torch="x", cuda="x",
                                                 triton="x"))
        assert suite.main([str(out), "--stages", stage]) == 0
    bench = json.loads((out / "benchmarks.stage.json").read_text())
    assert bench["environment"]["device"] == "DEVICE-A" and bench["environment"]["commit"] == "aaa1111", bench
    assert bench["suite_command"] == f"benchmarks/gpu_suite.sh {out} --stages benchmarks", bench
    assert bench["attempts"][0]["device"] == "DEVICE-A" and bench["attempts"][0]["commit"] == "aaa1111", bench
    text = (out / "gpu_suite.md").read_text()
    assert "DEVICE-B" in text.splitlines()[0] and "commit bbb2222" in text
    earlier = text.split("Not produced by this run")[1].split("###")[0]
    assert f"- benchmarks: DEVICE-A, commit aaa1111, `benchmarks/gpu_suite.sh {out} --stages benchmarks`" in earlier
    assert "- tests" not in earlier  # this run's
    bench_section = text.split("### Benchmarks")[1]
    assert f"Command: `benchmarks/gpu_suite.sh {out} --stages benchmarks`" in bench_section, bench_section


def test_markdown_report_lists_the_skipped_cases_with_their_reasons():
    """The tables hold passed cases only and the report listed failed and budget cases: a baseline skipped for
    a reason (Liger not installed, kpro-cuda without its library) vanished from gpu_suite.md, and the table
    compared kpro with whatever ran. Each skip is now listed with its reason, one line per reason."""
    report = fake_report()
    skipped = lambda test, message: dict(id=f"benchmarks/test_norm_swiglu.py::{test}", outcome="skipped",
                                         budget=False, message=message)
    liger = "liger is not available here (ModuleNotFoundError: No module named 'liger_kernel')"
    report["stages"]["benchmarks"]["cases"] += [
        skipped("test_forward_backward[rms_norm-16384x8192-liger]", liger),
        skipped("test_forward[swiglu-16384x8192-liger]", liger)] + [
        skipped(f"test_forward[rms_norm-2048x1024-{impl}]", "shape (2048, 1024) is not benchmarked on cuda")
        for impl in ("eager", "kpro-torch", "kpro-triton", "torch.compile", "liger", "kpro-cuda", "kpro-x")]
    text = suite.render_markdown(report)
    assert "Skipped (not timed), by reason:" in text, text
    assert f"- {liger}: 2 cases: `test_norm_swiglu.py::test_forward_backward[rms_norm-16384x8192-liger]`, " \
           "`test_norm_swiglu.py::test_forward[swiglu-16384x8192-liger]`" in text, text
    assert "- shape (2048, 1024) is not benchmarked on cuda: 7 cases: " \
           "`test_norm_swiglu.py::test_forward[rms_norm-2048x1024-eager]`" in text, text
    assert ", … and 2 more (gpu_suite.json lists each)" in text, text
    assert "gpu-1b-fit" not in text.split("Skipped (not timed)")[1].split("Not run (time budget")[0]  # budget: apart


# ----------------------------------------------------------------------------------- GPU timing replay

@pytest.mark.parametrize("options", [[], ["--benchmark-cprofile=tottime"]], ids=["replay", "cprofile"])
def test_cuda_event_times_become_the_benchmark_rounds(tmp_path, options):
    """conftest.timed on a (pretended) GPU hands the measured per-call times to pytest-benchmark as its
    rounds, so its median is the CUDA-event median; run in a child pytest to keep its plugin state apart.
    --benchmark-cprofile calls the target once more after the rounds (a bare StopIteration once): that call
    is the case's own, which cProfile profiles."""
    test = tmp_path / "test_replay.py"
    test.write_text(textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import conftest as bench

        def test_replay(benchmark):
            times, calls = [0.003, 0.001, 0.002, 0.005, 0.004], []
            bench.cuda_times = lambda fn, **options: times
            bench.timed(benchmark, types.SimpleNamespace(type="cuda"), lambda: calls.append(1))
            stats = benchmark.stats.stats
            assert abs(stats.median - 0.003) < 1e-12 and stats.rounds == 5 and abs(stats.min - 0.001) < 1e-12
            assert benchmark.extra_info["timer"] == "cuda events, L2 flushed"
            assert len(calls) == (1 if benchmark.cprofile else 0), calls
            assert (benchmark.stats.cprofile_stats is not None) == bool(benchmark.cprofile)
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider",
                           f"--rootdir={tmp_path}", *options], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_flush_buffer_is_resident_before_the_first_case():
    """On a (pretended) GPU the benchmarks' device fixture allocates the timing's L2-flush buffer, so that the
    first timed case does not count its 256 MB in its step peak (expansion, Bitune measure memory allocated
    during the timed steps above what was resident before them); run in a child to keep conftest apart."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import conftest as bench
        allocated = []
        bench.flush_buffer = allocated.append
        torch.cuda.is_available = lambda: True
        torch.cuda.current_device = lambda: 3
        assert bench.session_device().type == "cuda" and allocated == [3], allocated
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_training_benchmark_loops_compute_the_same_loss(tmp_path):
    """benchmarks/test_train.py times fit against a hand-written loop to measure fit's bookkeeping: both must
    compute the loss the same way (fit's default, kpro.ops.linear_cross_entropy from the hidden states), or
    the figures compare two loss implementations; run in a child to keep benchmarks/conftest.py apart."""
    script = textwrap.dedent(f"""
        import io, sys, torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import test_train as bench
        import kpro
        from kpro import ops, train as kt
        calls, real = [], ops.linear_cross_entropy
        ops.linear_cross_entropy = lambda *a, **k: calls.append(1) or real(*a, **k)
        cfg = kpro.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
        rows = kt.pack_documents([list(range(3, 60))] * 4, 16, eos_id=2)
        cpu = torch.device("cpu")
        _, losses = bench.plain_loop(bench.fresh_model(cfg, cpu), kt.Batches(rows, 2, seed=0), 1, cpu)
        loop_calls = len(calls)
        fit = kt.fit(bench.fresh_model(cfg, cpu), kt.Batches(rows, 2, seed=0), {str(tmp_path / 'run')!r}, steps=1,
                     stream=io.StringIO())
        assert loop_calls == len(calls) - loop_calls == 1, (loop_calls, len(calls))
        assert abs(losses[0] - fit.metrics["loss"]) <= 1e-5 * abs(losses[0]), (losses, fit.metrics)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_training_benchmark_times_each_loops_whole_iteration(tmp_path):
    """benchmarks/test_train.py compares fit's tokens/s with the hand-written loop's: fit's own tokens_per_s
    timed its training step only, the loop's clock its iteration (less the batch fetch), so work of fit's
    loop outside the step (callbacks, metrics, the data) was left out of fit's figure. Both are now timed
    from one step's end to the next: a batch source that takes 0.2 s a batch must show in both rates."""
    script = textwrap.dedent(f"""
        import io, sys, time, torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import test_train as bench
        import kpro
        from kpro import train as kt
        cfg = kpro.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
        rows = kt.pack_documents([list(range(3, 60))] * 8, 16, eos_id=2)
        cpu = torch.device("cpu")

        def slow_batches():
            for batch in kt.Batches(rows, 2, seed=0):
                time.sleep(0.2)
                yield batch
        limit = 2 * 16 / 0.2  # tokens per step over the fetch alone
        loop_rates, _ = bench.plain_loop(bench.fresh_model(cfg, cpu), slow_batches(), 3, cpu)
        timer = bench.StepTimes()
        kt.fit(bench.fresh_model(cfg, cpu), slow_batches(), {str(tmp_path / 'run')!r}, steps=3, callbacks=[timer],
               stream=io.StringIO())
        assert loop_rates and max(loop_rates) < limit, ("loop", loop_rates)
        assert timer.tokens_per_s and max(timer.tokens_per_s) < limit, ("fit", timer.tokens_per_s)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_suite_keyword_of_the_docs_selects_its_file_only():
    """docs/benchmarks.md's table names each suite by the `-k` keyword that runs it: `pytest --benchmark -k KW`
    must collect that file's cases and no other file's (`-k train` also ran every case with "train" in its
    name: train_only, training steps). Collected in one child, one pytest.main per keyword."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    table = text.split("| suite (`-k`) |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = [re.match(r"\| `([^`]+)` \(`(test_\w+\.py)`\) \|", line) for line in table]
    assert rows and all(rows), table
    suites = {row[1]: row[2] for row in rows}
    assert sorted(suites.values()) == sorted(p.name for p in BENCHMARKS.glob("test_*.py"))
    script = textwrap.dedent("""
        import json, sys
        import pytest

        class Files:
            files = None

            def pytest_collection_finish(self, session):
                self.files = sorted({item.nodeid.split("::")[0].rsplit("/", 1)[-1] for item in session.items})

        found = {}
        for keyword in sys.argv[1:]:
            plugin = Files()
            pytest.main(["--benchmark", "--collect-only", "-q", "-p", "no:cacheprovider", "-k", keyword], plugins=[plugin])
            found[keyword] = plugin.files
        print("FOUND " + json.dumps(found))
    """)
    done = subprocess.run([sys.executable, "-c", script, *suites], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    found = json.loads(done.stdout.split("FOUND ", 1)[1]) if "FOUND " in done.stdout else None
    # a suite of an optional dependency missing here collects nothing (test_hf_integration.py: transformers)
    collects = {file: importlib.util.find_spec("transformers") is not None or file != "test_hf_integration.py"
                for file in suites.values()}
    assert found == {keyword: [file] if collects[file] else [] for keyword, file in suites.items()}, \
        done.stdout[-3000:] + done.stderr[-3000:]


def test_the_bitune_activation_count_keeps_no_graph_alive():
    """benchmarks/test_bitune_step.py counts the activations a step saves before timing the step: the loss
    it returned stayed alive, with its graph, through the timed steps and counted in their peak memory (the
    first H200 run's 41.72 GiB held about 17 GiB of it). Run in a child to keep benchmarks/conftest.py apart."""
    script = textwrap.dedent(f"""
        import sys, weakref, torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import test_bitune_step as bench
        x, losses = torch.randn(64, 64, requires_grad=True), []

        def loss():
            out = (x.exp() * x).sum()  # saves exp(x) and x
            losses.append(weakref.ref(out))
            return out
        counted = bench.saved_bytes(loss)
        assert counted == 2 * x.numel() * x.element_size(), counted
        assert losses[0]() is None, "the loss and its graph outlive the count"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def run_benchmarks_with_plugin(tmp_path, plugin: str, source: str, suite: str, keyword: str, *options):
    """`pytest --benchmark --benchmark-disable benchmarks/suite -k keyword` in a subprocess, with `source` loaded as
    the pytest plugin `plugin` first: a fault or a fake it puts into kpro or a baseline before the suite runs. The
    suite's file is named, not found among all of benchmarks/: collecting every suite took most of a child's
    seconds (the tests below run seven)."""
    (tmp_path / f"{plugin}.py").write_text(textwrap.dedent(source))
    path = os.pathsep.join([str(ROOT), str(tmp_path)])
    return subprocess.run([sys.executable, "-m", "pytest", "--benchmark", "--benchmark-disable", "-q", *options, "-p",
                           "no:cacheprovider", "-p", plugin, f"benchmarks/{suite}", "-k", keyword],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path))


def test_the_frozen_head_cross_entropy_is_checked_frozen(tmp_path):
    """benchmarks/test_linear_cross_entropy.py times each loss with the head frozen too, kpro's path without
    the weight gradient: the check before the timing must run that path, not the trainable head's. A plugin
    breaks dhidden of kpro's torch kernel for a frozen head only; the frozen case must fail, unmeasured."""
    done = run_benchmarks_with_plugin(tmp_path, "broken_frozen_head", """
        import importlib
        lce = importlib.import_module("kpro.ops.linear_cross_entropy")  # kpro.ops.linear_cross_entropy: the function
        real = lce.TORCH_KERNELS.forward_with_grads

        def wrong_when_frozen(hidden, weight, labels, ignore_index, hidden_grad, weight_grad):
            loss, dh, dw = real(hidden, weight, labels, ignore_index, hidden_grad, weight_grad)
            return loss, dh if weight_grad or dh is None else 2 * dh, dw
        lce.TORCH_KERNELS.forward_with_grads = wrong_when_frozen
    """, "test_linear_cross_entropy.py", "loss_and_backward and kpro-torch and V32768")
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    failed = "FAILED benchmarks/test_linear_cross_entropy.py::test_loss_and_backward[N2048-d256-V32768-frozen-kpro-"
    assert failed in done.stdout and "WrongResult: kpro-torch is wrong: dhidden" in done.stdout, done.stdout[-3000:]


def test_the_cross_entropy_benchmark_checks_the_whole_timed_batch():
    """benchmarks/test_linear_cross_entropy.py checked the first 2,048 rows and timed all N (8k to 32k on a GPU):
    a loss right on those rows and wrong after them passed and was timed. kpro's loss is faked to cover the first
    2,048 rows only (one launch's worth) and a CPU case of 4,096 rows is run through the suite's test function:
    it must fail, unmeasured, head trainable and frozen. Run in a child to keep benchmarks/conftest.py apart."""
    script = textwrap.dedent(f"""
        import sys
        from types import SimpleNamespace
        import torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import kpro.ops as ops
        import test_linear_cross_entropy as bench
        from conftest import WrongResult

        real = ops.linear_cross_entropy
        ops.linear_cross_entropy = lambda hidden, weight, labels, *a, **k: real(hidden[:2048], weight, labels[:2048],
                                                                                 *a, **k)
        shape = (4096, 64, 512)
        bench.CPU_CASES.append(shape)
        for head in ("trainable", "frozen"):
            benchmark = SimpleNamespace(group=None, extra_info={{}}, stats=None, enabled=True,
                                        pedantic=lambda fn, **_: fn())
            try:
                bench.test_loss_and_backward(benchmark, torch.device("cpu"), shape, head, "kpro-torch")
                print(head, "TIMED")
            except WrongResult as err:
                print(head, "REFUSED", err)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for head in ("trainable", "frozen"):
        assert f"{head} REFUSED kpro-torch is wrong: loss relative error" in done.stdout, done.stdout[-3000:]


def test_an_implementation_overwriting_its_inputs_leaves_the_shared_ones_alone(tmp_path):
    """Liger's SwiGLU backward writes da, db into its inputs a, b; benchmarks/test_norm_swiglu.py shares a, b
    among the implementations of a case (CaseCache), so after Liger's check call they held gradients, and any
    implementation run after it would have run on them. A fake Liger, registered as the real one is (its
    import), overwrites its inputs the same way: it must pass, and the case's inputs must be unchanged after
    every implementation of it ran (but torch.compile's: 15 s of compiling that shares nothing with Liger)."""
    done = run_benchmarks_with_plugin(tmp_path, "fake_inplace_liger", """
        import sys, types
        import torch
        import torch.nn.functional as F

        class LigerSiLUMulFunction(torch.autograd.Function):  # as Liger's: da, db written into a, b
            @staticmethod
            def forward(ctx, a, b):
                ctx.save_for_backward(a, b)
                return F.silu(a) * b

            @staticmethod
            def backward(ctx, dc):
                a, b = ctx.saved_tensors
                sig = torch.sigmoid(a)
                da = dc * b * sig * (1 + a * (1 - sig))
                b.copy_(dc * a * sig)
                a.copy_(da)
                return a, b

        for name in ("liger_kernel", "liger_kernel.ops"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["liger_kernel.ops.swiglu"] = types.SimpleNamespace(LigerSiLUMulFunction=LigerSiLUMulFunction)

        def pytest_sessionfinish(session):
            bench = sys.modules["test_norm_swiglu"]
            fresh = bench.build_case("swiglu", (2048, 1024), torch.device("cpu"), backward=True)
            same = all(torch.equal(getattr(bench.CASES.value, n).detach(), getattr(fresh, n)) for n in ("a", "b"))
            print("SHARED INPUTS", "UNCHANGED" if same else "OVERWRITTEN")
    """, "test_norm_swiglu.py", "test_forward_backward and swiglu and not rms_norm and 2048x1024 and not compile", "-s")
    assert "3 passed" in done.stdout and "SHARED INPUTS UNCHANGED" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_training_steps_gradients_are_checked(tmp_path):
    """benchmarks/test_linear_cross_entropy.py's training steps (LLaMA Pro, Bitune) with the fused loss against
    materialised logits compared the losses only, the first path run taking the other's as its reference: a
    fused loss with no backward at all was timed. A plugin keeps the fused loss's value and drops its gradients:
    both fused steps must fail on their gradients, unmeasured, against a float64 reference with materialised
    logits, and the materialised ones pass."""
    done = run_with_fused_loss_without_backward(tmp_path, "test_linear_cross_entropy.py", "test_training_step")
    assert "2 failed, 2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    for method in ("expansion", "bitune"):
        assert f"FAILED benchmarks/test_linear_cross_entropy.py::test_training_step[{method}-fused]" in done.stdout
    assert "WrongResult: fused is wrong: gradients' relative error" in done.stdout, done.stdout[-3000:]


def test_the_training_benchmark_checks_the_first_steps_gradients(tmp_path):
    """benchmarks/test_train.py checked the first step's loss only: fit and the hand-written loop, both on the
    fused loss, were timed with a fused loss that has no backward. The gradients the optimizer gets at the first
    step are now checked against a reference with materialised logits: both cases fail, unmeasured."""
    done = run_with_fused_loss_without_backward(tmp_path, "test_train.py", "train_throughput and cpu-small")
    assert "2 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    for impl in ("fit", "plain-loop"):
        assert f"FAILED benchmarks/test_train.py::test_train_throughput[cpu-small-{impl}]" in done.stdout
        assert f"WrongResult: {impl} is wrong: lm_head.weight has a gradient only in the reference" in done.stdout, \
            done.stdout[-3000:]


def test_the_model_benchmark_checks_the_whole_timed_batch(tmp_path):
    """benchmarks/test_model.py checked the logits of one row's first 64 tokens and timed 4 rows of 256 (of
    2048 on a GPU): attention right on the first 64 positions of the first row and zero everywhere else passed
    and was timed. The whole timed batch is now checked, against a reference that does not go through kpro.ops
    (the gpt-fast-style model in float64 on the CPU): kpro's forward and forward+backward fail, unmeasured."""
    done = run_benchmarks_with_plugin(tmp_path, "attention_wrong_after_64", """
        import kpro.ops as ops
        real = ops.attention

        def wrong(q, k, v, **kw):
            out = real(q, k, v, **kw).clone()
            out[:, 64:] = 0
            out[1:] = 0
            return out
        ops.attention = wrong
    """, "test_model.py", "model and cpu-small")
    assert "2 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    for test in ("test_forward", "test_forward_backward"):
        assert f"FAILED benchmarks/test_model.py::{test}[cpu-small-kpro]" in done.stdout, done.stdout[-3000:]
    assert "WrongResult: kpro is wrong: logits relative error" in done.stdout, done.stdout[-3000:]


def test_the_bitune_dual_pass_benchmark_has_a_reference_of_its_own(tmp_path):
    """benchmarks/test_attention.py checked the Bitune dual pass against kpro's own plain-PyTorch op in float64:
    kpro-torch was compared with itself, and a defect in that code passed kpro and failed the baseline doing the
    right computation (three FlexAttention calls), which was then never timed. The reference is now a dense
    masked softmax written in the benchmark. A plugin swaps α_k and α_v in kpro's plain-PyTorch op: its
    forward and forward+backward cases must fail, unmeasured."""
    done = run_benchmarks_with_plugin(tmp_path, "bitune_alphas_swapped", """
        import importlib
        bitune = importlib.import_module("kpro.ops.bitune_attention")  # kpro.ops.bitune_attention: the function
        real = bitune.bitune_attention_reference

        def swapped(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k, alpha_v, *rest):
            return real(q_p, k_p, v_p, q_a, k_a, v_a, alpha_v, alpha_k, *rest)
        bitune.bitune_attention_reference = swapped
    """, "test_attention.py", "bitune_dual_pass and kpro-torch")
    assert "2 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    for grad in ("forward", "forward+backward"):
        assert f"FAILED benchmarks/test_attention.py::test_bitune_dual_pass[spec-{grad}-kpro-torch]" in done.stdout, \
            done.stdout[-3000:]
    assert "WrongResult: kpro-torch is wrong: answer output relative error" in done.stdout, done.stdout[-3000:]


def test_the_expansion_benchmark_has_a_reference_no_kpro_op_enters(tmp_path):
    """benchmarks/test_expansion.py checked every implementation, the eager baseline included, against kpro's
    plain-PyTorch path in fp32: a defect in kpro's torch ops was in the reference too, so kpro's rows passed and
    the eager baseline failed, never timed. The reference is now the gpt-fast-style model on the same weights in
    float64. A plugin makes kpro's torch SwiGLU scale `up` by 1.1: kpro's rows must fail, unmeasured, and eager
    pass."""
    done = run_benchmarks_with_plugin(tmp_path, "swiglu_up_scaled", """
        import importlib
        swiglu = importlib.import_module("kpro.ops.swiglu")  # kpro.ops.swiglu: the function
        real = swiglu.torch_forward
        swiglu.TORCH_KERNELS.forward = lambda gate, up: real(gate, up * 1.1)
    """, "test_expansion.py", "expansion_step and cpu-pro")
    assert "3 failed, 1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    for impl in ("kpro-frozen", "kpro-train_only", "kpro-recompute"):
        assert f"FAILED benchmarks/test_expansion.py::test_expansion_step[cpu-pro-{impl}]" in done.stdout, \
            done.stdout[-3000:]
    assert "WrongResult: kpro-frozen is wrong: gradients' relative error" in done.stdout, done.stdout[-3000:]


def run_with_fused_loss_without_backward(tmp_path, suite, keyword):
    """`pytest --benchmark --benchmark-disable benchmarks/suite -k keyword` with kpro.ops.linear_cross_entropy keeping its value
    and giving no gradient (a fast wrong fused loss)."""
    return run_benchmarks_with_plugin(tmp_path, "fused_without_backward", """
        import kpro.ops as ops
        real = ops.linear_cross_entropy
        ops.linear_cross_entropy = lambda hidden, weight, *a, **k: (real(hidden.detach(), weight.detach(), *a, **k)
                                                                    + 0.0 * hidden.sum())
    """, suite, keyword)


@pytest.mark.parametrize("untimed", [["--benchmark-disable"], ["--benchmark-skip"], ["-n", "2"]], ids=" ".join)
def test_the_benchmark_flag_combines_with_untimed_runs(untimed):
    """--benchmark asked pytest-benchmark for --benchmark-only, which it refuses beside --benchmark-disable and
    under xdist ("Can't have both --benchmark-only and --benchmark-disable", an option nobody gave)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--benchmark", *untimed, "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-k", "rms_norm and 2048x1024"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and "benchmark-only" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "test_norm_swiglu.py" in done.stdout or untimed[0] == "-n", done.stdout  # xdist lists no ids


def test_benchmark_only_with_no_path_runs_the_benchmarks():
    """pytest-benchmark's own --benchmark-only from the root collected tests/, which holds no benchmark: every
    test skipped and the run passed, having measured nothing. Like --benchmark, it picks benchmarks/ when no
    path is given."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-k", "rms_norm and 2048x1024"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and "benchmarks/test_norm_swiglu.py::" in done.stdout, done.stdout + done.stderr
    assert "tests/" not in done.stdout, done.stdout



@pytest.mark.parametrize("where", ["tests", "docs"])
def test_the_benchmark_flag_with_no_path_runs_the_benchmarks_wherever_pytest_starts(where):
    """From tests/ (or any folder but the root) pytest took the folder for its path, not the testpaths, and the
    conftest redirected only the testpaths: `pytest --benchmark` collected tests/, skipped every test and
    passed, having measured nothing."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--benchmark", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-k", "rms_norm and 2048x1024"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT / where, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and "test_norm_swiglu.py::" in done.stdout, done.stdout + done.stderr
    assert "tests/" not in done.stdout, done.stdout

def test_a_missing_flash_attn_is_named_in_its_skip():
    """The attention benchmark skipped flash-attn as "not available" without the import error, so a broken
    install read as an absent one (Liger's skip names its error). On a (pretended) GPU, flash_attn unimportable;
    run in a child to keep benchmarks/conftest.py apart."""
    script = textwrap.dedent(f"""
        import sys, types
        import pytest
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import test_attention as bench
        sys.modules["flash_attn"] = None  # what a broken install raises: an ImportError
        bench.CASES.get = lambda key, build: types.SimpleNamespace(q=types.SimpleNamespace(shape=(1, 1, 1, 1)))
        try:
            bench.setup(types.SimpleNamespace(type="cuda"), 4096, 128, "causal", "flash-attn", False)
        except pytest.skip.Exception as skip:
            assert str(skip).startswith("flash-attn is not available for this case here (ModuleNotFoundError: "), skip
        else:
            raise AssertionError("not skipped")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr


def test_ratios_can_compare_a_time_other_than_the_median():
    """record_ratios(seconds=...) compares the given times, not the timed calls' medians: test_train.py's fit
    round holds a final checkpoint that the hand-written loop's does not, so its ratio is of steady-state
    steps; run in a child to keep benchmarks/conftest.py apart."""
    script = textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import conftest as bench

        def row(median):
            stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=median))
            return types.SimpleNamespace(stats=stats, enabled=True, group="train cpu-small", name="x", extra_info={{}})

        fit, loop = row(2.0), row(1.7)  # rounds: fit's with its checkpoint
        bench.record_ratios(fit, "fit", ours=True, seconds=0.30)
        bench.record_ratios(loop, "plain-loop", ours=False, seconds=0.33)
        assert fit.extra_info == {{"time_over_plain-loop": round(0.30 / 0.33, 3)}}, fit.extra_info
        untimed = row(None)
        untimed.stats, untimed.enabled, untimed.group = None, False, "other"
        bench.record_ratios(untimed, "fit", ours=True, seconds=0.3)
        assert untimed.extra_info == {{}}
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_markdown_ratio_of_the_training_loops_is_of_steady_state_steps(tmp_path):
    """fit's timed round writes a final checkpoint that the hand-written loop's does not: the report's ratio
    is the one the case recorded (time_over_plain-loop, of steady-state steps), not of the round medians.
    fit runs first and gets its ratio only when plain-loop finishes, after its own record was written: the
    stage's child writes it again at its end. A real benchmarks stage over a fake training benchmark."""
    test = tmp_path / "fake" / "test_fake_train.py"
    test.parent.mkdir()
    test.write_text(textwrap.dedent(f"""
        import sys, time
        import pytest
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import conftest as bench

        @pytest.mark.parametrize("impl", ["fit", "plain-loop"])
        def test_train_throughput(benchmark, impl):
            benchmark.group = "train fake"
            # fit's round holds a slow checkpoint; steady-state steps: 10 ms for fit, 20 ms for the loop
            benchmark.pedantic(lambda: time.sleep(0.06 if impl == "fit" else 0.01), rounds=1, iterations=1)
            bench.record_ratios(benchmark, impl, ours=impl == "fit", seconds=0.010 if impl == "fit" else 0.020)
    """))
    out = tmp_path / "out"
    out.mkdir()
    args = [str(test), "-q", "-p", "no:cacheprovider", f"--rootdir={test.parent}"]
    stage = suite.Stage("benchmarks", suite.pytest_stage("benchmarks", args), budget=240.0, margin=5.0)
    result = suite.run_stages([stage], out, log=lambda line: None)["benchmarks"]
    assert result["complete"], result
    rows = [line for line in suite.render_markdown(dict(stages={"benchmarks": result})).splitlines()
            if line.startswith("| train fake")]
    assert [row.split(" | ")[1] for row in rows] == ["plain-loop", "fit"]
    assert "| 0.50 (fit) |" in rows[0], rows  # the round medians' ratio is about 6


# -------------------------------------------------------------------------------------------- profile

def load_profile_step():
    spec = importlib.util.spec_from_file_location("profile_step_under_test", BENCHMARKS / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_counts_the_device_reads_a_step_makes():
    """A host read of a tensor's value (`.item()`, `bool(t)`) is what stalls a GPU's run-ahead: the
    profile must find each one, and none where there is none."""
    import torch
    from torch.profiler import profile

    profile_step = load_profile_step()
    x = torch.ones(4)
    with profile() as prof:
        for _ in range(3):
            x.sum().item()
        bool(x.any())
        (x * 2).sum()
    counts = profile_step.sync_counts(prof.key_averages())
    assert counts.get("aten::item", 0) + counts.get("aten::is_nonzero", 0) >= 4
    with profile() as prof:
        (x * 2).sum()
    assert profile_step.sync_counts(prof.key_averages()) == {}


def test_profile_step_runs_the_expansion_step_and_writes_its_report(tmp_path):
    """On the CPU at a tiny depth (the suite's stage runs it on the GPU at the benchmark's size)."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), str(tmp_path), "--blocks", "2", "1",
                           "--steps", "1", "--impl", "eager", "--impl", "kpro-frozen"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    timed = [i for i, line in enumerate(lines) if ": step " in line]
    profiled = [i for i, line in enumerate(lines) if " launches, syncs " in line]
    assert len(timed) == len(profiled) == 2 and max(timed) < min(profiled)  # every clock before any profiler
    results = json.loads((tmp_path / "profile.json").read_text())
    assert [r["impl"] for r in results] == ["eager", "kpro-frozen"]
    for r in results:
        assert r["step_ms"] > 0 and 0 < r["enqueue_ms"] <= r["step_ms"] * 1.01 + 0.05  # the CPU runs synchronously
        assert r["launches"] == 0 and r["gpu_busy_ms"] is None and r["top_cpu"]
        assert any(t["op"] == "aten::mm" for t in r["top_cpu"])
    table = (tmp_path / "profile.md").read_text()
    assert table.count("\n| eager |") == 1 and table.count("\n| kpro-frozen |") == 1
    costs = json.loads((tmp_path / "host_costs.json").read_text())
    calls = [(c["call"], c["pass_"]) for c in costs]
    for op in ("kpro swiglu", "kpro rms_norm, frozen weight", "kpro attention, causal", "torch: SDPA, causal"):
        assert (op, "forward+backward") in calls
    assert ("kpro swiglu, torch launcher alone", "forward") in calls  # the CPU's backend
    assert all(0 < c["host_us"] <= c["per_call_us"] * 1.01 + 1 for c in costs)
    assert table.count("µs |") == 2 * len(costs)
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), str(tmp_path), "--impl", "kpro"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode == 2 and "--impl must be among" in bad.stderr
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), str(tmp_path), "--size", "gpu-pro"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "error: --size gpu-pro runs on CUDA only, and this machine's device is cpu"), bad.stderr[-2000:]


def test_profile_step_turns_the_launch_cache_on_for_its_implementation_only():
    """`--impl kpro-frozen-launch-cache` profiled plain kpro-frozen under that name: only the benchmark's case
    turned KPRO_LAUNCH_CACHE's cache on. Each of its steps runs with the cache on, restored after; run in a
    child (profile_step imports benchmarks/conftest.py as `conftest`)."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import profile_step
        import kpro.train
        from kpro.ops.triton_kernels import _launch
        seen, real = [], kpro.train.causal_lm_loss
        kpro.train.causal_lm_loss = lambda *a, **k: seen.append(_launch.LAUNCH_CACHE) or real(*a, **k)
        for impl in ("kpro-frozen-launch-cache", "kpro-frozen"):
            step, _ = profile_step.make_step(impl, "cpu-pro", torch.device("cpu"), (2, 1))
            step()
        assert seen == [True, False] and _launch.LAUNCH_CACHE is False, (seen, _launch.LAUNCH_CACHE)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), KPRO_LAUNCH_CACHE="0"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_profile_stage_reports_what_its_child_measured(tmp_path, monkeypatch):
    result = [dict(impl="eager", step_ms=95.0, enqueue_ms=30.0, gpu_busy_ms=93.0, launches=900, syncs={},
                   top_cpu=[], top_gpu=[]),
              dict(impl="kpro-frozen", step_ms=208.0, enqueue_ms=205.0, gpu_busy_ms=110.0, launches=2100,
                   syncs={"aten::item": 40}, top_cpu=[], top_gpu=[])]

    def child(args, log_path, hard_deadline, poll=None):
        assert args[0].endswith("profile_step.py") and args[1] == str(tmp_path)
        (tmp_path / "profile.json").write_text(json.dumps(result))
        (tmp_path / "profile.md").write_text("| kpro-frozen | 208.0 ms | 205.0 ms |\n")
        return 0, False

    monkeypatch.setattr(suite, "run_child", child)
    lines = []
    out = suite.profile_stage(suite.Context(tmp_path, budget=45, margin=0, log=lines.append))
    assert out["complete"] and out["results"] == result
    assert any("kpro-frozen: step 208.0 ms, issued in 205.0 ms" in line and "aten::item" in line for line in lines)
    text = suite.render_markdown(dict(stages={"profile": out}))
    assert "### Where an expansion step's time goes (profile)" in text and "| kpro-frozen | 208.0 ms |" in text


def test_the_profile_stage_reports_a_step_timed_but_not_profiled(tmp_path, monkeypatch):
    """The child writes each step's timing before any profiling: killed in between, the timing stands."""
    def child(args, log_path, hard_deadline, poll=None):
        (tmp_path / "profile.json").write_text(json.dumps([dict(impl="eager", step_ms=80.9, enqueue_ms=74.4)]))
        return None, True

    monkeypatch.setattr(suite, "run_child", child)
    lines = []
    out = suite.profile_stage(suite.Context(tmp_path, budget=45, margin=0, log=lines.append))
    assert not out["complete"] and out["error"] == "the time budget ran out"
    assert any("eager: step 80.9 ms, issued in 74.4 ms, not profiled" in line for line in lines)
    profile_step = load_profile_step()
    table = profile_step.markdown([dict(impl="eager", step_ms=80.9, enqueue_ms=74.4)])
    assert "| eager | 80.9 ms | 74.4 ms | — | — | not profiled |" in table and "most self CPU" not in table


def test_the_triton_launch_parts_time_the_jit_launch_and_report_the_compiled_one():
    """The host-cost rows that split a Triton launch (on a GPU only in the stage; here in the interpreter,
    where the JIT launch returns no compiled kernel, so the second row must carry the error, not numbers)."""
    import torch

    from kpro.ops.triton_kernels import _launch

    profile_step = load_profile_step()
    g, u = torch.randn(4, 40), torch.randn(4, 40)
    before = _launch.LAUNCH_CACHE
    rows = profile_step.triton_launch_parts(g, u, torch.device("cpu"))
    assert [row[1] for row in rows] == ["forward"] * 3 and "JITFunction" in rows[0][0]
    assert 0 < rows[0][2] <= rows[0][3] * 1.01 + 1
    assert len(rows[1]) == 3 and "Error" in rows[1][2]  # (label, pass, error)
    assert "KPRO_LAUNCH_CACHE" in rows[2][0] and 0 < rows[2][2]  # the interpreter bypasses the cache: it runs
    assert _launch.LAUNCH_CACHE is before  # restored
    table = profile_step.host_costs_markdown(
        [dict(call="a", pass_="forward", backend="triton", host_us=1.0, per_call_us=1.0),
         dict(call=rows[1][0], pass_="forward", backend="triton", error=rows[1][2])])
    assert "| 1.0 µs | 1.0 µs |" in table and "not measured: " + rows[1][2] in table


def test_the_profile_stages_result_and_its_childs_measurements_are_separate_files(tmp_path, monkeypatch):
    """The stage's result was saved as OUT_DIR/profile.json, the file profile_step.py writes its measurements
    to: the measurements were overwritten, and a resumed stage read the result dict as their list and
    crashed ("string indices must be integers"). A child killed before writing anything is reported so."""
    measured = [dict(impl="eager", step_ms=80.9, enqueue_ms=74.4)]

    def silent_child(args, log_path, hard_deadline, poll=None):
        return None, True  # killed while it built its models

    def child(args, log_path, hard_deadline, poll=None):
        (tmp_path / "profile.json").write_text(json.dumps(measured))
        return 0, False

    [stage] = [s for s in suite.stages_for(suite.BUDGETS) if s.name == "profile"]
    monkeypatch.setattr(suite, "run_child", silent_child)
    for attempt in (1, 2):
        result = suite.run_stages([stage], tmp_path, log=lambda line: None)["profile"]
        assert result["status"] == "incomplete" and result["attempt"] == attempt, result
        assert result["results"] == [] and result["summary"] == "nothing measured", result
        assert result["error"] == "profile_step.py measured nothing (no profile.json): the time budget ran out"
        assert not (tmp_path / "profile.json").exists()
    monkeypatch.setattr(suite, "run_child", child)
    result = suite.run_stages([stage], tmp_path, log=lambda line: None)["profile"]
    assert result["complete"] and result["results"] == measured and result["attempt"] == 3
    assert json.loads((tmp_path / "profile.json").read_text()) == measured  # the measurements stay
    assert json.loads((tmp_path / "profile.stage.json").read_text())["complete"] is True


def test_force_deletes_every_file_the_profile_stage_writes(tmp_path):
    """--force deleted profile.* and left host_costs.json, an output of profile_step.py, from the earlier run."""
    written = ["profile.json", "profile.md", "profile.log", "profile.stage.json", "host_costs.json"]
    for name in written + ["tests.jsonl", "tuned_tiles.json"]:
        (tmp_path / name).write_text("from an earlier run\n")
    [stage] = [s for s in suite.stages_for(suite.BUDGETS) if s.name == "profile"]
    assert sorted(p.name for p in stage.files(tmp_path)) == sorted(written)
    stage.run = lambda ctx: {"complete": False, "error": "cut short before the host costs"}
    suite.run_stages([stage], tmp_path, force=True, log=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.stage.json", "tests.jsonl", "tuned_tiles.json"]


# ------------------------------------------------------------------------------------------ startup_time.py

def run_startup_time(*args):
    return subprocess.run([sys.executable, str(BENCHMARKS / "startup_time.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_startup_time_refuses_a_tree_it_would_not_measure(tmp_path):
    """A SOURCE_TREE without kpro/ (a mistyped path, an archive extracted one level down) was measured anyway:
    its children imported whichever kpro Python found, the installed one, under the tree's name."""
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_startup_time(empty, "--runs", "1")
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert f"error: {empty} holds no kpro/__init__.py" in done.stderr, done.stderr
    # a kpro/ whose import resolves elsewhere (here: a package that hands the import over to another kpro)
    shim = tmp_path / "shim"
    (shim / "kpro").mkdir(parents=True)
    (shim / "kpro" / "__init__.py").write_text(textwrap.dedent(f"""
        import sys
        del sys.modules[__name__]
        sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if p not in ("", {str(shim)!r})]
        import kpro
    """))
    done = run_startup_time(shim, "--runs", "1")
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert f"error: {shim}: its processes import kpro from {ROOT / 'kpro' / '__init__.py'}, not from " \
           f"{shim / 'kpro' / '__init__.py'}" in done.stderr, done.stderr


@pytest.mark.parametrize("script, args, message", [
    ("startup_time.py", ["--runs", "0"], "error: --runs must be at least 1, got 0"),
    ("profile_step.py", ["OUT", "--blocks", "4", "0"],
     "error: --blocks 4 0: the number of new blocks must be a positive integer, got 0"),
    ("profile_step.py", ["OUT", "--blocks", "4", "3"],
     "error: --blocks 4 3: interleave needs the number of new blocks to divide the 4 original blocks"),
], ids=["runs-0", "blocks-new-0", "blocks-not-dividing"])
def test_the_helper_scripts_refuse_bad_counts_by_their_option(tmp_path, script, args, message):
    """They were accepted and crashed with a traceback (StatisticsError: no median for empty data; a ValueError
    from kpro.expand after the models' set-up began)."""
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
