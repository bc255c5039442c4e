"""JPEG draft decoding (config.jpeg_draft): exact where it does not apply, within the stated
tolerance where it does, and the same skip-and-count path for unreadable files."""

import io
import os

import numpy as np
import pytest
from helpers import photo_like, tiny_config
from PIL import Image

from dcff_jax import input_pipeline as ip


def jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(seed), width, height)).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


def exact(data: bytes, size: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """The path without draft: full decode, then the transforms on arrays."""
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return ip.transform_array(full, size, train, rng)


def both(data: bytes, train: bool, epoch: int, draft=True) -> tuple[np.ndarray, np.ndarray]:
    """(decode_transformed's crop, the exact path's) with the same draws."""
    rngs = (np.random.default_rng([0, epoch, 7]) for _ in range(2))
    ours = ip.decode_transformed(data, 224, train, next(rngs), draft)
    return ours, exact(data, 224, train, next(rngs))


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (1200, 1600)])
def test_without_draft_the_pil_path_is_exact_at_any_size(width, height):
    """The sources' encoded path (decode, crop and resize in PIL) gives the pixels of full
    decode + the transforms on arrays that test_torchvision_parity checks."""
    data = jpeg(width, height, seed=width)
    for train, epochs in ((True, 8), (False, 1)):
        for epoch in range(epochs):
            ours, reference = both(data, train, epoch, draft=False)
            np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500)])
def test_imagenet_sized_images_are_decoded_exactly_with_draft(width, height):
    """500x375 is never 2x the 256 (eval) or 224 (train) px the transforms resample to."""
    data = jpeg(width, height, seed=width)
    for train, epochs in ((True, 8), (False, 1)):
        for epoch in range(epochs):
            draft, reference = both(data, train, epoch)
            np.testing.assert_array_equal(draft, reference)


@pytest.mark.parametrize("width, height", [(800, 600), (1200, 1600)])
def test_large_images_stay_within_the_stated_tolerance(width, height):
    data = jpeg(width, height, seed=width)
    changed = False
    for train, epochs in ((True, 6), (False, 1)):
        for epoch in range(epochs):
            draft, reference = both(data, train, epoch)
            assert draft.shape == reference.shape == (224, 224, 3)
            diff = np.abs(draft.astype(np.int32) - reference.astype(np.int32))
            assert diff.mean() <= ip.DRAFT_TOLERANCE["mean_abs"], (train, epoch, diff.mean())
            assert np.mean(diff > 16) <= ip.DRAFT_TOLERANCE["share_over_16"]
            changed |= bool(diff.any())
    assert changed  # the reduced decode did apply


def test_unreadable_files_are_skipped_with_draft_too(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            os.makedirs(tmp_path / split / c)
            for i in range(3):
                (tmp_path / split / c / f"{i}.JPEG").write_bytes(jpeg(48, 40, seed=10 * i))
    (tmp_path / "train" / "n01" / "1.JPEG").write_bytes(b"not a jpeg")
    config = tiny_config(str(tmp_path), dataset="imagenet_folder", image_size=32, num_classes=2)
    draft = ip.load_data(
        tiny_config(
            str(tmp_path), dataset="imagenet_folder", image_size=32, num_classes=2, jpeg_draft=True
        )
    )
    before = ip.skipped_count()
    images, labels = draft.train.load(np.arange(6), epoch=0)
    assert ip.skipped_count() == before + 1
    reference, reference_labels = ip.load_data(config).train.load(np.arange(6), epoch=0)
    np.testing.assert_array_equal(images, reference)
    assert labels.tolist() == reference_labels.tolist()
