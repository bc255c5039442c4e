import os
import pickle
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import tiny_config, write_cifar_folder

from dcff_jax import input_pipeline as ip
from dcff_jax.errors import DataError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("cifar")), train=53, test=20)


def test_reads_official_layout_folder_or_parent(folder):
    images, labels = ip.read_cifar_folder(folder, "train")
    assert images.shape == (53, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (53,) and labels.dtype == np.int32
    same, _ = ip.read_cifar_folder(os.path.join(folder, "cifar-10-batches-py"), "train")
    np.testing.assert_array_equal(images, same)
    # Channel-last transposition of the official (3, 32, 32) row layout.
    with open(os.path.join(folder, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    np.testing.assert_array_equal(images[0, :, :, 0].ravel(), raw[:1024])
    np.testing.assert_array_equal(images[0, :, :, 2].ravel(), raw[2048:])


def test_missing_and_corrupt_folders_are_explained(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        ip.read_cifar_folder(str(tmp_path / "nothing"), "train")
    broken = write_cifar_folder(str(tmp_path / "broken"), train=10, test=5)
    with open(os.path.join(broken, "cifar-10-batches-py", "test_batch"), "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 batch file"):
        ip.read_cifar_folder(broken, "test")


def test_tampered_pickle_cannot_run_code(tmp_path):
    root = write_cifar_folder(str(tmp_path / "evil"), train=10, test=5)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        ip.read_cifar_folder(root, "test")


def test_real_cifar_from_shared_data_if_present():
    shared = os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "cifar-10-batches-py"
    )
    if not os.path.isdir(shared):
        pytest.skip("../shared/data not beside this checkout")
    assert sorted(os.listdir(shared))[0].endswith(
        ".xz"
    )  # packed: the loader needs the folder written out
    with pytest.raises(FileNotFoundError, match="make_cifar10.py"):
        ip.read_cifar_folder(shared, "test")


def test_tfds_cifar10_and_imagenet_from_mock_data():
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        data = ip.load_data(tiny_config("", dataset="cifar10"))
        assert data.train.num_examples == 24 and data.device_augment
        images, labels = data.train.load(np.arange(5), 0)
        assert images.shape == (5, 32, 32, 3) and labels.dtype == np.int32
        config = tiny_config("", dataset="imagenet2012", image_size=64, num_classes=1000)
        imagenet = ip.load_data(config)
        a, _ = imagenet.train.load(np.arange(6), epoch=3)
        b, _ = imagenet.train.load(np.arange(6), epoch=3)
        c, _ = imagenet.train.load(np.arange(6), epoch=4)
        assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)  # deterministic given (seed, epoch, index)
        assert np.any(a != c)
        test_images, _ = imagenet.test.load(np.arange(3), 0)
        assert test_images.shape == (3, 64, 64, 3)


def test_unprepared_tfds_dataset_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        ip.load_data(tiny_config(str(tmp_path), dataset="imagenet2012", image_size=224))
    # cifar10 falls back to the cache, then a download (tests/test_download.py); off, it says
    # where the files go.
    with pytest.raises(FileNotFoundError, match=f"not in {tmp_path} and --config.download=False"):
        ip.load_data(tiny_config(str(tmp_path), dataset="cifar10", download=False))


def pil_resize(image, box, width, height):
    """PIL's own crop (left, top, right, bottom) then bilinear resize: the expected pixels."""
    from PIL import Image

    cropped = Image.fromarray(image).crop(box) if box else Image.fromarray(image)
    return np.asarray(cropped.resize((width, height), Image.BILINEAR))


def test_resize_center_crop_pixels():
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    # Shorter side 60 -> 30: (30, 40); centre 24x24 crop starts at top 3, left 8.
    want = pil_resize(image, None, 40, 30)[3:27, 8:32]
    np.testing.assert_array_equal(ip.resize_center_crop(image, 30, 24), want)


def test_random_resized_crop_pixels():
    image = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    for seed in range(5):
        got = ip.random_resized_crop(image, 24, np.random.default_rng(seed))
        # Replay torchvision's draws (area, log-aspect, then top, left) with the same generator.
        # Up to 10 tries until the crop fits (none of these seeds needs the centre fallback).
        rng = np.random.default_rng(seed)
        for _ in range(10):
            area = 50 * 80 * rng.uniform(0.08, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < cw <= 80 and 0 < ch <= 50:
                break
        else:
            raise AssertionError("no crop fitted in 10 tries")
        top, left = rng.integers(0, 50 - ch + 1), rng.integers(0, 80 - cw + 1)
        want = pil_resize(image, (left, top, left + cw, top + ch), 24, 24)
        np.testing.assert_array_equal(got, want)


def test_epoch_order_depends_only_on_seed_and_epoch(folder):
    split = ip.load_data(tiny_config(folder)).train
    full = list(ip.train_batches(split, 8, seed=1, epoch=2, start_step=0, num_steps=6))
    resumed = list(ip.train_batches(split, 8, seed=1, epoch=2, start_step=4, num_steps=6))
    for (a, la), (b, lb) in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    other = next(ip.train_batches(split, 8, seed=1, epoch=3, start_step=0, num_steps=1))
    assert np.any(other[1] != full[0][1])
    assert ip.steps_per_epoch(split, 8) == 6 and ip.steps_per_epoch(split, 8, cap=2) == 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ip.steps_per_epoch(split, 64)


def test_last_partial_batch_is_one_more_step_that_completes_the_epoch(folder):
    split = ip.load_data(tiny_config(folder)).train  # 53 examples: 6 batches of 8, then 5
    assert ip.last_batch_size(split, 8, devices=1, drop_last=False) == 5
    assert ip.last_batch_size(split, 8, devices=1, drop_last=True) == 0
    # Split evenly over devices: 4 of the 5 on 2 or 4 devices, none on 8.
    assert ip.last_batch_size(split, 8, devices=2, drop_last=False) == 4
    assert ip.last_batch_size(split, 8, devices=8, drop_last=False) == 0
    assert ip.steps_per_epoch(split, 8, last_batch=5) == 7
    assert ip.steps_per_epoch(split, 8, cap=6, last_batch=5) == 6  # a cap leaves it out
    assert ip.steps_per_epoch(split, 8, cap=9, last_batch=5) == 7
    batches = list(
        ip.train_batches(split, 8, seed=1, epoch=2, start_step=0, num_steps=7, last_batch=5)
    )
    assert [len(labels) for _, labels in batches] == [8] * 6 + [5]
    images = np.concatenate([im for im, _ in batches])
    everything, _ = ip.read_cifar_folder(folder, "train")
    # Every training example exactly once in the epoch, in its order.
    order = ip.epoch_permutation(53, seed=1, epoch=2)
    np.testing.assert_array_equal(images, everything[order])
    # Resuming at the last step yields the same partial batch.
    ((resumed, _),) = ip.train_batches(split, 8, 1, 2, start_step=6, num_steps=7, last_batch=5)
    np.testing.assert_array_equal(resumed, batches[-1][0])


def test_eval_batches_cover_the_split_once_with_padding_mask(folder):
    split = ip.load_data(tiny_config(folder)).test
    seen = []
    for images, labels, valid in ip.eval_batches(split, 8):
        assert images.shape[0] == 8
        seen.extend(labels[valid].tolist())
    np.testing.assert_array_equal(seen, split.load(np.arange(20), 0)[1])


def test_device_augmentation_is_pad4_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    out = np.asarray(ip.augment_cifar(images, jax.random.key(0)))
    again = np.asarray(ip.augment_cifar(images, jax.random.key(0)))
    np.testing.assert_array_equal(out, again)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(16):
        found = any(
            np.array_equal(out[i], crop) or np.array_equal(out[i], crop[:, ::-1])
            for dy in range(9)
            for dx in range(9)
            for crop in [padded[i, dy : dy + 32, dx : dx + 32]]
        )
        assert found, i
    assert np.any(out != images)


def test_normalize_uses_published_statistics():
    x = np.full((1, 2, 2, 3), 255, np.uint8)
    y = np.asarray(ip.normalize(x, ip.CIFAR_MEAN, ip.CIFAR_STD))
    np.testing.assert_allclose(
        # float32: mean and std rounded (u each), 1 - mean and the division rounded (u each).
        y[0, 0, 0],
        (1 - np.array(ip.CIFAR_MEAN)) / np.array(ip.CIFAR_STD),
        rtol=4 * 2.0**-24,
    )


def test_prefetch_keeps_order_runs_ahead_and_stops_its_thread():
    import threading

    produced = []

    def batches():
        for i in range(10):
            produced.append(i)
            yield i

    placed = ip.prefetch(batches(), lambda b: b * 10, size=2)
    assert next(placed) == 0
    deadline = time.time() + 10
    while len(produced) < 4 and time.time() < deadline:  # batch 0 taken, 1-2 queued, 3 waiting
        time.sleep(0.01)
    assert len(produced) == 4  # ahead by the queue and one in hand, no further
    assert [*placed] == [10 * i for i in range(1, 10)]
    before = threading.active_count()
    early = ip.prefetch(iter(range(100)), lambda b: b, size=2)
    assert next(early) == 0
    early.close()  # a stop signal mid-epoch: the thread ends
    assert threading.active_count() == before


def test_prefetch_raises_a_producer_error_where_its_batch_would_come():
    def batches():
        yield 1
        yield 2
        raise DataError("batch 3 is unreadable")

    placed = ip.prefetch(batches(), lambda b: b)
    assert next(placed) == 1 and next(placed) == 2
    with pytest.raises(DataError, match="batch 3"):
        next(placed)


def test_the_former_module_name_re_exports_the_data_package():
    from dcff_jax import data

    assert ip.__all__ == data.__all__ and len(data.__all__) > 30
    assert ip.load_data is data.sources.load_data and ip.normalize is data.transforms.normalize
