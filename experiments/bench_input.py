"""Host input throughput on ImageNet-sized JPEGs: images/s of the train and eval transforms.

  python experiments/bench_input.py [--images 1000] [--workers 0,1,2] [--repeats 3] [--dir DIR]

Writes `--images` photo-like JPEGs (about 500x375, quality 90, 10 class folders; smooth
colour fields, edges and sensor-like noise, so that their size and decode cost are those of
photographs, about 110 KB) unless DIR already holds them, then times, for each worker count,
the whole host path of `--config.dataset=imagenet_folder`: read + decode + RandomResizedCrop
224 + flip (train) or Resize 256 + CenterCrop 224 (eval), batches of 128, the median of
`--repeats` epochs of 4 passes over the images each (`load_batches`). Workers 0 is the
thread path (a thread per core in this process); N > 0 is N grain worker processes. Also the
decode alone (PIL, one thread), to split the cost.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from dcff_jax import input_pipeline as ip
from dcff_jax.config import default_config


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): a few smooth colour fields at several scales, a hard-edged
    shape, and pixel noise; JPEG sizes at quality 90 land near real photographs'."""
    image = np.zeros((height, width, 3), np.float32)
    # Weights and noise chosen so that quality-90 files average ~110 KB at 500x375 (ImageNet's).
    for cells, weight in ((3, 90.0), (12, 40.0), (48, 18.0), (160, 60.0)):
        coarse = rng.uniform(-1, 1, (cells, int(cells * width / height) + 1, 3))
        field = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        image += (np.asarray(field, np.float32) / 127.5 - 1) * weight
    ys, xs = np.mgrid[:height, :width]
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(40, 160)
    image[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] += rng.uniform(-60, 60, 3)
    image += rng.normal(0, 10, image.shape)
    return np.clip(image + 128, 0, 255).astype(np.uint8)


def write_images(root: str, count: int, seed: int = 0) -> list[int]:
    """count JPEGs in root/train/<class>/ (and val/ the same) at 500x375 or 375x500; sizes."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
        pixels = photo_like(rng, width, height)
        for split in ("train", "val"):
            folder = os.path.join(root, split, f"n{i % 10:08d}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{i:06d}.JPEG")
            Image.fromarray(pixels).save(path, quality=90)
        sizes.append(os.path.getsize(path))
    return sizes


def images_per_second(split: ip.Split, repeats: int, passes: int = 4, batch: int = 128) -> float:
    """Median over `repeats` epochs of images/s through `load_batches` (the train and eval
    path), each epoch `passes` times over the images in batches of `batch`, timed from the
    first batch's arrival (worker start-up, once per epoch, is left out)."""
    n = split.num_examples
    index_batches = [np.arange(i, i + batch) % n for i in range(0, passes * n, batch)]
    rates = []
    for epoch in range(repeats):
        batches = ip.load_batches(split, index_batches, epoch)
        next(batches)
        start, count = time.perf_counter(), 0
        for images, _ in batches:
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def decode_rate(files: ip.ImageFiles, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files.paths:
            ip.decode_image(path)
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_input_")
    if not os.path.isdir(os.path.join(root, "train")):
        start = time.perf_counter()
        sizes = write_images(root, args.images)
        kb = np.asarray(sizes) / 1e3
        print(
            f"wrote {len(sizes)} JPEGs in {time.perf_counter() - start:.0f} s: mean "
            f"{kb.mean():.0f} KB (min {kb.min():.0f}, max {kb.max():.0f})"
        )
    train_files, _ = ip.image_folder_splits(root)
    print(f"{len(train_files)} images in {root}; {os.cpu_count()} cores")
    print(f"decode only, 1 thread: {decode_rate(train_files, args.repeats):.0f} images/s")
    print("| workers (0: threads) | train images/s | eval images/s |")
    print("|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
        config = default_config()
        config.dataset, config.data_dir = "imagenet_folder", root
        config.image_size, config.data_workers = 224, workers
        data = ip.load_data(config)
        train = images_per_second(data.train, args.repeats)
        test = images_per_second(data.test, args.repeats)
        print(f"| {workers} | {train:.0f} | {test:.0f} |")


if __name__ == "__main__":
    main()
