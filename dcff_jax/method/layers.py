"""Conv and Dense layers: FusedConv (DCFF), and nn.Conv / nn.Dense that can take PyTorch's
default bias init."""

from __future__ import annotations

import math

import jax
from flax import linen as nn
from jax import numpy as jnp

from dcff_jax.method import fusion


def torch_default_bias(key, shape, dtype=jnp.float32):
    """PyTorch's default Conv2d/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    fan_in is the layer's (kh * kw * c_in / groups, or the Dense input width), which a Flax
    bias_init is not given: only the layers of this module (Conv, Dense, FusedConv) accept this
    marker, and they read fan_in from the kernel they created just before.
    """
    raise TypeError(
        "torch_default_bias needs the layer's fan_in: use it with dcff_jax.method.layers.Conv, "
        "Dense or FusedConv"
    )


def uniform(bound: float):
    """Init U(-bound, bound), any shape."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _TorchDefaultBias:
    """Resolves bias_init=torch_default_bias from the kernel's shape (mixin for Conv/Dense)."""

    def param(self, name, init_fn, *init_args, **init_kwargs):
        if init_fn is torch_default_bias:
            # nn.Conv and nn.Dense create the kernel before the bias; its every axis but the
            # last (outputs) is fan_in, as PyTorch counts it. Resolved in apply too: Flax
            # evaluates init_fn's shape against an existing param.
            kernel_shape = self.get_variable("params", "kernel").shape
            init_fn = uniform(1.0 / math.sqrt(math.prod(kernel_shape[:-1])))
        return super().param(name, init_fn, *init_args, **init_kwargs)


class Conv(_TorchDefaultBias, nn.Conv):
    """nn.Conv; bias_init may be torch_default_bias."""


class Dense(_TorchDefaultBias, nn.Dense):
    """nn.Dense; bias_init may be torch_default_bias."""


class FusedConv(Conv):
    """nn.Conv whose `kept` output channels are fusions of all `features` filters (DCFF).

    Everything but the kernel and bias is nn.Conv's own (strides, padding, dilation, dtypes,
    precision, initialisers), as big_vision's StdConv does for weight standardisation: this
    class only changes what `param` hands to the conv.

    Params: "kernel" (kh, kw, c_in, features) and, with use_bias, "bias" (features,), all
    trainable. Collection "fusion" (not trainable, updated once per epoch by
    `dcff_jax.update_fusion`): "matrix" (kept, features), "scores" (features,), "kept" (kept,)
    int32. The conv sees the fused kernel kernel @ matrix^T (kh, kw, c_in, kept) and bias
    matrix @ bias (kept,), so gradients reach every filter. The fusion is computed in float32
    (float64 with float64 params) whatever `dtype` the conv runs in. Before the first update
    the matrix holds the first `kept` identity rows: a plain conv of the first `kept` filters.

    Input (N, H, W, c_in) -> output (N, H', W', kept). kernel_size is a tuple, as for nn.Conv;
    groups, masks and unshared weights are not supported.
    """

    kept: int | None = None

    def param(self, name, init_fn, *init_args, **init_kwargs):
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == "kernel":
            self._check_supported()
            matrix = fusion_state(self, self.features, self.kept)
        elif name == "bias":
            matrix = self.get_variable(fusion.FUSION_COLLECTION, "matrix")
        else:
            return value
        return fused_param(value, matrix)

    def _check_supported(self):
        if self.kept is None:
            raise ValueError("FusedConv needs kept, the number of fused output channels")
        if self.feature_group_count != 1 or self.mask is not None or not self.shared_weights:
            raise NotImplementedError(
                "FusedConv supports feature_group_count=1, no mask and shared weights"
            )


def fusion_state(module: nn.Module, num_filters: int, kept: int) -> jax.Array:
    """A linen module's DCFF fusion state, created at init as `fusion.init_fusion_state` gives
    it: "matrix" (kept, num_filters), "scores" (num_filters,), "kept" (kept,) in the "fusion"
    collection. Returns the matrix."""
    initial = fusion.init_fusion_state(num_filters, kept)
    state = {
        name: module.variable(fusion.FUSION_COLLECTION, name, lambda name=name: initial[name])
        for name in ("matrix", "scores", "kept")
    }
    return state["matrix"].value


def fused_param(value: jax.Array, matrix: jax.Array) -> jax.Array:
    """The fused conv's kernel (kh, kw, c_in, kept) or bias (kept,) from all c filters' (..., c)
    and the (kept, c) matrix: every fused conv (FusedConv, the linen and nnx rewrites of
    dcff_jax.DCFF) computes its weights here, in float32 at least whatever the params' dtype."""
    return fusion.fuse_kernel(value.astype(jnp.promote_types(value.dtype, jnp.float32)), matrix)
