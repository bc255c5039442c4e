import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import U32, gamma

from dcff_jax import FusedConv
from dcff_jax.method import fusion


def init(layer, x):
    return layer.init(jax.random.key(0), x)


def test_output_has_kept_channels_and_state_shapes():
    x = jnp.ones((2, 8, 8, 3))
    layer = FusedConv(features=16, kept=6, kernel_size=(3, 3), padding=1)
    variables = init(layer, x)
    assert variables["params"]["kernel"].shape == (3, 3, 3, 16)
    assert variables["params"]["bias"].shape == (16,)
    assert variables["fusion"]["matrix"].shape == (6, 16)
    assert variables["fusion"]["scores"].shape == (16,)
    assert variables["fusion"]["kept"].dtype == jnp.int32
    assert layer.apply(variables, x).shape == (2, 8, 8, 6)


@pytest.mark.parametrize(
    "strides,padding,dilation",
    [(1, 1, 1), (2, 1, 1), (2, 0, 1), (1, "SAME", 1), (1, "VALID", 2), (2, ((2, 1), (0, 3)), 2)],
)
def test_equals_plain_conv_on_selected_filters(strides, padding, dilation):
    """With 0/1 fusion rows the fused kernel is the selected filters exactly, and every conv
    option is nn.Conv's own: the same conv, bit for bit."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
    conv = dict(strides=strides, padding=padding, kernel_dilation=dilation)
    layer = FusedConv(features=8, kept=3, kernel_size=(3, 3), **conv)
    variables = init(layer, x)
    kept = jnp.array([5, 0, 2], jnp.int32)
    variables["params"]["bias"] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    variables["fusion"]["matrix"] = jnp.eye(8)[kept]
    plain = nn.Conv(3, (3, 3), **conv)
    selected = {
        "kernel": variables["params"]["kernel"][..., kept],
        "bias": variables["params"]["bias"][kept],
    }
    got = jax.jit(layer.apply)(variables, x)
    np.testing.assert_array_equal(got, jax.jit(plain.apply)({"params": selected}, x))


def test_soft_fusion_is_conv_with_fused_kernel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, 2)), jnp.float32)
    layer = FusedConv(features=5, kept=2, kernel_size=(1, 1), use_bias=False)
    variables = init(layer, x)
    matrix = jnp.asarray(rng.random((2, 5)), jnp.float32)
    variables["fusion"]["matrix"] = matrix
    x64, w64, f64 = (np.asarray(a, np.float64) for a in (x, variables["params"]["kernel"], matrix))
    want = np.einsum("nhwi,ic,mc->nhwm", x64, w64[0, 0], f64)
    # Fused kernel: sums of 5 products; conv: sums of 2 products of it. Both in float32, in any
    # order: within gamma_5 + gamma_2 + gamma_5 gamma_2 <= gamma_8 of sum |x| |w| |f|, and the
    # result is rounded once more (u |y|).
    magnitude = np.einsum("nhwi,ic,mc->nhwm", np.abs(x64), np.abs(w64[0, 0]), f64)
    got = np.asarray(layer.apply(variables, x), np.float64)
    assert np.all(np.abs(got - want) <= gamma(8) * magnitude + U32 * np.abs(want))


def test_gradients_reach_every_filter():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32)
    layer = FusedConv(features=10, kept=4, kernel_size=(3, 3), padding=1)
    variables = init(layer, x)
    w = fusion.kernel_filters(variables["params"]["kernel"])
    state, _ = fusion.update_layer(w, fusion.init_fusion_state(10, 4), 1.0, "reference")
    variables["fusion"] = state

    def loss(params):
        return jnp.sum(layer.apply({"params": params, "fusion": variables["fusion"]}, x) ** 2)

    grads = jax.grad(loss)(variables["params"])
    per_filter = jnp.sum(jnp.abs(grads["kernel"]), axis=(0, 1, 2))
    assert per_filter.shape == (10,)
    assert bool(jnp.all(per_filter > 0)), per_filter
    assert bool(jnp.all(jnp.abs(grads["bias"]) > 0))


def test_bfloat16_compute_keeps_float32_params():
    x = jnp.ones((1, 4, 4, 3))
    layer = FusedConv(features=8, kept=4, kernel_size=(3, 3), padding=1, dtype=jnp.bfloat16)
    variables = init(layer, x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert variables["fusion"]["matrix"].dtype == jnp.float32
    assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_kept_larger_than_features_is_rejected():
    with pytest.raises(ValueError, match="kept width"):
        init(FusedConv(features=4, kept=5, kernel_size=(1, 1)), jnp.ones((1, 2, 2, 3)))
