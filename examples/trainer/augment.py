"""Data augmentation in NumPy on uint8 images ``(H, W, 3)``, one image at a time.

Example code, not library API: the member policies of the CIFAR and
ImageNet trainers.

Every function takes a ``numpy.random.Generator`` (grain hands one to each
record, derived from the loader seed and the record index, so augmentation is
reproducible and resumes exactly from a checkpoint).

The policies are simple, documented approximations of the torchvision ones
that the Lookaround paper assigns to its members:

* ``crop_flip``: pad-and-crop (or an Inception-style random resized crop for
  ImageNet) and a horizontal flip with probability 1/2 (CIFAR configs can turn
  the flip off with ``config.random_flip = False``, as the digits config does:
  mirrored digits are other glyphs).
* ``randaugment``: ``crop_flip`` then RandAugment-like: ``num_ops`` operations
  drawn uniformly from :data:`OPS` (with replacement), each at the fixed
  magnitude ``magnitude / 30`` of its range, each sign flipped with
  probability 1/2.
* ``autoaugment``: ``crop_flip`` then AutoAugment-like: one of
  :data:`AUTOAUGMENT_SUBPOLICIES` drawn uniformly; each of its two operations
  is applied with its own probability at its own magnitude. The sub-policies
  are hand-picked pairs in the style of the searched CIFAR-10 policy, not the
  searched policy itself.

Geometric operations use nearest-neighbour sampling with grey fill (128);
``equalize`` is a per-channel histogram equalization; ``sharpness`` blends
with a 3x3 box-smoothed image. Results match torchvision's operations in kind,
not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

FILL = 128


def _blend(image: np.ndarray, other: np.ndarray, factor: float) -> np.ndarray:
    """``other + factor * (image - other)``, clipped to uint8 (PIL's Enhance)."""
    out = other.astype(np.float32) + factor * (image.astype(np.float32) - other)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return (image.astype(np.float32) @ weights)[..., None]


def _affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Samples ``image`` at ``matrix @ (x, y, 1)`` about the centre (nearest)."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    src_x = matrix[0, 0] * (xs - cx) + matrix[0, 1] * (ys - cy) + matrix[0, 2] + cx
    src_y = matrix[1, 0] * (xs - cx) + matrix[1, 1] * (ys - cy) + matrix[1, 2] + cy
    src_x, src_y = np.rint(src_x).astype(np.int64), np.rint(src_y).astype(np.int64)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    out = np.full_like(image, FILL)
    out[inside] = image[src_y[inside], src_x[inside]]
    return out


def identity(image, v):
    return image


def autocontrast(image, v):
    lo = image.min(axis=(0, 1), keepdims=True).astype(np.float32)
    hi = image.max(axis=(0, 1), keepdims=True).astype(np.float32)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1.0), 1.0)
    out = np.where(hi > lo, (image - lo) * scale, image)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def equalize(image, v):
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        hist = np.bincount(channel.ravel(), minlength=256)
        cdf = np.cumsum(hist)
        nonzero = cdf[hist > 0]
        if nonzero.size <= 1:
            out[..., c] = channel
            continue
        lut = np.clip(
            np.rint((cdf - nonzero[0]) * 255.0 / (cdf[-1] - nonzero[0])), 0, 255
        )
        out[..., c] = lut.astype(np.uint8)[channel]
    return out


def rotate(image, v):
    theta = np.deg2rad(30.0 * v)
    c, s = np.cos(theta), np.sin(theta)
    return _affine(image, np.array([[c, -s, 0.0], [s, c, 0.0]], np.float32))


def shear_x(image, v):
    return _affine(image, np.array([[1.0, 0.3 * v, 0.0], [0.0, 1.0, 0.0]], np.float32))


def shear_y(image, v):
    return _affine(image, np.array([[1.0, 0.0, 0.0], [0.3 * v, 1.0, 0.0]], np.float32))


def translate_x(image, v):
    shift = 0.45 * v * image.shape[1]
    return _affine(image, np.array([[1.0, 0.0, shift], [0.0, 1.0, 0.0]], np.float32))


def translate_y(image, v):
    shift = 0.45 * v * image.shape[0]
    return _affine(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, shift]], np.float32))


