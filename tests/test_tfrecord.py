"""imagenet2012 from tfds in either file format, without TensorFlow.

The test writes a tiny tfds dataset named imagenet2012 with tfds itself, then rewrites the same
serialized examples as tfrecord shards (the train split in 2 shards; helpers.py). Both must load
to the same examples through `load_data`."""

import functools
import io
import os
import shutil

import numpy as np
import pytest
from helpers import imagenet_to_tfrecord, tiny_config, write_tfds_imagenet, write_tfrecord
from PIL import Image

from dcff_jax import input_pipeline as ip
from dcff_jax.data import tfrecord
from dcff_jax.errors import DataError, MissingFileError

SPLITS = {"train": 12, "validation": 6}


def tiny_examples(split: str, n: int):
    """n (JPEG bytes, label) of small random images, 3 classes."""
    rng = np.random.default_rng(len(split))
    for i in range(n):
        size = (int(rng.integers(40, 80)), int(rng.integers(40, 80)), 3)
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size, np.uint8)).save(jpeg, "JPEG")
        yield jpeg.getvalue(), i % 3


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{format: data_dir} of one tiny imagenet2012 in array_record and in tfrecord."""
    root = tmp_path_factory.mktemp("tfds")
    array_dir = str(root / "array_record")
    splits = {name: functools.partial(tiny_examples, name, n) for name, n in SPLITS.items()}
    write_tfds_imagenet(array_dir, splits, num_classes=3)
    tfrecord_dir = str(root / "tfrecord")
    imagenet_to_tfrecord(array_dir, tfrecord_dir, {"train": [7, 5], "validation": [6]})
    return {"array_record": array_dir, "tfrecord": tfrecord_dir}


def config_for(data_dir):
    return tiny_config(data_dir, dataset="imagenet2012", image_size=32, num_classes=3)


def test_both_formats_load_the_same_examples(datasets):
    loaded = {fmt: ip.load_data(config_for(d)) for fmt, d in datasets.items()}
    for split in ("train", "test"):
        a, b = (getattr(loaded[fmt], split) for fmt in ("array_record", "tfrecord"))
        assert (
            a.num_examples
            == b.num_examples
            == SPLITS["train" if split == "train" else "validation"]
        )
        assert a.label_range == b.label_range == (0, 2)
        order = np.asarray([5, 0, 11 if split == "train" else 4, 2])  # out of order, across shards
        for x, y in zip(a.load(order, 3), b.load(order, 3), strict=True):
            np.testing.assert_array_equal(x, y)


def test_records_are_indexed_exactly_and_served_by_positioned_reads(datasets, tmp_path):
    shard = os.path.join(
        datasets["tfrecord"], "imagenet2012", "1.0.0", "imagenet2012-train.tfrecord-00001-of-00002"
    )
    records = [b"a", b"", b"x" * 300]
    path = str(tmp_path / "r.tfrecord")
    write_tfrecord(path, records)
    starts, lengths = tfrecord.record_offsets(path)
    assert starts.tolist() == [12, 12 + 1 + 4 + 12, 12 + 1 + 4 + 12 + 0 + 4 + 12]
    assert lengths.tolist() == [1, 0, 300]
    assert len(tfrecord.record_offsets(shard)[0]) == 5
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(DataError, match="is truncated"):
        tfrecord.record_offsets(path)


def test_crc32c_is_the_standard_one_and_a_damaged_length_is_refused(tmp_path, monkeypatch):
    # CRC-32C's check value (RFC 3720): "123456789" -> 0xE3069283, masked as TFRecord does.
    crc = 0xE3069283
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    samples = [b"", b"\x00" * 8, np.random.default_rng(0).bytes(1000)]
    fast = [tfrecord.masked_crc32c(x) for x in samples]
    assert tfrecord.masked_crc32c(b"123456789") == masked
    monkeypatch.setattr(tfrecord, "_crc32c", tfrecord.crc32c_by_table)  # without the package
    assert tfrecord.masked_crc32c(b"123456789") == masked
    assert [tfrecord.masked_crc32c(x) for x in samples] == fast
    path = str(tmp_path / "r.tfrecord")
    write_tfrecord(path, [b"abc", b"defg", b"h"])
    with open(path, "r+b") as f:  # the second record's length, 4 -> 5: one flipped bit
        f.seek(12 + 3 + 4)
        f.write(b"\x05")
    with pytest.raises(DataError, match="record header at byte 19 fails its CRC"):
        tfrecord.record_offsets(path)


def test_a_shard_that_disagrees_with_dataset_info_is_refused(datasets, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(datasets["tfrecord"], broken)
    shard = os.path.join(
        broken, "imagenet2012", "1.0.0", "imagenet2012-train.tfrecord-00000-of-00002"
    )
    write_tfrecord(shard, [b"only one"])
    with pytest.raises(DataError, match="holds 1 records, its dataset_info.json says 7"):
        ip.load_data(config_for(broken))


def test_an_unprepared_dir_still_names_both_formats(tmp_path):
    with pytest.raises(MissingFileError, match="array_record or tfrecord format"):
        ip.load_data(config_for(str(tmp_path)))


def test_tfrecord_shards_are_read_by_worker_processes_too(datasets):
    config = config_for(datasets["tfrecord"])
    here = ip.load_data(config)
    here.train.load(np.arange(3), 0)  # descriptors opened here must not travel to the workers
    config.data_workers = 2
    workers = ip.load_data(config)
    workers.train.load(np.arange(3), 0)
    for a, b in zip(
        ip.train_batches(here.train, 4, 0, 2, 0, 3),
        ip.train_batches(workers.train, 4, 0, 2, 0, 3),
        strict=True,
    ):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_an_unreadable_record_is_skipped_and_counted_not_a_crash(datasets, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(datasets["tfrecord"], damaged)
    version = os.path.join(damaged, "imagenet2012", "1.0.0")
    shard = os.path.join(version, "imagenet2012-train.tfrecord-00000-of-00002")
    records = tfrecord.Records([_instruction(shard, 7)])
    good = [records[i] for i in range(7)]
    write_tfrecord(shard, [b"not a serialized example", *good[1:]])
    intact = ip.load_data(config_for(datasets["tfrecord"])).train
    split = ip.load_data(config_for(damaged)).train
    before = ip.skipped_count()
    images, labels = split.load(np.arange(3), epoch=0)
    assert ip.skipped_count() - before == 1
    want_images, want_labels = intact.load(np.asarray([1, 1, 2]), epoch=0)  # 0 -> the next
    # The replacement is record 1 cropped with record 0's key (seed, epoch, index 0).
    assert labels.tolist() == want_labels.tolist()
    np.testing.assert_array_equal(images[1:], want_images[1:])


def _instruction(filename, count):
    from tensorflow_datasets.core.utils import shard_utils

    return shard_utils.FileInstruction(
        filename=filename, skip=0, take=count, examples_in_shard=count
    )


def test_jpeg_draft_reads_encoded_images_from_both_formats(datasets):
    """With jpeg_draft the sources hand over JPEG bytes and the transform decodes them; at
    these sizes no DCT scale applies, so the batches are exactly those without it."""
    for data_dir in datasets.values():
        exact = ip.load_data(config_for(data_dir))
        config = config_for(data_dir)
        config.jpeg_draft = True
        draft = ip.load_data(config)
        for split in ("train", "test"):
            a, b = getattr(exact, split), getattr(draft, split)
            order = np.arange(a.num_examples)
            for x, y in zip(a.load(order, 2), b.load(order, 2), strict=True):
                np.testing.assert_array_equal(x, y)
