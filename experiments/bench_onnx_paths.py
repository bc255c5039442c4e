"""Two ways to the same ONNX export, side by side: write each architecture's compact ONNX file
with one checkout of dcff_jax, then time the files of two checkouts in one run.

  # the files, one directory per checkout (PYTHONPATH picks the dcff_jax that writes them)
  PYTHONPATH=OLD_CHECKOUT python experiments/bench_onnx_paths.py write --out /tmp/onnx_old
  PYTHONPATH=. python experiments/bench_onnx_paths.py write --out /tmp/onnx_new [--archs vgg16]
  # onnxruntime, CPU provider, both sets interleaved call by call
  python experiments/bench_onnx_paths.py time /tmp/onnx_old /tmp/onnx_new [--steps 20]

`write` uses the paper's plan of each architecture with trained-looking variables
(tests/test_onnx.trained_looking: batch norms that compute something), pads to 8 (the default),
and records in summary.json the file's metadata (MACs), its op counts, the largest logit
difference from the Flax model relative to max |logit|, and the export's seconds (the first
call's, and with --repeats N the N - 1 calls after it). `time`
prints, per architecture and batch, each directory's median milliseconds and their ratio.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Batches of the latency table (experiments/RESULTS.md): 1 and the large one per dataset.
LARGE_BATCH = {"cifar10": 256, "imagenet2012": 16}


def write(out: str, archs: list[str] | None = None, repeats: int = 1) -> None:
    import onnx
    import onnxruntime

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import PAPER_CONFIGS
    from test_onnx import trained_looking_compact

    from dcff_jax import onnx_export

    os.makedirs(out, exist_ok=True)
    summary = {}
    for arch in archs or PAPER_CONFIGS:
        config, model, variables, images, x, mean, std = trained_looking_compact(arch)
        size = config.image_size
        seconds = []
        for _ in range(repeats):  # the first call also pays jax's one-time costs
            start = time.perf_counter()
            data = onnx_export.onnx_bytes(model, variables, size, mean, std)
            seconds.append(time.perf_counter() - start)
        with open(os.path.join(out, f"{arch}.onnx"), "wb") as f:
            f.write(data)
        proto = onnx.load_from_string(data)
        want = np.asarray(model.apply(variables, x, train=False))
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": images})[0]
        summary[arch] = {
            "dataset": config.dataset,
            "image_size": size,
            "metadata": {p.key: p.value for p in proto.metadata_props},
            "ops": dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items())),
            "max_logit_difference_relative": float(np.abs(got - want).max() / np.abs(want).max()),
            "export_seconds": round(seconds[0], 2),
            "export_seconds_repeats": [round(x, 2) for x in seconds[1:]],
        }
        print(arch, json.dumps(summary[arch]), flush=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def time_files(directories: list[str], steps: int) -> None:
    import onnxruntime

    with open(os.path.join(directories[0], "summary.json")) as f:
        summary = json.load(f)
    print(f"{'model':<12}{'batch':>6}" + "".join(f"{os.path.basename(d):>16}" for d in directories)
          + f"{'ratio':>8}")  # fmt: skip
    for arch, info in summary.items():
        sessions = [
            onnxruntime.InferenceSession(
                os.path.join(d, f"{arch}.onnx"), providers=["CPUExecutionProvider"]
            )
            for d in directories
        ]
        size = info["image_size"]
        for batch in (1, LARGE_BATCH[info["dataset"]]):
            rng = np.random.default_rng(batch)
            images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            for _ in range(3):  # warm-up
                for s in sessions:
                    s.run(None, {"images": images})
            times: list[list[float]] = [[] for _ in sessions]
            for _ in range(steps):  # interleaved: the machine's noise hits both alike
                for s, t in zip(sessions, times, strict=True):
                    start = time.perf_counter()
                    s.run(None, {"images": images})
                    t.append(1e3 * (time.perf_counter() - start))
            medians = [statistics.median(t) for t in times]
            print(
                f"{arch:<12}{batch:>6}"
                + "".join(f"{m:>16.2f}" for m in medians)
                + f"{medians[-1] / medians[0]:>8.2f}",  # fmt: skip
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    w.add_argument("--archs", default="", help="e.g. vgg16,resnet56 (default: all six)")
    w.add_argument("--repeats", type=int, default=1, help="exports timed per architecture")
    t = sub.add_parser("time")
    t.add_argument("directories", nargs="+")
    t.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.command == "write":
        write(args.out, [a for a in args.archs.split(",") if a], args.repeats)
    else:
        time_files(args.directories, args.steps)


if __name__ == "__main__":
    main()
