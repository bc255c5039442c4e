"""The images' transforms: torchvision's train and eval crops on the host (with JPEG draft
decoding), and on the device CIFAR's pad-crop-flip and the normalisation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


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
