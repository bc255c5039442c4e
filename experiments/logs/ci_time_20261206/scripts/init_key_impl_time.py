"""Time one jitted init of an architecture's fused model with rbg or threefry keys.

From the repository root (S = experiments/logs/ci_time_20261206/scripts), the cache off:
JAX_ENABLE_COMPILATION_CACHE=false python $S/init_key_impl_time.py ARCH {rbg,threefry}.
"""

import sys
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401 - the tests' compile settings, set on import
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import handwritten_model, paper_config  # noqa: E402

arch, impl = sys.argv[1], sys.argv[2]
model = handwritten_model(arch, paper_config(arch).cprate, "fused", num_classes=10)
x = jnp.zeros((1, 32, 32, 3))
start = time.time()
if impl == "rbg":
    variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
else:
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
jax.block_until_ready(variables)
print(arch, impl, f"{time.time() - start:.1f} s")
