"""JPEG draft decoding (config.jpeg_draft) against full decode + the exact transforms: images/s
of one core, train and eval, by image size, and how far the pixels moved.

    PYTHONPATH=. python experiments/bench_draft.py [--images 20 --repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import photo_like  # noqa: E402

from dcff_jax import input_pipeline as ip  # noqa: E402

SIZES = ((500, 375), (800, 600), (1024, 768), (1600, 1200))


def exact(data: bytes, size: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """The path without draft: full decode, then the transforms on arrays."""
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return ip.transform_array(full, size, train, rng)


def images_per_second(fn, files: list[bytes], train: bool, repeats: int) -> float:
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i, data in enumerate(files):
            fn(data, 224, train, np.random.default_rng([0, r, i]))
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| size | transform | exact img/s | draft img/s | speed-up | mean abs diff | max |")
    print("|---|---|---|---|---|---|---|")
    for w, h in SIZES:
        files = []
        for _ in range(args.images):
            buffer = io.BytesIO()
            Image.fromarray(photo_like(rng, w, h)).save(buffer, "JPEG", quality=90)
            files.append(buffer.getvalue())
        for train in (True, False):
            slow = images_per_second(exact, files, train, args.repeats)
            fast = images_per_second(ip.decode_transformed, files, train, args.repeats)
            diffs = [
                np.abs(
                    ip.decode_transformed(d, 224, train, np.random.default_rng(i)).astype(int)
                    - exact(d, 224, train, np.random.default_rng(i)).astype(int)
                )
                for i, d in enumerate(files)
            ]
            print(
                f"| {w}x{h} | {'train' if train else 'eval'} | {slow:.0f} | {fast:.0f} | "
                f"{fast / slow:.2f}x | {max(d.mean() for d in diffs):.2f} | "
                f"{max(d.max() for d in diffs)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
