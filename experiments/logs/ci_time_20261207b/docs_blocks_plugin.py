"""A pytest plugin: the seconds of each block tests/test_docs.py runs, on stderr.

PYTHONPATH=experiments/logs/ci_time_20261207b python -m pytest -s -p docs_blocks_plugin \
    tests/test_docs.py::test_the_pages_run_as_a_reader_follows_them"""

import sys
import time


def pytest_collection_finish(session):
    import test_docs

    run_block = test_docs.run_block

    def timed(block, cwd, env):
        start = time.perf_counter()
        try:
            return run_block(block, cwd, env)
        finally:
            sys.stderr.write(f"BLOCK {time.perf_counter() - start:7.2f}s {block}\n")

    test_docs.run_block = timed
