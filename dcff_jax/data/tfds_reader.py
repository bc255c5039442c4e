"""tfds datasets read by random access (tfds.data_source, or tfrecord without TensorFlow:
dcff_jax.data.tfrecord), as arrays (CIFAR-10) or as an indexable source (ImageNet)."""

from __future__ import annotations

import numpy as np

from dcff_jax.errors import MissingFileError


def read_tfds_arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """A small tfds dataset (e.g. cifar10) in memory: uint8 (n, H, W, 3), int32 (n,)."""
    source = tfds_source(name, split, data_dir)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return images, labels


def tfds_source(name: str, split: str, data_dir: str, encoded: bool = False):
    """A random-access source of a prepared tfds dataset: tfds' own for array_record, ours
    (dcff_jax.data.tfrecord) for tfrecord, which tfds serves only through TensorFlow. encoded: its
    "image" is the file's bytes, not decoded."""
    import tensorflow_datasets as tfds

    from dcff_jax.data import tfrecord

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


def class_count(source) -> int:
    """The label count a tfds source declares (ImageNet: 1000)."""
    return source.dataset_info.features["label"].num_classes
