"""Batched inference: one function applied to a whole dataset, a fixed-size batch at a time.

* `apply_batched`: arrays in memory (N, ...), cut into batches of ``batch_size`` rows; the last batch is
  zero-padded to the same size, so one compiled shape serves the whole dataset.
* `apply_stream`: the padded batches of `lqf.data.eval_batches` (``'image'``, ``'label'``, ``'mask'``),
  optionally sharded over a data mesh (every process passes the same whole batches and receives all
  outputs); padding rows are dropped.

``fn`` must treat rows independently (inference mode: BatchNorm with running statistics), so padding
does not change the real rows' outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lqf.runtime import parallel

EVAL_BATCH_SIZE = 512  # rows per forward pass when embedding or evaluating a dataset


def apply_batched(fn: Callable[..., Any], x: Any, *, args: tuple = (),
                  batch_size: int = EVAL_BATCH_SIZE) -> Any:
  """``fn(*args, x_b)`` over consecutive batches x_b of ``x`` (N, ...), concatenated along rows.

  Args:
    fn: a jitted function of a batch (B, ...) -> a pytree of arrays with B leading rows.
    x: the dataset (N, ...), a NumPy or JAX array.
    args: ``fn``'s leading arguments, the same for every batch (variables, δ, ...).
    batch_size: rows per call (at most N: a smaller dataset is one batch).

  Returns:
    The outputs for the N rows (JAX arrays), in order.
  """
  n = len(x)
  batch_size = max(1, min(batch_size, n))
  outputs = []
  for i in range(0, n, batch_size):
    xb = jnp.asarray(x[i:i + batch_size])
    if len(xb) < batch_size:
      xb = jnp.pad(xb, [(0, batch_size - len(xb))] + [(0, 0)] * (xb.ndim - 1))
    outputs.append(fn(*args, xb))
  return jax.tree.map(lambda *parts: jnp.concatenate(parts)[:n], *outputs)


def apply_stream(fn: Callable[..., Any], batches: Iterable[dict], *, args: tuple = (),
                 mesh: jax.sharding.Mesh | None = None) -> tuple[Any, np.ndarray]:
  """``fn(*args, images)`` over padded batches {'image', 'label', 'mask'}; outputs of the real rows.

  With ``mesh`` each batch is sharded over it (``fn`` jitted with that sharding) and the outputs are
  gathered from every process.

  Returns:
    (outputs, labels): a pytree of NumPy arrays (N, ...) and the labels (N,) of the real rows.

  Raises:
    ValueError: a batch holds NaN or Inf pixels.
  """
  outputs, labels = [], []
  for i, batch in enumerate(batches):
    if not np.isfinite(batch["image"]).all():
      raise ValueError(f"evaluation batch {i} holds NaN or Inf pixels: check the test data "
                       "(config.data.test_split and its source).")
    keep = np.asarray(batch["mask"]) > 0
    if mesh is None:
      out = jax.tree.map(np.asarray, fn(*args, jnp.asarray(batch["image"])))
    else:
      out = jax.tree.map(parallel.process_allgather,
                         fn(*args, parallel.shard_global_batch(batch["image"], mesh)))
    outputs.append(jax.tree.map(lambda o: o[keep], out))
    labels.append(np.asarray(batch["label"])[keep])
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs), np.concatenate(labels)
