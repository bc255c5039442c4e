"""The jitted train and eval steps, the train state, and data-parallel placement.

Data parallel with jax.sharding: a 1-D Mesh over every device of every host, the batch sharded
on its 'data' axis, the state replicated; XLA inserts the gradient all-reduce, and batch-norm
statistics are over the global batch. The same code serves 1 CPU, 8 GPUs and a TPU pod.

The step builders take a model, an optax transformation and an `InputSpec`; the steps take
arrays (uint8 images, int labels), so they work with any input pipeline:

    spec = InputSpec(mean=CIFAR_MEAN, std=CIFAR_STD, augment=True)
    train_step = make_train_step(model, tx, spec, mesh)
    state, metrics = train_step(state, *to_global(mesh, images, labels))
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcff_jax import fusion, input_pipeline
from dcff_jax.xla_options import compiler_options


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the optimizer itself is static)."""

    step: jax.Array  # int32 scalar, global step; with the seed it also keys the augmentation
    params: Any
    batch_stats: Any
    fusion: Any  # per fused layer: matrix (m, c), scores (c,), kept (m,)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How a step turns a uint8 (n, H, W, 3) batch into the model's input."""

    mean: tuple[float, float, float]  # per channel, of x / 255
    std: tuple[float, float, float]
    augment: bool = False  # CIFAR pad-4 crop + flip on the device, keyed by (seed, step)
    dtype: Any = jnp.float32  # the model's compute dtype


def make_mesh() -> Mesh:
    """A 1-D mesh, axis 'data', over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def create_train_state(model, tx, image_size: int, seed: int, mesh: Mesh) -> TrainState:
    """Initialised state, replicated over the mesh."""

    def init():
        variables = model.init(
            jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)), train=False
        )
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            fusion=variables.get(fusion.FUSION_COLLECTION, {}),  # {} for original/compact
            opt_state=tx.init(params),
        )

    return jax.jit(init, out_shardings=replicated(mesh))()


def model_input(images: jax.Array, spec: InputSpec, key: jax.Array | None = None) -> jax.Array:
    """uint8 (n, H, W, 3) -> normalised (n, H, W, 3) in spec.dtype; augmented when a key is
    given and spec.augment."""
    if spec.augment and key is not None:
        images = input_pipeline.augment_cifar(images, key)
    return input_pipeline.normalize(images, spec.mean, spec.std, spec.dtype)


def make_train_step(model, tx, spec: InputSpec, mesh: Mesh, seed: int = 0, options=None):
    """The jitted (state, images uint8, labels) -> (state, metrics) step; the state is donated.

    options: XLA compile options; None means dcff_jax.compiler_options(), {} XLA's defaults.
    metrics: "loss", "accuracy" (batch means) and "nonfinite_params" (count after the update).
    """

    def train_step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        x = model_input(images, spec, key)
        # Its own stream: adding dropout to a model leaves the augmentation unchanged.
        dropout_key = jax.random.fold_in(key, 1)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats, "fusion": state.fusion}
            logits, updates = model.apply(
                variables,
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        # Counted so that no checkpoint is written with params that a finite loss did not reveal
        # as broken yet (an exploding update shows in the next step's loss only).
        nonfinite = sum(jnp.sum(~jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params))
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "nonfinite_params": nonfinite.astype(jnp.float32),
        }
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(replicated(mesh), batch_sharded(mesh), batch_sharded(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options() if options is None else options,
    )


def make_eval_step(model, spec: InputSpec, mesh: Mesh, options=None):
    """(state, images, labels, mask) -> sums of loss, top-1 and top-5 hits over valid examples.

    options: as for make_train_step.
    """

    def eval_step(state: TrainState, images, labels, mask):
        variables = {
            "params": state.params,
            "batch_stats": state.batch_stats,
            "fusion": state.fusion,
        }
        logits = model.apply(variables, model_input(images, spec), train=False)
        return eval_sums(logits, labels, mask)

    batch = batch_sharded(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(replicated(mesh), batch, batch, batch),
        out_shardings=replicated(mesh),
        compiler_options=compiler_options() if options is None else options,
    )


def eval_sums(logits, labels, mask) -> dict[str, jax.Array]:
    """Masked sums: loss, top-1 and top-5 hits, count. logits (n, k), labels (n,), mask (n,)."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def to_global(mesh: Mesh, *local_arrays: np.ndarray) -> list[jax.Array]:
    """This process's slices of a global batch -> arrays sharded over every device of every host."""
    return [jax.make_array_from_process_local_data(batch_sharded(mesh), a) for a in local_arrays]


def evaluate(
    eval_step: Callable, state, batches: Iterable[tuple[np.ndarray, ...]], mesh: Mesh
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean loss over (images, labels, valid mask) batches, e.g.
    input_pipeline.eval_batches(split, global_batch)."""

    def place(batch):
        return to_global(mesh, *batch)

    totals = None
    with contextlib.closing(input_pipeline.prefetch(batches, place)) as placed:
        for images, labels, valid in placed:
            sums = eval_step(state, images, labels, valid)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": 100.0 * float(totals["top1"]) / count,
        "top5": 100.0 * float(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
        "examples": int(count),
    }
