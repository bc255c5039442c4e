"""Seconds per orbax save of a small state (30 layers of 3x3x16x16) and a JSON item, as
dcff_jax.training.checkpoints saves (save, then wait), with async checkpointing on (orbax's
default) and off; 8 saves each, two rounds.

    python experiments/logs/ci_time_20261207b/orbax_save_time.py"""

import tempfile
import time

import jax.numpy as jnp
import orbax.checkpoint as ocp

STATE = {
    f"layer{i}": {"kernel": jnp.ones((3, 3, 16, 16)) * i, "bias": jnp.zeros(16)} for i in range(30)
}


def run(name: str, **options) -> None:
    directory = tempfile.mkdtemp()
    options = ocp.CheckpointManagerOptions(max_to_keep=3, create=True, **options)
    mngr = ocp.CheckpointManager(directory, options=options)
    seconds = []
    for step in range(1, 9):
        start = time.perf_counter()
        items = {"state": ocp.args.StandardSave(STATE), "progress": ocp.args.JsonSave({"e": step})}
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
        seconds.append(time.perf_counter() - start)
    print(f"{name:6s} median {sorted(seconds)[4]:.3f} s; " + " ".join(f"{s:.2f}" for s in seconds))


if __name__ == "__main__":
    for _ in range(2):
        run("async")
        run("sync", enable_async_checkpointing=False)
