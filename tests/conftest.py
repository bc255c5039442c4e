import os
import shutil
import sys
import tempfile

# Tests see the CPU only and import the NumPy transcription beside them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))


import jax  # noqa: E402
import pytest  # noqa: E402

from dcff_jax import xla_options  # noqa: E402


def pytest_configure(config):
    """One cache directory for the whole run, as $XDG_CACHE_HOME: the pytest-xdist workers and
    every command a test starts inherit it, so a program compiled in one test (in-process or
    through main, whose default --compilation_cache lives there) is loaded by every later compile
    of the same program instead of compiled again. A run starts it empty and removes it, so no
    test reads or writes the user's ~/.cache and no run depends on an earlier one."""
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        config.dcff_cache_root = tempfile.mkdtemp(prefix="dcff_jax_tests_")
        os.environ["XDG_CACHE_HOME"] = config.dcff_cache_root
    xla_options.enable_compilation_cache("auto")


def pytest_unconfigure(config):
    if hasattr(config, "dcff_cache_root"):
        shutil.rmtree(config.dcff_cache_root, ignore_errors=True)


@pytest.fixture
def logic_only():
    """For tests of logic (shapes, flow, state updates), not numerics: compile with most XLA
    optimisations off, which costs a fraction of the compile time. Use it only with functions
    jitted inside the test, so no optimised-away executable is cached for another test."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
