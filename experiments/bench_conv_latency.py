"""Per-conv inference latency on XLA:CPU: where a compact model's time goes, original vs compact.

For each model, every distinct conv shape of its original and compact variants is jitted alone
(forward, NHWC, dcff_jax.compiler_options()) and timed: --chain (20) sequential calls in one
jitted loop (so that dispatch is not measured), the median of --steps such loops after a warm-up,
divided by --chain;
a shape's time counts once per conv that has it. Beside the sum of the convs, the whole model
(jitted apply, eval mode) in the same run, so what is outside the convs shows too. Each row: MACs,
ms, and GMAC/s, the throughput the conv reached.

    PYTHONPATH=. python experiments/bench_conv_latency.py --archs resnet110 --batches 1,256
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import paper_config  # noqa: E402

from dcff_jax import compiler_options, models  # noqa: E402


def median_ms(fn, args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def conv_shapes(model, shape) -> collections.Counter:
    """(input HWC, filters, kernel, stride, padding, groups) -> how many convs have it."""
    calls, _ = models.trace_calls(model, shape)
    found = collections.Counter()
    for c in calls:
        if isinstance(c.module, nn.Conv):
            m = c.module
            stride = m.strides if isinstance(m.strides, int) else m.strides[0]
            pad = m.padding if isinstance(m.padding, int) else 0
            key = (tuple(c.input_shape[1:]), m.features, m.kernel_size[0], stride, pad)
            found[key + (m.feature_group_count,)] += 1
    return found


def time_conv(key, batch: int, steps: int, options: dict, chain: int = 20) -> tuple[float, int]:
    """(ms per conv, MACs) of one conv shape. The conv runs `chain` times inside one jitted
    loop, each call's kernel offset by a scalar from the previous output, so that the calls
    stay sequential and the ~0.05 ms dispatch of a jitted call is paid once, not per conv."""
    (h, w, c), filters, k, stride, pad, groups = key
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c // groups, filters)), jnp.float32)

    def conv(x, kern):
        return jax.lax.conv_general_dilated(
            x, kern, (stride, stride), [(pad, pad)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        )  # fmt: skip

    def chained(x, kern):
        def body(_, offset):
            return 1e-7 * conv(x, kern + offset)[0, 0, 0, 0]

        return jax.lax.fori_loop(0, chain, body, jnp.float32(0))

    out = jax.eval_shape(conv, x, kernel)
    macs = math.prod(out.shape) * (c // groups) * k * k
    ms = median_ms(jax.jit(chained, compiler_options=options), (x, kernel), steps) / chain
    return ms, macs


def measure(arch: str, batch: int, steps: int, options: dict, chain: int = 20) -> dict:
    cprate = paper_config(arch).cprate
    shape = models.input_shape(arch, batch)
    result = {"arch": arch, "batch": batch}
    for variant in ("original", "compact"):
        model = models.create_model(arch, cprate if variant == "compact" else None, variant)
        variables = jax.jit(lambda x, m=model: m.init(jax.random.key(0), x, train=False))(
            jnp.zeros((1, *shape[1:]))
        )
        images = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
        apply = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False), compiler_options=options)
        whole = median_ms(apply, (variables, images), steps)
        rows = []
        for key, count in sorted(conv_shapes(model, shape).items()):
            ms, macs = time_conv(key, batch, steps, options, chain)
            rows.append({"shape": key, "count": count, "ms": ms, "macs": macs})
        conv_ms = sum(r["ms"] * r["count"] for r in rows)
        conv_macs = sum(r["macs"] * r["count"] for r in rows)
        result[variant] = {"whole_ms": whole, "conv_ms": conv_ms, "macs": conv_macs, "rows": rows}
    return result


def report(r: dict) -> str:
    o, c = r["original"], r["compact"]
    lines = [
        f"## {r['arch']} batch {r['batch']}",
        f"MACs ratio {o['macs'] / c['macs']:.2f}x; whole model {o['whole_ms']:.2f} -> "
        f"{c['whole_ms']:.2f} ms ({o['whole_ms'] / c['whole_ms']:.2f}x); convs alone "
        f"{o['conv_ms']:.2f} -> {c['conv_ms']:.2f} ms ({o['conv_ms'] / c['conv_ms']:.2f}x); "
        f"convs' share of the model: {o['conv_ms'] / o['whole_ms']:.0%} -> "
        f"{c['conv_ms'] / c['whole_ms']:.0%}",
        f"{'variant':<9}{'input HWC':<16}{'out':>5}{'k':>3}{'s':>3}{'n':>4}{'MMACs':>9}"
        f"{'ms each':>10}{'GMAC/s':>8}",
    ]
    for variant in ("original", "compact"):
        for row in r[variant]["rows"]:
            (hwc, filters, k, stride, _, _), n = row["shape"], row["count"]
            lines.append(
                f"{variant:<9}{str(hwc):<16}{filters:>5}{k:>3}{stride:>3}{n:>4}"
                f"{row['macs'] / 1e6:>9.2f}{row['ms']:>10.3f}{row['macs'] / row['ms'] / 1e6:>8.1f}"
            )
    return "\n".join(lines)


BUCKETS = ("< 8", "8-15", "16-31", ">= 32", "depthwise")


def bucket(shape) -> str:
    """A conv's class: depthwise, or the narrower of its input and output widths."""
    (_, _, channels), filters, *_, groups = shape
    if groups > 1:
        return "depthwise"
    n = min(channels, filters)
    return BUCKETS[0] if n < 8 else BUCKETS[1] if n < 16 else BUCKETS[2] if n < 32 else BUCKETS[3]


