"""FusedConv: a Flax conv layer that keeps all c_out filters but computes with m fused ones."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from dcff_jax import fusion

PaddingLike = str | int | Sequence[int | tuple[int, int]]


def _pairs(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def _padding(padding: PaddingLike, n: int):
    """nn.Conv's padding forms: 'SAME'/'VALID', an int p (= (p, p) per spatial dim) or pairs."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


class FusedConv(nn.Module):
    """Conv whose m output channels are fusions of all `features` filters (DCFF).

    Params: "kernel" (kh, kw, c_in, features) and, with use_bias, "bias" (features,), all trainable.
    Collection "fusion" (not trainable, updated once per epoch by `dcff_jax.update_fusion`):
    "matrix" (kept, features), "scores" (features,), "kept" (kept,) int32.

    The output has `kept` channels: y = conv(x, kernel @ matrix^T) (+ matrix @ bias), so
    gradients reach every filter. Strides, padding, dtype as nn.Conv (padding int p means (p, p),
    PyTorch's convention); groups = 1. Before the first update the matrix holds the first `kept`
    identity rows, so the layer starts as a plain conv of the first `kept` filters.

    Input (N, H, W, c_in) -> output (N, H', W', kept).
    """

    features: int
    kept: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = _pairs(self.kernel_size, 2)
        kernel_shape = (*kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        initial = fusion.init_fusion_state(self.features, self.kept)
        matrix = self.variable(fusion.FUSION_COLLECTION, "matrix", lambda: initial["matrix"]).value
        self.variable(fusion.FUSION_COLLECTION, "scores", lambda: initial["scores"])
        self.variable(fusion.FUSION_COLLECTION, "kept", lambda: initial["kept"])

        # The fusion itself is float32 (float64 with float64 params); the conv runs in self.dtype.
        fusion_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
        fused_kernel = fusion.fuse_kernel(kernel.astype(fusion_dtype), matrix)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            fused_kernel.astype(dtype),
            window_strides=_pairs(self.strides, 2),
            padding=_padding(self.padding, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        if bias is not None:
            y = y + fusion.fuse_kernel(bias.astype(fusion_dtype), matrix).astype(dtype)
        return y
