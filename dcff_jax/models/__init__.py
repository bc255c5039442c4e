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
    # Whether the classifier sees a fixed spatial size (flatten after a fixed-window pool): then
    # every input must be image_size px; global-pool architectures take any size.
    fixed_input_size: bool


ARCHITECTURES: dict[str, Architecture] = {
    "vgg16": Architecture(VGG, 32, 10, True),
    "resnet56": Architecture(
        lambda r, **kw: CifarResNet(r, plans.RESNET_CIFAR_BLOCKS["resnet56"], **kw), 32, 10, False
    ),
    "resnet110": Architecture(
        lambda r, **kw: CifarResNet(r, plans.RESNET_CIFAR_BLOCKS["resnet110"], **kw), 32, 10, False
    ),
    "googlenet": Architecture(GoogLeNet, 32, 10, True),
    "resnet50": Architecture(ImageNetResNet, 224, 1000, True),
    "mobilenetv2": Architecture(MobileNetV2, 224, 1000, False),
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
class LayerCall:
    """One module call seen while tracing a model."""

    module: nn.Module
    path: str  # "stage1_block0/conv1"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def trace_calls(model: nn.Module, shape: Sequence[int]) -> tuple[list[LayerCall], dict]:
    """Every module __call__ of model.init on an input of `shape`, in call order, traced
    abstractly (no FLOP spent), and the abstract variables. Leaf layers come in call order."""
    calls: list[LayerCall] = []

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and args and hasattr(y, "shape"):
            module = context.module
            path = "/".join(module.scope.path) if module.scope else ""
            calls.append(LayerCall(module, path, tuple(args[0].shape), tuple(y.shape)))
        return y

    x = jax.ShapeDtypeStruct(tuple(shape), jax.numpy.float32)
    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return calls, variables


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

    calls, _ = trace_calls(create_model(architecture, cprate, "fused"), input_shape(architecture))
    return [
        FusedLayer(c.path, c.module.features, c.module.kept)
        for c in calls
        if isinstance(c.module, FusedConv)
    ]


def conv_paths(model: nn.Module, shape: Sequence[int]) -> list[str]:
    """The paths of a model's convs in call order, depthwise (grouped) convs left out."""
    calls, _ = trace_calls(model, shape)
    return [
        c.path for c in calls if isinstance(c.module, nn.Conv) and c.module.feature_group_count == 1
    ]


def paper_dcff(
    architecture: str,
    cprate: str | Sequence[float] | None = None,
    *,
    num_classes: int | None = None,
    dtype: jax.typing.DTypeLike | None = None,
):
    """dcff_jax.DCFF on the architecture's original model with its rate string mapped to conv
    paths (plans.path_rates): the any-model API applied to the paper's architectures."""
    from dcff_jax import auto

    model = create_model(architecture, None, "original", num_classes=num_classes, dtype=dtype)
    shape = input_shape(architecture)
    rates = plans.path_rates(architecture, cprate, conv_paths(model, shape))
    return auto.DCFF(
        model,
        jax.ShapeDtypeStruct(shape, jax.numpy.float32),
        rates,
        unfused=list(plans.LAYOUTS[architecture].unfused),
        apply_kwargs={"train": False},
    )


def input_shape(architecture: str, batch_size: int = 1) -> tuple[int, int, int, int]:
    """(batch, H, W, 3) of the architecture's dataset."""
    size = ARCHITECTURES[architecture].image_size
    return (batch_size, size, size, 3)


__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "FusedLayer",
    "LayerCall",
    "create_model",
    "fused_layers",
    "conv_paths",
    "input_shape",
    "paper_dcff",
    "prunable_conv",
    "trace_calls",
]
