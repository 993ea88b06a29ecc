"""Prepared TFDS image datasets read with `tfds.data_source` (ArrayRecord; TensorFlow is never imported).

Preparing a dataset needs TensorFlow and, for most image sets, a manual or network download, so it is
done once on a machine that has them: ``tfds build <name> --data_dir=<dir>`` (add
``--file_format=array_record`` on TFDS versions that do not default to it). Reading needs neither.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

TFDS_DATASETS = ("cifar10", "cifar100", "oxford_iiit_pet", "caltech101", "imagenet2012")
KNOWN_HINT = ("or another registered TFDS dataset with 'image' and 'label' features "
              "(tfds.list_builders()), prepared in data.data_dir")


def builder(name: str, data_dir: str | None, known: tuple[str, ...] = TFDS_DATASETS
            ) -> tfds.core.DatasetBuilder:
  """The TFDS builder of ``name``; checks it has an 'image' Image and a 'label' ClassLabel feature.

  Raises:
    ValueError: ``name`` is not a registered TFDS dataset (or not even a valid TFDS name, such as
      'cifar-10'; the message lists ``known``), or its features do not fit.
  """
  try:
    found = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError):  # ValueError: not a valid TFDS name
    raise ValueError(f"data.name={name!r} is unknown: use one of {known} {KNOWN_HINT}.") from None
  features = dict(found.info.features.items())
  if not (isinstance(features.get("image"), tfds.features.Image)
          and isinstance(features.get("label"), tfds.features.ClassLabel)):
    raise ValueError(f"data.name={name!r} has features {sorted(features)}: use a TFDS dataset with an "
                     "'image' Image feature and a 'label' ClassLabel feature.")
  channels = features["image"].shape[-1]
  if channels not in (1, 3):
    raise ValueError(f"data.name={name!r} has images with {channels} channels: use a dataset with "
                     "grayscale (1) or RGB (3) images.")
  return found


def _check_split(found: tfds.core.DatasetBuilder, split: str) -> None:
  """Checks the base names of a TFDS split expression ('train[:90%]+validation') where known."""
  known = set(found.info.splits)
  for part in split.split("+"):
    base = part.split("[")[0].strip()
    if known and base not in known:
      raise ValueError(f"split {split!r} is not in {found.name} (splits {sorted(known)}): set "
                       "data.train_split / data.test_split to one of them.")


def _open(name: str, split: str, data_dir: str | None, **kw):
  """`tfds.data_source` without download; an unprepared dataset is one line naming the fix."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kw)
  except Exception as e:  # TFDS raises several types (NotImplementedError, AssertionError, ...).
    found = tfds.builder(name, data_dir=data_dir)
    if not found.is_prepared():
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {found.data_dir_root}: run `tfds build {name} "
          f"--data_dir={found.data_dir_root}` on a machine with TensorFlow (see lqf.data.tfds_source)."
      ) from e
    raise


class TfdsRecords:
  """Random access to a prepared TFDS split: ``[i]`` → {'image': uint8 (h, w, C), 'label': int}.

  ``labels`` (int32, all records) is read on first use with the image features left undecoded.
  Picklable, so it can be used by grain worker processes.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    self.name, self.split, self.data_dir = name, split, data_dir
    found = builder(name, data_dir)
    _check_split(found, split)
    self._image_keys = [key for key, feature in found.info.features.items()
                        if isinstance(feature, tfds.features.Image)]
    self._source = _open(name, split, data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    return {"image": np.asarray(record["image"]), "label": int(record["label"])}

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """Labels ``(len(self),)`` int32, parsing the records without decoding any image."""
    skip = {key: tfds.decode.SkipDecoding() for key in self._image_keys}
    source = _open(self.name, self.split, self.data_dir, decoders=skip)
    try:
      return self._read_labels(source)
    except ModuleNotFoundError:
      # `tfds.testing.mock_data` serves undecoded features by encoding them with TensorFlow; under the
      # mock (only there) the decoded records are read instead.
      return self._read_labels(self._source)

  @staticmethod
  def _read_labels(source) -> np.ndarray:
    return np.fromiter((source[i]["label"] for i in range(len(source))), np.int32, len(source))
