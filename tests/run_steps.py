"""Run a few train steps; print {"losses": [...], "checksum": ...} as JSON (subprocess tests).

python tests/run_steps.py DATA_DIR STEPS [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import sys

import jax

if len(sys.argv) > 3:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=sys.argv[3], num_processes=int(sys.argv[4]), process_id=int(sys.argv[5])
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers import tiny_config  # noqa: E402

from dcff_jax import fusion, input_pipeline, models, train  # noqa: E402


def main():
    data_dir, steps = sys.argv[1], int(sys.argv[2])
    # A small rate: at 0.1-0.01 a rounding-level difference (any device count or compile option)
    # flips a max-pool tie by step 3 and moves the loss by ~1e-3, which would hide real bugs.
    config = tiny_config(data_dir, model="vgg16", cprate="[0.75]*13", learning_rate=0.002)
    data = input_pipeline.load_data(config)
    mesh = train.make_mesh()
    model = models.create_model(config.model, config.cprate, "fused")
    tx = train.make_optimizer(config, steps)
    state = train.create_train_state(model, tx, 32, config.seed, mesh)
    new_fusion, _ = fusion.update_fusion(state.params, state.fusion, 0, config.num_epochs)
    state = state.replace(fusion=new_fusion)
    step_fn = train.make_train_step(model, tx, data, config.seed, jnp.float32, mesh)
    losses = []
    batches = input_pipeline.train_batches(data.train, config.batch_size, config.seed, 0, 0, steps)
    for images, labels in batches:
        state, metrics = step_fn(state, *train.to_global(mesh, images, labels))
        losses.append(float(metrics["loss"]))
    leaves = [
        np.asarray(jax.device_get(x)).astype(np.float64) for x in jax.tree.leaves(state.params)
    ]
    checksum = float(sum(np.abs(x).sum() for x in leaves))
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
