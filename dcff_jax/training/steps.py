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
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcff_jax.data import loader, transforms
from dcff_jax.method import fusion
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


def model_variables(state: TrainState) -> dict[str, Any]:
    """The model's variables in a train state: {"params", "batch_stats", "fusion"}."""
    return {"params": state.params, "batch_stats": state.batch_stats, "fusion": state.fusion}


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
        images = transforms.augment_cifar(images, key)
    return transforms.normalize(images, spec.mean, spec.std, spec.dtype)


def train_step_fn(model, tx, spec: InputSpec, seed: int = 0) -> Callable:
    """The pure (state, images uint8 (n, H, W, 3), labels (n,)) -> (state, metrics) step.

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

    return train_step


def make_train_step(model, tx, spec: InputSpec, mesh: Mesh, seed: int = 0, options=None):
    """The jitted (state, images uint8, labels) -> (state, metrics) step; the state is donated.

    options: XLA compile options; None means dcff_jax.compiler_options(), {} XLA's defaults.
    metrics: as train_step_fn's.
    """
    return jax.jit(
        train_step_fn(model, tx, spec, seed),
        in_shardings=(replicated(mesh), batch_sharded(mesh), batch_sharded(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options() if options is None else options,
    )


def gather_batch(split, order: jax.Array, start: jax.Array, batch: int, mesh: Mesh):
    """A global batch gathered on the device: (images, labels) at split rows
    order[start : start + batch], sharded over the mesh's 'data' axis.

    split: a DeviceSplit; order: int32 (n,) the epoch's permutation; batch: static."""
    rows = jax.lax.dynamic_slice(order, (start,), (batch,))
    # Sharded before the gather: each device gathers only its slice of the batch.
    rows = jax.lax.with_sharding_constraint(rows, batch_sharded(mesh))
    return split.images[rows], split.labels[rows]


@flax.struct.dataclass
class DeviceSplit:
    """A whole split held on every device (CIFAR-10's training set is 150 MB as uint8)."""

    images: jax.Array  # uint8 (n, H, W, 3), replicated
    labels: jax.Array  # int32 (n,), replicated


def place_split(mesh: Mesh, images: np.ndarray, labels: np.ndarray) -> DeviceSplit:
    """Host arrays (every process holds the whole split) -> a DeviceSplit replicated on `mesh`."""
    return DeviceSplit(place_replicated(mesh, images), place_replicated(mesh, labels, np.int32))


def place_replicated(mesh: Mesh, array: np.ndarray, dtype=None) -> jax.Array:
    """A host array, the same on every process, as one array replicated over `mesh`."""
    array = np.asarray(array, dtype)
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def loops_keep_fast_convs() -> bool:
    """Whether the default backend runs convolutions inside a loop body as fast as outside.

    Not XLA:CPU: its convolution canonicalization (the NHWC/HWIO layouts its Eigen kernels need)
    visits only the entry computation, so in a while body the backward convolutions (dimension
    numbers b01f_01oi and f01b_i01o) run as naive loops: a ResNet-56 step at batch 64 took 8.9 s
    in a loop against 0.61 s outside (experiments/RESULTS.md)."""
    return jax.default_backend() != "cpu"


def make_train_loop(
    model,
    tx,
    spec: InputSpec,
    mesh: Mesh,
    batch: int,
    seed: int = 0,
    options=None,
    stride: int | None = None,
    rolled: bool | None = None,
) -> Callable:
    """The (state, split, order, first, count) -> (state, sums) train call: `count` steps on
    batches gathered on the device; the state is donated.

    Step i of the call trains on split rows order[(first + i) * stride : ... + batch] (in that
    order), the same global batch the host path builds for step first + i of the epoch. Both
    `first` and `count` are int32 scalars; one executable serves every call.

    Args:
      split: a DeviceSplit; order: int32 (n,) the epoch's permutation, replicated.
      batch: the global batch size (static: one executable per batch size).
      stride: where step s's rows start, s * stride; default `batch`. An epoch's partial last
        batch has the full global batch size as its stride.
      rolled: True: one jitted call, the steps in a `lax.fori_loop` with a traced trip count;
        False: one jitted call per step, driven from Python, the sums staying on the device
        (a StepwiseLoop). Default: rolled where loops_keep_fast_convs().

    Returns:
      A jitted function (rolled) or a StepwiseLoop, both with `.lower(*args).compile()`. Calls
      return the new state and the metrics summed over the call's steps (see train_step_fn),
      plus "steps" (the count, float32).
    """
    rolled = loops_keep_fast_convs() if rolled is None else rolled
    step_fn = train_step_fn(model, tx, spec, seed)
    stride = batch if stride is None else stride

    def step_at(split: DeviceSplit, order, index, state: TrainState, sums):
        images, labels = gather_batch(split, order, index * stride, batch, mesh)
        state, metrics = step_fn(state, images, labels)
        return state, jax.tree.map(jnp.add, sums, metrics)

    def one_step(state: TrainState, sums, split: DeviceSplit, order, index):
        return step_at(split, order, index, state, sums)

    def train_loop(state: TrainState, split: DeviceSplit, order, first, count):
        def body(i, carry):
            return step_at(split, order, first + i, *carry)

        state, sums = jax.lax.fori_loop(0, count, body, (state, zero_sums()))
        return state, {**sums, "steps": jnp.asarray(count, jnp.float32)}

    jit = functools.partial(
        jax.jit,
        out_shardings=(replicated(mesh), replicated(mesh)),
        compiler_options=compiler_options() if options is None else options,
    )
    if rolled:
        return jit(train_loop, in_shardings=(replicated(mesh),) * 5, donate_argnums=0)
    return StepwiseLoop(jit(one_step, in_shardings=(replicated(mesh),) * 5, donate_argnums=(0, 1)))


