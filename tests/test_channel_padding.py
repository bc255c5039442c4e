"""pad_channels: the same logits with every conv width a multiple of 8, on our architectures and on
hand-made functions that reach each rule (option-A channel pads, concats, flattens into a dense
layer, depthwise convs, an op that needs the real channels back)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import init_jitted, paper_config

from dcff_jax import models
from dcff_jax.deploy.channel_padding import conv_widths, pad_channels

# Padding adds exact zero products; what differs is the order in which a conv kernel blocks and
# sums the channels, i.e. float32 rounding (2^-24 relative) of each conv's sums, carried through
# at most ~110 layers: well under 1e-5 of the largest logit.
TOLERANCE = 1e-5


def primitive_counts(fn, x) -> dict:
    counts: dict = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            if eqn.primitive.name == "cond":  # a platform choice: its slices are the rewrite's
                continue
            for param in eqn.params.values():
                if hasattr(param, "jaxpr") and hasattr(param.jaxpr, "eqns"):
                    walk(param.jaxpr)

    walk(jax.make_jaxpr(fn)(x).jaxpr)
    return counts


def check_padded(fn, x, multiple=8):
    """The padded function's logits equal fn's; its convs are multiples; nothing was unpadded
    (no gather or channel slice beyond fn's own)."""
    padded = pad_channels(fn, multiple)
    want, got = jax.jit(fn)(x), jax.jit(padded)(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * float(jnp.abs(want).max()))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    widths = conv_widths(padded, spec)
    assert widths and all(w % multiple == 0 for w in widths), widths
    plain, wide = primitive_counts(fn, x), primitive_counts(padded, x)
    for op in ("gather", "slice"):
        assert wide.get(op, 0) == plain.get(op, 0), (op, plain, wide)
    return conv_widths(fn, spec), widths


def shifted_stats(variables):
    shift = jax.jit(lambda stats: jax.tree.map(lambda a: a + 0.1, stats))
    return {**variables, "batch_stats": shift(variables["batch_stats"])}


@pytest.mark.parametrize(
    "arch",
    [
        "resnet56",  # option-A channel pads meeting residual adds
        "vgg16",
        "googlenet",  # concats of padded branches
        pytest.param("resnet50", marks=pytest.mark.slow),  # projection shortcuts
        pytest.param("mobilenetv2", marks=pytest.mark.slow),  # depthwise convs follow
    ],
)
def test_our_compact_models_keep_their_logits_with_every_width_a_multiple_of_8(arch):
    model = models.create_model(arch, paper_config(arch).cprate, "compact")
    shape = models.input_shape(arch, 2)
    variables = shifted_stats(init_jitted(model, jnp.zeros((1, *shape[1:]))))
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    plain, padded = check_padded(lambda v: model.apply(variables, v, train=False), x)
    assert any(w % 8 for w in plain)  # the plan's widths needed padding
    assert all(p == -(-w // 8) * 8 for w, p in zip(plain, padded, strict=True))


class Handmade(nn.Module):
    """Every rule at once, at odd widths: a conv into an option-A channel pad meeting a residual
    add, a depthwise conv, a concat of two branches, a flatten of 2x2 positions into a dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(5, (3, 3))(x))
        y = nn.Conv(9, (3, 3))(x)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (2, 2))) + y  # 5 channels at 2..6 of 9
        x = nn.Conv(9, (3, 3), feature_group_count=9)(x)
        a, b = nn.Conv(3, (1, 1))(x), nn.Conv(6, (3, 3))(x)
        x = nn.max_pool(jnp.concatenate([a, b], axis=-1), (4, 4), (4, 4))
        x = nn.Conv(7, (1, 1))(x)
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_each_rule_keeps_the_values_and_the_channels_in_place():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
    model = Handmade()
    variables = model.init(jax.random.key(1), x)
    plain, padded = check_padded(lambda v: model.apply(variables, v), x)
    assert plain == [5, 9, 9, 3, 6, 7]
    assert padded == [8, 16, 16, 8, 8, 8]


def test_an_op_on_the_channel_axis_gets_the_real_channels():
    """A mean over channels must not average the padded zeros in: the real channels come back
    (a slice), and the result is still fn's."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 3)), jnp.float32)
    conv1, conv2 = nn.Conv(5, (3, 3)), nn.Conv(3, (3, 3))
    v1 = conv1.init(jax.random.key(0), x)
    v2 = conv2.init(jax.random.key(1), jnp.zeros((1, 6, 6, 5)))

    def fn(images):
        h = conv1.apply(v1, images)
        h = h - h.mean(axis=-1, keepdims=True)
        return conv2.apply(v2, h)

    padded = pad_channels(fn)
    want = jax.jit(fn)(x)
    np.testing.assert_allclose(
        jax.jit(padded)(x), want, rtol=0, atol=TOLERANCE * float(jnp.abs(want).max())
    )
    assert conv_widths(padded, jax.ShapeDtypeStruct(x.shape, x.dtype)) == [8, 8]
    assert primitive_counts(padded, x).get("slice", 0) >= 1


def test_padded_function_lowers_for_any_batch_size():
    model = models.create_model("resnet56", paper_config("resnet56").cprate, "compact")
    # Jitted, as the test above initialises the same model (one program, from the run's cache);
    # eagerly every op of the init and of the applies below compiled on its own.
    variables = shifted_stats(init_jitted(model, jnp.zeros((1, 32, 32, 3))))
    padded = pad_channels(lambda v: model.apply(variables, v, train=False))
    (batch,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(padded))(
        jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    )
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    for n in (1, 3):
        x = jnp.asarray(np.random.default_rng(n).standard_normal((n, 32, 32, 3)), jnp.float32)
        want = apply(variables, x)
        np.testing.assert_allclose(
            exported.call(x), want, rtol=0, atol=TOLERANCE * float(jnp.abs(want).max())
        )


def test_multiple_must_be_positive():
    with pytest.raises(ValueError, match="multiple"):
        pad_channels(jnp.negative, 0)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_convs_run_as_shifted_multiply_adds_on_cpu(stride):
    """XLA:CPU's depthwise convs are ~10x slower than the same sum written as kh * kw shifted
    multiply-adds: on CPU the padded function has no convolution left for them, and the
    values are the conv's."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, 9, 5)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(4).standard_normal((3, 3, 1, 5)), jnp.float32)

    def fn(images, k=kernel):
        return jax.lax.conv_general_dilated(
            images, k, (stride, stride), [(1, 1), (1, 1)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=5,
        )  # fmt: skip

    padded = pad_channels(fn)
    want = fn(x)
    got = jax.jit(padded)(x)
    assert got.shape == want.shape
    # The same 9 products summed in another order: each order is within 8 roundings (2^-24)
    # of the sum of |terms|, so two orders are within twice that.
    bound = 2 * 8 * 2.0**-24 * fn(jnp.abs(x), jnp.abs(kernel))
    assert bool(jnp.all(jnp.abs(got - want) <= bound))
    assert "convolution" not in jax.jit(padded).lower(x).as_text()
    assert "convolution" in jax.jit(fn).lower(x).as_text()


def test_a_named_value_keeps_its_padding():
    """checkpoint_name is an identity (jaxpr.walk.CHANNEL_RULE): the conv after a named value reads
    it padded, and no real channels are taken back for it."""
    from jax.ad_checkpoint import checkpoint_name

    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 6, 3)), jnp.float32)
    conv1, conv2 = nn.Conv(5, (3, 3)), nn.Conv(8, (3, 3))  # the output needs no slice back
    v1 = conv1.init(jax.random.key(0), x)
    v2 = conv2.init(jax.random.key(1), jnp.zeros((1, 6, 6, 5)))

    def fn(images):
        return conv2.apply(v2, checkpoint_name(jax.nn.relu(conv1.apply(v1, images)), "h"))

    plain, padded = check_padded(fn, x)
    assert (plain, padded) == ([5, 8], [8, 8])
