"""A pytest plugin: what JAX reports (jax.monitoring) per test, appended to $COMPILE_REPORT
(default /tmp/compile_report.txt), in the form $COMPILE_REPORT_FORMAT names:
  compiles (default; compile_report.log): its wall time, backend-compile seconds and count, and
      the compiles over 0.5 s (name:seconds);
  phases (ci_time_20261207/phase_heavy_modules_3e2b7fd.log): wall s, jaxpr trace s (nested traces
      count once each), lowering s, backend compile s, compiles, persistent-cache reads s,
      pytest-xdist worker, test;
  events (ci_time_20261207/googlenet_compiles_3e2b7fd.log): one line per trace, lowering and
      backend compile: kind, seconds, program, test.

PYTHONPATH=experiments/logs/ci_time_20261206/scripts python -m pytest -p compile_report_plugin ...

That folder's tree.py then shadows dm-tree's `tree`, which tensorflow-datasets imports: run it on
the numeric modules (as the logs above), not on the data tests (test_tfrecord and the tfds ones
fail with an IndexError from tree.py).
"""

import os
import time

import pytest

_events: list[tuple[str, str, float]] = []  # (event's last part, program, seconds)
_FORMAT = os.environ.get("COMPILE_REPORT_FORMAT", "compiles")
_KINDS = ("backend_compile_duration", "jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")


def _listener(event, duration, **kwargs):
    _events.append((event.rsplit("/", 1)[-1], kwargs.get("fun_name", "?"), duration))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    from jax import monitoring  # after conftest.py has set the tests' environment

    monitoring.register_event_duration_secs_listener(_listener)


def _seconds(kind: str) -> float:
    return sum(d for k, _, d in _events if k == kind)


def _lines(item, wall: float) -> str:
    compiles = [(name, d) for k, name, d in _events if k == "backend_compile_duration"]
    if _FORMAT == "phases":
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        fields = (
            f"{wall:7.1f}",
            f"{_seconds('jaxpr_trace_duration'):6.1f}",
            f"{_seconds('jaxpr_to_mlir_module_duration'):6.1f}",
            f"{_seconds('backend_compile_duration'):6.1f}",
            f"{len(compiles):4d}",
            f"{_seconds('cache_retrieval_time_sec'):5.1f}",
        )
        return f"{' '.join(fields)} {worker} {item.nodeid}\n"
    if _FORMAT == "events":
        test = item.nodeid.split("::")[-1][:60]
        return "".join(f"{k[:5]} {d:7.3f} {n} {test}\n" for k, n, d in _events if k in _KINDS)
    seconds = sum(d for _, d in compiles)
    big = " ".join(f"{name}:{d:.1f}" for name, d in compiles if d >= 0.5)
    head = f"{wall:7.1f} wall {seconds:7.1f} backend {len(compiles):4d} n  "
    return f"{head}{item.nodeid}\n     {big}\n"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _events.clear()
    start = time.time()
    yield
    with open(os.environ.get("COMPILE_REPORT", "/tmp/compile_report.txt"), "a") as f:
        f.write(_lines(item, time.time() - start))
