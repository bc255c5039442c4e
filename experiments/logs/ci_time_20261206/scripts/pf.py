"""Run from the repository root (it adds tests/ to the path): a timing helper of
experiments/logs/ci_time_20261206/fourth_slice_measurements.log."""

import os
import sys
import time

sys.path.insert(0, "tests")
sys.path.insert(0, "experiments")
import jax
import parity_fixture as pf

mode = sys.argv[1]
if mode != "plain":
    opts = {"xla_cpu_use_fusion_emitters": True}
    if mode == "both":
        jax.config.update("jax_disable_most_optimizations", False)
    raw = pf._loss_and_grads.__wrapped__
    pf._loss_and_grads = jax.jit(raw, static_argnums=0, compiler_options=opts)
t = time.perf_counter()
r = pf.compare()
for e in pf.EPOCHS:
    m = r["step"]["float32", e]
    print(mode, e, m["grad"].max(), m["published_float32_grad"].max())
print(
    mode,
    "seconds",
    time.perf_counter() - t,
    os.environ["XLA_FLAGS"],
    jax.config.read("jax_disable_most_optimizations"),
)
