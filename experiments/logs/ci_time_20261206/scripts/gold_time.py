"""Run from the repository root (it adds tests/ to the path): a timing helper of
experiments/logs/ci_time_20261206/fourth_slice_measurements.log."""

import os
import sys
import tempfile
import time

sys.path.insert(0, "tests")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
import test_golden as g

from dcff_jax import xla_options

xla_options.enable_compilation_cache("auto")
t0 = time.perf_counter()
from jax._src import monitoring  # noqa: E402

events = []
monitoring.register_event_duration_secs_listener(lambda name, d, **kw: events.append((name, d)))
got = g.golden_steps(sys.argv[1])
print("total", time.perf_counter() - t0)
import collections  # noqa: E402

c = collections.Counter()
n = collections.Counter()
for name, d in events:
    c[name] += d
    n[name] += 1
for name, d in events:
    if "backend_compile" in name or "trace" in name:
        print(f"{d:7.2f} {name}")
