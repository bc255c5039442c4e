"""ResNet-50 for ImageNet (published models/imagenet/resnet.py): Bottlenecks, stride on conv2.

Its rate string (dcff_jax.method.rate_strings): the stem, each block's conv1 and conv2, then one
rate per stage shared by its conv3s and its downsample, a 1x1 conv + BN that is never fused but
trained at its stage's compact width (rate_strings.LAYOUTS["resnet50"].unfused).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from dcff_jax.method.rate_strings import RESNET50_BLOCKS
from dcff_jax.models import common

EXPANSION = 4
STAGE_PLANES = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride) - 1x1 (x4) + shortcut. (N, H, W, c_in) -> (N, H/s, W/s, c_out)."""

    planes: int
    strides: int
    downsample: bool
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        init = dict(kernel_init=common.kaiming_normal_fan_out, dtype=self.dtype)
        y = common.conv(self.planes, 1, name="conv1", **init)(x)
        y = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(y))
        y = common.conv(self.planes, 3, strides=self.strides, padding=1, name="conv2", **init)(y)
        y = nn.relu(common.batch_norm(train, self.dtype, name="bn2")(y))
        out_filters = EXPANSION * self.planes
        y = common.conv(out_filters, 1, name="conv3", **init)(y)
        y = common.batch_norm(train, self.dtype, name="bn3")(y)
        shortcut = x
        if self.downsample:
            shortcut = common.conv(
                out_filters, 1, strides=self.strides, name="downsample_conv", **init
            )(x)
            shortcut = common.batch_norm(train, self.dtype, name="downsample_bn")(shortcut)
        return common.residual_relu(y, shortcut)


class ImageNetResNet(nn.Module):
    """ResNet-50. Input (N, 224, 224, 3) -> logits (N, num_classes)."""

    blocks: Sequence[int] = RESNET50_BLOCKS
    num_classes: int = 1000
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = dict(kernel_init=common.kaiming_normal_fan_out, dtype=self.dtype)
        x = common.conv(64, 7, strides=2, padding=3, name="conv1", **init)(x)
        x = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(x))
        x = common.MaxPool(3, 2, 1)(x)
        in_filters = 64
        for stage, (planes, blocks) in enumerate(zip(STAGE_PLANES, self.blocks, strict=True)):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(
                    planes,
                    strides,
                    downsample=block == 0 and (strides != 1 or in_filters != EXPANSION * planes),
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
                in_filters = EXPANSION * planes
        x = common.AvgPool(7, 1)(x)
        x = x.reshape(x.shape[0], -1)
        return common.dense(self.num_classes, dtype=self.dtype, name="fc")(x)
