"""FLOPs and params in the paper's convention (thop 0.0.31), counted from the model itself.

The model is traced abstractly (models.trace_calls: jax.eval_shape and a Flax method
interceptor, no FLOP spent), which records every layer call with its input and output shapes:

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
from collections.abc import Collection, Sequence

import jax
from flax import linen as nn

from dcff_jax import errors, models
from dcff_jax.layers import FusedConv
from dcff_jax.models import common


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


def _layer_flops(
    module: nn.Module, x_shape: Sequence[int], y_shape: Sequence[int]
) -> tuple[str, int] | None:
    out = math.prod(y_shape)
    if isinstance(module, (nn.Conv, FusedConv)):
        kernel = math.prod(
            module.kernel_size
            if not isinstance(module.kernel_size, int)
            else (module.kernel_size,) * 2
        )
        groups = getattr(module, "feature_group_count", 1)
        return "conv", out * (x_shape[-1] // groups * kernel + int(module.use_bias))
    if isinstance(module, nn.BatchNorm):
        return "batch_norm", 2 * math.prod(x_shape)
    if isinstance(module, nn.Dense):
        return "dense", out * x_shape[-1]
    if isinstance(module, common.AvgPool):
        return "avg_pool", out
    if isinstance(module, common.GlobalAvgPool):
        area = x_shape[1] * x_shape[2]
        return "global_avg_pool", (area + 1) * out if module.counted else 0
    return None


CONVENTIONS = ("thop", "macs")


def count(
    model: nn.Module,
    input_shape: Sequence[int],
    convention: str = "thop",
    uncounted: Collection[str] = (),
) -> Counts:
    """FLOPs and params of `model` on one input of `input_shape` (batch included), eval mode.

    convention: "thop" (the paper's table, see the module docstring) or "macs" (conv and dense
    multiply-accumulates only). uncounted: paths of layers not counted (those the published
    model computes with a function thop does not see, Architecture.original_uncounted)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    calls, variables = models.trace_calls(model, input_shape)
    records = []
    for call in calls:
        if call.path in uncounted:
            continue
        found = _layer_flops(call.module, call.input_shape, call.output_shape)
        if found is not None and (convention == "thop" or found[0] in ("conv", "dense")):
            records.append(LayerCount(call.path, found[0], call.output_shape, found[1]))
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables.get("params", {})))
    return Counts(sum(r.flops for r in records), int(params), tuple(records))


def model_counts(
    architecture: str, cprate: str | Sequence[float] | None, convention: str = "thop"
) -> dict[str, int]:
    """Compact-model and original-model counts for a rate string, at batch 1."""
    shape = models.input_shape(architecture, 1)
    compact = count(models.create_model(architecture, cprate, "compact"), shape, convention)
    base = original_counts(architecture, convention)
    return {
        "flops": compact.flops,
        "params": compact.params,
        "base_flops": base.flops,
        "base_params": base.params,
    }


def original_counts(architecture: str, convention: str = "thop") -> Counts:
    """The original model's counts at batch 1, as thop counts the published one."""
    return count(
        models.create_model(architecture, None, "original"),
        models.input_shape(architecture, 1),
        convention,
        models.ARCHITECTURES[architecture].original_uncounted,
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
        compact = models.create_model(config.model, config.cprate or None, "compact")
        print(format_layers(count(compact, models.input_shape(config.model))))
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
