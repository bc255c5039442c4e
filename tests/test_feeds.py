"""Device-resident data and many steps per call (dcff_jax.data.feeds, steps.make_train_loop)."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, write_cifar_folder

from dcff_jax import input_pipeline, models
from dcff_jax.data import feeds
from dcff_jax.training import checkpoints, optim, steps


def host_split(train=40, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, train).astype(np.int64)
    return input_pipeline.array_split(images, labels)


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 5), (3, 1)])
def test_device_batches_equal_the_host_paths_for_every_step(seed, epoch):
    """40 examples at batch 16: two full steps and the partial last one of 8. The device gather
    yields, bit for bit, the global batch the host path builds for the same (seed, epoch, step)."""
    split = host_split()
    mesh = steps.make_mesh()
    device = steps.place_split(mesh, *split.arrays)
    order = input_pipeline.epoch_permutation(split.num_examples, seed, epoch)
    order = steps.place_replicated(mesh, order, np.int32)
    host = list(input_pipeline.train_batches(split, 16, seed, epoch, 0, 3, last_batch=8))
    assert [len(labels) for _, labels in host] == [16, 16, 8]
    for step, (images, labels) in enumerate(host):
        gather = jax.jit(
            functools.partial(steps.gather_batch, batch=len(labels), mesh=mesh),
        )
        got_images, got_labels = gather(device, order, jnp.int32(step * 16))
        np.testing.assert_array_equal(np.asarray(got_images), images)
        np.testing.assert_array_equal(np.asarray(got_labels), labels)


def test_call_boundaries_depend_only_on_the_step_in_the_epoch():
    """195 full steps and a partial one at 65 per call: calls end at 65, 130, 195, and the
    partial step runs alone; a run resumed at any boundary, or mid-call after a preemption
    with another steps_per_call, ends its calls on multiples of its own per_call."""

    def calls(start, full, per_call):
        out, step = [], start
        while step <= full:
            out.append((step, feeds.call_length(step, full, per_call)))
            step += out[-1][1]
        return out

    assert calls(0, 195, 65) == [(0, 65), (65, 65), (130, 65), (195, 1)]
    assert calls(65, 195, 65) == [(65, 65), (130, 65), (195, 1)]
    assert calls(100, 195, 64) == [(100, 28), (128, 64), (192, 3), (195, 1)]
    assert calls(0, 4, 1) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]


def test_steps_per_call_defaults_by_platform_and_data_placement_is_chosen(tmp_path):
    config = tiny_config(write_cifar_folder(str(tmp_path), train=20, test=8))
    assert feeds.steps_per_call(config) == 1  # the tests run on the CPU
    config.steps_per_call = 7
    assert feeds.steps_per_call(config) == 7
    data = input_pipeline.load_data(config)
    assert feeds.on_device(config, data)  # auto: in-memory arrays
    config.data_placement = "host"
    assert not feeds.on_device(config, data)
    imagenet_like = input_pipeline.Data(
        dataclasses.replace(data.train, arrays=None), data.test, data.mean, data.std, False
    )
    config.data_placement = "auto"
    assert not feeds.on_device(config, imagenet_like)
    config.data_placement = "device"
    with pytest.raises(ValueError, match="needs a dataset held in memory"):
        feeds.on_device(config, imagenet_like)


@pytest.mark.parametrize("rolled", [True, False], ids=["fori_loop", "stepwise"])
def test_one_call_of_k_steps_equals_k_calls_of_one_bit_for_bit(tmp_path, rolled):
    """steps_per_call changes only how steps are grouped into calls: 3 steps in one call, and
    3 calls of one step, end in the same state bit for bit (one executable serves both: the
    loop's trip count is traced, or each step is its own call), and the metric sums add up."""
    config = tiny_config("", batch_size=8)
    split = host_split(train=24)
    mesh = steps.make_mesh()
    model = models.create_model(config.model, config.cprate, "fused")
    tx = optim.make_optimizer(config, 3)
    spec = steps.InputSpec(input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, True)
    loop = steps.make_train_loop(model, tx, spec, mesh, 8, seed=0, rolled=rolled)
    device = steps.place_split(mesh, *split.arrays)
    order = steps.place_replicated(mesh, input_pipeline.epoch_permutation(24, 0, 0), np.int32)

    def fresh():
        return steps.create_train_state(model, tx, 32, 0, mesh)

    one, sums = loop(fresh(), device, order, jnp.int32(0), jnp.int32(3))
    many, losses = fresh(), []
    for step in range(3):
        many, part = loop(many, device, order, jnp.int32(step), jnp.int32(1))
        losses.append(float(part["loss"]))
        assert float(part["steps"]) == 1
    assert int(one.step) == int(many.step) == 3 and float(sums["steps"]) == 3
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(sums["loss"]) == pytest.approx(sum(losses), rel=1e-6)
    assert len(set(losses)) == 3  # three different batches, not one repeated


def test_the_default_train_call_on_the_cpu_keeps_every_convolution_on_eigens_fast_path():
    """XLA:CPU canonicalizes convolutions for its Eigen kernels only in the entry computation;
    inside a loop body the backward ones would run as naive loops (15x slower). The default
    call on the CPU therefore has no loop around the step: every convolution of its compiled
    program, backward ones included, is in the entry computation."""
    config = tiny_config("", model="vgg16", cprate="[0.75]*13", batch_size=8)
    mesh = steps.make_mesh()
    model = models.create_model("vgg16", config.cprate, "fused")
    tx = optim.make_optimizer(config, 3)
    spec = steps.InputSpec(input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, True)
    split = steps.place_split(mesh, *host_split(train=16).arrays)
    order = steps.place_replicated(mesh, np.arange(16), np.int32)
    state = steps.create_train_state(model, tx, 32, 0, mesh)

    def convolutions(computation) -> dict[str, int]:
        """{"entry": n, "nested": m}: convolutions in the entry computation and elsewhere."""
        blocks = re.split(r"\n(?=\S)", computation.as_text())
        entry = sum(block.count(" convolution(") for block in blocks if block.startswith("ENTRY"))
        return {"entry": entry, "nested": computation.as_text().count(" convolution(") - entry}

    loop = steps.make_train_loop(model, tx, spec, mesh, 8, seed=0)
    assert isinstance(loop, steps.StepwiseLoop)
    compiled = loop.lower(state, split, order, jnp.int32(0), jnp.int32(1)).compile()
    # Forward and weight gradient of all 13 convs, input gradient of all but the first.
    assert convolutions(compiled.step) == {"entry": 3 * 13 - 1, "nested": 0}
    # What the rolled loop would compile here: the same convolutions, all in the loop's body.
    rolled = steps.make_train_loop(model, tx, spec, mesh, 8, seed=0, rolled=True)
    compiled = rolled.lower(state, split, order, jnp.int32(0), jnp.int32(1)).compile()
    assert convolutions(compiled) == {"entry": 0, "nested": 3 * 13 - 1}


def test_a_background_checkpoint_keeps_the_values_saved_while_the_next_calls_donate_them(
    tmp_path,
):
    """checkpoints.save(wait=False) returns before the files are written; the train loop then
    donates the state's buffers to its next call. The checkpoint holds the saved values."""
    mesh = steps.make_mesh()
    state = {"w": jnp.arange(4 << 20, dtype=jnp.float32), "step": jnp.int32(5)}
    best = {"w": jnp.full((3,), 7.0)}
    saved = jax.device_get(state)
    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    checkpoints.save(mngr, 5, state, {"best_top1": 1.0}, best=best, wait=False)
    for _ in range(3):
        state = bump(state)
    jax.block_until_ready(state)
    mngr.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=steps.replicated(mesh)), saved
    )
    abstract_best = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=steps.replicated(mesh)), best
    )
    restored, progress, restored_best = checkpoints.restore_latest(mngr, abstract, abstract_best)
    np.testing.assert_array_equal(np.asarray(restored["w"]), saved["w"])
    np.testing.assert_array_equal(np.asarray(restored_best["w"]), np.full((3,), 7.0))
    assert progress == {"best_top1": 1.0}
    # A checkpoint without the best item (as written before it existed) restores without it.
    checkpoints.save(mngr, 6, state, {"best_top1": 2.0})
    assert checkpoints.restore_latest(mngr, abstract, abstract_best)[2] is None
