"""Data: bundled digit sets and TFDS image datasets, class subsets, k-shot, held-out cut, grain pipelines.

Everything is configured by the ``config.data`` section (an ``ml_collections.ConfigDict``):

  name: str            ``'mnist5k'`` or ``'uci_digits'`` (bundled, offline; `lqf.data.bundled`), or a
                       TFDS dataset prepared in ``data_dir``: ``'cifar10'``, ``'cifar100'``,
                       ``'oxford_iiit_pet'``, ``'caltech101'``, ``'imagenet2012'``, or any other
                       registered TFDS dataset with an 'image' Image and a 'label' ClassLabel feature
                       (``'name/config:version'`` works as in TFDS).
  image_size: int      images come out ``(image_size, image_size, C)`` (`lqf.data.transforms`).
  classes: tuple|None  class ids kept, relabelled 0..k−1 in the given order; None keeps all.
  shots: int|None      examples per class kept on ``train_split`` (None = all), drawn with
                       ``shot_seed`` (`k_shot_indices`; nested across ``shots`` for one seed).
  shot_seed: int       (default 0).
  validation_per_class: int|None  examples per class carved out of ``train_split`` before any k-shot
                       draw (seeded by ``validation_seed``, default 0): the pseudo split
                       ``'train_validation'`` (`VALIDATION_SPLIT`), disjoint from every shot pool and from
                       the test split — a tuning study's validation set (default None: none).
  heldout_fraction: float|None  share of the (class-subset, k-shot) training records held out
                       (`split_heldout`, seeded by ``heldout_seed``): ``train_split`` then returns the
                       rest and the pseudo split ``'heldout'`` (`HELDOUT_SPLIT`) the held-out part;
                       None or 0: no held-out part (default None). Order: classes, shots, cut —
                       ``shots`` is the labelled budget per class that train and held-out share.
  heldout_seed: int    (default 0).
  augment: bool        training crop + flip (`lqf.data.transforms.random_fit`); ignored for the
                       bundled digit sets, which are never augmented (default False).
  data_dir: str|None   TFDS data_dir (default: TFDS's, ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
  train_split: str     (default 'train'); TFDS slicing syntax works for TFDS datasets.
  test_split: str      (default 'test'). The bundled sets have exactly 'train' and 'test'; the
                       names 'heldout' and 'train_validation' always mean the pseudo splits above.

Pixels are normalized per channel count (grayscale: MNIST statistics; RGB: ImageNet statistics), so
``mnist5k`` and ``uci_digits`` share one scale. TFDS data is read through ``tfds.data_source``
(ArrayRecord), which needs no TensorFlow; preparing it does (``tfds build <name> --data_dir=<dir>``).

Typical use::

  train = lqf.data.get_source(config.data, config.data.train_split)
  it = lqf.data.train_iterator(train, config.data, global_batch_size=128, seed=config.seed)
  batch = next(it)            # {'image': (128, S, S, C) float32, 'label': (128,) int32}
  for batch in lqf.data.eval_batches(lqf.data.get_source(config.data, config.data.test_split),
                                     config.data, batch_size=500): ...   # + 'mask'
"""

from lqf.data.pipeline import eval_batches, load_arrays, preprocess, source_arrays, train_iterator
from lqf.data.sampling import k_shot_indices, split_heldout
from lqf.data.source import (HELDOUT_SPLIT, KNOWN_DATASETS, VALIDATION_SPLIT, Source, check, get_source,
                             image_shape, num_classes)

__all__ = ["HELDOUT_SPLIT", "KNOWN_DATASETS", "VALIDATION_SPLIT", "Source", "check", "eval_batches", "get_source", "image_shape",
           "k_shot_indices", "load_arrays", "num_classes", "preprocess", "source_arrays", "split_heldout",
           "train_iterator"]
