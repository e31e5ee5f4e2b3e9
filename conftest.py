"""Repository-wide pytest set-up: `pytest --benchmark` runs the suites in benchmarks/ instead of tests/."""
from pathlib import Path

import pytest

ROOT = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suites in benchmarks/ (pytest-benchmark) instead of the tests")


def pytest_configure(config):
    if config.getoption("benchmark"):
        config.option.benchmark_only = True
        if config.args_source == pytest.Config.ArgsSource.TESTPATHS:  # no paths given: the benchmarks
            config.args[:] = [str(ROOT / "benchmarks")]
