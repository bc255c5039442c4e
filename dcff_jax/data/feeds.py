"""Where a run's training batches come from, and how its steps are grouped into calls.

Two feeds give the train loop the same global batch for every (seed, epoch, step):
  - DeviceFeed: the whole split lives on every device (CIFAR-10: 150 MB as uint8). The epoch's
    permutation is computed on the host exactly as loader.train_batches does and sent
    once per epoch (200 KB); each call runs up to `steps_per_call` steps in one jitted loop that
    gathers its batches on the device (steps.make_train_loop). No host work between steps.
  - HostFeed: batches loaded on the host (ImageNet decodes and crops there), placed on the
    devices by a prefetch thread, one step per call.

Call boundaries depend only on the step's place in its epoch (multiples of steps_per_call, the
epoch's last full step, its partial last batch on its own), so a run resumed from a checkpoint,
which is always taken at a boundary, groups its steps as an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcff_jax.data import loader, sources
from dcff_jax.training import steps

# Data placement (config.data_placement): "auto" puts a split on the devices when it is held in
# memory as arrays (CIFAR-10) and both splits together take at most this many bytes.
DEVICE_DATA_LIMIT = 2 << 30
PLACEMENTS = ("auto", "device", "host")
# config.steps_per_call = 0: this many steps per call on each platform. On a GPU or TPU a
# ResNet-56 call then takes ~0.5 s at 40,000 images/s (three calls per CIFAR-10 epoch at batch
# 256); on a CPU a step takes ~1 s already, and a call must end well within a preemption's
# grace period (often 30 s).
DEFAULT_STEPS_PER_CALL = {"cpu": 1}
ACCELERATOR_STEPS_PER_CALL = 65


def steps_per_call(config) -> int:
    """config.steps_per_call, or the platform's default when it is 0."""
    if config.steps_per_call > 0:
        return config.steps_per_call
    return DEFAULT_STEPS_PER_CALL.get(jax.default_backend(), ACCELERATOR_STEPS_PER_CALL)


def on_device(config, data: sources.Data) -> bool:
    """Whether config.data_placement (auto, device or host) puts this data on the devices."""
    from dcff_jax.errors import ConfigError

    in_memory = data.train.arrays is not None and data.test.arrays is not None
    if config.data_placement == "host":
        return False
    if config.data_placement == "device":
        if not in_memory:
            raise ConfigError(
                f"config.data_placement='device' needs a dataset held in memory as arrays "
                f"(cifar10, cifar10_folder), not {config.dataset}; use 'auto' or 'host'"
            )
        return True
    size = sum(a.nbytes for split in (data.train, data.test) for a in split.arrays or ())
    return in_memory and size <= DEVICE_DATA_LIMIT


def full_steps(steps_per_epoch: int, last_batch: int) -> int:
    """Steps of an epoch at the full batch size: all but the partial last batch's, if any."""
    return steps_per_epoch - (1 if last_batch else 0)


def call_length(step_in_epoch: int, full_steps: int, per_call: int) -> int:
    """Steps in the call that starts at `step_in_epoch`: up to the next multiple of `per_call`
    or the epoch's last full step; 1 for the partial last batch (at full_steps)."""
    if step_in_epoch >= full_steps:
        return 1
    return min((step_in_epoch // per_call + 1) * per_call, full_steps) - step_in_epoch


@dataclasses.dataclass
class DeviceFeed:
    """Batches gathered on the device from a replicated split; see the module docstring."""

    split: steps.DeviceSplit
    num_examples: int
    seed: int
    mesh: Any
    full_loop: Any  # compiled steps.make_train_loop at the global batch size
    last_loop: Any  # the same at the partial last batch's size, or None
    full_steps: int  # steps of an epoch at the full batch size
    per_call: int
    order: jax.Array | None = None

    @contextlib.contextmanager
    def epoch(self, epoch: int, first_step: int):
        del first_step
        order = loader.epoch_permutation(self.num_examples, self.seed, epoch)
        self.order = steps.place_replicated(self.mesh, order, np.int32)
        yield self

    def call(self, state, step_in_epoch: int, count: int):
        """`count` steps from `step_in_epoch`: (state, metric sums with "steps")."""
        loop = self.full_loop if step_in_epoch < self.full_steps else self.last_loop
        return loop(state, self.split, self.order, jnp.int32(step_in_epoch), jnp.int32(count))


def device_path(model, tx, spec, mesh, config, state, data, last_batch: int, steps_per_epoch: int):
    """The splits placed on the devices and every step function compiled now, for `state`'s
    shapes: (DeviceFeed, evaluate: state -> steps.eval_result).

    Three executables, compiled in parallel: the train loop at the global batch size, at the
    partial last batch's size (compiled now, so that it does not stall an epoch's end), and the
    eval loop over the whole test split."""
    train = steps.place_split(mesh, *data.train.arrays)
    test = steps.place_split(mesh, *data.test.arrays)
    order = steps.place_replicated(mesh, np.arange(data.train.num_examples), np.int32)

    def train_loop(batch):
        loop = steps.make_train_loop(
            model, tx, spec, mesh, batch, config.seed, stride=config.batch_size
        )
        return loop.lower(state, train, order, jnp.int32(0), jnp.int32(1))

    lowered = [steps.make_eval_loop(model, spec, mesh, config.batch_size).lower(state, test)]
    lowered += [train_loop(config.batch_size)] + ([train_loop(last_batch)] if last_batch else [])
    eval_loop, full_loop, *last_loop = compile_in_parallel(lowered)
    feed = DeviceFeed(
        split=train,
        num_examples=data.train.num_examples,
        seed=config.seed,
        mesh=mesh,
        full_loop=full_loop,
        last_loop=last_loop[0] if last_loop else None,
        full_steps=full_steps(steps_per_epoch, last_batch),
        per_call=steps_per_call(config),
    )
    return feed, lambda state: steps.eval_result(eval_loop(state, test))


def compile_in_parallel(lowered: list) -> list:
    """Compile jax.stages.Lowered computations in threads (XLA compiles outside the GIL)."""
    with ThreadPoolExecutor(max_workers=len(lowered)) as pool:
        return list(pool.map(lambda computation: computation.compile(), lowered))


@dataclasses.dataclass
class HostFeed:
    """Batches loaded on the host and placed by a prefetch thread; one step per call."""

    train: sources.Split
    batch: int
    seed: int
    steps_per_epoch: int
    last_batch: int
    mesh: Any
    train_step: Any  # steps.make_train_step
    full_steps: int
    per_call: int = 1
    _placed: Any = None

    @contextlib.contextmanager
    def epoch(self, epoch: int, first_step: int):
        batches = loader.train_batches(
            self.train,
            self.batch,
            self.seed,
            epoch,
            first_step,
            self.steps_per_epoch,
            self.last_batch,
        )

        def place(batch):
            return steps.to_global(self.mesh, *batch)

        with contextlib.closing(loader.prefetch(batches, place)) as placed:
            self._placed = placed
            try:
                yield self
            finally:
                self._placed = None

    def call(self, state, step_in_epoch: int, count: int):
        del step_in_epoch
        assert count == 1, count
        state, metrics = self.train_step(state, *next(self._placed))
        return state, {**metrics, "steps": jnp.float32(1)}
