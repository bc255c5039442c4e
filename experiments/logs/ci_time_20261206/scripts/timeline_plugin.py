"""A pytest plugin: one line per test, 'worker start end nodeid' (seconds since the epoch), appended
to $TIMELINE_OUT (default /tmp/timeline.txt) by the process that ran it."""

import os
import time

import pytest

_PATH = os.environ.get("TIMELINE_OUT", "/tmp/timeline.txt")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.time()
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(_PATH, "a") as f:
        f.write(f"{worker} {start:.3f} {time.time():.3f} {item.nodeid}\n")
