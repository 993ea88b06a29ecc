"""Prepared TFDS text-classification datasets read with `tfds.data_source` (no TensorFlow).

A dataset is named as in TFDS (``'glue/sst2'``, ``'ag_news_subset'``, ``'imdb_reviews'``,
``'name/config:version'``). Its text is the ``data.text_keys`` features joined by ". " (defaults
for the datasets in `KNOWN`) and its label the ClassLabel feature ``data.label_key`` (default
``label``). Preparing a dataset needs TensorFlow and a download, so it is done once elsewhere:
``tfds build <name> --data_dir=<dir>``; reading here needs neither.
"""

from __future__ import annotations

import importlib

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lqf.text_data.dataset import TextDataset, TextSplit

# Text features and default test split of well-known datasets (GLUE's test labels are hidden).
KNOWN = {"glue/sst2": {"text_keys": ("sentence",), "test_split": "validation"},
         "ag_news_subset": {"text_keys": ("title", "description"), "test_split": "test"},
         "imdb_reviews": {"text_keys": ("text",), "test_split": "test"}}


def _base_name(name: str) -> str:
  """``'glue/sst2:2.0.0'`` → ``'glue/sst2'``; ``'imdb_reviews/plain_text'`` → ``'imdb_reviews'``."""
  base = name.split(":")[0]
  return base if base in KNOWN else base.split("/")[0]


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of ``name``, importing its TFDS module if the lazy registry skipped it.

  Without TensorFlow, ``import tensorflow_datasets`` does not register every text dataset (e.g.
  ``glue``); importing ``tensorflow_datasets.text.<family>`` registers it.
  """
  family = name.split("/")[0].split(":")[0]
  try:
    importlib.import_module(f"tensorflow_datasets.text.{family}")
  except ImportError:
    pass
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError):  # ValueError: not a valid TFDS name
    raise ValueError(f"data.name={name!r} is not a TFDS dataset: use 'hass_intents' (offline), "
                     f"'files' (your CSV/TSV/JSONL files) or a TFDS text dataset such as "
                     f"{sorted(KNOWN)}.") from None


def _open(found: tfds.core.DatasetBuilder, name: str, split: str, data_dir: str | None):
  """`tfds.data_source` without download; an unprepared dataset is one line naming the fix."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types (NotImplementedError, AssertionError, ...).
    if not found.is_prepared():
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {found.data_dir_root}: run `tfds build {name} "
          f"--data_dir={found.data_dir_root}` on a machine with TensorFlow.") from e
    raise


def _as_text(value) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load(data: ml_collections.ConfigDict) -> TextDataset:
  """Reads ``data.train_split`` and ``data.test_split`` of the TFDS dataset ``data.name``."""
  name, data_dir = data.name, data.get("data_dir")
  known = KNOWN.get(_base_name(name), {})
  text_keys = tuple(data.get("text_keys") or known.get("text_keys", ()))
  label_key = data.get("label_key") or "label"
  found = _builder(name, data_dir)
  features = dict(found.info.features.items())
  if not text_keys:
    text_like = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Text))
    raise ValueError(f"data.text_keys is unset for {name!r}: set it to some of its Text features "
                     f"{text_like}.")
  for key in text_keys:
    if not isinstance(features.get(key), tfds.features.Text):
      raise ValueError(f"data.text_keys holds {key!r}, which is not a Text feature of {name!r} "
                       f"(features: {sorted(features)}).")
  if not isinstance(features.get(label_key), tfds.features.ClassLabel):
    raise ValueError(f"data.label_key={label_key!r} is not a ClassLabel feature of {name!r} "
                     f"(features: {sorted(features)}).")
  splits = {}
  for part, split in (("train", data.get("train_split") or "train"),
                      ("test", data.get("test_split") or known.get("test_split", "test"))):
    source = _open(found, name, split, data_dir)
    records = [source[i] for i in range(len(source))]
    splits[part] = TextSplit(
        tuple(". ".join(_as_text(r[k]) for k in text_keys) for r in records),
        np.fromiter((int(r[label_key]) for r in records), np.int32, len(records)))
  return TextDataset(name, tuple(features[label_key].names), splits["train"], splits["test"],
                     None, {"source": f"tfds {name}", "text_keys": list(text_keys)})
