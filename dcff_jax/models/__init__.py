"""Model registry: architecture name -> one Flax definition, built in any of three variants."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from flax import linen as nn

from dcff_jax import plans
from dcff_jax.models.common import VARIANTS, check_variant, prunable_conv
from dcff_jax.models.googlenet import GoogLeNet
from dcff_jax.models.mobilenetv2 import MobileNetV2
from dcff_jax.models.resnet_cifar import CifarResNet
from dcff_jax.models.resnet_imagenet import ImageNetResNet
from dcff_jax.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the rest of the library needs to know about an architecture."""

    build: Callable[..., nn.Module]  # (layer_rates, variant, num_classes, dtype) -> module
    image_size: int
    num_classes: int


ARCHITECTURES: dict[str, Architecture] = {
    "vgg16": Architecture(VGG, 32, 10),
    "resnet56": Architecture(
        lambda r, **kw: CifarResNet(r, plans.RESNET_CIFAR_BLOCKS["resnet56"], **kw), 32, 10
    ),
    "resnet110": Architecture(
        lambda r, **kw: CifarResNet(r, plans.RESNET_CIFAR_BLOCKS["resnet110"], **kw), 32, 10
    ),
    "googlenet": Architecture(GoogLeNet, 32, 10),
    "resnet50": Architecture(ImageNetResNet, 224, 1000),
    "mobilenetv2": Architecture(MobileNetV2, 224, 1000),
}


def create_model(
    architecture: str,
    cprate: str | Sequence[float] | None = None,
    variant: str = "fused",
    *,
    num_classes: int | None = None,
    dtype: jax.typing.DTypeLike | None = None,
) -> nn.Module:
    """Build an architecture as "original", "fused" or "compact".

    Args:
      architecture: one of ARCHITECTURES.
      cprate: the published rate string (or its parsed list) for that architecture; None prunes
        nothing (every rate 0).
      variant: "original" (full widths, plain convs), "fused" (training with FusedConv) or
        "compact" (plain convs at the kept widths).
      num_classes: defaults to the architecture's dataset (10 or 1000).
      dtype: compute dtype of convs (e.g. jnp.bfloat16); params and fusion stay float32.

    Returns:
      A flax.linen Module called as module.apply(variables, images, train=...), images NHWC.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    check_variant(variant)
    arch = ARCHITECTURES[architecture]
    if cprate is None:
        layer_rates = plans.uniform_rates(architecture, 0.0)
    else:
        layer_rates = plans.layer_rates(architecture, cprate)
    return arch.build(
        tuple(layer_rates),
        variant=variant,
        num_classes=num_classes or arch.num_classes,
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class FusedLayer:
    path: str  # "stage1_block0/conv1"
    filters: int  # c_out of the original layer
    kept: int  # m


def fused_layers(
    architecture: str, cprate: str | Sequence[float] | None = None
) -> list[FusedLayer]:
    """Every fused conv of the architecture in plan (call) order, traced abstractly."""
    from dcff_jax.layers import FusedConv

    model = create_model(architecture, cprate, "fused")
    found: list[FusedLayer] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, FusedConv) and context.method_name == "__call__":
            module = context.module
            found.append(FusedLayer("/".join(module.scope.path), module.features, module.kept))
        return next_fun(*args, **kwargs)

    shape = input_shape(architecture)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros(shape), train=False))
    return found


def input_shape(architecture: str, batch_size: int = 1) -> tuple[int, int, int, int]:
    """(batch, H, W, 3) of the architecture's dataset."""
    size = ARCHITECTURES[architecture].image_size
    return (batch_size, size, size, 3)


__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "FusedLayer",
    "create_model",
    "fused_layers",
    "input_shape",
    "prunable_conv",
]
