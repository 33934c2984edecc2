"""Benchmarks are pytest-benchmark tests. A GPU machine without pytest-benchmark installed gets a small
stand-in `benchmark` fixture with the same interface and the same JSON output, so `make gpu-check` runs."""

import json
import statistics
import time

import pytest

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


if not HAVE_PYTEST_BENCHMARK:
    _RESULTS = []

    class _Benchmark:
        def __init__(self, name):
            self.name, self.extra_info, self.group = name, {}, None

        def pedantic(self, fn, rounds=10, warmup_rounds=1, iterations=1):
            for _ in range(warmup_rounds):
                fn()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(iterations):
                    fn()
                times.append((time.perf_counter() - t0) / iterations)
            _RESULTS.append({"name": self.name, "group": self.group, "extra_info": self.extra_info,
                             "stats": {"median": statistics.median(times), "min": min(times), "max": max(times),
                                       "rounds": rounds}})

    @pytest.fixture
    def benchmark(request):
        return _Benchmark(request.node.name)

    def pytest_addoption(parser):
        parser.addoption("--benchmark-json", default=None)
        parser.addoption("--benchmark-columns", default=None)

    def pytest_sessionfinish(session):
        path = session.config.getoption("--benchmark-json")
        if path:
            with open(path, "w") as f:
                json.dump({"benchmarks": _RESULTS, "machine_info": {}, "commit_info": {}}, f, indent=1)


def pytest_runtest_logstart(nodeid, location):
    """`make bench` runs for many minutes: say which case is running, not only pytest's dots."""
    reporter = _CONFIG.pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
    if reporter is not None:
        reporter.write_line(f"running {nodeid.split('::', 1)[-1]}")


_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
