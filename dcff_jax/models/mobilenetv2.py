"""MobileNetV2 for ImageNet, as torchvision defines it (width 1.0). The published code has none.

As torchvision: every conv Kaiming-normal (fan_out), BN scale 1 and bias 0, Dropout(0.2) before
the classifier, classifier weights N(0, 0.01) and bias 0.

Its rate string (dcff_jax.method.rate_strings, 25 rates): the 3x3 stem conv, each block's 1x1
expansion conv, one rate per stage for the 1x1 projection convs (a stage's blocks are chained by
residual adds, so their outputs keep one width, as ResNet-50's conv3s), and the last 1x1 conv
(1280). Depthwise 3x3 convs are never fused: each follows the compact width of the expansion conv
before it.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from dcff_jax.method.rate_strings import MOBILENETV2_STAGES
from dcff_jax.models import common

LAST_FILTERS = 1280
DROPOUT_RATE = 0.2


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN (+ x when shapes allow)."""

    expansion: int
    in_filters: int
    out_filters: int
    strides: int
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        conv = dict(kernel_init=common.kaiming_normal_fan_out, dtype=self.dtype)
        y = x
        if self.expansion != 1:
            y = common.conv(self.expansion * self.in_filters, 1, name="expand", **conv)(y)
            y = nn.relu6(common.batch_norm(train, self.dtype, name="expand_bn")(y))
        channels = y.shape[-1]
        y = nn.Conv(
            channels,
            (3, 3),
            strides=self.strides,
            padding=1,
            feature_group_count=channels,
            use_bias=False,
            name="depthwise",
            **conv,
        )(y)
        y = nn.relu6(common.batch_norm(train, self.dtype, name="depthwise_bn")(y))
        y = common.conv(self.out_filters, 1, name="project", **conv)(y)
        y = common.batch_norm(train, self.dtype, name="project_bn")(y)
        if self.strides == 1 and self.in_filters == self.out_filters:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """Input (N, 224, 224, 3) -> logits (N, num_classes)."""

    num_classes: int = 1000
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = dict(kernel_init=common.kaiming_normal_fan_out, dtype=self.dtype)
        x = common.conv(32, 3, strides=2, padding=1, name="stem", **conv)(x)
        x = nn.relu6(common.batch_norm(train, self.dtype, name="stem_bn")(x))
        in_filters, index = 32, 0
        for expansion, out_filters, blocks, stride in MOBILENETV2_STAGES:
            for block in range(blocks):
                x = InvertedResidual(
                    expansion,
                    in_filters,
                    out_filters,
                    stride if block == 0 else 1,
                    self.dtype,
                    name=f"block{index}",
                )(x, train)
                in_filters, index = out_filters, index + 1
        x = common.conv(LAST_FILTERS, 1, name="last", **conv)(x)
        x = nn.relu6(common.batch_norm(train, self.dtype, name="last_bn")(x))
        # torchvision pools with F.adaptive_avg_pool2d, which thop does not count.
        x = common.GlobalAvgPool(counted=False)(x)
        # Dropout draws from the "dropout" rng stream, which the train step provides.
        x = nn.Dropout(DROPOUT_RATE, deterministic=not train)(x)
        return common.dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="classifier",
        )(x)
