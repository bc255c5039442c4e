import collections
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "tests")
from helpers import tiny_config

from dcff_jax import models
from dcff_jax.training import optim, steps

arch, cprate = sys.argv[1], sys.argv[2]
config = tiny_config("", model=arch, cprate=cprate)
model = models.create_model(arch, cprate, "fused")
tx = optim.make_optimizer(config, 10)
mesh = steps.make_mesh()
state = jax.eval_shape(lambda: steps.create_train_state(model, tx, 32, 0, mesh))
spec = steps.InputSpec(np.zeros(3, np.float32), np.ones(3, np.float32), True, jnp.float32)
fn = steps.train_step_fn(model, tx, spec, 0)
images = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.uint8)
labels = jax.ShapeDtypeStruct((16,), jnp.int32)
for _i in range(2):
    t = time.perf_counter()
    jaxpr = jax.make_jaxpr(fn)(state, images, labels)
    print("trace", time.perf_counter() - t)
c = collections.Counter()


def walk(j):
    for e in j.eqns:
        c[e.primitive.name] += 1
        for p in e.params.values():
            if hasattr(p, "jaxpr"):
                walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)


walk(jaxpr.jaxpr)
print("eqns", sum(c.values()))
print(c.most_common(25))
