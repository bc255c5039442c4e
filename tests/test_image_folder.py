"""imagenet_folder: the published code's ImageNet layout (train/<class>/*.JPEG, val as class
folders or flat + a label file), read as torchvision's ImageFolder labels it, bad files skipped
and counted, every layout mistake refused before training with a line naming it."""

import os
import shutil

import numpy as np
import pytest
from helpers import SMOKE_FLAGS, run_module, tiny_config
from PIL import Image

from dcff_jax import input_pipeline as ip
from dcff_jax.errors import DataError, MissingFileError

CLASSES = ["n02", "n01", "n03"]  # written unsorted: labels must follow the sorted names


def image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_split(root, split: str, per_class: int = 4, flat: bool = False) -> dict[str, str]:
    """Images for CLASSES under root/split (class folders, or flat); {file name: class}."""
    names = {}
    for c, cls in enumerate(CLASSES):
        folder = os.path.join(root, split) if flat else os.path.join(root, split, cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            name = f"{split}_{cls}_{i}.JPEG"
            image(100 * c + i).save(os.path.join(folder, name), quality=90)
            names[name] = cls
    return names


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "imagenet")
    write_split(root, "train")
    write_split(root, "val")
    return root


def test_labels_follow_sorted_class_folders_and_only_images_count(data):
    extra = os.path.join(data, "train", "n01")
    open(os.path.join(extra, "notes.txt"), "w").close()
    open(os.path.join(extra, ".hidden.jpg"), "w").close()
    image(7).save(os.path.join(extra, "lower.png"))
    train, val = ip.image_folder_splits(data)
    assert train.classes == sorted(CLASSES) == val.classes
    assert len(train) == 13 and len(val) == 12
    for path, label in zip(train.paths, train.labels, strict=True):
        assert os.path.basename(os.path.dirname(path)) == sorted(CLASSES)[label]
    assert os.path.basename(train.paths[0]) == "lower.png"  # sorted within the class folder


def test_flat_val_with_either_label_file_equals_class_folders(data, tmp_path):
    _, folders = ip.image_folder_splits(data)
    by_name = {os.path.basename(p): int(label) for p, label in zip(folders.paths, folders.labels)}
    flat = str(tmp_path / "flat")
    shutil.copytree(os.path.join(data, "train"), os.path.join(flat, "train"))
    names = write_split(flat, "val", flat=True)
    with open(os.path.join(flat, "val_labels.txt"), "w") as f:
        f.writelines(f"{name} {cls}\n" for name, cls in names.items())
    _, simple = ip.image_folder_splits(flat)
    os.remove(os.path.join(flat, "val_labels.txt"))
    with open(os.path.join(flat, "LOC_val_solution.csv"), "w") as f:  # Kaggle's: stem, boxes
        f.write("ImageId,PredictionString\n")
        f.writelines(
            f"{n.removesuffix('.JPEG')},{c} 1 2 30 40 {c} 3 4 5 6\n" for n, c in names.items()
        )
    _, kaggle = ip.image_folder_splits(flat)
    for split in (simple, kaggle):
        got = {os.path.basename(p): int(label) for p, label in zip(split.paths, split.labels)}
        assert got == by_name


def test_images_decode_to_rgb_uint8_from_any_mode(tmp_path):
    source = image(3, size=(20, 10))
    expected = np.asarray(source)
    for mode in ("RGB", "RGBA", "P"):
        path = str(tmp_path / f"x_{mode}.png")
        source.convert(mode).save(path)
        decoded = ip.decode_image(path)
        assert decoded.shape == (10, 20, 3) and decoded.dtype == np.uint8
        if mode != "P":  # a palette quantises
            np.testing.assert_array_equal(decoded, expected)
    source.convert("L").save(tmp_path / "gray.jpg")
    gray = ip.decode_image(str(tmp_path / "gray.jpg"))
    assert gray.shape == (10, 20, 3) and np.all(gray[..., 0] == gray[..., 2])


def test_unreadable_files_are_replaced_by_the_next_and_counted(data, caplog):
    folder = os.path.join(data, "train", "n01")
    with open(os.path.join(folder, "a_garbage.JPEG"), "wb") as f:
        f.write(b"not an image at all")
    good = os.path.join(folder, "train_n01_0.JPEG")
    with open(good, "rb") as f:
        head = f.read()[:300]
    with open(os.path.join(folder, "b_truncated.JPEG"), "wb") as f:
        f.write(head)
    train, _ = ip.image_folder_splits(data)
    assert [os.path.basename(p) for p in train.paths[:3]] == [
        "a_garbage.JPEG",
        "b_truncated.JPEG",
        "train_n01_0.JPEG",
    ]
    with pytest.raises(OSError):  # the source itself raises ...
        train[0]
    before = ip.skipped_count()
    replaced = ip.read_or_skip(train, 0)  # ... and the loader moves on, counting
    np.testing.assert_array_equal(replaced["image"], train[2]["image"])
    assert replaced["label"] == train[2]["label"]
    assert ip.skipped_count() - before == 2
    assert "skipped unreadable image" in caplog.text and "a_garbage.JPEG" in caplog.text
    # Through the Split every batch keeps its shape.
    config = tiny_config(data, dataset="imagenet_folder", image_size=32, num_classes=3)
    split = ip.load_data(config).train
    images, labels = split.load(np.arange(split.num_examples), epoch=0)
    assert images.shape == (14, 32, 32, 3) and labels.tolist()[:3] == [0, 0, 0]


