"""Seeded mutations of every other file a user hands us (issue 23): CIFAR-10 batch pickles, tfrecord
shards' record index, an export's metadata.json, a DCFF plan.json and a run's config.json. Each
reads as what it describes (checked here) or fails with one user error; never another
exception, a hang or a wrong read. The counts print with -s (experiments/RESULTS.md).
"""

import json
import pickle
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from fuzzing import MUTATIONS, flip_bytes, fuzz, mutate_json_bytes, replace_ints, truncate
from helpers import write_tfrecord

from dcff_jax import any_model, export, input_pipeline
from dcff_jax.config import default_config
from dcff_jax.data import tfrecord
from dcff_jax.errors import ConfigError, DataError
from dcff_jax.training import run_config

# --- CIFAR-10 batch files ----------------------------------------------------------------------


def cifar_batch() -> bytes:
    """A test_batch as the official files are laid out (protocol 2, bytes keys), 20 images."""
    rng = np.random.default_rng(0)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": rng.integers(0, 10, 20).tolist(),
        b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(20)],
    }
    return pickle.dumps(batch, protocol=2)


@pytest.mark.parametrize("kind", ["int", "bytes", "truncate"])
def test_mutated_cifar_batches(kind, tmp_path):
    original = cifar_batch()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(["int", "bytes", "truncate"].index(kind))
    mutate = {"int": replace_ints, "bytes": flip_bytes, "truncate": truncate}[kind]

    def read(blob):
        (folder / "test_batch").write_bytes(blob)
        return input_pipeline.read_cifar_folder(str(tmp_path), "test")

    def check(result):
        images, labels = result
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int32 and labels.shape == (len(images),)
        assert labels.size == 0 or 0 <= labels.min() <= labels.max() <= 9

    fuzz("cifar", kind, (mutate(original, rng) for _ in range(MUTATIONS)), read, check)
    images, labels = read(original)  # the unmutated file reads exactly
    batch = pickle.loads(original, encoding="bytes")
    assert np.array_equal(images, batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels.tolist() == batch[b"labels"]


def test_a_cifar_batch_with_code_or_bad_labels_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    bad = {
        "runs code": pickle.dumps(print, protocol=2),
        "not a dict": pickle.dumps([1, 2], protocol=2),
        "label 10": pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
        "pixel 300": pickle.dumps({b"data": np.full((1, 3072), 300), b"labels": [1]}),
        # LONG_BINPUT with memo index 2**31 - 1: the C unpickler would size its memo for it.
        "huge memo": b"\x80\x02}r\xff\xff\xff\x7f.",
    }
    for what, blob in bad.items():
        (folder / "test_batch").write_bytes(blob)
        with pytest.raises(DataError, match="test_batch") as error:
            input_pipeline.read_cifar_folder(str(tmp_path), "test")
        assert "\n" not in str(error.value), what


# --- tfrecord index ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "truncate", "length"])
def test_mutated_tfrecord_shards_index_exactly_or_fail(kind, tmp_path):
    rng = np.random.default_rng(10 + ["bytes", "truncate", "length"].index(kind))
    records = [rng.bytes(int(n)) for n in rng.integers(0, 50, 12)]
    path = tmp_path / "shard.tfrecord"
    write_tfrecord(str(path), records)
    original = path.read_bytes()
    headers = np.cumsum([0] + [12 + len(r) + 4 for r in records[:-1]])

    def mutate(_):
        if kind == "length":  # a record's length field, its CRC left as it was
            data = bytearray(original)
            at = int(headers[rng.integers(len(headers))])
            data[at : at + 8] = struct.pack("<Q", int(rng.integers(0, 2**40)))
            return bytes(data)
        return flip_bytes(original, rng) if kind == "bytes" else truncate(original, rng)

    def read(blob):
        path.write_bytes(blob)
        return tfrecord.record_offsets(str(path)), len(blob)

    def check(result):
        (starts, lengths), size = result
        # Headers intact: every record is where it was written, with its length.
        assert lengths.tolist() == [len(r) for r in records]
        assert starts.tolist() == (headers + 12).tolist() and starts[-1] + lengths[-1] + 4 == size

    fuzz("tfrecord", kind, (mutate(i) for i in range(MUTATIONS)), read, check)


# --- metadata.json, plan.json, config.json -----------------------------------------------------

METADATA = {
    "architecture": "vgg16",
    "cprate": "[0.5]*13",
    "widths": [32, 32],
    "num_classes": 10,
    "image_size": 32,
    "dataset": "cifar10",
    "epoch": 3,
    "test_top1": 0.5,
    "sha256": {"model.stablehlo": "0" * 64},
}


@pytest.mark.parametrize("kind", ["json", "bytes", "truncate"])
def test_mutated_export_metadata(kind, tmp_path):
    rng = np.random.default_rng(20 + ["json", "bytes", "truncate"].index(kind))
    text = json.dumps(METADATA, indent=2)
    path = tmp_path / "metadata.json"

    def read(blob):
        path.write_bytes(blob)
        metadata = export.read_metadata(path)
        return metadata, export.model_of(metadata, path)

    def check(result):
        metadata, model = result
        assert isinstance(metadata["image_size"], int) and 1 <= metadata["image_size"] <= 1 << 14
        assert model.model.num_classes == metadata["num_classes"] >= 1  # DCFF wraps the original

    mutations = (mutate_json_bytes(text, kind, rng) for _ in range(MUTATIONS))
    fuzz("metadata.json", kind, mutations, read, check)


@pytest.fixture(scope="module")
def plan_json():
    import flax_user_models as user

    images = jnp.zeros((1, 32, 32, 3))
    return any_model.make_plan(user.ConcatCNN(), images, 0.5).to_json()


@pytest.mark.parametrize("kind", ["json", "bytes", "truncate"])
def test_mutated_plans(kind, plan_json):
    rng = np.random.default_rng(30 + ["json", "bytes", "truncate"].index(kind))

    def check(plan):
        for conv in plan.convs:
            assert 1 <= conv.kept <= conv.filters and all(n >= 1 for n in conv.kernel_shape)
            assert isinstance(conv.fused, bool) and 0 <= conv.rate < 1

    def read(blob):
        try:
            return any_model.Plan.from_json(blob)
        except ConfigError as error:
            assert "not a dcff-jax plan" in str(error)
            raise

    mutations = (mutate_json_bytes(plan_json, kind, rng) for _ in range(MUTATIONS))
    fuzz("plan.json", kind, mutations, read, check)
    assert any_model.Plan.from_json(plan_json).to_json() == plan_json


@pytest.mark.parametrize("kind", ["json", "bytes", "truncate"])
def test_mutated_run_configs(kind, tmp_path):
    """A resumed run's config.json: readable and equal, or a damaged file or a changed run
    refused in one line (a mutation that only touches resumable fields reads)."""
    rng = np.random.default_rng(40 + ["json", "bytes", "truncate"].index(kind))
    config = default_config()
    text = config.to_json(indent=2)

    def read(blob):
        (tmp_path / "config.json").write_bytes(blob)
        return run_config.check_resumable(config, str(tmp_path))

    mutations = (mutate_json_bytes(text, kind, rng) for _ in range(MUTATIONS))
    fuzz("config.json", kind, mutations, read)
    (tmp_path / "config.json").write_text(text)
    assert run_config.check_resumable(config, str(tmp_path)) is None
