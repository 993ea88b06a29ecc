"""Batched inference: one function applied to a whole dataset in memory, a fixed-size batch at a time.

`apply_batched` cuts arrays (N, ...) into batches of ``batch_size`` rows; the last batch is zero-padded to
the same size, so one compiled shape serves the whole dataset. (A stream of padded pipeline batches,
sharded over a mesh: `lqf.runtime.parallel.apply_stream`.)

``fn`` must treat rows independently (inference mode: BatchNorm with running statistics), so padding
does not change the real rows' outputs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

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
