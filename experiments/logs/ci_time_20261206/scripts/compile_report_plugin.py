"""A pytest plugin: per test, its wall time, backend-compile seconds and count, and the compiles
over 0.5 s (name:seconds), appended to $COMPILE_REPORT (default /tmp/compile_report.txt).

PYTHONPATH=experiments/logs/ci_time_20261206/scripts python -m pytest -p compile_report_plugin ...
"""

import os
import time

import pytest

_compiles: list[tuple[str, float]] = []


def _listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles.append((kwargs.get("fun_name", "?"), duration))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    from jax import monitoring  # after conftest.py has set the tests' environment

    monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _compiles.clear()
    start = time.time()
    yield
    seconds = sum(d for _, d in _compiles)
    big = " ".join(f"{name}:{d:.1f}" for name, d in _compiles if d >= 0.5)
    with open(os.environ.get("COMPILE_REPORT", "/tmp/compile_report.txt"), "a") as f:
        f.write(f"{time.time() - start:7.1f} wall {seconds:7.1f} backend {len(_compiles):4d} n  ")
        f.write(f"{item.nodeid}\n     {big}\n")
