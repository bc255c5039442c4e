"""Hand-written oracle (see __init__), as in dcff_jax/models before issue 24.

MobileNetV2 for ImageNet, as torchvision defines it (width 1.0). The published code has none.

As torchvision: every conv Kaiming-normal (fan_out), BN scale 1 and bias 0, Dropout(0.2) before
the classifier, classifier weights N(0, 0.01) and bias 0.

Plan rules (dcff_jax.method.rate_strings, 25 rates): the 3x3 stem conv, each block's 1x1 expansion
conv, one rate per stage for the 1x1 projection convs (a stage's blocks are chained by residual
adds, so their outputs must keep one width, as ResNet-50's conv3s), and the last 1x1 conv (1280).
Depthwise 3x3 convs are never fused (FusedConv is groups = 1): each follows the compact width of the
expansion conv before it, as ResNet-50's downsample follows its stage. Layer-wise order: [stem,
block0.project, block1.expand, block1.project, ..., last].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from dcff_jax.method.rate_strings import MOBILENETV2_STAGES
from dcff_jax.models import common
from dcff_jax.models.mobilenetv2 import DROPOUT_RATE, LAST_FILTERS


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN (+ x when shapes allow)."""

    expansion: int
    in_filters: int  # full width of the block input, which decides the residual as published
    out_filters: int
    strides: int
    rates: tuple[float, ...]  # (project,) for expansion 1, else (expand, project)
    variant: str
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        y = x
        if self.expansion != 1:
            hidden = self.expansion * self.in_filters
            y = common.prunable_conv(
                self.variant,
                hidden,
                self.rates[0],
                1,
                kernel_init=common.kaiming_normal_fan_out,
                dtype=self.dtype,
                name="expand",
            )(y)
            y = nn.relu6(common.batch_norm(train, self.dtype, name="expand_bn")(y))
        channels = y.shape[-1]
        y = nn.Conv(
            channels,
            (3, 3),
            strides=self.strides,
            padding=1,
            feature_group_count=channels,
            use_bias=False,
            kernel_init=common.kaiming_normal_fan_out,
            dtype=self.dtype,
            name="depthwise",
        )(y)
        y = nn.relu6(common.batch_norm(train, self.dtype, name="depthwise_bn")(y))
        y = common.prunable_conv(
            self.variant,
            self.out_filters,
            self.rates[-1],
            1,
            kernel_init=common.kaiming_normal_fan_out,
            dtype=self.dtype,
            name="project",
        )(y)
        y = common.batch_norm(train, self.dtype, name="project_bn")(y)
        if self.strides == 1 and self.in_filters == self.out_filters:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """Input (N, 224, 224, 3) -> logits (N, num_classes)."""

    layer_rates: Sequence[float]
    variant: str = "fused"
    num_classes: int = 1000
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        rates = tuple(self.layer_rates)
        conv = dict(kernel_init=common.kaiming_normal_fan_out, dtype=self.dtype)
        x = common.prunable_conv(
            self.variant, 32, rates[0], 3, strides=2, padding=1, name="stem", **conv
        )(x)
        x = nn.relu6(common.batch_norm(train, self.dtype, name="stem_bn")(x))
        conv_id, in_filters, index = 1, 32, 0
        for expansion, out_filters, blocks, stride in MOBILENETV2_STAGES:
            for block in range(blocks):
                n = 1 if expansion == 1 else 2
                x = InvertedResidual(
                    expansion,
                    in_filters,
                    out_filters,
                    stride if block == 0 else 1,
                    rates[conv_id : conv_id + n],
                    self.variant,
                    self.dtype,
                    name=f"block{index}",
                )(x, train)
                conv_id, in_filters, index = conv_id + n, out_filters, index + 1
        x = common.prunable_conv(
            self.variant, LAST_FILTERS, rates[conv_id], 1, name="last", **conv
        )(x)
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
