"""Memory planning of a fine-tuning run: which splits are held in memory with their trunk features."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from lqf import data as data_lib
from lqf import linearize as lin_lib
from lqf import methods
from lqf.data import bundled
from lqf.network import Model


def cache_plan(name: str, lqf: methods.LQFSettings, data: ml_collections.ConfigDict, model: Model,
               num_train: int, num_test: int) -> tuple[bool, bool]:
  """(hold the training set in memory, hold the test set in memory) for the method ``name``.

  In memory means the float32 images and the trunk features h of the method's tail (its input: e.g.
  14×14×1024 for stage4 of a ResNet-50 at 224 px), cached once. ``lqf.cache_features``: 'always',
  'never' (stream both), or 'auto': the training set is cached when it is not augmented
  (``data.augment`` on a TFDS dataset) and its images + h fit in ``lqf.cache_gib`` GiB; the test set
  when it fits too, next to the cached training set. Streamed splits are read through grain.

  Raises:
    ValueError: an unknown mode, 'always' with augmentation, or full-batch LQF on a streamed training set.
  """
  method = methods.get(name, "config.method")
  augment = data.get("augment", False) and data.name not in bundled.NAMES
  if lqf.cache_features == "always" and augment:
    raise ValueError("config.lqf.cache_features='always' cannot cache augmented images (h changes every "
                     "step): set config.data.augment=False or cache_features='auto'.")
  shape = (1, *data_lib.image_shape(data))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
  lin = lin_lib.linearize(model, abstract, method.trainable(lqf))
  h = jax.eval_shape(lin.trunk, abstract, jax.ShapeDtypeStruct(shape, jnp.float32))
  per_example = 4 * (math.prod(shape) + math.prod(h.shape))
  train_bytes = num_train * per_example
  if lqf.cache_features == "auto":
    budget = lqf.cache_gib * 2 ** 30
    cache_train = not augment and train_bytes <= budget
    cache_test = (cache_train * train_bytes + num_test * per_example) <= budget
  else:
    cache_train = cache_test = lqf.cache_features == "always"
  if not cache_train and method.linearized and lqf.fit.batch_size is None:
    why = ("config.data.augment=True" if augment else "config.lqf.cache_features='never'"
           if lqf.cache_features == "never" else
           f"{train_bytes / 2 ** 30:.1f} GiB of images and features > config.lqf.cache_gib={lqf.cache_gib}")
    raise ValueError(f"config.lqf.batch_size=None (full batch) needs the training features in memory, "
                     f"but they are streamed ({why}): set config.lqf.batch_size, e.g. 128.")
  return cache_train, cache_test
