"""init_probe.py MODE, from the repository root: how long GoogLeNet's fused init (the paper's
rates, batch 1) takes to compile, with the random draws as they are (normal) or replaced
(zeros, uniform_only, bits_only), or threefry partitionable off (partitionable_off)."""

import os
import sys
import tempfile
import time

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from jax._src import monitoring  # noqa: E402

events = []
monitoring.register_event_duration_secs_listener(lambda n, d, **k: events.append((n, d)))
F32 = jnp.float32


def zeros(key, *args, shape=(), dtype=F32, **kwargs):
    return jnp.zeros(shape, dtype)


def bits(key, *args, shape=(), dtype=F32, **kwargs):
    return jr.bits(key, shape).astype(dtype)


mode = sys.argv[1]
if mode == "zeros":  # every draw: is the cost the generator or the model?
    jr.normal = lambda key, shape=(), dtype=F32: zeros(key, shape=shape, dtype=dtype)
    jr.uniform = lambda key, shape=(), dtype=F32, minval=0, maxval=1: zeros(key, shape=shape)
    jr.truncated_normal = lambda key, lo, hi, shape=(), dtype=F32: zeros(key, shape=shape)
if mode == "uniform_only":
    jr.normal = lambda key, shape=(), dtype=F32: zeros(key, shape=shape, dtype=dtype)
    jr.truncated_normal = lambda key, lo, hi, shape=(), dtype=F32: zeros(key, shape=shape)
if mode == "bits_only":
    jr.normal = lambda key, shape=(), dtype=F32: bits(key, shape=shape, dtype=dtype)
    jr.uniform = lambda key, shape=(), dtype=F32, minval=0, maxval=1: bits(key, shape=shape)
    jr.truncated_normal = lambda key, lo, hi, shape=(), dtype=F32: bits(key, shape=shape)
if mode == "partitionable_off":
    jax.config.update("jax_threefry_partitionable", False)

from dcff_jax import models  # noqa: E402
from dcff_jax.config import load_config  # noqa: E402

model = models.create_model("googlenet", load_config("configs/googlenet_cifar.py").cprate, "fused")
x = jnp.zeros((1, 32, 32, 3))
start = time.perf_counter()
jax.block_until_ready(jax.jit(lambda x: model.init(jax.random.key(0), x))(x))
took = [(n.split("/")[-1], round(d, 2)) for n, d in events if d > 0.2]
print(mode, f"{time.perf_counter() - start:.2f} s", took)
