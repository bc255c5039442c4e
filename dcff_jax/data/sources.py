"""Where the splits come from: the dataset names, Split and Data, load_data (CIFAR-10 pickles
or tfds, ImageNet from tfds or class folders) and the checks that a config can train on them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dcff_jax.data.cifar import read_cifar10, read_cifar_folder
from dcff_jax.data.image_files import ImageExample, image_folder_splits, stack_examples
from dcff_jax.data.tfds_reader import class_count, tfds_source
from dcff_jax.errors import ConfigError, DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "cifar10_folder", "imagenet2012", "imagenet_folder")


@dataclasses.dataclass
class Split:
    """A random-access split. `load(indices, epoch)` -> (images uint8 (n, H, W, 3), labels (n,)).

    A split that decodes on the host (ImageNet) also has `example(index, epoch)` -> (image,
    label), picklable, and `workers`: with workers > 0 its batches are made by that many grain
    worker processes (whole batches each), else by `load` in this process.
    """

    num_examples: int
    load: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    image_size: int
    label_range: tuple[int, int]  # smallest and largest label the split can hold
    example: Callable[[int, int], tuple[np.ndarray, int]] | None = None
    workers: int = 0
    # A split held in memory: (images uint8 (n, H, W, 3), labels (n,)); it can live on the
    # devices (dcff_jax.data.feeds).
    arrays: tuple[np.ndarray, np.ndarray] | None = None


@dataclasses.dataclass
class Data:
    train: Split
    test: Split
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device_augment: bool  # CIFAR: crop + flip inside the train step


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, on [0, 1] pixels, of a dataset name (config.dataset)."""
    return (CIFAR_MEAN, CIFAR_STD) if dataset.startswith("cifar") else (IMAGENET_MEAN, IMAGENET_STD)


def load_data(config) -> Data:
    """The train and test splits named by config.dataset / config.data_dir."""
    if config.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {config.dataset!r}; expected one of {DATASETS}")
    if "://" in config.data_dir and config.dataset not in ("cifar10_folder", "imagenet_folder"):
        raise ConfigError(
            f"--config.data_dir={config.data_dir}: tfds datasets ({config.dataset}) cannot be "
            "read from an object store (tfds' array_record reader opens local files only). Copy "
            "the prepared dataset to a local disk (gcloud storage cp -r) or mount the bucket "
            "(gcsfuse) and pass that local path; the *_folder datasets read gs:// directly"
        )
    if config.dataset == "cifar10_folder":
        train, test = (
            array_split(*read_cifar_folder(config.data_dir, s)) for s in ("train", "test")
        )
        return Data(train, test, *normalization(config.dataset), device_augment=True)
    if config.dataset == "cifar10":
        train, test = (array_split(*arrays) for arrays in read_cifar10(config))
        return Data(train, test, *normalization(config.dataset), device_augment=True)
    # Image files are handed over encoded: the transform decodes each for its crop. tfds
    # decodes its records itself unless draft decoding needs the bytes (its mock data, which the
    # tests and benchmarks use, can hand over bytes only through TensorFlow).
    if config.dataset == "imagenet_folder":
        train_files, test_files = (
            dataclasses.replace(files, encoded=True)
            for files in image_folder_splits(config.data_dir, config.val_labels)
        )
        train = imagenet_split(train_files, len(train_files.classes), config, train=True)
        test = imagenet_split(test_files, len(train_files.classes), config, train=False)
    else:
        source = tfds_source("imagenet2012", "train", config.data_dir, config.jpeg_draft)
        train = imagenet_split(source, class_count(source), config, train=True)
        source = tfds_source("imagenet2012", "validation", config.data_dir, config.jpeg_draft)
        test = imagenet_split(source, class_count(source), config, train=False)
    return Data(train, test, *normalization(config.dataset), device_augment=False)


def check_fits(config, data: Data, where: str) -> None:
    """Refuse data the config cannot train on, before anything is compiled: labels outside
    [0, config.num_classes), or images of another size than config.image_size."""
    for name, split in (("train", data.train), ("test", data.test)):
        low, high = split.label_range
        if low < 0 or high >= config.num_classes:
            raise DataError(
                f"the {name} labels in {where} range over [{low}, {high}] but "
                f"config.num_classes is {config.num_classes}; set --config.num_classes={high + 1} "
                "(and a model whose classifier has that many outputs)"
            )
        if split.image_size != config.image_size:
            raise ConfigError(
                f"the {name} images in {where} are {split.image_size} px but config.image_size "
                f"is {config.image_size}; set --config.image_size={split.image_size}"
            )


def array_split(images: np.ndarray, labels: np.ndarray) -> Split:
    def load(indices, epoch):
        del epoch
        return images[indices], labels[indices]

    label_range = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    return Split(len(labels), load, images.shape[1], label_range, arrays=(images, labels))


# --- ImageNet -------------------------------------------------------------------------------


def imagenet_split(source, num_classes: int, config, train: bool) -> Split:
    """A random-access source of {"image": uint8 (H, W, 3), "label": int} examples (tfds, or
    ImageFiles) as a Split of (size, size) crops: RandomResizedCrop + flip keyed by (seed, epoch,
    index) for training, Resize(size * 256 / 224) + CenterCrop(size) for evaluation."""
    example = ImageExample(source, config.image_size, config.seed, train, config.jpeg_draft)
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2) if not config.data_workers else None

    def load(indices, epoch):
        if pool is None:  # a batch outside the worker path (e.g. a single lookup)
            return stack_examples([example(i, epoch) for i in indices])
        return stack_examples(list(pool.map(lambda i: example(i, epoch), indices)))

    label_range = (0, num_classes - 1)
    return Split(len(source), load, config.image_size, label_range, example, config.data_workers)
