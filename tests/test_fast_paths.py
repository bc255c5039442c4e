"""The CPU fast paths (experiments/RESULTS.md, issue 5) change speed, never results.

- dcff_jax.compiler_options: XLA:CPU with YNNPACK library fusions for reductions only.
- models.common.residual_relu: a ReLU written so that XLA keeps each residual block's output.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from dcff_jax import compiler_options, create_model, steps
from dcff_jax.input_pipeline import CIFAR_MEAN, CIFAR_STD
from dcff_jax.models import common, resnet_cifar
from dcff_jax.xla_options import CPU_OPTIONS, LIBRARY_FUSION_OPTION


def test_compiler_options_on_cpu(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler_options() == CPU_OPTIONS
    # The user's own XLA_FLAGS setting wins: we then pass nothing.
    monkeypatch.setenv("XLA_FLAGS", f"--{LIBRARY_FUSION_OPTION}=LIBRARY_FUSION_TYPE_DOT")
    assert compiler_options() == {}


def _library_fusion_bodies(hlo: str) -> list[str]:
    """The fused computations that a compiled HLO text hands to YNNPACK."""
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^%([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M)
    }
    return [
        bodies[re.search(r"calls=%([\w.\-]+)", line).group(1)]
        for line in hlo.splitlines()
        if "kind=kCustom" in line and "ynn" in line
    ]


def test_compiler_options_keep_only_library_reductions():
    """XLA:CPU (jaxlib 0.10) hands a ResNet gradient's convolutions, dots and reductions to
    YNNPACK; with our options only the reductions (each library fusion contains a reduce, none a
    convolution or dot)."""
    model = resnet_cifar.CifarResNet((0.0,) * 7, 1, "compact")
    x = jnp.ones((4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2)

    lowered = jax.jit(jax.grad(loss)).lower(variables["params"])
    defaults = _library_fusion_bodies(lowered.compile().as_text())
    if not any("convolution(" in body for body in defaults):
        pytest.skip("this jaxlib's XLA:CPU does not hand convolutions to YNNPACK by default")
    ours = _library_fusion_bodies(lowered.compile(compiler_options()).as_text())
    assert ours, "reductions should stay with YNNPACK"
    for body in ours:
        assert " reduce(" in body and "convolution(" not in body and " dot(" not in body, body


def _float_leaves_to(dtype):
    def cast(x):
        x = np.asarray(x)
        return jnp.asarray(x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x)

    return lambda tree: jax.tree.map(cast, tree)


@functools.cache
def _initial_state(arch: str, cprate: str):
    """A fused model's initial train state (float32, on the host) and its step's pieces."""
    model = create_model(arch, cprate, "fused")
    tx = optax.sgd(0.1)
    state = steps.create_train_state(model, tx, 32, 0, steps.make_mesh())
    return model, tx, jax.device_get(state)


def _one_step(options: dict, arch: str, cprate: str, dtype=jnp.float32):
    """One train step compiled with `options`, computed in `dtype`: (loss, updates as float64).

    The initial state, batch and augmentation are the same for every dtype (drawn in float32,
    then widened), so float64 measures the float32 paths' rounding error.
    """
    model, tx, host_state = _initial_state(arch, cprate)
    mesh = steps.make_mesh()
    with jax.enable_x64(dtype == jnp.float64):
        state = _float_leaves_to(dtype)(host_state)
        spec = steps.InputSpec(CIFAR_MEAN, CIFAR_STD, augment=True, dtype=dtype)
        step = steps.make_train_step(model, tx, spec, mesh, 0, options)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, (8,)).astype(np.int32)
        state, metrics = step(state, *steps.to_global(mesh, images, labels))
        new_params = jax.device_get(state.params)
    updates = jax.tree.map(
        lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64),
        new_params,
        host_state.params,
    )
    return float(metrics["loss"]), np.concatenate([u.ravel() for u in jax.tree.leaves(updates)])


# Unit roundoff of float32.
U32 = 2.0**-24


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,cprate", [("vgg16", "[0.5]*7+[0.8]*6"), ("resnet56", "[0.5]*27+[0.3]*3")]
)
def test_train_step_with_our_options_is_as_accurate_as_xla_defaults(arch, cprate):
    """Our compile options change how XLA:CPU sums, never how accurately: one fused train step,
    with our options and with XLA's defaults, each measured against the same step in float64.

    Bound: two float32 paths that differ only in summation order (blocking, threads) have
    rounding errors of the same order; we allow 8x. A path that loses accuracy exceeds it by far:
    bfloat16 or TF32 arithmetic by ~2^15 or ~2^13, and XLA:CPU's own reduction emitter (what our
    options gave before they kept YNNPACK's reductions) measured 3500x on ResNet-56's update,
    through the cancellation in batch-norm gradients (experiments/RESULTS.md). The loss gets a
    floor of 64 ulps of itself, for the case where the defaults happen to round almost exactly.
    """
    loss64, updates64 = _one_step({}, arch, cprate, jnp.float64)
    fast_loss, fast_updates = _one_step(compiler_options(), arch, cprate)
    base_loss, base_updates = _one_step({}, arch, cprate)

    def error(updates):
        return np.linalg.norm(updates - updates64) / np.linalg.norm(updates64)

    assert error(fast_updates) <= 8 * error(base_updates), (
        error(fast_updates),
        error(base_updates),
    )
    floor = 64 * U32 * abs(loss64)
    assert abs(fast_loss - loss64) <= 8 * max(abs(base_loss - loss64), floor)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residual_relu_values_and_gradients_equal_relu(dtype):
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(2, 4, 4, 6)), dtype)
    shortcut = jnp.asarray(rng.normal(size=(2, 4, 4, 6)), dtype)
    # Exact ties at zero, where a max-reduction's derivative would differ from relu's.
    y = y.at[0, 0, 0].set(0).at[1, 1, 1].set(-shortcut[1, 1, 1])
    shortcut = shortcut.at[0, 0, 0].set(0)
    assert int(jnp.sum(y + shortcut == 0)) >= 12
    out = common.residual_relu(y, shortcut)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, nn.relu(y + shortcut))
    weights = jnp.asarray(rng.normal(size=y.shape), dtype)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * weights)

    got = jax.grad(loss(common.residual_relu), argnums=(0, 1))(y, shortcut)
    want = jax.grad(loss(lambda a, b: nn.relu(a + b)), argnums=(0, 1))(y, shortcut)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # Forward-mode too (jvp), since residual_relu is a custom_jvp.
    _, tangent = jax.jvp(common.residual_relu, (y, shortcut), (weights, weights))
    np.testing.assert_array_equal(tangent, jnp.where(y + shortcut > 0, 2 * weights, 0))


def _max_fusion_operands(blocks_per_stage: int) -> int:
    """The most operands of any fusion in the compiled gradient of a compact CIFAR ResNet."""
    model = resnet_cifar.CifarResNet(
        (0.0,) * (1 + 6 * blocks_per_stage), blocks_per_stage, "compact"
    )
    x = jnp.ones((4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2)

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile(compiler_options()).as_text()
    fusions = re.finditer(r"= \S+ fusion\((.*?)\), kind=", hlo)
    return max(len(re.findall(r"%[\w.\-]+", m.group(1))) for m in fusions)


def test_backward_does_not_recompute_the_residual_chain():
    """With nn.relu, XLA fuses each block's whole chain of BN-add-ReLU producers into the backward
    (fusions grow with depth: 19 -> 34 operands from 1 to 4 blocks per stage); residual_relu keeps
    them flat."""
    shallow, deep = _max_fusion_operands(1), _max_fusion_operands(4)
    assert deep <= shallow + 3, (shallow, deep)
