"""The CIFAR ResNet-(6n+2) family (published models/cifar/resnet.py: ResNet-56/110; also 8, 20,
32 and 44): BasicBlocks, option-A shortcuts.

Init as published: convs and the classifier's weights Kaiming-normal (fan_in); the classifier's
bias keeps PyTorch's default, BN scale 1 and bias 0.

Its rate string (dcff_jax.method.rate_strings): one rate per block's conv1, then one per stage
shared by the stage's conv2s (and, for the first stage, the stem), which residual adds tie to one
width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dcff_jax.models import common

STAGE_WIDTHS = (16, 32, 64)


def pad_or_crop_channels(x: jax.Array, out_channels: int) -> jax.Array:
    """Option-A shortcut channels: zero-pad (diff // 2 before, the rest after), as F.pad does.

    A negative difference crops like F.pad with negative pads does in the published code (possible
    only with unusual rate strings where a later stage is narrower than the previous one).
    """
    diff = out_channels - x.shape[-1]
    before, after = diff // 2, diff - diff // 2
    x = x[..., max(0, -before) : x.shape[-1] - max(0, -after)]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (max(0, before), max(0, after))))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. (N, H, W, c_in) -> (N, H/s, W/s, c_out)."""

    planes: int
    strides: int
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        conv = dict(padding=1, kernel_init=common.kaiming_normal_fan_in, dtype=self.dtype)
        y = common.conv(self.planes, 3, strides=self.strides, name="conv1", **conv)(x)
        y = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(y))
        y = common.conv(self.planes, 3, name="conv2", **conv)(y)
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

    blocks_per_stage: int
    num_classes: int = 10
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = dict(padding=1, kernel_init=common.kaiming_normal_fan_in, dtype=self.dtype)
        x = common.conv(STAGE_WIDTHS[0], 3, name="conv1", **conv)(x)
        x = nn.relu(common.batch_norm(train, self.dtype, name="bn1")(x))
        for stage, planes in enumerate(STAGE_WIDTHS):
            for block in range(self.blocks_per_stage):
                x = BasicBlock(
                    planes,
                    strides=2 if stage > 0 and block == 0 else 1,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
        # The published original model pools with F.avg_pool2d, which thop does not count
        # (Architecture.original_uncounted), its compact model with a module, which it does.
        x = common.GlobalAvgPool()(x)
        return common.dense(
            self.num_classes, kernel_init=common.kaiming_normal_fan_in, dtype=self.dtype, name="fc"
        )(x)
