"""Would rounding the compact widths up to multiples of 8 make the compact models faster?

  python experiments/bench_padding.py [--archs resnet56,resnet110,googlenet] [--steps 5]

For each architecture: the paper plan's compact model, and the same plan with every kept width
rounded up to a multiple of 8 (a plan of its own, so the extra filters are real, zero-cost to
build, and its FLOPs are counted exactly). Times both with jitted JAX and with onnxruntime
(bench_latency.engines) at batch 1 and 256, and prints the FLOPs of each: padding pays where the
padded model is faster despite its higher FLOPs.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_latency import CONFIGS, ROOT, engines, median_ms

from dcff_jax import flops, input_pipeline, models
from dcff_jax.config import load_config
from dcff_jax.method import rate_strings


def entry_filters(arch: str, num_rates: int) -> list[int]:
    """The filter count each rate-string entry prunes (its layers' c_out, which agree)."""
    layers0 = models.fused_layers(arch, [0.0] * num_rates)
    counts = []
    for i in range(num_rates):
        probe = [0.0] * num_rates
        probe[i] = 0.5
        changed = {
            a.filters
            for a, b in zip(layers0, models.fused_layers(arch, probe), strict=True)
            if a.kept != b.kept
        }
        assert len(changed) == 1, (arch, i, changed)
        counts.append(changed.pop())
    return counts


def padded_rates(arch: str, rates: list[float], multiple: int = 8) -> list[float]:
    """Rates whose kept widths are the given ones rounded up to a multiple (capped at c_out)."""
    out = []
    for filters, rate in zip(entry_filters(arch, len(rates)), rates, strict=True):
        width = -(-rate_strings.keep_width(filters, rate) // multiple) * multiple
        out.append(0.0 if width >= filters else 1 - (width + 0.5) / filters)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet56,resnet110,googlenet")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", default="", help="e.g. 1 (default: bench_latency's)")
    args = parser.parse_args()
    print(
        "| model | plan | GFLOPs/image | batch | jax ms | onnxruntime ms |\n"
        "|---|---|---|---|---|---|"
    )
    for arch in args.archs.split(","):
        config_name, batches = CONFIGS[arch]
        batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
        config = load_config(os.path.join(ROOT, "configs", f"{config_name}.py"))
        paper = list(rate_strings.parse_rates(config.cprate))
        size = config.image_size
        mean, std = input_pipeline.normalization(config.dataset)
        for name, rates in (("paper", paper), ("widths to x8", padded_rates(arch, paper))):
            counts = flops.model_counts(arch, rates)
            model = models.create_model(arch, rates, "compact")
            variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
            calls = engines(model, variables, size, mean, std, ("jax", "onnxruntime"))
            for batch in batches:
                images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
                ms = {
                    e: median_ms(lambda c=c, x=images: c(x), args.steps) for e, c in calls.items()
                }
                print(
                    f"| {arch} | {name} | {counts['flops'] / 1e9:.4f} | {batch} | "
                    f"{ms['jax']:.2f} | {ms['onnxruntime']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
