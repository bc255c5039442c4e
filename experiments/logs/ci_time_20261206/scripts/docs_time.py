"""Run from the repository root (it adds tests/ to the path): the seconds of each block
tests/test_docs.py runs, in its order, in a fresh reader directory, and their sum. A timing
helper of experiments/logs/ci_time_20261206/fourth_slice_measurements.log (and later slices'
logs). From 2026-12-07 on it takes the tests' whole environment from tests/conftest.py (as the
test's own commands get it: -O0, the elemental-emitters flag, threefry unrolled); before, it set
only the two variables."""

import pathlib
import sys
import tempfile
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401  (the tests' environment)
import test_docs as t  # noqa: E402


class F:
    def mktemp(self, name):
        return pathlib.Path(tempfile.mkdtemp(prefix=name))


home, env = t.reader_dir.__wrapped__(F())
total = 0.0
for page in t.DOC_ORDER:
    for b in t.blocks(page):
        if b.language in t.COMMAND_LANGUAGES and b.marker is not None:
            s = time.perf_counter()
            t.run_block(b, home, env)
            seconds = time.perf_counter() - s
            total += seconds
            print(f"{seconds:6.1f} s {b}", flush=True)
print(f"{total:6.1f} s in all")
