"""Hand-written oracle (see __init__), as in dcff_jax/models before issue 24.

ResNet-56/110 for CIFAR-10 (published models/cifar/resnet.py): BasicBlocks, option-A shortcuts.

Init as published: convs and the classifier's weights Kaiming-normal (fan_in); the classifier's
bias keeps PyTorch's default, BN scale 1 and bias 0.

Layer-wise rates (see dcff_jax.method.rate_strings): [stem, block0.conv1, block0.conv2,
block1.conv1, ...].
A block's input width is whatever the previous layer produced; its output width is its conv2's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from dcff_jax.models import common
from dcff_jax.models.resnet_cifar import STAGE_WIDTHS, pad_or_crop_channels


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. (N, H, W, c_in) -> (N, H/s, W/s, c_out)."""

    planes: int
    rates: tuple[float, float]
    strides: int
    variant: str
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        conv = dict(padding=1, kernel_init=common.kaiming_normal_fan_in, dtype=self.dtype)
        y = common.prunable_conv(
            self.variant, self.planes, self.rates[0], 3, strides=self.strides, name="conv1", **conv
        )(x)
        y = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(y))
        y = common.prunable_conv(self.variant, self.planes, self.rates[1], 3, name="conv2", **conv)(
            y
        )
        y = common.batch_norm(train, self.dtype, name="bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != y.shape[-1]:
            # lax.slice, not x[:, ::s, ::s]: with a symbolic batch (jax.export) indexing becomes
            # a gather, which the exports would carry instead of a strided slice.
            subsampled = jax.lax.slice(x, (0,) * 4, x.shape, (1, self.strides, self.strides, 1))
            shortcut = pad_or_crop_channels(subsampled, y.shape[-1])
        return common.residual_relu(y, shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. Input (N, 32, 32, 3) -> logits (N, num_classes)."""

    layer_rates: Sequence[float]
    blocks_per_stage: int
    variant: str = "fused"
    num_classes: int = 10
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        rates = self.layer_rates
        x = common.prunable_conv(
            self.variant,
            STAGE_WIDTHS[0],
            rates[0],
            3,
            padding=1,
            kernel_init=common.kaiming_normal_fan_in,
            dtype=self.dtype,
            name="conv1",
        )(x)
        x = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(x))
        conv_id = 1
        for stage, planes in enumerate(STAGE_WIDTHS):
            for block in range(self.blocks_per_stage):
                x = BasicBlock(
                    planes,
                    (rates[conv_id], rates[conv_id + 1]),
                    strides=2 if stage > 0 and block == 0 else 1,
                    variant=self.variant,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
                conv_id += 2
        # The published original model pools with F.avg_pool2d, which thop does not count
        # (Architecture.original_uncounted), its compact model with a module, which it does.
        x = common.GlobalAvgPool()(x)
        return common.dense(
            self.num_classes, kernel_init=common.kaiming_normal_fan_in, dtype=self.dtype, name="fc"
        )(x)