def test_splits_are_deterministic_and_fit_the_config(data):
    config = tiny_config(data, dataset="imagenet_folder", image_size=32, num_classes=3)
    loaded = ip.load_data(config)
    ip.check_fits(config, loaded, data)
    assert loaded.train.label_range == (0, 2) and not loaded.device_augment
    a, la = loaded.train.load(np.arange(6), epoch=1)
    b, lb = loaded.train.load(np.arange(6), epoch=1)
    c, _ = loaded.train.load(np.arange(6), epoch=2)
    np.testing.assert_array_equal(a, b)
    assert la.tolist() == lb.tolist() and np.any(a != c)
    test_images, _ = loaded.test.load(np.arange(12), epoch=0)
    assert test_images.shape == (12, 32, 32, 3)
    with pytest.raises(DataError, match="config.num_classes is 2"):
        ip.check_fits(tiny_config(data, num_classes=2), loaded, data)


@pytest.mark.parametrize(
    "breakage, error, message",
    [
        (lambda d: shutil.rmtree(os.path.join(d, "val")), MissingFileError, "val does not exist"),
        (
            lambda d: os.makedirs(os.path.join(d, "train", "n00_empty")),
            DataError,
            "class folder .*n00_empty has no images",
        ),
        (
            lambda d: os.makedirs(os.path.join(d, "val", "n99")),
            DataError,
            r"class folders that train lacks: \['n99'\]",
        ),
    ],
    ids=["missing-val", "empty-class", "unknown-val-class"],
)
def test_layout_mistakes_are_named(data, breakage, error, message):
    breakage(data)
    with pytest.raises(error, match=message):
        ip.image_folder_splits(data)


def test_flat_val_label_file_mistakes_are_named(data):
    flat_val = os.path.join(data, "val")
    shutil.rmtree(flat_val)
    names = write_split(data, "val", flat=True)
    with pytest.raises(MissingFileError, match="no label file: put val_labels.txt"):
        ip.image_folder_splits(data)
    with pytest.raises(MissingFileError, match="val_labels=/nope does not exist"):
        ip.image_folder_splits(data, "/nope")
    labels = os.path.join(data, "val_labels.txt")
    lines = [f"{n} {c}" for n, c in names.items()]
    with open(labels, "w") as f:
        f.write("\n".join([*lines[:-1], lines[-1].split()[0] + " n77"]))
    with pytest.raises(DataError, match=r"val_labels.txt:12: class 'n77' is not a folder"):
        ip.image_folder_splits(data)
    with open(labels, "w") as f:
        f.write("\n".join(lines[1:]))
    with pytest.raises(DataError, match=f"{list(names)[0]} in .* has no line in"):
        ip.image_folder_splits(data)


@pytest.mark.slow
def test_main_trains_and_exports_from_class_folders(data, tmp_path):
    proc = run_module(
        "dcff_jax.main",
        "--config=configs/resnet56_cifar.py",
        *SMOKE_FLAGS,
        f"--workdir={tmp_path / 'wd'}",
        "--config.dataset=imagenet_folder",
        f"--config.data_dir={data}",
        "--config.image_size=32",
        "--config.num_classes=3",
        "--config.batch_size=4",
        "--config.num_epochs=1",
        "--config.data_workers=2",  # the grain worker path, under absl and an initialised JAX
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/1: test top-1" in proc.stderr
    assert os.path.isfile(os.path.join(tmp_path, "wd", "compact", "LATEST"))


def batches_of(data, start_step):
    """(train batches of epoch 1 from start_step, test batches with masks)."""
    train = list(ip.train_batches(data.train, 4, 0, 1, start_step, 3))
    test = list(ip.eval_batches(data.test, 5))
    return train, test


@pytest.mark.parametrize("start_step", [0, 2])
def test_worker_processes_make_exactly_the_batches_of_this_process(data, start_step):
    base = tiny_config(data, dataset="imagenet_folder", image_size=32, num_classes=3)
    here = ip.load_data(base)
    base.data_workers = 2
    workers = ip.load_data(base)
    assert workers.train.workers == 2 and here.train.workers == 0
    pairs = zip(batches_of(here, start_step), batches_of(workers, start_step), strict=True)
    for (a, b), count in zip(pairs, (3 - start_step, 3), strict=True):  # 12 test images: 3 x 5
        assert len(a) == len(b) == count
        for x, y in zip(a, b, strict=True):
            for u, v in zip(x, y, strict=True):
                np.testing.assert_array_equal(u, v)


SIGINT_SCRIPT = """
import os, signal, sys
import multiprocessing.process
import numpy as np
from helpers import tiny_config
from dcff_jax import input_pipeline as ip

# Whether SIGINT is blocked in the thread that starts each worker: the worker inherits that
# mask, and an unblocked one dies of a Ctrl-C that comes while it still imports (a race that
# a test cannot time; the mask it is born with decides it).
spawn_masks = []
start = multiprocessing.process.BaseProcess.start
def recording_start(process):
    spawn_masks.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return start(process)
multiprocessing.process.BaseProcess.start = recording_start

caught = []
signal.signal(signal.SIGINT, lambda *_: caught.append(1))
config = tiny_config(sys.argv[1], dataset="imagenet_folder", image_size=32, num_classes=3)
config.data_workers = 2
split = ip.load_data(config).train
batches = ip.train_batches(split, 2, 0, 0, 0, 6)
first = next(batches)
os.killpg(0, signal.SIGINT)  # Ctrl-C: the whole foreground process group
rest = list(batches)
print("batches", 1 + len(rest), "caught", len(caught), "workers born blocked", spawn_masks)
"""


def test_ctrl_c_reaches_only_the_main_process_not_the_workers(data):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_SCRIPT, data],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group, so the test runner gets no SIGINT
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches 6 caught 1 workers born blocked [True, True]" in proc.stdout, proc.stdout
