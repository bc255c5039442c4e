"""Model registry: architecture name -> one Flax definition at its published widths; its fused
and compact variants are dcff_jax.DCFF's rewrites of it (paper_dcff)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
from flax import linen as nn

from dcff_jax.method import rate_strings
from dcff_jax.models.common import VARIANTS, check_variant, prunable_conv
from dcff_jax.models.googlenet import GoogLeNet
from dcff_jax.models.mobilenetv2 import MobileNetV2
from dcff_jax.models.resnet_cifar import CifarResNet
from dcff_jax.models.resnet_imagenet import ImageNetResNet
from dcff_jax.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the rest of the library needs to know about an architecture."""

    build: Callable[..., nn.Module]  # (num_classes=, dtype=) -> the original model
    image_size: int
    num_classes: int
    # Whether the classifier sees a fixed spatial size (flatten after a fixed-window pool): then
    # every input must be image_size px; global-pool architectures take any size.
    fixed_input_size: bool
    # Layers thop does not count in the published original model, which calls a function where
    # the published compact model has a module (the CIFAR ResNets' F.avg_pool2d).
    original_uncounted: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "vgg16": Architecture(VGG, 32, 10, True),
    **{
        name: Architecture(
            functools.partial(CifarResNet, blocks),
            32,
            10,
            False,
            original_uncounted=("GlobalAvgPool_0",),
        )
        for name, blocks in rate_strings.RESNET_CIFAR_BLOCKS.items()
    },
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
      variant: "original" (full widths, plain convs), "fused" (training: each fused conv keeps
        all its filters and fuses them) or "compact" (plain convs at the kept widths); the
        latter two are paper_dcff(...).fused() and .compact_model().
      num_classes: defaults to the architecture's dataset (10 or 1000).
      dtype: compute dtype of convs (e.g. jnp.bfloat16); params and fusion stay float32.

    Returns:
      A flax.linen Module called as module.apply(variables, images, train=...), images NHWC.
    """
    check_variant(variant)
    if variant == "original":
        return _original(architecture, num_classes, dtype)
    dcff = paper_dcff(architecture, cprate, num_classes=num_classes, dtype=dtype)
    return dcff.fused() if variant == "fused" else dcff.compact_model()


def _original(architecture: str, num_classes: int | None, dtype) -> nn.Module:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[architecture]
    return arch.build(num_classes=num_classes or arch.num_classes, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One module call seen while tracing a model."""

    module: nn.Module
    path: str  # "stage1_block0/conv1"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def trace_calls(model: nn.Module, shape: Sequence[int]) -> tuple[list[LayerCall], dict]:
    """Every module __call__ of model.init on an input of `shape`, in call order, traced
    abstractly (no FLOP spent), and the abstract variables. Leaf layers come in call order.

    A module applied on its own inside another module's call (dcff_jax.DCFF's rewritten convs
    apply a detached copy of the conv they replace) is part of that call, not a layer: it has
    no path, and is not recorded (intercept_layers)."""
    calls: list[LayerCall] = []

    def record(module, path, call, args, kwargs):
        y = call(*args, **kwargs)
        if hasattr(y, "shape"):
            calls.append(LayerCall(module, path, tuple(args[0].shape), tuple(y.shape)))
        return y

    x = jax.ShapeDtypeStruct(tuple(shape), jax.numpy.float32)
    with intercept_layers(record):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return calls, variables


def intercept_layers(record: Callable):
    """nn.intercept_methods context in which every layer's __call__ with a positional input is
    made as record(module, path, call, args, kwargs) -> output (path: "stage1_block0/conv1").
    Not a layer: a module applied on its own inside another module's call (no path below the
    top), or a module's __call__ calling its parent class's (super().__call__, as
    models.common.BatchNorm does: one layer, recorded once); these are called as usual."""
    stack: list[nn.Module] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(module.scope.path) if module.scope else ""
        layer = context.method_name == "__call__" and args and (path or not stack)
        layer = layer and not (stack and stack[-1] is module)
        stack.append(module)
        try:
            if layer:
                return record(module, path, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)
        finally:
            stack.pop()

    return nn.intercept_methods(interceptor)


@dataclasses.dataclass(frozen=True)
class FusedLayer:
    path: str  # "stage1_block0/conv1"
    filters: int  # c_out of the original layer
    kept: int  # m


def fused_layers(
    architecture: str, cprate: str | Sequence[float] | None = None
) -> list[FusedLayer]:
    """Every fused conv of the architecture in plan (call) order."""
    return [
        FusedLayer(c.path, c.filters, c.kept)
        for c in paper_dcff(architecture, cprate).plan.convs
        if c.fused
    ]


def conv_paths(
    architecture: str, num_classes: int | None = None, dtype: jax.typing.DTypeLike | None = None
) -> tuple[str, ...]:
    """The paths of the original model's convs that a rate applies to (all but the depthwise
    ones, which follow their input's width), in call order."""
    return _traced_original(architecture, num_classes, dtype)[1]


def paper_dcff(
    architecture: str,
    cprate: str | Sequence[float] | None = None,
    *,
    num_classes: int | None = None,
    dtype: jax.typing.DTypeLike | None = None,
):
    """dcff_jax.DCFF on the architecture's original model with its rate string mapped to conv
    paths (rate_strings.path_rates): the any-model API applied to the paper's architectures. The
    original model is traced once per (architecture, num_classes, dtype) in a process (a
    trainer, its export and its counts share one: float32 runs build their models with dtype
    None, which computes in float32 from float32 inputs)."""
    if architecture in ARCHITECTURES:  # one trace for the default and the explicit class count
        num_classes = num_classes or ARCHITECTURES[architecture].num_classes
    traced, paths = _traced_original(architecture, num_classes, dtype)
    rates = rate_strings.path_rates(architecture, cprate, paths)
    return traced.replanned(rates, unfused=list(rate_strings.LAYOUTS[architecture].unfused))


@functools.lru_cache(maxsize=32)
def _traced_original(architecture: str, num_classes: int | None, dtype):
    """(DCFF of the original model with no conv planned, the paths of its convs that a rate
    applies to in call order): the one trace that paper_dcff plans on."""
    from dcff_jax import any_model

    dcff = any_model.DCFF(
        _original(architecture, num_classes, dtype),
        jax.ShapeDtypeStruct(input_shape(architecture), jax.numpy.float32),
        {},
        apply_kwargs={"train": False},
    )
    # Group -1: the depthwise convs (their width follows their input), which take no rate.
    return dcff, tuple(c.path for c in dcff.plan.convs if c.group != -1)


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
    "intercept_layers",
    "paper_dcff",
    "prunable_conv",
    "trace_calls",
]
