"""Text classification data as Python strings and numpy labels: `TextSplit`, `TextDataset`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """One split: ``texts`` (N strings), ``labels`` (N,) int32 in [0, K).

  ``groups`` (N,) int32, optional: the template (or other source unit) each text comes from;
  texts of one group are paraphrases of each other.
  """
  texts: tuple[str, ...]
  labels: np.ndarray
  groups: np.ndarray | None = None

  def __post_init__(self):
    labels = np.asarray(self.labels, np.int32)
    object.__setattr__(self, "texts", tuple(self.texts))
    object.__setattr__(self, "labels", labels)
    if labels.shape != (len(self.texts),):
      raise ValueError(f"a split needs one label per text: got {len(self.texts)} texts and labels "
                       f"of shape {labels.shape}.")
    if self.groups is not None:
      object.__setattr__(self, "groups", np.asarray(self.groups, np.int32))

  def __len__(self) -> int:
    return len(self.texts)

  def subset(self, indices: Sequence[int]) -> TextSplit:
    """The texts at ``indices``, in that order."""
    indices = np.asarray(indices, np.int64)
    return TextSplit(tuple(self.texts[i] for i in indices), self.labels[indices],
                     None if self.groups is None else self.groups[indices])


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A labelled text dataset.

  Attributes:
    name: what it is (``config.data.name``).
    class_names: the K class names; label k is ``class_names[k]``.
    train: the training split.
    test: the test split (reporting only).
    heldout: a model-selection split built with the data (e.g. by template), or None: a study
      then carves one from ``train`` (`compat.split_heldout`).
    info: facts about how it was built (for reports), JSON-serializable.
  """
  name: str
  class_names: tuple[str, ...]
  train: TextSplit
  test: TextSplit
  heldout: TextSplit | None = None
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

