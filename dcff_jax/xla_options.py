"""XLA compile options that make conv-net steps fast on XLA:CPU (see experiments/RESULTS.md).

jaxlib 0.10's XLA:CPU hands convolutions, elementwise ops and reductions to YNNPACK "library
fusions" by default. On the CIFAR models' shapes its convolutions and elementwise fusions run
1.5-2.5x slower than XLA's own (Eigen) convolutions and loop fusions, so every jitted step here
turns those off on CPU:

    step = jax.jit(fn, compiler_options=dcff_jax.compiler_options())

Reductions stay with YNNPACK: XLA's own reduction emitter sums float32 with ~30x the rounding
error, which the cancellation in batch-norm gradients carries into the update (a ResNet-56
step 4-6x further from float64 than XLA's defaults; experiments/RESULTS.md). With them kept,
accuracy equals XLA's defaults (tests/test_fast_paths.py). GPUs and TPUs get {} (the option is
CPU-only). Setting the option yourself in XLA_FLAGS wins over ours.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

LIBRARY_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# Only reductions go to YNNPACK (accurate float32 sums); convolutions, dots and elementwise
# fusions are XLA's own (faster here).
CPU_OPTIONS = {LIBRARY_FUSION_OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, str]:
    """Options for jax.jit(..., compiler_options=...) on JAX's default backend.

    {} off CPU, when XLA_FLAGS already sets the option, or when this jaxlib does not know it
    (the option is experimental; a future jaxlib may drop it, and then we change nothing).
    """
    if jax.default_backend() != "cpu" or LIBRARY_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(CPU_OPTIONS) if _cpu_accepts_options() else {}


@functools.cache
def _cpu_accepts_options() -> bool:
    try:
        jax.jit(jnp.negative).lower(jnp.zeros(())).compile(CPU_OPTIONS)
    except Exception as error:  # noqa: BLE001 - any rejection means: compile without them
        logging.warning("XLA:CPU rejected %s (%s); compiling with defaults.", CPU_OPTIONS, error)
        return False
    return True


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/dcff_jax/xla, else ~/.cache/dcff_jax/xla."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dcff_jax", "xla")


def enable_compilation_cache(directory: str = "auto") -> str | None:
    """Keep compiled executables in `directory` ("auto": default_cache_dir(); "": off), so that a
    resumed run loads its train and eval steps instead of compiling them again (compiles of a
    second or more are kept, JAX's default). A cache the user set up (JAX_COMPILATION_CACHE_DIR
    or jax.config) wins. Returns the directory in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if current or not directory:
        return current or None
    directory = default_cache_dir() if directory == "auto" else directory
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


class CompileCounter:
    """Counts, from JAX's monitoring events, the compiles that asked the persistent cache and
    those it answered (hits), while open:

        with CompileCounter() as counter:
            ...
        counter.hits, counter.requests
    """

    def __init__(self):
        self.requests = self.hits = 0

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_listener(self._event)

    def _event(self, event: str, **kwargs) -> None:
        del kwargs
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            self.requests += 1
        elif event == "/jax/compilation_cache/cache_hits":
            self.hits += 1
