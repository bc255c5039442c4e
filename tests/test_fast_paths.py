"""The CPU fast paths (experiments/RESULTS.md, issue 5) change speed, never results.

- dcff_jax.compiler_options: XLA:CPU without YNNPACK library fusions.
- models.common.residual_relu: a ReLU written so that XLA keeps each residual block's output.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from dcff_jax import compiler_options, create_model, input_pipeline, train
from dcff_jax.compiler_options import CPU_OPTIONS, LIBRARY_FUSION_OPTION
from dcff_jax.models import common, resnet_cifar


def test_compiler_options_on_cpu(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler_options() == CPU_OPTIONS
    # The user's own XLA_FLAGS setting wins: we then pass nothing.
    monkeypatch.setenv("XLA_FLAGS", f"--{LIBRARY_FUSION_OPTION}=LIBRARY_FUSION_TYPE_DOT")
    assert compiler_options() == {}


def test_compiler_options_turn_off_library_fusions():
    """XLA:CPU (jaxlib 0.10) emits YNNPACK fusions for a conv's gradient; with our options, none."""
    conv = nn.Conv(8, (3, 3))
    x = jnp.ones((4, 16, 16, 8))
    params = conv.init(jax.random.key(0), x)

    def loss(p):
        return jnp.sum(conv.apply(p, x) ** 2)

    lowered = jax.jit(jax.grad(loss)).lower(params)
    if "__ynn_fusion" not in lowered.compile().as_text():
        pytest.skip("this jaxlib's XLA:CPU does not use YNNPACK fusions by default")
    assert "__ynn_fusion" not in lowered.compile(compiler_options()).as_text()


def _one_step(options: dict, arch: str, cprate: str):
    """One train step of a fused model compiled with `options`: its loss and param updates."""
    model = create_model(arch, cprate, "fused")
    tx = optax.sgd(0.1)
    mesh = train.make_mesh()
    data = input_pipeline.Data(
        None, None, input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, True
    )
    state = train.create_train_state(model, tx, 32, 0, mesh)
    step = train.make_train_step(model, tx, data, 0, jnp.float32, mesh, options)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (8,)).astype(np.int32)
    before = jax.device_get(state.params)
    state, metrics = step(state, *train.to_global(mesh, images, labels))
    updates = jax.tree.map(lambda new, old: new - old, jax.device_get(state.params), before)
    return float(metrics["loss"]), updates


@pytest.mark.parametrize(
    "arch,cprate", [("vgg16", "[0.5]*7+[0.8]*6"), ("resnet56", "[0.5]*27+[0.3]*3")]
)
def test_train_step_numerics_match_xla_defaults(arch, cprate):
    fast_loss, fast_updates = _one_step(compiler_options(), arch, cprate)
    base_loss, base_updates = _one_step({}, arch, cprate)
    assert fast_loss == pytest.approx(base_loss, rel=1e-5)
    for fast, base in zip(jax.tree.leaves(fast_updates), jax.tree.leaves(base_updates)):
        # (+1e-6: conv biases before a batch norm get a zero gradient up to rounding)
        assert np.linalg.norm(fast - base) <= 1e-3 * np.linalg.norm(base) + 1e-6


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
