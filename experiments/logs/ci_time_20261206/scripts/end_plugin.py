"""A pytest plugin: when each process (controller, pytest-xdist workers) reaches the end of its
last test, its sessionfinish, its terminal summary and its atexit functions, one line each in
/tmp/end_times.txt (seconds since the epoch, process, event). ninth_slice_measurements.log."""

import atexit
import os
import time

import pytest


def _log(what):
    with open("/tmp/end_times.txt", "a") as f:
        f.write(f"{time.time():.3f} {os.environ.get('PYTEST_XDIST_WORKER', 'ctl')} {what}\n")


def pytest_configure(config):
    atexit.register(_log, "atexit last")  # registered early: runs after later registrations


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session, exitstatus):
    _log("sessionfinish start")
    yield
    _log("sessionfinish end")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    atexit.register(_log, "atexit first")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if nextitem is None:
        _log("last test done " + item.nodeid)


def pytest_terminal_summary(terminalreporter):
    _log("terminal summary")
