"""Our ImageNet transforms against torchvision's, restated directly on PIL images, on JPEGs of
awkward shapes (odd sides, where truncation and rounding choices show). Allowed deviation: none;
both run the same PIL decode, crop and bilinear resize, so any difference is a semantic one.

torchvision's PIL path, as documented and implemented (transforms.functional):
  - pil_loader: Image.open(f).convert("RGB").
  - Resize(s): the shorter side becomes s, the longer int(s * long / short); PIL BILINEAR.
  - CenterCrop(c): top = int(round((H - c) / 2.0)), left likewise; PIL crop.
  - RandomResizedCrop(c): get_params draws (area fraction, log aspect) up to 10 times, then
    top and left; fallback: the whole image clipped to the aspect range, centred ((H - h) // 2);
    then img.crop((left, top, left + w, top + h)).resize((c, c), BILINEAR).
"""

import os

import numpy as np
import pytest
from PIL import Image

from dcff_jax import input_pipeline as ip

SHAPES = [(375, 500), (500, 375), (333, 500), (500, 333), (257, 256), (683, 1024), (301, 451)]


def torchvision_eval(path: str, resize: int, crop: int) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def torchvision_train_crop(path: str, box: tuple[int, int, int, int], crop: int) -> np.ndarray:
    top, left, h, w = box
    image = Image.open(path).convert("RGB")
    return np.asarray(
        image.crop((left, top, left + w, top + h)).resize((crop, crop), Image.BILINEAR)
    )


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for h, w in SHAPES:
        smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize((w, h))
        pixels = np.clip(np.asarray(smooth, np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255)
        path = os.path.join(root, f"{h}x{w}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def test_eval_transform_is_torchvisions_resize_and_center_crop(jpegs):
    for path in jpegs:
        for resize, crop in ((256, 224), (146, 128)):
            ours = ip.resize_center_crop(ip.decode_image(path), resize, crop)
            np.testing.assert_array_equal(ours, torchvision_eval(path, resize, crop), err_msg=path)


def test_train_crop_is_torchvisions_resized_crop(jpegs):
    for k, path in enumerate(jpegs):
        image = ip.decode_image(path)
        for seed in range(4):
            box = ip.resized_crop_box(*image.shape[:2], np.random.default_rng([k, seed]))
            ours = ip.random_resized_crop(image, 224, np.random.default_rng([k, seed]))
            np.testing.assert_array_equal(ours, torchvision_train_crop(path, box, 224))


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (10, 300, (0, 143, 10, 13)),  # wider than 4:3: height kept, width round(10 * 4 / 3)
        (300, 10, (143, 0, 13, 10)),  # taller than 3:4: width kept, height round(10 / (3 / 4))
    ],
)
def test_the_fallback_when_no_draw_fits_is_torchvisions(h, w, expected):
    # Such shapes make all 10 draws miss (a crop of at least 8% of the area at aspect 3/4-4/3
    # does not fit), so the fallback decides.
    assert ip.resized_crop_box(h, w, np.random.default_rng(0)) == expected


def test_draws_cover_torchvisions_ranges():
    rng = np.random.default_rng(1)
    boxes = np.asarray([ip.resized_crop_box(375, 500, rng) for _ in range(4000)])
    area = boxes[:, 2] * boxes[:, 3] / (375 * 500)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert 0.075 < area.min() < 0.1 and area.max() > 0.9
    # Rounding to whole pixels widens the aspect range a little at small crops.
    assert 0.7 < aspect.min() < 0.77 and 1.3 < aspect.max() < 1.45
    assert np.all(boxes[:, 0] + boxes[:, 2] <= 375) and np.all(boxes[:, 1] + boxes[:, 3] <= 500)
