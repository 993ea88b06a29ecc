"""`Source`: the records of one split after class subsetting, k-shot selection and the held-out cut."""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Sequence

import ml_collections
import numpy as np

from lqf.data import bundled
from lqf.data import sampling
from lqf.data import tfds_source

KNOWN_DATASETS: tuple[str, ...] = bundled.NAMES + tfds_source.TFDS_DATASETS
# The pseudo split holding the ``data.heldout_fraction`` part of ``data.train_split``.
HELDOUT_SPLIT = "heldout"
VALIDATION_SPLIT = "train_validation"


class Source:
  """A grain-compatible random-access source: ``len(s)``, ``s[i]`` → {'image': uint8 (h, w, C), 'label': int}.

  Images are as stored (bundled sets already at ``image_size``; TFDS images at their own size); labels
  are relabelled ``0..num_classes-1`` in the order of ``data.classes``.

  Attributes:
    name: the dataset name.
    num_classes: classes after subsetting.
    class_names: their names, in label order.
    channels: 1 (grayscale) or 3 (RGB).
    labels: int32 ``(len(s),)``, the label of every record (read on first use for TFDS).
    indices: positions of the kept records in the whole split (None: all are kept).
  """

  def __init__(self, records, *, name: str, channels: int, class_names: Sequence[str],
               label_map: np.ndarray | None = None, indices: np.ndarray | None = None):
    """``records[j]`` → {'image', 'label' (original id)}; ``records.labels``: original ids of all j.

    ``label_map[original id]`` is the new label (−1: excluded); ``indices`` are the kept positions.
    """
    self._records, self._label_map, self.indices = records, label_map, indices
    self.name, self.channels = name, channels
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._records) if self.indices is None else len(self.indices)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index if self.indices is None else int(self.indices[index])]
    label = record["label"] if self._label_map is None else self._label_map[record["label"]]
    return {"image": record["image"], "label": int(label)}

  @functools.cached_property
  def labels(self) -> np.ndarray:
    labels = self._records.labels
    labels = labels if self.indices is None else labels[self.indices]
    return np.asarray(labels if self._label_map is None else self._label_map[labels], np.int32)

  def __repr__(self) -> str:
    return f"Source({self.name}, {len(self)} records, {self.num_classes} classes)"


@dataclasses.dataclass(frozen=True)
class _DatasetFacts:
  class_names: tuple[str, ...]  # all classes of the dataset
  channels: int


def _facts(data: ml_collections.ConfigDict) -> _DatasetFacts:
  """Class names and channel count of ``data.name`` (no records are read)."""
  if data.name in bundled.NAMES:
    return _DatasetFacts(bundled.CLASS_NAMES, 1)
  features = tfds_source.builder(data.name, data.get("data_dir"), KNOWN_DATASETS).info.features
  return _DatasetFacts(tuple(features["label"].names), features["image"].shape[-1])


def _selection(data: ml_collections.ConfigDict,
               facts: _DatasetFacts) -> tuple[np.ndarray | None, tuple[str, ...]]:
  """``data.classes`` as (lookup original id → new label, −1 = excluded; names in new-label order).

  The lookup is None when all classes are kept.
  """
  classes = data.get("classes")
  if classes is None:
    return None, facts.class_names
  total = len(facts.class_names)
  classes = [int(c) for c in classes]
  if not classes or any(not 0 <= c < total for c in classes):
    raise ValueError(f"data.classes={tuple(classes)} is outside {data.name}'s labels: use class ids "
                     f"in 0..{total - 1} (or None for all).")
  if len(set(classes)) != len(classes):
    raise ValueError(f"data.classes={tuple(classes)} repeats a class: list each class once.")
  label_map = np.full(total, -1, np.int32)
  label_map[classes] = np.arange(len(classes), dtype=np.int32)
  return label_map, tuple(facts.class_names[c] for c in classes)


def _image_size(data: ml_collections.ConfigDict) -> int:
  size = data.image_size
  if not isinstance(size, numbers.Integral) or size < 1:
    raise ValueError(f"data.image_size={size!r} is not a positive integer: set it, e.g. 28 or 224.")
  return size


def check(data: ml_collections.ConfigDict) -> None:
  """Checks a data section before anything is read: the dataset is known (metadata only), the image
  size, the class subset (at least two distinct classes), the shots and the held-out share.

  Raises:
    ValueError: one line naming ``data.<field>``, the value and the fix.
  """
  _image_size(data)
  if len(_selection(data, _facts(data))[1]) < 2:
    raise ValueError(f"data.classes={tuple(data.classes)} leaves a one-class task: list at least two "
                     "classes (or None for all).")
  shots = data.get("shots")
  if shots is not None and (not isinstance(shots, numbers.Integral) or isinstance(shots, bool)
                            or shots < 1):
    raise ValueError(f"data.shots={shots!r} must be a positive integer (examples per class), or None "
                     "for the whole training split.")
  validation = data.get("validation_per_class")
  if validation is not None and (not isinstance(validation, numbers.Integral) or isinstance(validation, bool)
                                 or validation < 1):
    raise ValueError(f"data.validation_per_class={validation!r} must be a positive integer (validation "
                     "examples per class carved out of the training split), or None for none.")
  fraction = data.get("heldout_fraction")
  if fraction is not None and not 0 < fraction < 1:
    raise ValueError(f"data.heldout_fraction={fraction} is outside (0, 1): use a held-out share such "
                     "as 0.2.")


