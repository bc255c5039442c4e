"""Run from the repository root (it adds tests/ to the path): a timing helper of
experiments/logs/ci_time_20261206/fourth_slice_measurements.log."""

import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, "tests")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import test_docs as t


class F:
    def mktemp(self, name):
        return pathlib.Path(tempfile.mkdtemp(prefix=name))


home, env = t.reader_dir.__wrapped__(F())
for page in t.DOC_ORDER:
    for b in t.blocks(page):
        if b.language in t.COMMAND_LANGUAGES and b.marker is not None:
            s = time.perf_counter()
            t.run_block(b, home, env)
            print(f"{time.perf_counter() - s:6.1f} s {b}", flush=True)
