"""Hand-written oracle (see __init__), as in dcff_jax/models before issue 24.

GoogLeNet for CIFAR-10 (published models/cifar/googlenet.py): pre-layer + 9 Inception blocks.

Layer-wise rates: 64, one per conv in creation order: pre-layer, then per Inception
[b1 1x1, b2 1x1, b2 3x3, b3 1x1, b3 3x3, b3 3x3, b4 1x1]. Convs have bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from dcff_jax.models import common
from dcff_jax.models.googlenet import INCEPTIONS


class Inception(nn.Module):
    """Four branches, concatenated: (N, H, W, c_in) -> (N, H, W, sum of branch widths)."""

    filters: tuple[int, ...]
    rates: tuple[float, ...]  # 7, see the module docstring
    variant: str
    dtype: jax.typing.DTypeLike | None = None

    def conv_bn_relu(self, x, index: int, filters: int, kernel: int, train: bool):
        conv = common.prunable_conv(
            self.variant,
            filters,
            self.rates[index],
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

    layer_rates: Sequence[float]
    variant: str = "fused"
    num_classes: int = 10
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        rates = tuple(self.layer_rates)
        x = common.prunable_conv(
            self.variant,
            192,
            rates[0],
            3,
            padding=1,
            use_bias=True,
            dtype=self.dtype,
            name="pre_conv",
        )(x)
        x = nn.relu(common.batch_norm(train, self.dtype, name="pre_bn")(x))
        conv_id = 1
        for item in INCEPTIONS:
            if item == "M":
                x = common.MaxPool(3, 2, 1)(x)
                continue
            name, filters = item
            x = Inception(
                filters, rates[conv_id : conv_id + 7], self.variant, self.dtype, name=name
            )(x, train)
            conv_id += 7
        x = common.AvgPool(8, 1)(x)
        x = x.reshape(x.shape[0], -1)
        return common.dense(self.num_classes, dtype=self.dtype, name="linear")(x)
