"""Input pipelines: CIFAR-10 (tfds or a cifar-10-batches-py folder) and ImageNet (tfds), TF-free.

Design:
  - Batches are uint8 (N, H, W, 3) with int32 labels, taken from a per-epoch permutation seeded
    by (seed, epoch), so they depend only on (seed, epoch, step) and a resumed run sees the same
    ones.
  - CIFAR-10 lives in memory (150 MB). By default every host holds the whole split on each of
    its devices and the train loop gathers its batches there (dcff_jax.feeds); it is augmented
    on the device inside the jitted train step (`augment_cifar`: pad-4 random crop + flip, keyed
    by seed and step), so the input is never the bottleneck.
  - On the host path (ImageNet, or data_placement="host") every host reads only its own slice of
    each global batch. ImageNet is decoded by tfds' random-access data source and cropped on
    the host (random-resized-crop 224 + flip; eval resize 256 + centre crop 224) by a thread pool.
  - Normalisation happens on the device (`normalize`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import resource_tracker
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from dcff_jax.errors import DAMAGED_PICKLE, ConfigError, DataError, MissingFileError

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
    # devices (dcff_jax.feeds).
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
            _array_split(*read_cifar_folder(config.data_dir, s)) for s in ("train", "test")
        )
        return Data(train, test, *normalization(config.dataset), device_augment=True)
    if config.dataset == "cifar10":
        train, test = (_array_split(*arrays) for arrays in read_cifar10(config))
        return Data(train, test, *normalization(config.dataset), device_augment=True)
    # Image files are handed over encoded: the transform decodes each for its crop. tfds
    # decodes its records itself unless draft decoding needs the bytes (its mock data, which the
    # tests and benchmarks use, can hand over bytes only through TensorFlow).
    if config.dataset == "imagenet_folder":
        train_files, test_files = (
            dataclasses.replace(files, encoded=True)
            for files in image_folder_splits(config.data_dir, config.val_labels)
        )
        train = _imagenet_split(train_files, len(train_files.classes), config, train=True)
        test = _imagenet_split(test_files, len(train_files.classes), config, train=False)
    else:
        source = _tfds_source("imagenet2012", "train", config.data_dir, config.jpeg_draft)
        train = _imagenet_split(source, _num_classes(source), config, train=True)
        source = _tfds_source("imagenet2012", "validation", config.data_dir, config.jpeg_draft)
        test = _imagenet_split(source, _num_classes(source), config, train=False)
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


# --- CIFAR-10 -------------------------------------------------------------------------------

_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _is_cifar_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isdir(
        os.path.join(path, "cifar-10-batches-py")
    )


def read_cifar10(config) -> list[tuple[np.ndarray, np.ndarray]]:
    """[train, test] as (uint8 (n, 32, 32, 3), int32 (n,)) from the first copy found: a
    cifar-10-batches-py folder at config.data_dir, tfds' cifar10 there (or in its default data
    dir), the folder or archive in the cache (config.data_dir, else download.default_cache_dir()),
    else one downloaded into that cache when config.download is on."""
    from dcff_jax import download

    splits = ("train", "test")
    if config.data_dir and _is_cifar_folder(config.data_dir):
        return [read_cifar_folder(config.data_dir, s) for s in splits]
    try:
        return [read_tfds_arrays("cifar10", s, config.data_dir) for s in splits]
    except MissingFileError:
        pass  # not prepared for tfds: the cache, or a download
    cache = config.data_dir or download.default_cache_dir()
    folder = download.ensure_cifar10(
        cache, config.cifar10_url, config.cifar10_md5, download=config.download
    )
    logging.info("CIFAR-10 from %s", folder)
    return [read_cifar_folder(folder, s) for s in splits]


def read_cifar_folder(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the standard `cifar-10-batches-py` folder (data_dir may be it or its parent).

    Returns:
      images uint8 (n, 32, 32, 3) and labels int32 (n,).
    """
    from dcff_jax import storage

    # epath: a local folder or one on an object store (read whole: 150 MB in all).
    if storage.is_remote(data_dir):
        storage.check_backend(data_dir)
    folder = epath.Path(data_dir)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    expected = _CIFAR_FILES[split]
    missing = [f for f in expected if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        local = not storage.is_remote(data_dir) and not os.path.isabs(data_dir)
        relative = f" (relative to {os.getcwd()})" if local else ""
        what = f"lacks {missing}" if folder.is_dir() else "does not exist"
        raise MissingFileError(
            f"CIFAR-10 folder {str(folder)!r}{relative} {what}: expected "
            "the standard cifar-10-batches-py folder (data_batch_1..5, test_batch), e.g. from "
            "`python ../shared/data/make_cifar10.py DIR`, given as --config.data_dir=DIR"
        )
    images, labels = [], []
    for name in expected:
        path = folder / name
        try:
            with path.open("rb") as f:
                batch = _SafeUnpickler(f, encoding="bytes").load()
            if not isinstance(batch, dict):
                raise TypeError(f"a {type(batch).__name__}, not a dict")
            data = _exact_array(_unpickled_array(batch[b"data"]), np.uint8, 2)
            data = data.reshape(-1, 3, 32, 32)
            batch_labels = _exact_array(_unpickled_array(batch[b"labels"]), np.int64, 1)
        except DAMAGED_PICKLE as e:
            raise DataError(f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})") from e
        if len(batch_labels) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < 10:
            raise DataError(
                f"{path}: labels outside 0..9 ({batch_labels.min()}..{batch_labels.max()})"
            )
        batch_labels = batch_labels.astype(np.int32)
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _exact_array(value, dtype, ndim: int) -> np.ndarray:
    """value as an array of `dtype`, refused (ValueError) unless it is `ndim`-dimensional and
    every element converts exactly (no wrap-around of a 300 into a uint8 44)."""
    array = np.asarray(value)
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a {array.ndim}-d {array.dtype} array, expected {ndim}-d integers")
    if array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"values outside {np.dtype(dtype).name}")
    return array.astype(dtype, copy=False)


