"""A pytest plugin: each process's peak memory and CPU seconds at its end, in /tmp/gc_times.txt."""

import os
import resource


def pytest_unconfigure(config):
    r = resource.getrusage(resource.RUSAGE_SELF)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    line = f"{worker} maxrss_MB {r.ru_maxrss / 1024:.0f} cpu_s {r.ru_utime + r.ru_stime:.1f}\n"
    with open("/tmp/gc_times.txt", "a") as f:
        f.write(line)
