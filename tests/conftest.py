import os
import sys

# Tests see the CPU only and import the NumPy transcription beside them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))


import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def logic_only():
    """For tests of logic (shapes, flow, state updates), not numerics: compile with most XLA
    optimisations off, which costs a fraction of the compile time. Use it only with functions
    jitted inside the test, so no optimised-away executable is cached for another test."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