class _SafeUnpickler(pickle._Unpickler):
    """The official files are pickles of dicts of NumPy arrays, bytes, lists and ints. Only those
    are built: arrays through the stand-ins below, never NumPy's own unpickling (a crafted dtype
    state can mark uint8 as holding object pointers), and nothing else, so a tampered file can
    neither run code nor build a broken array. Python's unpickler, not C's: the C one sizes its
    memo table by the largest index a file names, so one damaged byte can ask for gigabytes."""

    def find_class(self, module, name):
        if (module, name) in _ARRAY_GLOBALS:
            return _ARRAY_GLOBALS[module, name]
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 file")


# Integer dtypes a CIFAR-10 file may hold ('|u1' pixels; labels pickled as arrays by some tools).
_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}
_ELEMENT_CAP = 1 << 31  # all of CIFAR-10's pixels are 1.8e8 elements


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("a bytes object pickled in an unknown way")
    return text.encode("latin1")


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


class _DtypeStandIn:
    """numpy.dtype(name, align, copy) + BUILD: an integer dtype, its state checked whole."""

    def __init__(self, name, align=False, copy=True):
        name = _text(name)  # Python 2's files give bytes (encoding="bytes")
        if name not in _DTYPES:
            raise pickle.UnpicklingError(f"dtype {name!r} is not an integer type")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        order = "|" if self.dtype.itemsize == 1 else "<"
        state = tuple(_text(x) for x in state) if isinstance(state, tuple) else state
        if state not in (
            (3, order, None, None, None, -1, -1, 0),
            (3, "=", None, None, None, -1, -1, 0),
        ):
            raise pickle.UnpicklingError(f"dtype state {state!r} is not a plain integer type's")


class _ArrayStandIn:
    """numpy's _reconstruct(ndarray, (0,), b'b') + BUILD: the array its state describes, read
    with np.frombuffer after its shape, dtype and byte count agree."""

    def __init__(self, cls, shape, code):
        if cls is not _ndarray:
            raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("an array state that is not (version, shape, ...)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStandIn) or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("an array state without a dtype and its bytes")
        if not isinstance(shape, tuple) or not all(
            isinstance(n, int) and 0 <= n <= _ELEMENT_CAP for n in shape
        ):
            raise pickle.UnpicklingError(f"an array shape {shape!r}")
        count = math.prod(shape)
        if count > _ELEMENT_CAP or count * dtype.dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(
                f"an array of shape {shape} holds {len(raw)} bytes, not {count} elements'"
            )
        order = "F" if fortran is True else "C"
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order=order)


