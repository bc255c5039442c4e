"""Building blocks shared by every architecture.

Each architecture is written once, at its published widths, with plain convs (`conv`); its fused
and compact forms are dcff_jax.DCFF's rewrites of it (dcff_jax.models.paper_dcff). For your own
models, `prunable_conv(variant, ...)` gives one layer in any of three variants:
  - "original": a plain nn.Conv with all c_out filters (the unpruned baseline),
  - "fused":    a FusedConv holding c_out filters and computing m = keep_width(c_out, rate),
  - "compact":  a plain nn.Conv with m filters (the exported network).
The module name is the same in every variant, so a fused model's variables map one to one onto
the compact model's (see dcff_jax.deploy.compact).

The pooling modules below exist so that FLOPs can be counted from the model itself: thop, which
the paper used, counts a pool by how the published model wrote it (see dcff_jax.flops).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from dcff_jax.method.layers import Conv, Dense, FusedConv, torch_default_bias, uniform
from dcff_jax.method.rate_strings import keep_width

VARIANTS = ("original", "fused", "compact")

# Initialisers, as the published models (and torchvision's MobileNetV2) use them.
# PyTorch's kaiming_normal_ (untruncated normal, gain sqrt(2)).
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_uniform():
    """PyTorch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)), which is
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in is the product of every kernel axis but the last
    (output) one, as PyTorch counts it (kh * kw * c_in / groups)."""

    def init(key, shape, dtype=jnp.float32):
        return uniform(1.0 / math.sqrt(math.prod(shape[:-1])))(key, shape, dtype)

    return init


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def width(variant: str, filters: int, rate: float) -> int:
    """Output width of a conv with `filters` filters pruned at `rate` in this variant."""
    check_variant(variant)
    return filters if variant == "original" else keep_width(filters, rate)


def conv(filters: int, kernel_size: int, **fields) -> nn.Conv:
    """A square conv as the published models write nn.Conv2d (see `conv_fields`)."""
    return Conv(features=filters, **conv_fields(kernel_size, **fields))


def conv_fields(
    kernel_size: int,
    *,
    strides: int = 1,
    padding: int = 0,
    use_bias: bool = False,
    kernel_init=None,
    bias_init=torch_default_bias,
    dtype=None,
    name: str | None = None,
) -> dict:
    """nn.Conv's fields for a PyTorch-style conv: an int padding p pads p on each side; init
    defaults to PyTorch's Conv2d defaults (weights and bias U(+-1/sqrt(fan_in))), which the
    published VGG-16 and GoogLeNet keep."""
    return dict(
        kernel_size=(kernel_size, kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_init=kernel_init or torch_default_uniform(),
        bias_init=bias_init,
        dtype=dtype,
        name=name,
    )


def prunable_conv(variant: str, filters: int, rate: float, kernel_size: int, **fields):
    """The conv of one prunable layer in the given variant (see the module docstring): `filters`
    outputs ("original"), keep_width(filters, rate) ("compact"), or a FusedConv fusing `filters`
    filters into that many ("fused"). fields: `conv_fields`'."""
    check_variant(variant)
    fields = conv_fields(kernel_size, **fields)
    if variant == "fused":
        return FusedConv(features=filters, kept=keep_width(filters, rate), **fields)
    return Conv(features=width(variant, filters, rate), **fields)


def batch_norm(train: bool, dtype=None, name: str | None = None) -> nn.BatchNorm:
    """PyTorch BatchNorm2d defaults: momentum 0.1 (Flax 0.9), eps 1e-5, scale 1, bias 0, and
    its unbiased running variance (BatchNorm)."""
    return BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm whose running variance takes in the batch variance unbiased, x n / (n - 1)
    with n the elements per channel, as torch.nn.BatchNorm2d does (Flax takes it biased: 7.6e-6
    relative at CIFAR-10's batch 128 on 32x32 maps, 1.2e-4 on 8x8 ones). The same class name,
    so parameter paths and isinstance checks are nn.BatchNorm's."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, **kwargs):
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if running or self.is_initializing():  # no update to correct
            return super().__call__(x, use_running_average, **kwargs)
        old = self.get_variable("batch_stats", "var")
        y = super().__call__(x, use_running_average, **kwargs)
        n = x.size // x.shape[-1]
        kept = self.momentum * old
        # Flax's update is kept + (1 - momentum) * biased: rescale its new part.
        new = self.get_variable("batch_stats", "var")
        self.put_variable("batch_stats", "var", kept + (new - kept) * (n / (n - 1)))
        return y


@jax.custom_jvp
def residual_relu(y: jax.Array, shortcut: jax.Array) -> jax.Array:
    """relu(y + shortcut), the end of a residual block; any shape. Same values and gradient.

    Why not nn.relu: in the backward pass XLA:CPU re-derives each block's output, which a
    weight-gradient conv needs transposed, by fusing the whole chain of elementwise
    BN-add-ReLU producers back to the stage's first block: O(depth^2) work, 43% of a ResNet-56
    step's op time (experiments/RESULTS.md). So when differentiated (the JVP rule below) the
    output is computed by `_materialised_relu`. A forward pass alone (inference, evaluation,
    exports) has no backward to protect and runs this plain ReLU, which XLA fuses with the BN
    and the add into one pass; the stacked form costs a 2x-sized buffer and a reduction per
    block (half of a ResNet-56's inference time on XLA:CPU, experiments/RESULTS.md).
    """
    return jnp.maximum(y + shortcut, 0)


def _materialised_relu(summed: jax.Array) -> jax.Array:
    """relu(summed) as a max over a stacked zero: XLA never duplicates a reduction into a
    consumer, so the result stays a buffer that later ops (the backward pass) read."""
    return jnp.max(jnp.stack([summed, jnp.zeros_like(summed)]), axis=0)


@residual_relu.defjvp
def _residual_relu_jvp(primals, tangents):
    out = _materialised_relu(primals[0] + primals[1])
    # relu's derivative (0 at 0, where a max-reduction's would split the tie), masked by the
    # output so the backward pass reads the materialised buffer too.
    return out, jnp.where(out > 0, tangents[0] + tangents[1], 0).astype(out.dtype)


class AvgPool(nn.Module):
    """nn.AvgPool2d(window, stride) as the published models use it; NHWC."""

    window: int
    stride: int = 1

    def __call__(self, x):
        return nn.avg_pool(x, (self.window, self.window), (self.stride, self.stride))


class GlobalAvgPool(nn.Module):
    """Mean over H and W: (N, H, W, C) -> (N, C).

    counted: whether thop sees it (a module in the published model, not a function call).
    """

    counted: bool = True

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


class MaxPool(nn.Module):
    """nn.MaxPool2d(window, stride, padding) with -inf padding; NHWC."""

    window: int
    stride: int
    padding: int = 0

    def __call__(self, x):
        pad = ((self.padding, self.padding),) * 2
        return nn.max_pool(x, (self.window, self.window), (self.stride, self.stride), pad)


def dense(
    features: int, kernel_init=None, bias_init=torch_default_bias, dtype=None, name=None
) -> nn.Dense:
    """A classifier layer; PyTorch's default Linear init (weights and bias U(+-1/sqrt(fan_in)))
    unless others are given."""
    return Dense(
        features,
        kernel_init=kernel_init or torch_default_uniform(),
        bias_init=bias_init,
        dtype=dtype,
        name=name,
    )
