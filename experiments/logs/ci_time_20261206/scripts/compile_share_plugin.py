"""pytest -p compile_share_plugin (on PYTHONPATH): per test, wall and XLA compile seconds."""

import collections
import sys
import time

import pytest

events = collections.Counter()
_registered = []


def listener(name, d, **kw):
    if "backend_compile" in name:
        events["compile"] += d
    elif "trace" in name:
        events["trace"] += d
    elif "lower" in name:
        events["lower"] += d


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _registered:
        from jax._src import monitoring

        monitoring.register_event_duration_secs_listener(listener)
        _registered.append(1)
    events.clear()
    t = time.perf_counter()
    yield
    w = time.perf_counter() - t
    sys.__stderr__.write(
        f"\n{w:6.1f} s wall  compile {events['compile']:5.1f}  trace {events['trace']:5.1f}  "
        f"lower {events['lower']:5.1f}  {item.nodeid}\n"
    )
