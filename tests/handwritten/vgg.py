"""Hand-written oracle (see __init__), as in dcff_jax/models before issue 24.

VGG-16 for CIFAR-10 (published models/cifar/vgg.py): 13 convs with bias, BN, ReLU, 5 pools."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

from dcff_jax.models import common
from dcff_jax.models.vgg import VGG16_LAYOUT


class VGG(nn.Module):
    """VGG for 32x32 inputs. layer_rates: one rate per conv (13 for VGG-16).

    Input (N, 32, 32, 3) -> logits (N, num_classes).
    """

    layer_rates: Sequence[float]
    variant: str = "fused"
    layout: Sequence[int | str] = VGG16_LAYOUT
    num_classes: int = 10
    dtype: jax.typing.DTypeLike | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv_id = 0
        for item in self.layout:
            if item == "M":
                x = common.MaxPool(2, 2)(x)
                continue
            x = common.prunable_conv(
                self.variant,
                item,
                self.layer_rates[conv_id],
                3,
                padding=1,
                use_bias=True,
                dtype=self.dtype,
                name=f"conv{conv_id}",
            )(x)
            x = common.batch_norm(train, self.dtype, name=f"bn{conv_id}")(x)
            x = nn.relu(x)
            conv_id += 1
        x = common.AvgPool(1, 1)(x)  # published nn.AvgPool2d(1): a no-op that thop counts
        x = x.reshape(x.shape[0], -1)
        return common.dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
