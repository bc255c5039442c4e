"""Compile seconds of an architecture's fused init, fusion update and train step in the tests'
environment (tests/conftest.py), and digests of what they compute. From the repository root:

    python experiments/logs/ci_time_20261207/compile_sweep.py "[unrolled] [XLA flags]" [arch]
        [TRACE_DIR]

"unrolled" lowers threefry unrolled (tests/fast_threefry.py); other words are appended to
XLA_FLAGS. compile_sweep.log holds its lines (GoogLeNet, alternated, three rounds). TRACE_DIR:
the train step's compile under jax.profiler, with a Perfetto trace there
(ci_time_20261207b/profile_summary.py sums its events)."""

import hashlib
import os
import sys
import time

sys.path.insert(0, "tests")
extra = sys.argv[1] if len(sys.argv) > 1 else ""
import conftest  # noqa: E402, F401  (the tests' environment: -O0, elemental emitters)
import fast_threefry  # noqa: E402

fast_threefry.lower_threefry_on_cpu(unrolled="unrolled" in extra)
flags = extra.replace("unrolled", "").strip()
if flags:
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {flags}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers import paper_config  # noqa: E402

from dcff_jax import fusion, input_pipeline, models, optim, steps  # noqa: E402


def compile_seconds(jitted, *args, trace_dir=None):
    lowered = jitted.lower(*args)
    start = time.perf_counter()
    if trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    compiled = lowered.compile()
    if trace_dir:
        jax.profiler.stop_trace()
    return compiled, time.perf_counter() - start


def digest(tree) -> str:
    data = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(tree))
    return hashlib.sha256(data).hexdigest()[:10]


def main():
    arch = sys.argv[2] if len(sys.argv) > 2 else "googlenet"
    config = paper_config(arch)
    model = models.create_model(arch, config.cprate, "fused", num_classes=10)
    size = models.input_shape(arch)[1]
    x = jnp.zeros((1, size, size, 3))
    init = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))
    compiled, t_init = compile_seconds(init)
    variables = compiled()
    update = jax.jit(lambda p, f: fusion.update_fusion(p, f, 1, 3)[0])
    compiled, t_update = compile_seconds(update, variables["params"], variables["fusion"])
    fused = compiled(variables["params"], variables["fusion"])
    digests = [digest(variables), digest(fused)]
    mesh = steps.make_mesh()
    tx = optim.make_optimizer(config, 3)
    state = steps.create_train_state(model, tx, size, 0, mesh).replace(fusion=fused)
    mean, std = input_pipeline.normalization(config.dataset)
    step = steps.make_train_step(model, tx, steps.InputSpec(mean, std), mesh, 0)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, size, size, 3), np.uint8), np.arange(4) % 10
    args = (state, *steps.to_global(mesh, images, labels))
    trace_dir = sys.argv[3] if len(sys.argv) > 3 else None
    compiled, t_step = compile_seconds(step, *args, trace_dir=trace_dir)
    state, metrics = compiled(*args)
    print(
        f"{extra or 'base':55s} init {t_init:5.1f} update {t_update:5.1f} step {t_step:5.1f} "
        f"sum {t_init + t_update + t_step:5.1f}  {' '.join(digests)} {digest(state.params)} "
        f"{float(metrics['loss']):.6f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
