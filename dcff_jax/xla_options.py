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
