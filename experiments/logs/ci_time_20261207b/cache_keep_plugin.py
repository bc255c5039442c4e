"""A pytest plugin: copies the run-wide compilation cache (tests/conftest.py's, removed at the
run's end) to $CACHE_KEEP_DIR (default /tmp/kept_cache) before it is removed.

PYTHONPATH=experiments/logs/ci_time_20261207b python -m pytest -p cache_keep_plugin ..."""

import os
import shutil

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    root = getattr(config, "dcff_cache_root", None)
    if root and os.path.isdir(root):
        target = os.environ.get("CACHE_KEEP_DIR", "/tmp/kept_cache")
        shutil.copytree(root, target, dirs_exist_ok=True)
