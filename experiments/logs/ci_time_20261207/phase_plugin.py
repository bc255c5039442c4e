"""A pytest plugin: per test, its wall time and the seconds JAX reported (jax.monitoring) for
tracing, lowering and backend compiles, the compile count and persistent-cache reads, appended to
$PHASE_OUT (default /tmp/phase.txt). Nested traces are counted once each, so trace seconds can
exceed wall time. phase_heavy_modules_3e2b7fd.log holds a run's lines:

PYTHONPATH=experiments/logs/ci_time_20261207 python -m pytest -q -n 2 -p phase_plugin ...
"""

import collections
import os
import time

import pytest

_seconds: collections.defaultdict = collections.defaultdict(float)
_counts: collections.Counter = collections.Counter()


def _listener(event, duration, **kwargs):
    name = event.rsplit("/", 1)[-1]
    _seconds[name] += duration
    _counts[name] += 1


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    from jax import monitoring  # after conftest.py has set the tests' environment

    monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _seconds.clear()
    _counts.clear()
    start = time.time()
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    fields = (
        f"{time.time() - start:7.1f}",
        f"{_seconds['jaxpr_trace_duration']:6.1f}",
        f"{_seconds['jaxpr_to_mlir_module_duration']:6.1f}",
        f"{_seconds['backend_compile_duration']:6.1f}",
        f"{_counts['backend_compile_duration']:4d}",
        f"{_seconds['cache_retrieval_time_sec']:5.1f}",
    )
    with open(os.environ.get("PHASE_OUT", "/tmp/phase.txt"), "a") as f:
        f.write(f"{' '.join(fields)} {worker} {item.nodeid}\n")