def num_classes(data: ml_collections.ConfigDict) -> int:
  """Number of classes after subsetting (``len(data.classes)`` or all of the dataset's)."""
  return len(_selection(data, _facts(data))[1])


def image_shape(data: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """``(image_size, image_size, channels)`` of the preprocessed images."""
  size = _image_size(data)
  return size, size, _facts(data).channels


def get_source(data: ml_collections.ConfigDict, split: str) -> Source:
  """The records of ``split`` after ``data.classes`` subsetting, k-shot selection and held-out cut.

  On ``data.train_split``, on `VALIDATION_SPLIT` (``'train_validation'``) and on `HELDOUT_SPLIT`
  (``'heldout'``), in this order:

  1. class subset: the records of ``data.classes``;
  2. validation carve (when ``data.validation_per_class`` is set): that many records per class
     (`k_shot_indices` with ``data.validation_seed``) form ``'train_validation'``, and the rest of the split
     goes on — a validation set disjoint from every k-shot pool (any ``shots``, any ``shot_seed``) and
     from the test split, the same for every draw (for tuning studies; a few-shot learner's own
     validation is the held-out cut below);
  3. k-shot: ``data.shots`` per class of those (``np.random.default_rng(data.shot_seed)``, see
     `k_shot_indices`); the result is the labelled pool;
  4. held-out cut (when ``data.heldout_fraction`` is set): `split_heldout` of the pool's positions
     with ``data.heldout_seed``; ``data.train_split`` returns the train part, ``'heldout'`` the
     held-out part, both in split order.

  So ``data.shots`` is the labelled budget per class that train and held-out share (a few-shot
  learner has no other labels to validate on), and the train part has ~(1 − fraction)·shots per
  class. Every other split gets step 1 only.

  Args:
    data: the ``config.data`` section (see `lqf.data`).
    split: a split name, e.g. ``data.train_split``, ``data.test_split`` or ``'heldout'`` (TFDS
      slicing such as ``'train[:90%]'`` works for TFDS datasets).

  Returns:
    A `Source`; its ``indices`` are positions in the dataset split that was read.

  Raises:
    ValueError: bad ``data.classes`` / ``shots`` / ``validation_per_class`` / ``heldout_fraction``, or
      ``'heldout'`` without a ``data.heldout_fraction`` (``'train_validation'`` without a
      ``data.validation_per_class``).
  """
  size = _image_size(data)
  facts = _facts(data)
  label_map, class_names = _selection(data, facts)
  train_split = data.get("train_split", "train")
  fraction = data.get("heldout_fraction")
  if split == HELDOUT_SPLIT and not fraction:
    raise ValueError(f"split {HELDOUT_SPLIT!r} needs a held-out part of {train_split!r}: set "
                     "data.heldout_fraction in (0, 1), e.g. 0.2.")
  validation = data.get("validation_per_class")
  if split == VALIDATION_SPLIT and not validation:
    raise ValueError(f"split {VALIDATION_SPLIT!r} needs a validation part of {train_split!r}: set "
                     "data.validation_per_class, e.g. 50.")
  read = train_split if split in (HELDOUT_SPLIT, VALIDATION_SPLIT) else split
  if data.name in bundled.NAMES:
    records = bundled.load_split(data.name, read, size)
  else:
    records = tfds_source.TfdsRecords(data.name, read, data.get("data_dir"))
  make_source = functools.partial(Source, records, name=data.name, channels=facts.channels,
                                  class_names=class_names, label_map=label_map)

  def subset(source: Source, positions: np.ndarray) -> Source:
    return make_source(indices=positions if source.indices is None else source.indices[positions])

  source = make_source(indices=None if label_map is None
                       else np.flatnonzero(label_map[records.labels] >= 0))
  if read != train_split:
    return source
  if validation:
    carved = sampling.k_shot_indices(source.labels, validation, data.get("validation_seed", 0),
                                     class_names=source.class_names, field="data.validation_per_class")
    if split == VALIDATION_SPLIT:
      return subset(source, carved)
    source = subset(source, np.setdiff1d(np.arange(len(source)), carved))
  shots = data.get("shots")
  if shots is not None:
    source = subset(source, sampling.k_shot_indices(source.labels, shots, data.get("shot_seed", 0),
                                                    class_names=source.class_names))
  if not fraction:
    return source
  train, heldout = sampling.split_heldout(len(source), fraction, data.get("heldout_seed", 0),
                                          field="data.heldout_fraction")
  return subset(source, heldout if split == HELDOUT_SPLIT else train)
