"""GoogLeNet for CIFAR-10 (published models/cifar/googlenet.py): pre-layer + 9 Inception blocks.

Its rate string (dcff_jax.method.rate_strings): 64 rates, one per conv in call order: pre-layer,
then per Inception [b1 1x1, b2 1x1, b2 3x3, b3 1x1, b3 3x3, b3 3x3, b4 1x1]. Convs have bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dcff_jax.models import common

# (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) per Inception; "M" = 3x3/2 max-pool.
INCEPTIONS = (
    ("a3", (64, 96, 128, 16, 32, 32)),
    ("b3", (128, 128, 192, 32, 96, 64)),
    "M",
    ("a4", (192, 96, 208, 16, 48, 64)),
    ("b4", (160, 112, 224, 24, 64, 64)),
    ("c4", (128, 128, 256, 24, 64, 64)),
    ("d4", (112, 144, 288, 32, 64, 64)),
    ("e4", (256, 160, 320, 32, 128, 128)),
    "M",
    ("a5", (256, 160, 320, 32, 128, 128)),
    ("b5", (384, 192, 384, 48, 128, 128)),
)


class Inception(nn.Module):
    """Four branches, concatenated: (N, H, W, c_in) -> (N, H, W, sum of branch widths)."""

    filters: tuple[int, ...]
    dtype: jax.typing.DTypeLike | None = None

    def conv_bn_relu(self, x, index: int, filters: int, kernel: int, train: bool):
        conv = common.conv(
            filters,
            kernel,
            padding=kernel // 2,
            use_bias=True,
            dtype=self.dtype,
            name=f"conv{index}",
        )
        return nn.relu(common.batch_norm(train, self.dtype, name=f"bn{index}")(conv(x)))

    @nn.compact
    def __call__(self, x, train: bool):
        n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes = self.filters
        y1 = self.conv_bn_relu(x, 0, n1x1, 1, train)
        y2 = self.conv_bn_relu(self.conv_bn_relu(x, 1, n3x3red, 1, train), 2, n3x3, 3, train)
        y3 = self.conv_bn_relu(x, 3, n5x5red, 1, train)
        y3 = self.conv_bn_relu(self.conv_bn_relu(y3, 4, n5x5, 3, train), 5, n5x5, 3, train)
        y4 = self.conv_bn_relu(common.MaxPool(3, 1, 1)(x), 6, pool_planes, 1, train)
        return jnp.concatenate([y1, y2, y3, y4], axis=-1)


class GoogLeNet(nn.Module):
    """Input (N, 32, 32, 3) -> logits (N, num_classes)."""

    num_classes: int = 10
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = dict(padding=1, use_bias=True, dtype=self.dtype, name="pre_conv")
        x = common.conv(192, 3, **conv)(x)
        x = nn.relu(common.batch_norm(train, self.dtype, name="pre_bn")(x))
        for item in INCEPTIONS:
            if item == "M":
                x = common.MaxPool(3, 2, 1)(x)
                continue
            name, filters = item
            x = Inception(filters, self.dtype, name=name)(x, train)
        x = common.AvgPool(8, 1)(x)
        x = x.reshape(x.shape[0], -1)
        return common.dense(self.num_classes, dtype=self.dtype, name="linear")(x)