def zero_sums() -> dict[str, jax.Array]:
    """train_step_fn's metrics, zero: the start of a call's sums."""
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "accuracy", "nonfinite_params")}


@dataclasses.dataclass(frozen=True)
class StepwiseLoop:
    """make_train_loop's call as one jitted step per train step: (state, split, order, first,
    count) -> (state, sums), the sums accumulated on the device and donated from step to step.

    step: the jitted or compiled (state, sums, split, order, index) -> (state, sums)."""

    step: Any

    def __call__(self, state, split, order, first, count):
        sums = zero_sums()
        for index in range(int(first), int(first) + int(count)):
            state, sums = self.step(state, sums, split, order, jnp.int32(index))
        return state, {**sums, "steps": jnp.asarray(count, jnp.float32)}

    def lower(self, state, split, order, first, count) -> _LoweredStepwiseLoop:
        del count
        return _LoweredStepwiseLoop(self.step.lower(state, zero_sums(), split, order, first))


@dataclasses.dataclass(frozen=True)
class _LoweredStepwiseLoop:
    lowered: Any

    def compile(self) -> StepwiseLoop:
        return StepwiseLoop(self.lowered.compile())


def make_eval_step(model, spec: InputSpec, mesh: Mesh, options=None):
    """(state, images, labels, mask) -> sums of loss, top-1 and top-5 hits over valid examples.

    options: as for make_train_step.
    """

    def eval_step(state: TrainState, images, labels, mask):
        logits = model.apply(model_variables(state), model_input(images, spec), train=False)
        return eval_sums(logits, labels, mask)

    batch = batch_sharded(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(replicated(mesh), batch, batch, batch),
        out_shardings=replicated(mesh),
        compiler_options=compiler_options() if options is None else options,
    )


def make_eval_loop(model, spec: InputSpec, mesh: Mesh, batch: int, options=None) -> Callable:
    """The jitted (state, split) -> sums (see eval_sums) over a whole DeviceSplit in one call, in
    batches of `batch` (global; the last one masked).

    options: as for make_train_step.
    """

    def eval_loop(state: TrainState, split: DeviceSplit):
        num_examples = split.labels.shape[0]
        variables = model_variables(state)

        def body(i, totals):
            rows = i * batch + jnp.arange(batch)
            valid = rows < num_examples
            rows = jax.lax.with_sharding_constraint(jnp.where(valid, rows, 0), batch_sharded(mesh))
            x = model_input(split.images[rows], spec)
            sums = eval_sums(model.apply(variables, x, train=False), split.labels[rows], valid)
            return jax.tree.map(jnp.add, totals, sums)

        zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}
        return jax.lax.fori_loop(0, -(-num_examples // batch), body, zeros)

    return jax.jit(
        eval_loop,
        in_shardings=(replicated(mesh), replicated(mesh)),
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
    loader.eval_batches(split, global_batch)."""

    def place(batch):
        return to_global(mesh, *batch)

    totals = None
    with contextlib.closing(loader.prefetch(batches, place)) as placed:
        for images, labels, valid in placed:
            sums = eval_step(state, images, labels, valid)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return eval_result(totals)


def eval_result(totals: dict) -> dict[str, float]:
    """Summed eval_sums -> top-1 / top-5 (%), mean loss and the example count."""
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": 100.0 * float(totals["top1"]) / count,
        "top5": 100.0 * float(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
        "examples": int(count),
    }