def color(image, v):
    return _blend(image, np.broadcast_to(_grey(image), image.shape), 1.0 + 0.9 * v)


def contrast(image, v):
    mean = np.full(image.shape, _grey(image).mean(), np.float32)
    return _blend(image, mean, 1.0 + 0.9 * v)


def brightness(image, v):
    return _blend(image, np.zeros(image.shape, np.float32), 1.0 + 0.9 * v)


def sharpness(image, v):
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    smooth = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    return _blend(image, smooth, 1.0 + 0.9 * v)


def posterize(image, v):
    bits = int(np.clip(8 - round(4 * abs(v)), 1, 8))
    return (image & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def solarize(image, v):
    threshold = 256 - 256 * abs(v)
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


# name -> op(image, v) with the signed magnitude v in [-1, 1].
OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "identity": identity,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
    "solarize": solarize,
    "color": color,
    "posterize": posterize,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}

# Pairs of (op, probability, magnitude in [0, 1]).
AUTOAUGMENT_SUBPOLICIES = (
    (("equalize", 0.6, 0.0), ("rotate", 0.4, 0.3)),
    (("color", 0.5, 0.5), ("solarize", 0.3, 0.2)),
    (("autocontrast", 0.5, 0.0), ("translate_y", 0.4, 0.3)),
    (("sharpness", 0.5, 0.7), ("brightness", 0.4, 0.4)),
    (("shear_x", 0.4, 0.5), ("posterize", 0.3, 0.5)),
    (("contrast", 0.6, 0.6), ("translate_x", 0.3, 0.3)),
    (("rotate", 0.3, 0.5), ("equalize", 0.5, 0.0)),
    (("brightness", 0.5, 0.6), ("shear_y", 0.3, 0.4)),
)


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() < 0.5 else v


def rand_augment(image, rng, *, num_ops: int = 2, magnitude: int = 9):
    names = list(OPS)
    for _ in range(num_ops):
        name = names[rng.integers(len(names))]
        image = OPS[name](image, _signed(magnitude / 30.0, rng))
    return image


def auto_augment(image, rng):
    subpolicy = AUTOAUGMENT_SUBPOLICIES[rng.integers(len(AUTOAUGMENT_SUBPOLICIES))]
    for name, prob, magnitude in subpolicy:
        if rng.random() < prob:
            image = OPS[name](image, _signed(magnitude, rng))
    return image


def pad_crop_flip(image, rng, *, padding: int = 4, flip: bool = True):
    """Reflect-pads by ``padding``, crops back at a random offset, flips half (if ``flip``)."""
    h, w = image.shape[:2]
    padded = np.pad(
        image, ((padding, padding), (padding, padding), (0, 0)), mode="reflect"
    )
    top, left = rng.integers(2 * padding + 1, size=2)
    image = padded[top : top + h, left : left + w]
    return image[:, ::-1] if flip and rng.random() < 0.5 else image


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``(height, width)``."""
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def random_resized_crop_flip(
    image, rng, *, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
):
    """Inception-style crop (area ``scale``, aspect ``ratio``), resize, flip half."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
            break
    else:  # fall back to a central crop of the whole image
        ch, cw, top, left = h, w, 0, 0
    image = _resize(image[top : top + ch, left : left + cw], (size, size))
    return image[:, ::-1] if rng.random() < 0.5 else image


def center_crop(image, *, size: int, crop_fraction: float = 0.875):
    """Resizes the short side to ``size / crop_fraction`` then crops the centre."""
    h, w = image.shape[:2]
    short = size / crop_fraction
    new_h, new_w = (
        max(size, round(h * short / min(h, w))),
        max(size, round(w * short / min(h, w))),
    )
    image = _resize(image, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size]


POLICIES = ("crop_flip", "autoaugment", "randaugment")


def member_transform(policy: str, base: Callable) -> Callable:
    """``base`` (crop + flip) followed by the policy's photometric/geometric ops."""
    if policy == "crop_flip":
        return base
    if policy == "autoaugment":
        return lambda image, rng: auto_augment(base(image, rng), rng)
    if policy == "randaugment":
        return lambda image, rng: rand_augment(base(image, rng), rng)
    raise ValueError(f"unknown augmentation policy {policy!r}; choose from {POLICIES}.")
