"""Models written the way Flax users write them, not for dcff-jax: the subjects of test_auto.

ResNet follows the structure of flax's examples/imagenet (module classes given
functools.partial(nn.Conv, use_bias=False) and a BatchNorm partial, bottleneck blocks, projection
shortcuts), written here from its description.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


class Bottleneck(nn.Module):
    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: tuple[int, ...] = (1, 2)
    num_filters: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = Bottleneck(self.num_filters * 2**i, conv, norm, nn.relu, strides)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class ConcatCNN(nn.Module):
    """Two branches concatenated, pools, a flatten into a dense classifier with dropout."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        a = nn.relu(nn.Conv(8, (1, 1), name="branch_a")(x))
        b = nn.relu(nn.Conv(12, (3, 3), name="branch_b")(x))
        x = nn.max_pool(jnp.concatenate([a, b], axis=-1), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3), name="conv_after")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(32, name="fc1")(x)))
        return nn.Dense(10, name="fc2")(x)


class SlicingCNN(nn.Module):
    """Convs DCFF cannot fuse: one whose channels are sliced, one that is the model's output."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="free")(x))
        y = nn.Conv(8, (3, 3), name="sliced")(x)[..., :4]
        return nn.Conv(10, (1, 1), name="head")(y).mean(axis=(1, 2))


class OwnConv(nn.Module):
    """A conv that is no nn.Conv: lax.conv_general_dilated on a kernel of its own."""

    features: int

    @nn.compact
    def __call__(self, x):
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


class UnrewritableCNN(nn.Module):
    """Three convs the rewriter must not fuse: `own` (no nn.Conv), `classes` (its channels are
    classes, averaged and arg-maxed over the channel axis) and `before_fixed` (read by a conv
    whose kernel is computed, not a parameter). `free` fuses."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(OwnConv(8, name="own")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="free")(x))
        x = nn.relu(nn.Conv(6, (3, 3), name="before_fixed")(x))
        fixed = jnp.ones((1, 1, x.shape[-1], 6), x.dtype) / x.shape[-1]
        x = jax.lax.conv_general_dilated(
            x, fixed, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        logits = nn.Conv(10, (1, 1), name="classes")(nn.Conv(8, (3, 3), name="last")(x))
        return jnp.argmax(logits.mean(axis=(1, 2)), axis=-1)


class SepBlock(nnx.Module):
    """Depthwise-separable: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU."""

    def __init__(self, cin: int, cout: int, rngs: nnx.Rngs, init=nnx.initializers.lecun_normal()):
        self.depthwise = nnx.Conv(
            cin, cin, (3, 3), feature_group_count=cin, use_bias=False, kernel_init=init, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(cin, rngs=rngs)
        self.pointwise = nnx.Conv(cin, cout, (1, 1), use_bias=False, kernel_init=init, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.depthwise(x)))
        return nnx.relu(self.bn2(self.pointwise(x)))


class SepNetLinen(nn.Module):
    """SepNet in linen, with the same widths and `kernel_init` for every conv and the head."""

    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(x):
            return nn.BatchNorm(use_running_average=not train)(x)

        x = nn.relu(
            bn(nn.Conv(16, (3, 3), strides=2, kernel_init=self.kernel_init, name="stem")(x))
        )
        for cin, cout in ((16, 32), (32, 32)):
            x = nn.Conv(
                cin, (3, 3), feature_group_count=cin, use_bias=False, kernel_init=self.kernel_init
            )(x)
            x = nn.relu(bn(x))
            x = nn.relu(bn(nn.Conv(cout, (1, 1), use_bias=False, kernel_init=self.kernel_init)(x)))
        return nn.Dense(10, kernel_init=self.kernel_init, name="head")(x.mean(axis=(1, 2)))


class SepNet(nnx.Module):
    """`init`: every conv's and the head's kernel initialiser (nnx's default: lecun_normal)."""

    def __init__(self, rngs: nnx.Rngs, num_classes: int = 10, init=nnx.initializers.lecun_normal()):
        self.stem = nnx.Conv(3, 16, (3, 3), strides=2, kernel_init=init, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.blocks = nnx.List([SepBlock(16, 32, rngs, init), SepBlock(32, 32, rngs, init)])
        self.head = nnx.Linear(32, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


class NormsAndGates(nn.Module):
    """LayerNorm over channels (fusable), GroupNorm (its groups fix the channel blocks), and a
    squeeze-and-excitation gate made by dense layers (fixed width, multiplied into the conv)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.LayerNorm()(nn.Conv(16, (3, 3), name="layer_norm")(x)))
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3), name="group_norm")(x)))
        y = nn.Conv(16, (3, 3), name="gated")(x)
        gate = nn.sigmoid(nn.Dense(16)(nn.relu(nn.Dense(4)(y.mean(axis=(1, 2))))))
        y = y * gate[:, None, None, :]
        return nn.Dense(10)(nn.relu(nn.Conv(8, (1, 1), name="last")(y)).mean(axis=(1, 2)))
