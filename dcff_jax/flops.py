"""FLOPs and params in the paper's convention (thop 0.0.31), counted from the model itself.

The model is traced abstractly (no FLOP spent) and every layer call recorded with its input
and output shapes (Layer); count_layers is the one counter, used by `count` (a model as it is),
DCFF.counts and the plans (a plan's compact model at its traced widths), the plan search and the
export metadata:

  conv            output elements x (c_in / groups x kh x kw + 1 if bias)
  batch norm      2 x elements
  dense           output elements x in_features
  avg-pool        output elements
  global avg-pool (pool area + 1) x output elements, when the published model used a module
  ReLU, max-pool, padding, residual adds, concatenation: 0
  params          every trainable parameter (batch-norm scale and bias included)

convention="macs" counts conv and dense multiply-accumulates only: the figure most papers quote
for ImageNet models (MobileNetV2's 300M), and the one DCFF's MobileNetV2 row uses (140M =
46.7% of 300M); thop's count of the same network adds batch norm (13.4M) to it.

Run `python -m dcff_jax.flops --config=configs/vgg16_cifar.py [--config.cprate='...']`: a table,
then, as the last line of stdout, {"flops", "params", "base_flops", "base_params"} as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Sequence

import jax
from flax import linen as nn

from dcff_jax import errors, models
from dcff_jax.jaxpr import channels
from dcff_jax.method.layers import FusedConv
from dcff_jax.models import common


@dataclasses.dataclass(frozen=True)
class Layer:
    """One counted layer call. Its count is linear in each of its channel widths (c_in, c_out;
    the traced plans count a compact model by changing only these):

      conv             pair x c_in / groups x c_out, + positions x c_out with a bias (thop)
      dense            pair x c_in x c_out
      batch_norm       2 x positions x c_in (thop)
      avg_pool         positions x c_out (thop)
      global_avg_pool  (area + 1) x positions x c_out (thop; 0 when not `counted`)

    positions: elements per channel of the output (batch x H x W); pair: conv and dense
    multiply-accumulates per (input channel of a group, output channel) pair. A depthwise conv
    (groups == in_channels) keeps one input channel per group at any width."""

    path: str
    kind: str
    output_shape: tuple[int, ...]
    in_channels: int
    out_channels: int
    positions: int = 0
    pair: int = 0
    groups: int = 1
    bias: bool = False
    area: int = 0
    counted: bool = True

    def flops(self, c_in: int | None = None, c_out: int | None = None) -> int:
        """Its count in the thop convention with c_in/c_out channels (None: its own)."""
        c_in = self.in_channels if c_in is None else c_in
        c_out = self.out_channels if c_out is None else c_out
        if self.kind == "conv":
            per_group = c_in if self.groups == 1 else self.in_channels // self.groups
            return self.pair * per_group * c_out + self.bias * self.positions * c_out
        if self.kind == "dense":
            return self.pair * c_in * c_out
        if self.kind == "batch_norm":
            return 2 * self.positions * c_in
        if self.kind == "avg_pool":
            return self.positions * c_out
        return (self.area + 1) * self.positions * c_out if self.counted else 0

    def macs(self, c_in: int | None = None, c_out: int | None = None) -> int:
        """Its conv or dense multiply-accumulates (0 for the other kinds)."""
        if self.kind not in ("conv", "dense"):
            return 0
        return dataclasses.replace(self, bias=False).flops(c_in, c_out)


# The module classes whose calls are counted layers (layer_of).
COUNTED = (nn.Conv, FusedConv, nn.BatchNorm, nn.Dense, common.AvgPool, common.GlobalAvgPool)


def layer_of(module, path: str, x_shape: Sequence[int], y_shape: Sequence[int]) -> Layer | None:
    """The counted layer a linen module call is (None: a call that costs nothing or is made of
    counted calls), from its input and output shapes (channels last)."""
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    positions = math.prod(y_shape[:-1])
    if isinstance(module, (nn.Conv, FusedConv)):
        size = module.kernel_size
        area = math.prod(size if not isinstance(size, int) else (size,) * 2)
        return Layer(
            path,
            "conv",
            y_shape,
            x_shape[-1],
            y_shape[-1],
            positions,
            positions * area,
            getattr(module, "feature_group_count", 1),
            bool(module.use_bias),
        )
    if isinstance(module, nn.BatchNorm):
        return Layer(path, "batch_norm", y_shape, x_shape[-1], y_shape[-1], positions)
    if isinstance(module, nn.Dense):
        return Layer(path, "dense", y_shape, x_shape[-1], y_shape[-1], positions, positions)
    if isinstance(module, common.AvgPool):
        return Layer(path, "avg_pool", y_shape, x_shape[-1], y_shape[-1], positions)
    if isinstance(module, common.GlobalAvgPool):
        area = x_shape[1] * x_shape[2]
        kwargs = {"area": area, "counted": module.counted}
        return Layer(
            path, "global_avg_pool", y_shape, x_shape[-1], y_shape[-1], positions, **kwargs
        )
    return None


def record_layer(record: channels.ConvRecord, path: str = "") -> Layer:
    """The counted layer of a conv or matmul of a traced jaxpr (one made outside any counted
    layer call: an nnx model's, a user's own matmul, a function's with its weights bound)."""
    return Layer(
        path,
        record.kind,
        (record.out_width,),
        record.in_width,
        record.out_width,
        0,
        record.macs_per_channel_pair,
        record.groups,
    )


def function_macs(fn: Callable, example) -> int:
    """Conv and matmul multiply-accumulates of `fn` (one array -> arrays, its weights bound
    as constants) on an input shaped like `example`: a model as exported, or as
    deploy.channel_padding.pad_channels rewrites it (a CPU-only branch counted once, as the
    other platforms' branch)."""
    example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    return jaxpr_macs(jax.make_jaxpr(fn)(example))


def jaxpr_macs(closed) -> int:
    """function_macs of a function already traced (a ClosedJaxpr of one input); traced at a
    symbolic batch size (jaxpr.walk.trace_any_batch), the MACs of one example."""
    layers = [record_layer(r) for r in channels.analyze_closed(closed).records]
    macs = count_layers(layers, 0, "macs").flops
    (batch, *_) = closed.in_avals[0].shape
    return macs if isinstance(macs, int) else int(macs // batch)


@dataclasses.dataclass(frozen=True)
class LayerCount:
    path: str
    kind: str
    output_shape: tuple[int, ...]
    flops: int


@dataclasses.dataclass(frozen=True)
class Counts:
    flops: int
    params: int
    layers: tuple[LayerCount, ...]


CONVENTIONS = ("thop", "macs")


def count_layers(
    layers: Sequence[Layer],
    params: int,
    convention: str = "thop",
    uncounted: Collection[str] = (),
    widths: Sequence[tuple[int, int]] | None = None,
) -> Counts:
    """The one counter: `layers` (in call order) counted in `convention` ("thop": the paper's
    table, see the module docstring; "macs": conv and dense multiply-accumulates only), each at
    its (c_in, c_out) of `widths` (None: their own), leaving out the paths in `uncounted`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    records = []
    for i, layer in enumerate(layers):
        if layer.path in uncounted or (
            convention == "macs" and layer.kind not in ("conv", "dense")
        ):
            continue
        c_in, c_out = (None, None) if widths is None else widths[i]
        n = layer.flops(c_in, c_out) if convention == "thop" else layer.macs(c_in, c_out)
        shape = layer.output_shape[:-1] + (c_out or layer.out_channels,)
        records.append(LayerCount(layer.path, layer.kind, shape, n))
    return Counts(sum(r.flops for r in records), int(params), tuple(records))


def count(
    model: nn.Module,
    input_shape: Sequence[int],
    convention: str = "thop",
    uncounted: Collection[str] = (),
) -> Counts:
    """FLOPs and params of a linen `model` on one input of `input_shape` (batch included), eval
    mode, as they are (count_layers over its layer calls; DCFF.counts counts a plan's compact
    model without building it). uncounted: paths of layers not counted (those the published
    model computes with a function thop does not see, Architecture.original_uncounted)."""
    calls, variables = models.trace_calls(model, input_shape)
    layers = [layer_of(c.module, c.path, c.input_shape, c.output_shape) for c in calls]
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables.get("params", {})))
    return count_layers([x for x in layers if x is not None], params, convention, uncounted)


def model_counts(
    architecture: str, cprate: str | Sequence[float] | None, convention: str = "thop"
) -> dict[str, int]:
    """Compact-model and original-model counts for a rate string, at batch 1."""
    compact = models.paper_dcff(architecture, cprate).counts(convention)
    base = original_counts(architecture, convention)
    return {
        "flops": compact.flops,
        "params": compact.params,
        "base_flops": base.flops,
        "base_params": base.params,
    }


def original_counts(architecture: str, convention: str = "thop") -> Counts:
    """The original model's counts at batch 1, as thop counts the published one."""
    return models.paper_dcff(architecture, None).counts(
        convention,
        compact=False,
        uncounted=models.ARCHITECTURES[architecture].original_uncounted,
    )


def format_summary(architecture: str, counts: dict[str, int]) -> str:
    """The paper's table row: FLOPs and params with their reductions."""

    def human(n: float) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    def reduction(key: str) -> str:
        return f"{100.0 * (1 - counts[key] / counts['base_' + key]):.2f}%"

    def row(name: str, flops: str, params: str) -> str:
        return f"{name:<24}{flops:>12}{params:>12}"

    rows = [
        row("model", "FLOPs", "params"),
        row(f"{architecture} original", human(counts["base_flops"]), human(counts["base_params"])),
        row(f"{architecture} compact", human(counts["flops"]), human(counts["params"])),
        row("reduction", reduction("flops"), reduction("params")),
    ]
    return "\n".join(rows)


def format_layers(counts: Counts) -> str:
    lines = [f"{'layer':<40}{'kind':<16}{'output':<22}{'FLOPs':>14}"]
    for r in counts.layers:
        lines.append(f"{r.path:<40}{r.kind:<16}{str(r.output_shape[1:]):<22}{r.flops:>14,}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    errors.no_positional_arguments(argv)
    config = errors.loaded_config(_CONFIG.value)
    from dcff_jax.config import validate_config

    validate_config(config)
    counts = model_counts(config.model, config.cprate or None)
    if _LAYERS.value:
        print(format_layers(models.paper_dcff(config.model, config.cprate or None).counts()))
    print(format_summary(config.model, counts))
    print(f"cprate: {config.cprate}")
    print(json.dumps(counts))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file.", lock_config=True
    )
    _LAYERS = flags.DEFINE_bool("layers", False, "Also print one row per counted layer.")
    flags.mark_flags_as_required(["config"])
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
