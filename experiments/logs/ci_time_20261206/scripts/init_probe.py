import os, sys, time, tempfile
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
import jax, jax.numpy as jnp
from jax._src import monitoring
ev = []
monitoring.register_event_duration_secs_listener(lambda n, d, **k: ev.append((n, d)))
mode = sys.argv[1]
if mode == "uniform_only":
    import jax.random as jr
    jr.normal = lambda key, shape=(), dtype=jnp.float32: jnp.zeros(shape, dtype)
    jr.truncated_normal = lambda key, lower, upper, shape=(), dtype=jnp.float32: jnp.zeros(shape, dtype)
if mode == "bits_only":
    import jax.random as jr
    jr.normal = lambda key, shape=(), dtype=jnp.float32: jr.bits(key, shape).astype(dtype)
    jr.truncated_normal = lambda key, lower, upper, shape=(), dtype=jnp.float32: jr.bits(key, shape).astype(dtype)
    jr.uniform = lambda key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0: jr.bits(key, shape).astype(dtype)
if mode == "partitionable_off":
    jax.config.update("jax_threefry_partitionable", False)
if mode == "zeros":
    import jax.random as jr
    # every random draw returns zeros of its shape: is the cost the RNG or the model?
    jr.normal = lambda key, shape=(), dtype=jnp.float32: jnp.zeros(shape, dtype)
    jr.uniform = lambda key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0: jnp.zeros(shape, dtype)
    jr.truncated_normal = lambda key, lower, upper, shape=(), dtype=jnp.float32: jnp.zeros(shape, dtype)
from dcff_jax import models
from dcff_jax.config import load_config
cfg = load_config("configs/googlenet_cifar.py")
m = models.create_model("googlenet", cfg.cprate, "fused")
x = jnp.zeros((1, 32, 32, 3))
t = time.perf_counter()
v = jax.jit(lambda x: m.init(jax.random.key(0), x))(x)
jax.block_until_ready(v)
print(mode, f"{time.perf_counter() - t:.2f} s", [(n.split('/')[-1], round(d, 2)) for n, d in ev if d > 0.2])
