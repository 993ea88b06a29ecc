"""grain input pipelines over a `Source`: the infinite training iterator, evaluation batches, arrays.

Training order. With ``n = len(source)``, global batch ``G`` and ``S = n // G`` steps per epoch, the
global stream is: epoch e = the first ``S·G`` records of a permutation of the source drawn from
``(seed, e)`` (grain's ``MapDataset.shuffle``; the last ``n − S·G`` of each epoch's permutation are
dropped), epochs concatenated. Global batch t is stream positions ``t·G … t·G + G − 1``. Process p of
P reads the positions ``≡ p (mod P)`` and batches them by ``b = G / P``, so its batch t is
``global_batch_t[p::P]``: the P host-local batches interleave to the global batch exactly, for any P.
Augmentation draws from grain's per-position generator (seeded by ``seed`` and the *global* position),
so augmented pixels do not depend on P either. Each host only reads and decodes its own records.

Checkpointing the position (the iterator's state is a small dict; ``get_state``/``set_state``)::

  import orbax.checkpoint as ocp, grain
  mngr = ocp.CheckpointManager(workdir, item_names=("state", "data"))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(iterator)))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
  # `iterator` now yields exactly the batches that followed `step`.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from lqf.data import bundled
from lqf.data import source as source_lib
from lqf.data import transforms



def _read_options(data: ml_collections.ConfigDict) -> grain.ReadOptions:
  """Reader threads for TFDS (decoding and resizing release the GIL); none for in-memory digits.

  Measured on 2 cores, mnist5k, batch 128: 5 ms per batch without threads, 60 ms with 2.
  """
  if data.name in bundled.NAMES:
    return grain.ReadOptions(num_threads=0)
  return grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1))


def preprocess(images_uint8: np.ndarray | Sequence[np.ndarray],
               data: ml_collections.ConfigDict) -> np.ndarray:
  """Evaluation preprocessing of uint8 images → float32 ``(N, S, S, C)`` (or ``(S, S, C)``).

  Args:
    images_uint8: ``(N, h, w, C)``, one image ``(h, w, C)``, or a sequence of ``(h_i, w_i, C)``.
    data: the ``config.data`` section (``image_size`` = S).

  Each image whose size differs from ``(S, S)`` goes through `transforms.center_fit`; then
  x = (u / 255 − mean_C) / std_C (`transforms.normalize`).
  """
  size = data.image_size
  if isinstance(images_uint8, np.ndarray) and images_uint8.ndim == 3:
    return preprocess(images_uint8[None], data)[0]
  if not (isinstance(images_uint8, np.ndarray) and images_uint8.shape[1:3] == (size, size)):
    images_uint8 = np.stack([transforms.center_fit(np.asarray(im), size) for im in images_uint8])
  return transforms.normalize(images_uint8)


def _fit_example(example: dict, rng: np.random.Generator | None = None, *, size: int) -> dict:
  """The example with its image at ``(size, size, C)``: random crop + flip given ``rng``, else center."""
  image = example["image"]
  fitted = transforms.center_fit(image, size) if rng is None else transforms.random_fit(image, size, rng)
  return {**example, "image": fitted}


def _collate(examples: Sequence[dict]) -> dict:
  """Stacks fitted examples: {'image': float32 (b, S, S, C) normalized, 'label': int32 (b,)}."""
  return {"image": transforms.normalize(np.stack([ex["image"] for ex in examples])),
          "label": np.asarray([ex["label"] for ex in examples], np.int32)}


def train_iterator(source: source_lib.Source, data: ml_collections.ConfigDict, *,
                   global_batch_size: int, seed: int, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite, deterministic, checkpointable iterator of this process's training batches.

  See the module docstring for the exact order and its relation across process counts. Augmentation
  (`transforms.random_fit`) runs when ``data.augment`` and the dataset is not a bundled digit set.

  Args:
    source: the training `Source`.
    data: the ``config.data`` section.
    global_batch_size: G, the batch over all processes.
    seed: shuffle and augmentation seed (0 ≤ seed < 2**32).
    process_index: p; default ``jax.process_index()``.
    process_count: P; default ``jax.process_count()``.

  Returns:
    A grain ``DatasetIterator`` of {'image': float32 (G/P, S, S, C), 'label': int32 (G/P,)} with
    ``get_state()`` / ``set_state(state)``.
  """
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= p < count:
    raise ValueError(f"process_index={p} is outside 0..{count - 1}: pass 0 <= index < process_count.")
  if global_batch_size % count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {count} "
                     "processes: use a multiple of the process count.")
  steps_per_epoch = len(source) // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"global_batch_size={global_batch_size} exceeds the {len(source)} training records "
                     f"of {source.name}: use a batch size <= {len(source)}.")
  fit = functools.partial(_fit_example, size=data.image_size)
  ds = grain.MapDataset.source(source).shuffle(seed=seed)[:steps_per_epoch * global_batch_size]
  ds = ds.repeat()
  if data.get("augment", False) and data.name not in bundled.NAMES:
    ds = ds.random_map(fit, seed=seed)
  else:
    ds = ds.map(fit)
  ds = ds[p::count].to_iter_dataset(_read_options(data))
  return iter(ds.batch(global_batch_size // count, drop_remainder=True, batch_fn=_collate))


def eval_batches(source: source_lib.Source, data: ml_collections.ConfigDict, *,
                 batch_size: int) -> Iterator[dict]:
  """Batches of all records in order, each exactly once; the last is padded to ``batch_size``.

  Yields:
    {'image': float32 (batch_size, S, S, C), 'label': int32 (batch_size,), 'mask': float32
    (batch_size,)} with mask 1 for real records and 0 for padding (zero image, label 0).
  """
  ds = grain.MapDataset.source(source).map(functools.partial(_fit_example, size=data.image_size))
  for batch in ds.to_iter_dataset(_read_options(data)).batch(batch_size, batch_fn=_collate):
    n = len(batch["label"])
    pad = batch_size - n
    yield {"image": np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
           "label": np.pad(batch["label"], (0, pad)),
           "mask": np.pad(np.ones(n, np.float32), (0, pad))}


def load_arrays(data: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole split (after subsetting and k-shot) preprocessed in memory, read serially.

  Returns:
    images float32 ``(N, S, S, C)`` (as `preprocess`), labels int32 ``(N,)``, in `Source` order.
  """
  return source_arrays(source_lib.get_source(data, split), data)


def source_arrays(source: source_lib.Source, data: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`load_arrays` of a `Source` already opened (e.g. to size it first): images (N, S, S, C), labels (N,)."""
  records = [source[i] for i in range(len(source))]
  images = preprocess([record["image"] for record in records], data)
  return images, np.asarray([record["label"] for record in records], np.int32)
