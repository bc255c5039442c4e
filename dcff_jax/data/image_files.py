"""Images read one at a time (ImageNet-sized data): the picklable per-example transform, the skip
of unreadable records, and class folders of image files (torchvision ImageFolder's layout)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from dcff_jax.data.transforms import decode_transformed, transform_array
from dcff_jax.errors import DataError, MissingFileError


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