def summary(results: list) -> str:
    """One markdown row per model, batch and variant: whole model, convs, the rest, and the
    convs' GMAC/s (ms) per class."""
    lines = [
        "| model | batch | variant | whole ms | convs ms | outside convs ms | conv GMAC/s | "
        + " | ".join(BUCKETS)
        + " |",
        "|---" * (7 + len(BUCKETS)) + "|",
    ]
    for r in results:
        for variant in ("original", "compact"):
            v = r[variant]
            sums = collections.defaultdict(lambda: [0.0, 0])
            for row in v["rows"]:
                cell = sums[bucket(row["shape"])]
                cell[0] += row["ms"] * row["count"]
                cell[1] += row["macs"] * row["count"]
            cells = [
                f"{sums[b][1] / sums[b][0] / 1e6:.1f} ({sums[b][0]:.1f} ms)" if b in sums else "-"
                for b in BUCKETS
            ]
            lines.append(
                f"| {r['arch']} | {r['batch']} | {variant} | {v['whole_ms']:.2f} | "
                f"{v['conv_ms']:.2f} | {v['whole_ms'] - v['conv_ms']:.2f} | "
                f"{v['macs'] / v['conv_ms'] / 1e6:.1f} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "| model | batch | MACs ratio | speed-up | share of the MACs ratio | convs alone | "
        "share if the compact convs ran at the original's GMAC/s |",
        "|---" * 7 + "|",
    ]
    for r in results:
        lines.append("| " + " | ".join(bound(r)) + " |")
    return "\n".join(lines)


def bound(r: dict) -> list[str]:
    """The speed-up's share of the MACs ratio now, and what it would be if every compact conv
    ran at the original's conv throughput while the time outside the convs stayed as measured:
    what faster narrow convs alone could reach."""
    o, c = r["original"], r["compact"]
    ratio = o["macs"] / c["macs"]
    speedup = o["whole_ms"] / c["whole_ms"]
    ideal_ms = c["macs"] / (o["macs"] / o["conv_ms"]) + (c["whole_ms"] - c["conv_ms"])
    return [
        r["arch"],
        str(r["batch"]),
        f"{ratio:.2f}x",
        f"{speedup:.2f}x",
        f"{speedup / ratio:.0%}",
        f"{o['conv_ms'] / c['conv_ms']:.2f}x",
        f"{o['whole_ms'] / ideal_ms / ratio:.0%}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet56,resnet110")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--chain", type=int, default=20, help="calls per timed loop (fewer at large batches)"
    )
    parser.add_argument("--out", default="", help="also write every figure as JSON here")
    parser.add_argument("--summarize", nargs="*", help="only print the summary of these JSONs")
    args = parser.parse_args()
    if args.summarize:
        print(summary([r for path in args.summarize for r in json.load(open(path))]))
        return
    options = compiler_options()
    results = []
    for arch in args.archs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            results.append(measure(arch, batch, args.steps, options, args.chain))
            print(report(results[-1]), flush=True)
    print(summary(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
