"""Hand-written oracle (see __init__), as in dcff_jax/models before issue 24.

ResNet-50 for ImageNet (published models/imagenet/resnet.py): Bottlenecks, stride on conv2.

Layer-wise rates: [stem, then conv1, conv2, conv3 of each of the 16 blocks]. The downsample is a
plain (never fused) 1x1 conv + BN at compact widths: its output width is the stage's conv3 width.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from dcff_jax.method.rate_strings import RESNET50_BLOCKS
from dcff_jax.models import common
from dcff_jax.models.resnet_imagenet import EXPANSION, STAGE_PLANES


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride) - 1x1 (x4) + shortcut. (N, H, W, c_in) -> (N, H/s, W/s, c_out)."""

    planes: int
    rates: tuple[float, float, float]
    strides: int
    downsample: bool
    variant: str
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        init = dict(kernel_init=common.kaiming_normal_fan_out, dtype=self.dtype)
        y = common.prunable_conv(self.variant, self.planes, self.rates[0], 1, name="conv1", **init)(
            x
        )
        y = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(y))
        y = common.prunable_conv(
            self.variant,
            self.planes,
            self.rates[1],
            3,
            strides=self.strides,
            padding=1,
            name="conv2",
            **init,
        )(y)
        y = nn.relu(common.batch_norm(train, self.dtype, name="bn2")(y))
        out_filters = EXPANSION * self.planes
        y = common.prunable_conv(self.variant, out_filters, self.rates[2], 1, name="conv3", **init)(
            y
        )
        y = common.batch_norm(train, self.dtype, name="bn3")(y)
        shortcut = x
        if self.downsample:
            shortcut = nn.Conv(
                common.width(self.variant, out_filters, self.rates[2]),
                (1, 1),
                strides=self.strides,
                padding=0,
                use_bias=False,
                name="downsample_conv",
                **init,
            )(x)
            shortcut = common.batch_norm(train, self.dtype, name="downsample_bn")(shortcut)
        return common.residual_relu(y, shortcut)


class ImageNetResNet(nn.Module):
    """ResNet-50. Input (N, 224, 224, 3) -> logits (N, num_classes)."""

    layer_rates: Sequence[float]
    variant: str = "fused"
    blocks: Sequence[int] = RESNET50_BLOCKS
    num_classes: int = 1000
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        rates = tuple(self.layer_rates)
        x = common.prunable_conv(
            self.variant,
            64,
            rates[0],
            7,
            strides=2,
            padding=3,
            kernel_init=common.kaiming_normal_fan_out,
            dtype=self.dtype,
            name="conv1",
        )(x)
        x = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(x))
        x = common.MaxPool(3, 2, 1)(x)
        conv_id, in_filters = 1, 64
        for stage, (planes, blocks) in enumerate(zip(STAGE_PLANES, self.blocks, strict=True)):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(
                    planes,
                    rates[conv_id : conv_id + 3],
                    strides,
                    downsample=block == 0 and (strides != 1 or in_filters != EXPANSION * planes),
                    variant=self.variant,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
                conv_id, in_filters = conv_id + 3, EXPANSION * planes
        x = common.AvgPool(7, 1)(x)
        x = x.reshape(x.shape[0], -1)
        return common.dense(self.num_classes, dtype=self.dtype, name="fc")(x)
