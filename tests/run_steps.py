"""Run a few train steps; print {"losses": [...], "checksum": ..., "params": path} as JSON.

python tests/run_steps.py DATA_DIR STEPS [--model vgg16|resnet8] [--float64]
    [--params_out FILE.npz] [--coordinator HOST:PORT --num_processes N --process_id I]

--model: VGG-16 at [0.75]*13 (the default) or helpers.SMOKE_MODEL, ResNet-8 at its smoke rates:
the same steps through the same code, compiled in a fraction of VGG-16's time.

--float64 runs the same steps (same initial state, fusion, batches, augmentation) with every
float in float64: the reference that the float32 runs' rounding is measured against.
"""

import argparse
import contextlib
import json

import jax
from helpers import TINY_RUN_RATES as RATES  # --model's rate strings; no JAX backend started

parser = argparse.ArgumentParser()
parser.add_argument("data_dir")
parser.add_argument("steps", type=int)
parser.add_argument("--model", choices=sorted(RATES), default="vgg16")
parser.add_argument("--float64", action="store_true")
parser.add_argument("--params_out", default="")
parser.add_argument("--coordinator", default="")
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
ARGS = parser.parse_args()

if ARGS.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=ARGS.coordinator,
        num_processes=ARGS.num_processes,
        process_id=ARGS.process_id,
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers import tiny_config  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dcff_jax import input_pipeline, models, xla_options  # noqa: E402
from dcff_jax.method import fusion  # noqa: E402
from dcff_jax.training import optim, steps  # noqa: E402

# The persistent cache, as `main` keeps it ($XDG_CACHE_HOME: the test run's own, see
# tests/conftest.py): the initial state's program is the same in every run of a device count,
# and the float32 and float64 runs of test_parallel.py and experiments/float64_distances.py
# repeat each other's programs; a loaded executable is the compiled one, bit for bit.
xla_options.enable_compilation_cache("auto")


def as_float64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def main():
    # A small rate: at 0.1-0.01 a rounding-level difference (any device count or compile option)
    # flips a max-pool tie by step 3 and moves the loss by ~1e-3, which would hide real bugs.
    config = tiny_config(
        ARGS.data_dir, model=ARGS.model, cprate=RATES[ARGS.model], learning_rate=0.002
    )
    data = input_pipeline.load_data(config)
    mesh = steps.make_mesh()
    model = models.create_model(config.model, config.cprate, "fused")
    tx = optim.make_optimizer(config, ARGS.steps)
    # The initial state is drawn in float32 in every mode, then widened.
    state = steps.create_train_state(model, tx, 32, config.seed, mesh)
    x64 = jax.enable_x64(True) if ARGS.float64 else contextlib.nullcontext()
    with x64:
        dtype = jnp.float64 if ARGS.float64 else jnp.float32
        if ARGS.float64:
            state = jax.jit(as_float64, out_shardings=NamedSharding(mesh, P()))(state)
        new_fusion, _ = fusion.update_fusion(state.params, state.fusion, 0, config.num_epochs)
        state = state.replace(fusion=new_fusion)
        spec = steps.InputSpec(data.mean, data.std, data.device_augment, dtype)
        step_fn = steps.make_train_step(model, tx, spec, mesh, config.seed)
        losses = []
        batches = input_pipeline.train_batches(
            data.train, config.batch_size, config.seed, 0, 0, ARGS.steps
        )
        for images, labels in batches:
            state, metrics = step_fn(state, *steps.to_global(mesh, images, labels))
            losses.append(float(metrics["loss"]))
        params = {
            jax.tree_util.keystr(path): np.asarray(jax.device_get(x)).astype(np.float64)
            for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
        }
    if ARGS.params_out:
        np.savez(ARGS.params_out, **params)
    checksum = float(sum(np.abs(x).sum() for x in params.values()))
    print(
        json.dumps(
            {
                "losses": losses,
                "checksum": checksum,
                "devices": jax.device_count(),
                "processes": jax.process_count(),
            }
        )
    )


main()