def _ndarray(*_):
    raise pickle.UnpicklingError("numpy.ndarray called directly")


_ARRAY_GLOBALS = {
    **{
        (m, "_reconstruct"): _ArrayStandIn
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _DtypeStandIn,
}


def _unpickled_array(value):
    """An array stand-in's array (a list stays a list); ValueError for one never built."""
    if isinstance(value, _ArrayStandIn):
        if value.array is None:
            raise ValueError("an array without its data")
        return value.array
    return value


def read_tfds_arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """A small tfds dataset (e.g. cifar10) in memory: uint8 (n, H, W, 3), int32 (n,)."""
    source = _tfds_source(name, split, data_dir)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return images, labels


def _tfds_source(name: str, split: str, data_dir: str, encoded: bool = False):
    """A random-access source of a prepared tfds dataset: tfds' own for array_record, ours
    (dcff_jax.tfrecord) for tfrecord, which tfds serves only through TensorFlow. encoded: its
    "image" is the file's bytes, not decoded."""
    import tensorflow_datasets as tfds

    from dcff_jax import tfrecord

    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
    try:
        return tfds.data_source(
            name, split=split, data_dir=data_dir or None, download=False, decoders=decoders
        )
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
        error = e
    # Prepared in tfrecord, or in another version than this tfds release's default.
    builder = tfrecord.prepared_builder(name, data_dir)
    formats = (tfds.core.FileFormat.TFRECORD, tfds.core.FileFormat.ARRAY_RECORD)
    if builder is not None and builder.info.file_format in formats:
        if split not in builder.info.splits:
            raise MissingFileError(
                f"tfds dataset {name!r} in {builder.data_dir} has no split {split!r} "
                f"(it has {sorted(builder.info.splits)})"
            )
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            return builder.as_data_source(split=split, decoders=decoders)
        return tfrecord.data_source(builder.info, split, decoders)
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
    raise MissingFileError(
        f"tfds dataset {name!r} split {split!r} is not prepared in {where} "
        f"({type(error).__name__}: {error}). Prepare it with tfds (e.g. "
        f"`tfds build {name} --data_dir=DIR`, array_record or tfrecord format) "
        "and pass --config.data_dir=DIR"
    ) from error


def _num_classes(source) -> int:
    """The label count a tfds source declares (ImageNet: 1000)."""
    return source.dataset_info.features["label"].num_classes


def _array_split(images: np.ndarray, labels: np.ndarray) -> Split:
    def load(indices, epoch):
        del epoch
        return images[indices], labels[indices]

    label_range = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    return Split(len(labels), load, images.shape[1], label_range, arrays=(images, labels))


# --- ImageNet -------------------------------------------------------------------------------


def _imagenet_split(source, num_classes: int, config, train: bool) -> Split:
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


@dataclasses.dataclass(frozen=True)
class ImageExample:
    """`(index, epoch)` -> (uint8 (size, size, 3), label) from a random-access source; picklable,
    so that worker processes can run it. The train crop and flip are keyed by (seed, epoch,
    index) only: the same wherever and in whichever order it runs."""

    source: object
    size: int
    seed: int
    train: bool
    draft: bool = False  # decode JPEGs at a reduced DCT scale where allowed (decode_transformed)

    def __call__(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
        def transform(record: dict) -> tuple[np.ndarray, int]:
            image, rng = record["image"], self._rng(index, epoch)
            if isinstance(image, bytes):  # encoded (our sources): decoded for this crop
                image = decode_transformed(image, self.size, self.train, rng, self.draft)
            else:
                image = transform_array(np.asarray(image, np.uint8), self.size, self.train, rng)
            return image, int(record["label"])

        # The decode runs inside read_or_skip: an unreadable image is skipped, not a crash.
        return read_or_skip(self.source, int(index), transform)

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, int(index)])


_skipped = [0]  # unreadable records met by this process


def skipped_count() -> int:
    """How many unreadable records this process has skipped (each worker process counts its
    own)."""
    return _skipped[0]


