"""Repository-wide pytest set-up: `pytest --benchmark`, or pytest-benchmark's own `--benchmark-only`, with no
path runs the suites in benchmarks/ instead of tests/, wherever in the repository pytest starts."""
from pathlib import Path

import pytest

ROOT = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suites in benchmarks/ (pytest-benchmark) instead of the tests")


def pytest_configure(config):
    # pytest-benchmark's --benchmark-only alone would collect tests/ (no benchmark there), skip it all and pass
    benchmarks = config.getoption("benchmark") or config.getoption("benchmark_only", False)
    if config.getoption("benchmark"):
        # Only the timed cases, where timing runs: pytest-benchmark refuses --benchmark-only beside
        # --benchmark-disable or --benchmark-skip, and turns timing off itself under xdist (-n).
        untimed = config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False) or \
            (config.getoption("numprocesses", None) or 0) != 0 or config.getoption("dist", "no") != "no"
        config.option.benchmark_only = not untimed
    # No path given: the benchmarks. Not only in place of the testpaths (pytest started at the root): started in
    # a folder (tests/, say), pytest takes that folder for its path, where no benchmark is to be found.
    if benchmarks and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(ROOT / "benchmarks")]
