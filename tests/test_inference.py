"""Batched inference (`lqf.inference`) = the function applied to the whole dataset at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import inference
from lqf.runtime import parallel


@jax.jit
def _affine(w, x):
  return {"out": x @ w, "sum": x.sum(-1)}


def _rounding(x, w):
  """Bound on the difference of two float32 evaluations of x @ w in any summation order:
  2·k·ε₃₂·(|x| @ |w|) for k terms per entry."""
  return 2 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w))


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 16)])
def test_apply_batched_equals_one_call(n, batch_size):
  rng = np.random.default_rng(n)
  w, x = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(n, 5)).astype(np.float32)
  got = inference.apply_batched(_affine, x, args=(jnp.asarray(w),), batch_size=batch_size)
  assert np.all(np.abs(got["out"] - x @ w) <= _rounding(x, w))
  assert np.all(np.abs(got["sum"] - x.sum(-1)) <= _rounding(x, np.ones((5, 1)))[:, 0])


def test_apply_stream_drops_padding_rows():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 2)).astype(np.float32)
  images = rng.normal(size=(2, 4, 5)).astype(np.float32)
  masks = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
  batches = [{"image": images[i], "label": np.arange(4) + 4 * i, "mask": masks[i]} for i in range(2)]
  out, labels = parallel.apply_stream(lambda x: x @ jnp.asarray(w), batches)
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5])
  x = images.reshape(8, 5)[:6]
  assert np.all(np.abs(out - x @ w) <= _rounding(x, w))
