"""Measured and not kept (issue 25, eighth slice): update_fusion with its same-shape layers
grouped under lax.map, against the current program (one update per layer): compile time with
the cache off, and bit-identity over 7 epochs under both criteria. From the repository root:
    python experiments/logs/ci_time_20261206/scripts/update_fusion_grouped_prototype.py \
        resnet8,vgg16,resnet56,googlenet
"""

import sys
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401  (the tests' compile settings)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from flax.core import unfreeze  # noqa: E402
from helpers import paper_config  # noqa: E402

from dcff_jax import models  # noqa: E402
from dcff_jax.method import fusion as F  # noqa: E402


def _update_grouped(params, fusion, epoch, num_epochs, criterion, t_start, t_end, k):
    t = F.temperature(jnp.asarray(epoch), num_epochs, t_start, t_end, k)
    flat_fusion = traverse_util.flatten_dict(unfreeze(fusion))
    flat_params = traverse_util.flatten_dict(unfreeze(params))
    layers = sorted({path[:-1] for path in flat_fusion})
    groups = {}
    for layer in layers:
        filters = F.kernel_filters(flat_params[layer + ("kernel",)])
        state = {name: flat_fusion[layer + (name,)] for name in ("matrix", "scores", "kept")}
        key = (filters.shape, filters.dtype, state["kept"].shape)
        groups.setdefault(key, []).append((layer, filters, state))
    new_flat, info = {}, {}
    for members in groups.values():
        stacked = (
            jnp.stack([f for _, f, _ in members]),
            jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, _, s in members]),
        )
        new_states, infos = jax.lax.map(lambda a: F.update_layer(a[0], a[1], t, criterion), stacked)
        for i, (layer, _, _) in enumerate(members):
            new_flat.update({layer + (n,): v[i] for n, v in new_states.items()})
            info["/".join(layer)] = {n: v[i] for n, v in infos.items()}
    return traverse_util.unflatten_dict(new_flat), info


grouped = jax.jit(_update_grouped, static_argnames=("criterion", "t_start", "t_end", "k"))
jax.config.update("jax_enable_compilation_cache", False)
archs = sys.argv[1].split(",")
for arch in archs:
    cprate = paper_config(arch).cprate if arch != "resnet8" else "[0.5]*6"
    size = 224 if arch in ("resnet50", "mobilenetv2") else 32
    model = models.create_model(arch, cprate, "fused")
    x = jnp.zeros((1, size, size, 3))
    v = jax.jit(lambda x, model=model: model.init(jax.random.key(0), x, train=False))(x)
    args = (v["params"], v["fusion"], 1, 300, "reference", 1.0, 1e4, 1.0)
    times = {}
    for name, fn in (("old", F._update_fusion_jit), ("new", grouped)):
        start = time.time()
        fn.lower(*args).compile()
        times[name] = time.time() - start
    same = True
    for crit in ("reference", "exact"):
        pa, fa, pb, fb = v["params"], v["fusion"], v["params"], v["fusion"]
        rng = np.random.default_rng(0)
        for epoch in (0, 1, 5, 30, 100, 150, 299):
            noise = jax.tree.map(lambda x: rng.normal(0, 0.01, x.shape), pa)  # noqa: B023
            pa = jax.tree.map(lambda x, n: x + jnp.asarray(n, x.dtype), pa, noise)
            oa, ia = F._update_fusion_jit(pa, fa, epoch, 300, crit, 1.0, 1e4, 1.0)
            ob, ib = grouped(pa, fb, epoch, 300, crit, 1.0, 1e4, 1.0)
            pairs = zip(jax.tree.leaves((oa, ia)), jax.tree.leaves((ob, ib)), strict=True)
            same &= all(np.array_equal(x, y, equal_nan=True) for x, y in pairs)
            fa, fb = oa, ob
    verdict = "bit-identical" if same else "DIFFERENT"
    print(arch, f"compile old {times['old']:.2f} new {times['new']:.2f}", verdict, flush=True)
