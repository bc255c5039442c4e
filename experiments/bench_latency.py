"""Inference latency, original vs compact, for jitted JAX, the StableHLO export and the ONNX export
(onnxruntime), side by side in one run.

  python experiments/bench_latency.py [--archs vgg16,...] [--engines jax,jax-eigen,...]
      [--pad_to 8] [--steps 5] [--out FILE.json]

For each architecture (its config's paper plan) and each batch (1, and the existing table's: 256
CIFAR, 16 ImageNet): the median wall time of `--steps` calls after a warm-up call, uint8 images
in, logits out, normalisation included, in this order:
- jax: jax.jit of model.apply, XLA's defaults;
- jax-eigen: the same with dcff_jax.compiler_options(), as `evaluate` compiles it (XLA's own
  convs instead of YNNPACK's);
- jax-padded, jax-eigen-padded: the same two with conv widths rounded up to --pad_to
  (channel_padding.pad_channels);
  with --microbatch N, the jax engines run a larger batch as N-image micro-batches in turn
  (lax.map inside the jitted call);
- stablehlo: export.stablehlo_bytes, deserialized and called under jit;
- onnxruntime: onnx_export.onnx_bytes (widths padded to --pad_to), CPU provider, default threads.
The speed-up is original / compact time, and its share of the FLOPs ratio is speed-up /
(original FLOPs / compact FLOPs) (flops.model_counts). Random weights with batch statistics
moved off (0, 1); latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcff_jax import compiler_options, export, flops, input_pipeline, models, onnx_export
from dcff_jax.config import load_config
from dcff_jax.deploy.channel_padding import pad_channels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "vgg16": ("vgg16_cifar", (1, 256)),
    "resnet56": ("resnet56_cifar", (1, 256)),
    "resnet110": ("resnet110_cifar", (1, 256)),
    "googlenet": ("googlenet_cifar", (1, 256)),
    "resnet50": ("resnet50_imagenet", (1, 16)),
    "mobilenetv2": ("mobilenetv2_imagenet", (1, 16)),
}


def median_ms(call, steps: int) -> float:
    call()  # warm-up (and compilation)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


ENGINES = ("jax", "jax-eigen", "jax-padded", "jax-eigen-padded", "stablehlo", "onnxruntime")


def engines(
    model,
    variables,
    size: int,
    mean,
    std,
    wanted: Sequence[str] = ENGINES,
    pad_to: int = 8,
    microbatch: int = 0,
) -> dict:
    """{engine: images -> logits (blocking)} for one model, for the wanted engines only (each
    export is lowered or converted when it is wanted)."""
    calls = {}

    def whole(images):
        x = input_pipeline.normalize(images, mean, std, jnp.float32)
        return model.apply(variables, x, train=False)

    def in_microbatches(fn):
        """fn over micro-batches, one after another inside the jitted call (activations that
        fit in cache); fn itself at or below the micro-batch size."""

        def call(images):
            if not microbatch or images.shape[0] <= microbatch:
                return fn(images)
            if images.shape[0] % microbatch:
                raise SystemExit(f"--microbatch {microbatch} does not divide {images.shape[0]}")
            chunks = images.reshape(-1, microbatch, *images.shape[1:])
            return jax.lax.map(fn, chunks).reshape(images.shape[0], -1)

        return call

    logits, padded = in_microbatches(whole), in_microbatches(pad_channels(whole, pad_to))
    for engine, fn, options in (
        ("jax", logits, {}),
        ("jax-eigen", logits, compiler_options()),
        ("jax-padded", padded, {}),
        ("jax-eigen-padded", padded, compiler_options()),
    ):
        if engine in wanted:
            jitted = jax.jit(fn, compiler_options=options)
            calls[engine] = lambda images, f=jitted: jax.block_until_ready(f(images))
    if "stablehlo" in wanted:
        exported = jax.export.deserialize(
            bytearray(export.stablehlo_bytes(model, variables, size, mean, std))
        )
        stablehlo = jax.jit(exported.call)
        calls["stablehlo"] = lambda images: jax.block_until_ready(stablehlo(images))
    if "onnxruntime" in wanted:
        import onnxruntime

        session = onnxruntime.InferenceSession(
            onnx_export.onnx_bytes(model, variables, size, mean, std, pad_to),
            providers=["CPUExecutionProvider"],
        )
        calls["onnxruntime"] = lambda images: onnx_export.run_session(session, images)
    return calls


def measure(
    arch: str,
    steps: int,
    wanted: Sequence[str],
    pad_to: int = 8,
    batches: Sequence[int] = (),
    microbatch: int = 0,
) -> list[dict]:
    config_name, default_batches = CONFIGS[arch]
    batches = batches or default_batches
    config = load_config(os.path.join(ROOT, "configs", f"{config_name}.py"))
    counts = flops.model_counts(config.model, config.cprate)
    flops_ratio = counts["base_flops"] / counts["flops"]
    size = config.image_size
    mean, std = input_pipeline.normalization(config.dataset)
    times: dict = {}
    for variant in ("original", "compact"):
        model = models.create_model(arch, config.cprate, variant)
        variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
        variables = {
            **variables,
            "batch_stats": jax.tree.map(lambda a: a + 0.1, variables["batch_stats"]),
        }
        calls = engines(model, variables, size, mean, std, wanted, pad_to, microbatch)
        for batch in batches:
            images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
            for engine in wanted:
                call = calls[engine]
                times[variant, batch, engine] = median_ms(lambda c=call, x=images: c(x), steps)
    rows = []
    for batch in batches:
        for engine in wanted:
            original, compact = times["original", batch, engine], times["compact", batch, engine]
            speedup = original / compact
            rows.append(
                {
                    "arch": arch,
                    "batch": batch,
                    "engine": engine,
                    "original_ms": original,
                    "compact_ms": compact,
                    "speedup": speedup,
                    "flops_ratio": flops_ratio,
                    "share_of_flops_ratio": speedup / flops_ratio,
                }
            )
            print(
                f"| {arch} | {batch} | {engine} | {original:.2f} | {compact:.2f} | "
                f"{speedup:.2f}x | {flops_ratio:.2f}x | {100 * speedup / flops_ratio:.0f}% |",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(CONFIGS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument(
        "--pad_to", type=int, default=8, help="conv width multiple of the padded engines"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", default="", help="e.g. 1 (default: 1 and the table's)")
    parser.add_argument(
        "--microbatch",
        type=int,
        default=0,
        help="jax engines: run larger batches as lax.map over micro-batches of this size",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, jax {jax.__version__}, ONNX widths padded to x{args.pad_to}")
    print(
        "| model | batch | engine | original ms | compact ms | speed-up | FLOPs ratio "
        "| speed-up / FLOPs ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    wanted = args.engines.split(",")
    rows = [
        row
        for arch in args.archs.split(",")
        for row in measure(
            arch,
            args.steps,
            wanted,
            args.pad_to,
            [int(b) for b in args.batches.split(",") if b],
            args.microbatch,
        )
    ]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
