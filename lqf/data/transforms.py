"""Per-image geometry (resize, crop, flip) on uint8 arrays and the per-batch normalization.

Geometry works on one ``uint8`` image of shape ``(h, w, C)`` (``C`` = 1 or 3) with Pillow and returns
``(size, size, C)`` ``uint8``. Two regimes, chosen per image by its shorter side:

* *small* images (shorter side ≤ ``SMALL_IMAGE_MAX`` = 64 px: CIFAR, MNIST, the bundled digits).
  Evaluation: resize the shorter side to ``size`` and center-crop. Augmentation: the evaluation image,
  zero-padded by ``size // 8`` px on each side (4 px at 32 px), a random ``size × size`` crop, and a
  horizontal flip with probability 1/2 (He et al. 2016, §4.2).
* *large* images (ImageNet, Pets, Caltech-101). Evaluation: resize the shorter side to
  ``round(size / 0.875)`` and center-crop ``size`` (the 256 → 224 protocol). Augmentation: an
  Inception-style random resized crop (area fraction uniform in [0.08, 1], aspect ratio log-uniform in
  [3/4, 4/3], 10 tries, then the evaluation crop), resized to ``size``, and a flip with probability 1/2.

Normalization (`normalize`) depends only on the channel count: x = (u / 255 − mean) / std with the
MNIST statistics (mean 0.1307, std 0.3081) for grayscale and the ImageNet statistics
(mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)) for RGB, so the two digit sets share one scale.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SMALL_IMAGE_MAX = 64
EVAL_CROP_FRACTION = 0.875
MEAN_STD = {1: ((0.1307,), (0.3081,)),
            3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def resize(image: np.ndarray, height: int, width: int,
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear (antialiased) resize of ``image[box]`` to ``(height, width, C)``; box = (l, t, r, b)."""
  out = _to_pil(image).resize((width, height), Image.Resampling.BILINEAR, box=box)
  return _from_pil(out, image.shape[-1])


def _is_small(image: np.ndarray) -> bool:
  return min(image.shape[:2]) <= SMALL_IMAGE_MAX


def center_fit(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation geometry: ``(h, w, C)`` → ``(size, size, C)`` (shorter-side resize + center crop)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  short = size if _is_small(image) else round(size / EVAL_CROP_FRACTION)
  scale = short / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resize(image, new_h, new_w)[top:top + size, left:left + size]


def _random_resized_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
  """Inception crop box (l, t, r, b) of area fraction U[0.08, 1], log-uniform ratio in [3/4, 4/3]."""
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < crop_w <= w and 0 < crop_h <= h:
      top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
      return left, top, left + crop_w, top + crop_h
  return None


def random_fit(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Training geometry: ``(h, w, C)`` → ``(size, size, C)`` random crop and flip (see module doc)."""
  if _is_small(image):
    pad = size // 8
    padded = np.pad(center_fit(image, size), ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[top:top + size, left:left + size]
  else:
    box = _random_resized_box(*image.shape[:2], rng)
    out = center_fit(image, size) if box is None else resize(image, size, size, box=box)
  return out[:, ::-1] if rng.random() < 0.5 else out


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 ``(..., C)`` → float32 ``(u / 255 − mean_C) / std_C`` with the constants of `MEAN_STD`."""
  mean, std = (np.asarray(v, np.float32) for v in MEAN_STD[images.shape[-1]])
  return (images.astype(np.float32) / 255.0 - mean) / std