def read_or_skip(source, index: int, then: Callable[[dict], Any] | None = None):
    """source[index] (then(source[index]) when given: a decode that may fail too), or when that
    record cannot be read or decoded (a corrupt, truncated or non-image file or record) the next
    readable one (index + 1, ... modulo the length), so a batch keeps its shape. Each skip is
    counted and logged: every one of the first 10, then one in _WARN_EVERY. Never a crash hours
    into an epoch; 100 unreadable in a row is a DataError."""
    from google.protobuf.message import DecodeError

    for offset in range(min(len(source), 100)):
        i = (index + offset) % len(source)
        try:
            return source[i] if then is None else then(source[i])
        except (OSError, ValueError, SyntaxError, DecodeError) as e:  # PIL's and protobuf's
            _skipped[0] += 1  # a race between threads only miscounts a warning
            if _skipped[0] <= 10 or _skipped[0] % _WARN_EVERY == 0:
                what = source.describe(i) if hasattr(source, "describe") else f"record {i}"
                logging.warning(
                    "skipped unreadable image %s (%s: %s); %d skipped so far in this process, "
                    "each replaced by the next readable image",
                    what,
                    type(e).__name__,
                    e,
                    _skipped[0],
                )
    raise DataError(f"100 records in a row from index {index} on are unreadable")


