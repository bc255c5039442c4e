"""A pytest plugin: gc.collect() and gc.freeze() after each test (what tests/conftest.py now
does since 65a684d: for the tests before it), and the process's peak memory and frozen object
count at its end in /tmp/gc_times.txt."""

import gc
import resource

import pytest


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/tmp/gc_times.txt", "a") as f:
        f.write(f"maxrss_MB {peak_mb:.0f} frozen {gc.get_freeze_count()}\n")
