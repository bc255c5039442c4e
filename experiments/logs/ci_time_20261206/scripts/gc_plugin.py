"""A pytest plugin: the seconds spent in garbage collections of each generation, and their count,
per process, appended to /tmp/gc_times.txt at its end (with the objects gc tracks then)."""

import gc
import os
import time

_t = {"start": 0.0, "total": [0.0, 0.0, 0.0], "n": [0, 0, 0]}


def _cb(phase, info):
    if phase == "start":
        _t["start"] = time.perf_counter()
    else:
        g = info["generation"]
        _t["total"][g] += time.perf_counter() - _t["start"]
        _t["n"][g] += 1


gc.callbacks.append(_cb)


def pytest_unconfigure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    totals = [round(x, 2) for x in _t["total"]]
    with open("/tmp/gc_times.txt", "a") as f:
        f.write(f"{worker} gen totals {totals} counts {_t['n']} objects {len(gc.get_objects())}\n")