def stack_examples(examples: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([e[0] for e in examples]), np.asarray([e[1] for e in examples], np.int32)


# --- Class folders of images (torchvision ImageFolder's layout) ----------------------------

# ImageFolder's IMG_EXTENSIONS, compared case-insensitively as it does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Skipped-file warnings: every one of the first few, then one per this many.
_WARN_EVERY = 100


@dataclasses.dataclass
class ImageFiles:
    """Random access to image files with labels: `files[i]` -> {"image": uint8 (H, W, 3) RGB,
    "label": int}; an unreadable file raises (ImageExample skips it)."""

    paths: list[str]
    labels: np.ndarray  # int32 (n,)
    classes: list[str]  # label -> class folder name (the train split's, sorted)
    encoded: bool = False  # "image" is the file's bytes (decode_transformed decodes them)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = epath.Path(path).read_bytes() if self.encoded else decode_image(path)
        return {"image": image, "label": int(self.labels[index])}

    def describe(self, index: int) -> str:
        return self.paths[index]


def decode_image(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB (grayscale, CMYK, palette and alpha converted as
    torchvision's pil_loader does)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
        return np.asarray(image.convert("RGB"))


def image_folder_splits(data_dir: str, val_labels: str = "") -> tuple[ImageFiles, ImageFiles]:
    """(train, val) of the published code's ImageNet layout: data_dir/train/<class>/<images> and
    data_dir/val, either as class folders too or flat with a label file.

    Classes are the train folder names in sorted order (ImageFolder's labels). A flat val folder
    takes its labels from `val_labels` (default: data_dir/val_labels.txt, else Kaggle's
    data_dir/LOC_val_solution.csv): one image per line, its file name (or name without
    extension), a comma or whitespace, its class folder name, anything after ignored; a header
    line starting with ImageId is skipped.

    Raises:
      MissingFileError: a missing split or label file.
      DataError: an empty class folder, a val class unknown to train, an image without label.
    """
    from dcff_jax import storage

    if storage.is_remote(data_dir):
        storage.check_backend(data_dir)
    root = epath.Path(data_dir)
    train_dir, val_dir = root / "train", root / "val"
    for split in (train_dir, val_dir):
        if not split.is_dir():
            raise MissingFileError(
                f"{split} does not exist: imagenet_folder expects {data_dir}/train/<class>/"
                f"<images> and {data_dir}/val (class folders, or images + a label file)"
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders (expected {train_dir}/<class>/<images>)")
    index = {name: i for i, name in enumerate(classes)}
    train = _class_folders(train_dir, classes, index)
    val_classes = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
    if val_classes:
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(
                f"{val_dir} has class folders that train lacks: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}"
            )
        val = _class_folders(val_dir, val_classes, index)
    else:
        val = _flat_with_labels(val_dir, _val_label_file(root, val_labels), classes, index)
    return train, val


def _is_image(path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_folders(split_dir, classes: list[str], index: dict[str, int]) -> ImageFiles:
    paths, labels = [], []
    for name in classes:
        files = sorted(str(p) for p in (split_dir / name).iterdir() if _is_image(p))
        if not files:
            raise DataError(
                f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "remove it or fill it"
            )
        paths += files
        labels += [index[name]] * len(files)
    return ImageFiles(paths, np.asarray(labels, np.int32), list(index))


def _val_label_file(root, val_labels: str):
    if val_labels:
        path = epath.Path(val_labels)
        if not path.is_file():
            raise MissingFileError(f"--config.val_labels={val_labels} does not exist")
        return path
    for name in ("val_labels.txt", "LOC_val_solution.csv"):
        if (root / name).is_file():
            return root / name
    raise MissingFileError(
        f"{root / 'val'} has no class folders and no label file: put val_labels.txt "
        "(lines '<image file> <class folder name>') or Kaggle's LOC_val_solution.csv in "
        f"{root}, pass --config.val_labels=FILE, or sort val into class folders"
    )


def _flat_with_labels(val_dir, label_file, classes: list[str], index: dict[str, int]):
    labels_by_name = {}
    for number, line in enumerate(label_file.read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or (number == 1 and fields[0] == "ImageId"):
            continue
        if len(fields) < 2:
            raise DataError(f"{label_file}:{number}: expected '<image> <class>', got {line!r}")
        if fields[1] not in index:
            raise DataError(
                f"{label_file}:{number}: class {fields[1]!r} is not a folder of train "
                f"({len(classes)} classes, e.g. {classes[0]!r})"
            )
        labels_by_name[fields[0]] = index[fields[1]]
    paths, labels = [], []
    for path in sorted(val_dir.iterdir(), key=lambda p: p.name):
        if not _is_image(path):
            continue
        label = labels_by_name.get(path.name, labels_by_name.get(path.stem))
        if label is None:
            raise DataError(f"{path.name} in {val_dir} has no line in {label_file}")
        paths.append(str(path))
        labels.append(label)
    if not paths:
        raise DataError(f"{val_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(paths, np.asarray(labels, np.int32), classes)


def random_resized_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
    """torchvision's RandomResizedCrop on a PIL image: (H, W, 3) uint8 -> (size, size, 3)."""
    top, left, height, width = resized_crop_box(*image.shape[:2], rng, scale, ratio)
    return _resize(image[top : top + height, left : left + width], size, size)


def resized_crop_box(
    h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.get_params draws them (area
    fraction, then log-aspect, up to 10 tries, then top and left), numpy's generator for torch's;
    when no try fits, its fallback: the whole image clipped to the aspect range, centred."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    if w / h < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif w / h > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize_center_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image, pixel for pixel (see
    center_crop_geometry)."""
    nh, nw, top, left = center_crop_geometry(*image.shape[:2], resize, size)
    image = _resize(image, nh, nw)
    return image[top : top + size, left : left + size]


def center_crop_geometry(h: int, w: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of torchvision's Resize(resize) +
    CenterCrop(size) on an h x w image: the shorter side becomes `resize`, the longer
    int(resize * long / short) (truncated), then the crop starts at round((side - size) / 2)
    (Python's round, as torchvision's)."""
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nh, nw = resize, int(resize * w / h)
    return nh, nw, int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))


def _flip_half(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The horizontal flip of RandomHorizontalFlip(0.5), drawn after the crop."""
    return image[:, ::-1] if rng.random() < 0.5 else image


# What draft decoding may change, measured against full decode + the exact transforms on
# photo-like JPEGs where it applies (tests/test_jpeg_draft.py checks it): the mean
# absolute difference per image, and the share of pixels off by more than 16 levels.
# Measured worst cases (experiments/RESULTS.md): 3.13 and 0.0018, at 800x600 (scale 1/2).
DRAFT_TOLERANCE = {"mean_abs": 4.0, "share_over_16": 0.01}


def transform_array(
    image: np.ndarray, size: int, train: bool, rng: np.random.Generator
) -> np.ndarray:
    """A decoded uint8 (H, W, 3) image -> its train crop (RandomResizedCrop + flip, from rng)
    or eval crop (Resize(size * 256 / 224) + CenterCrop(size)), uint8 (size, size, 3)."""
    if not train:
        return resize_center_crop(image, int(size * 256 / 224), size)
    return _flip_half(random_resized_crop(image, size, rng), rng)


def decode_transformed(
    data: bytes, size: int, train: bool, rng: np.random.Generator, draft: bool = False
) -> np.ndarray:
    """Encoded image -> transform_array(decoded image), in PIL throughout (crop, then resize:
    torchvision's order, no copies to numpy between; the same pixels, ~10% faster).

    draft: decode a JPEG at a reduced DCT scale (1/2, 1/4, 1/8) where the scaled image still
    has at least the pixels the crop is resized to, then resize from it (within
    DRAFT_TOLERANCE of the exact result). Where no reduction applies (500x375 at 224 px, and
    every non-JPEG) the result is exact."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        w, h = image.size
        resize = int(size * 256 / 224)
        if train:
            top, left, ch, cw = resized_crop_box(h, w, rng)
            needed = (math.ceil(w * size / cw), math.ceil(h * size / ch))
        else:
            short = min(w, h)
            needed = (math.ceil(w * resize / short), math.ceil(h * resize / short))
        if draft:
            image.draft(None, needed)  # a no-op unless a JPEG decodes >= needed at 1/2, 1/4, 1/8
        sx, sy = image.size[0] / w, image.size[1] / h  # 1 unless draft reduced it
        rgb = image.convert("RGB")
    if not train:
        nh, nw, top, left = center_crop_geometry(h, w, resize, size)
        resized = rgb.resize((nw, nh), Image.BILINEAR)
        return np.asarray(resized.crop((left, top, left + size, top + size)))
    if (sx, sy) == (1, 1):
        crop = rgb.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
    else:  # the crop box in the reduced image's coordinates (PIL resamples sub-pixel boxes)
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        crop = rgb.resize((size, size), Image.BILINEAR, box=box)
    return _flip_half(np.asarray(crop), rng)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


# --- Batching (host) ------------------------------------------------------------------------


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training set in an epoch: depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    split: Split,
    global_batch: int,
    seed: int,
    epoch: int,
    start_step: int,
    num_steps: int,
    last_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's slices of the epoch's global batches, from `start_step` (for resume).

    Each process yields 1 / process_count of every global batch. Steps 0..num_steps-1 take
    `global_batch` examples in the epoch's order, except that with last_batch > 0 the final step
    takes the `last_batch` examples left over (see last_batch_size).
    """
    order = epoch_permutation(split.num_examples, seed, epoch)
    index_batches = []
    for step in range(start_step, num_steps):
        size = last_batch if last_batch and step == num_steps - 1 else global_batch
        local = size // jax.process_count()
        start = step * global_batch + jax.process_index() * local
        index_batches.append(order[start : start + local])
    return load_batches(split, index_batches, epoch)


def load_batches(
    split: Split, index_batches: list[np.ndarray], epoch: int, threads_per_worker: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """split.load of each index array in order: in grain worker processes when the split has
    workers (each makes whole batches; order kept; workers ignore SIGINT, so Ctrl-C reaches
    only this process), else here.

    Each worker builds one batch at a time (threads_per_worker=1) and keeps one ready: a worker
    is one core, and a worker holds 2 batches, not grain's default of 16 threads and up to 500
    batches in flight (gigabytes per worker for ImageNet batches).
    """
    if not (split.workers and split.example is not None):
        for indices in index_batches:
            yield split.load(indices, epoch)
        return
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its own absl flags (programmatic use)
        flags.FLAGS.mark_as_parsed()
    dataset = grain.MapDataset.source(index_batches).map(
        functools.partial(_load_in_worker, split.example, epoch)
    )
    options = grain.MultiprocessingOptions(num_workers=split.workers)
    read = grain.ReadOptions(num_threads=threads_per_worker, prefetch_buffer_size=1)
    iterator = iter(dataset.to_iter_dataset(read).mp_prefetch(options, worker_init_fn=_worker_init))
    try:
        # Workers start here. A Ctrl-C while one is still importing (before _worker_init runs)
        # would kill it, so they are started with SIGINT blocked in this thread: the processes
        # and helper threads it creates inherit the block, and a Ctrl-C meanwhile reaches
        # this process as soon as the first batch is in.
        first = _with_sigint_blocked(lambda: next(iterator, _END))
        if first is not _END:
            yield first
            yield from iterator
    finally:
        iterator.close()  # stops the workers, also when the consumer stops early


_END = object()


def _with_sigint_blocked(fn: Callable[[], Any]) -> Any:
    """fn() with SIGINT blocked in the calling thread (deferred, not lost), where POSIX allows."""
    if not hasattr(signal, "pthread_sigmask"):
        return fn()
    # The thread that starts multiprocessing's resource tracker leaves with SIGINT unblocked
    # (CPython's ensure_running unblocks it unconditionally); started first, outside the
    # block, it is not started again by a thread inside it.
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return fn()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _load_in_worker(example, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return stack_examples([example(i, epoch) for i in indices])


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prefetch(batches: Iterable, place: Callable, size: int = 2) -> Iterator:
    """`place(batch)` for each batch, in order, computed up to `size` batches ahead by a
    background thread: loading (decoding, cropping) and the host-to-device copy of the next
    batches overlap the device's work on this one (double-buffered at size 2).

    An exception while producing a batch is raised here where that batch would have come;
    closing the iterator early (a stop signal, an error in the loop) stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=size)
    closed = threading.Event()
    done = object()

    def put(item) -> bool:
        while not closed.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in batches:
                if not put(place(batch)):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        closed.set()
        thread.join()


@dataclasses.dataclass
class _Failed:
    error: BaseException


def last_batch_size(split: Split, global_batch: int, devices: int, drop_last: bool) -> int:
    """The global size of an epoch's final partial batch, 0 when there is none.

    The published loaders keep it (PyTorch DataLoader, drop_last=False: 196 steps of CIFAR-10 at
    batch 256, the last of 80 images, whose batch-norm statistics are over those 80). It is split
    evenly over the devices, so it keeps a multiple of `devices` examples (80 on 1-16 devices;
    with more, the few left over are dropped, as is a batch that would be smaller than that).
    """
    if drop_last:
        return 0
    left = split.num_examples % global_batch
    return left - left % devices


def eval_batches(
    split: Split, global_batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's slices of the test set in order; the last batch is padded, with a mask."""
    local = global_batch // jax.process_count()
    offset = jax.process_index() * local
    starts = range(offset, split.num_examples + offset, global_batch)
    wanted = [np.arange(start, start + local) for start in starts]
    valid = [w < split.num_examples for w in wanted]
    index_batches = [np.where(v, w, 0) for w, v in zip(wanted, valid, strict=True)]
    for (images, labels), mask in zip(load_batches(split, index_batches, 0), valid, strict=True):
        yield images, labels, mask


def steps_per_epoch(split: Split, global_batch: int, cap: int = -1, last_batch: int = 0) -> int:
    """Steps of an epoch: the full global batches, plus one when a partial last batch of
    `last_batch` examples is kept; at most `cap` (> 0), which then leaves the partial one out."""
    steps = split.num_examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"the training set has {split.num_examples} examples, fewer than one global batch "
            f"of {global_batch}: lower --config.batch_size"
        )
    if cap > 0 and cap <= steps:
        return cap
    return steps + (1 if last_batch else 0)


# --- Device side (inside jit) -------------------------------------------------------------


def augment_cifar(images: jax.Array, key: jax.Array) -> jax.Array:
    """Pad-4 random crop + horizontal flip: uint8 (n, 32, 32, 3) -> uint8 (n, 32, 32, 3)."""
    n, h, w, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    # Explicit 32-bit dtypes: the same random stream with jax_enable_x64 on (float64 checks).
    offsets = jax.random.randint(crop_key, (n, 2), 0, 9, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_key, jnp.float32(0.5), (n,))
    padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))

    def one(image, offset, flip):
        start = (offset[0], offset[1], jnp.zeros_like(offset[0]))
        crop = jax.lax.dynamic_slice(image, start, (h, w, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 (n, H, W, 3) -> (x / 255 - mean) / std in `dtype`, computed in float32 (float64 for
    a float64 model, whose checks would otherwise start from float32-rounded inputs)."""
    compute = jnp.promote_types(dtype, jnp.float32)
    x = images.astype(compute) / 255.0
    x = (x - jnp.asarray(mean, compute)) / jnp.asarray(std, compute)
    return x.astype(dtype)
