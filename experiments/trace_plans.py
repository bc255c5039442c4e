"""Traced plans (dcff_jax.auto) for our six architectures' unpruned definitions, with the
published widths: how long tracing takes, how many convs fuse, and the compact MACs and params
against our hand-written compact models' own counts.

    PYTHONPATH=. python experiments/trace_plans.py [--tables]
"""

from __future__ import annotations

import argparse
import importlib
import math
import time

import jax.numpy as jnp
from flax import linen as nn

import dcff_jax
from dcff_jax import auto, models

CONFIGS = {
    "vgg16": "vgg16_cifar",
    "resnet56": "resnet56_cifar",
    "resnet110": "resnet110_cifar",
    "googlenet": "googlenet_cifar",
    "resnet50": "resnet50_imagenet",
    "mobilenetv2": "mobilenetv2_imagenet",
}


def published_rates(arch: str) -> tuple[str, dict[str, float]]:
    """The config's rate string, and per-path rates that truncate to its widths (the ResNet-50
    downsample takes its stage's conv3 rate)."""
    cprate = importlib.import_module(f"configs.{CONFIGS[arch]}").get_config().cprate
    layers = models.fused_layers(arch, cprate)
    rates = {x.path: max(0.0, 1 - (x.kept + 0.5) / x.filters) for x in layers}
    rates |= {
        p.replace("conv3", "downsample_conv"): r for p, r in rates.items() if "block0/conv3" in p
    }
    return cprate, rates


def pure_macs(model, shape) -> int:
    """Conv and dense multiply-accumulates of a model's own layer calls (no bias adds)."""
    calls, _ = models.trace_calls(model, shape)
    total = 0
    for c in calls:
        if isinstance(c.module, nn.Conv):
            per_output = c.input_shape[-1] // c.module.feature_group_count
            total += math.prod(c.output_shape) * per_output * math.prod(c.module.kernel_size)
        elif isinstance(c.module, nn.Dense):
            total += math.prod(c.output_shape) * c.input_shape[-1]
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print every plan's table")
    args = parser.parse_args()
    print(f"{'model':<12}{'trace s':>8}{'convs':>7}{'fused':>7}{'blocked':>9}"
          f"{'compact MACs':>15}{'ours':>15}{'params':>12}{'ours':>12}")  # fmt: skip
    for arch in CONFIGS:
        cprate, rates = published_rates(arch)
        start = time.perf_counter()
        plan = auto.make_plan(
            models.create_model(arch, None, "original"),
            jnp.zeros(models.input_shape(arch)),
            rates,
            unfused=["*/downsample_conv"],
            apply_kwargs={"train": False},
        )
        seconds = time.perf_counter() - start
        compact = models.create_model(arch, cprate, "compact")
        ours = dcff_jax.count_flops(compact, models.input_shape(arch))
        macs = pure_macs(compact, models.input_shape(arch))
        blocked = sum(not c.fused and not c.resized and c.reason != auto.NO_RATE
                      and not c.reason.startswith("depthwise") for c in plan.convs)  # fmt: skip
        print(
            f"{arch:<12}{seconds:>8.2f}{len(plan.convs):>7}{len(plan.fused):>7}{blocked:>9}"
            f"{plan.compact_macs:>15,}{macs:>15,}{plan.compact_params:>12,}{ours.params:>12,}"
        )
        if args.tables:
            print(plan.table())


if __name__ == "__main__":
    main()
