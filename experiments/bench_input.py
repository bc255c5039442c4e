"""Host input throughput on ImageNet-sized JPEGs: images/s of the train and eval transforms.

  python experiments/bench_input.py [--images 1000] [--workers 0,1,2] [--repeats 3] [--dir DIR]
      [--sources folder,array_record,tfrecord]

Writes `--images` photo-like JPEGs (about 500x375, quality 90, 10 class folders; smooth
colour fields, edges and sensor-like noise, so that their size and decode cost are those of
photographs, about 110 KB) unless DIR already holds them, then times, for each worker count,
the whole host path of `--config.dataset=imagenet_folder`: read + decode + RandomResizedCrop
224 + flip (train) or Resize 256 + CenterCrop 224 (eval), batches of 128, the median of
`--repeats` epochs of 8 passes over the images each (`load_batches`). Workers 0 is the
thread path (a thread per core in this process); N > 0 is N grain worker processes, each
with --threads threads. --standalone also times the work alone in 1 and 2 plain processes.

Sources: `folder` reads the JPEG files (`imagenet_folder`); `array_record` and `tfrecord` read
the same JPEGs from a tfds imagenet2012 written from them (`--config.dataset=imagenet2012`),
in array_record (1 shard per split, as tfds writes it) or tfrecord (4 train shards).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from dcff_jax import input_pipeline as ip
from dcff_jax.config import default_config

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)
from helpers import imagenet_to_tfrecord, photo_like, write_tfds_imagenet  # noqa: E402


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


def passes_in_batches(n: int, passes: int, batch: int) -> list[np.ndarray]:
    """Index arrays of `batch` examples covering `passes` passes over n examples in order."""
    return [np.arange(i, i + batch) % n for i in range(0, passes * n, batch)]


def images_per_second(
    split: ip.Split, repeats: int, threads: int = 1, passes: int = 8, batch: int = 128
) -> tuple[float, float]:
    """(images/s, seconds to the first batch), medians over `repeats` epochs through
    `load_batches` (the train and eval path), each epoch `passes` times over the images in
    batches of `batch`. The rate is over the whole epoch, worker start-up included: timing
    from the first batch instead would leave out every batch the workers finish together with
    it (16 per worker at grain's default of 16 threads, which is what inflated this table's
    first version)."""
    index_batches = passes_in_batches(split.num_examples, passes, batch)
    rates, firsts = [], []
    for epoch in range(repeats):
        start, count = time.perf_counter(), 0
        for images, _ in ip.load_batches(split, index_batches, epoch, threads):
            if not count:
                firsts.append(time.perf_counter() - start)
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), statistics.median(firsts)


def _build_batches(example, batches: list[np.ndarray], epoch: int) -> tuple[float, float]:
    """(seconds, cpu seconds) to build `batches` with the function grain's workers run."""
    start, cpu = time.perf_counter(), time.process_time()
    for indices in batches:
        ip._load_in_worker(example, epoch, indices)
    return time.perf_counter() - start, time.process_time() - cpu


def standalone_rate(split: ip.Split, processes: int, passes: int = 2, batch: int = 128):
    """(images/s, busy share) of `processes` plain processes (no grain, nothing handed back)
    each building every processes-th batch with grain's worker function: the work alone, to
    set beside the grain figures. busy share: CPU seconds / wall seconds per process."""
    import multiprocessing

    index_batches = passes_in_batches(split.num_examples, passes, batch)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pool.starmap(_build_batches, [(split.example, index_batches[:1], 0)] * processes)  # warm
        start = time.perf_counter()
        timings = pool.starmap(
            _build_batches,
            [(split.example, index_batches[k::processes], 0) for k in range(processes)],
        )
        wall = time.perf_counter() - start
    busy = statistics.mean(cpu / seconds for seconds, cpu in timings)
    return len(index_batches) * batch / wall, busy


def write_tfds_copies(root: str) -> dict[str, str]:
    """{format: data_dir} of tfds imagenet2012 copies of root's train/ and val/ JPEGs."""
    dirs = {fmt: os.path.join(root, f"tfds_{fmt}") for fmt in ("array_record", "tfrecord")}
    if os.path.isdir(dirs["tfrecord"]):
        return dirs
    train, val = ip.image_folder_splits(root)

    def examples(files: ip.ImageFiles):
        for path, label in zip(files.paths, files.labels, strict=True):
            with open(path, "rb") as f:
                yield f.read(), int(label)

    splits = {"train": lambda: examples(train), "validation": lambda: examples(val)}
    write_tfds_imagenet(dirs["array_record"], splits, num_classes=len(train.classes))
    quarter = -(-len(train) // 4)
    counts = [quarter] * 3 + [len(train) - 3 * quarter]
    imagenet_to_tfrecord(
        dirs["array_record"], dirs["tfrecord"], {"train": counts, "validation": [len(val)]}
    )
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="")
    parser.add_argument("--sources", default="folder,array_record,tfrecord")
    parser.add_argument(
        "--threads", default="1", help="threads per worker process (grain's default: 16)"
    )
    parser.add_argument(
        "--standalone", action="store_true", help="also time plain processes without grain"
    )
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
    sources = args.sources.split(",")
    data_dirs = {"folder": root}
    if set(sources) - {"folder"}:
        data_dirs.update(write_tfds_copies(root))
    print(
        "| source | workers (0: threads here) | threads per worker | train images/s "
        "| eval images/s | s to first train batch |"
    )
    print("|---|---|---|---|---|---|")
    for source in sources:
        for workers in (int(w) for w in args.workers.split(",")):
            for threads in (int(t) for t in args.threads.split(",")) if workers else [0]:
                config = default_config()
                config.dataset = "imagenet_folder" if source == "folder" else "imagenet2012"
                config.data_dir, config.num_classes = data_dirs[source], len(train_files.classes)
                config.image_size, config.data_workers = 224, workers
                data = ip.load_data(config)
                train, first = images_per_second(data.train, args.repeats, threads)
                test, _ = images_per_second(data.test, args.repeats, threads)
                print(
                    f"| {source} | {workers} | {threads or '-'} | {train:.0f} | {test:.0f} "
                    f"| {first:.2f} |",
                    flush=True,
                )
    if args.standalone:
        config = default_config()
        config.dataset, config.data_dir, config.image_size = "imagenet_folder", root, 224
        split = ip.load_data(config).train
        for processes in (1, 2):
            rates = [standalone_rate(split, processes) for _ in range(args.repeats)]
            print(
                f"standalone (no grain), {processes} processes: "
                f"{statistics.median(r for r, _ in rates):.0f} train images/s, "
                f"CPU busy {statistics.median(b for _, b in rates):.2f}"
            )


if __name__ == "__main__":
    main()
