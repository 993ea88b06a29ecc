"""Shared pytest setup: CPU only, single-threaded BLAS (as the entry points run it,
`lqf.runtime.parallel.single_threaded_blas`).

No global matmul precision: the library sets Precision.HIGHEST itself where a result is certified or
compared with an exact quantity (`lqf.precision`), and test_precision.py checks that it does."""

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment is set)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import support  # noqa: E402
from lqf.precision import exact  # noqa: E402
from lqf.runtime import parallel  # noqa: E402

parallel.single_threaded_blas()


@pytest.fixture(scope="session")
def dense_jacobian():
  """``jacobian(lin, variables, h) -> (J, unravel)``: the linearized model's Jacobian J (N·C, P) in
  float64 (row (i, c) = i·C + c, columns in `ravel_pytree` order of δ, ``unravel`` maps a column
  vector back to δ), by ``jax.jacfwd`` with full float32 products on every backend."""
  @exact
  def jacobian(lin, variables, h):
    w0, unravel = ravel_pytree(lin.init_delta(variables))
    jac = jax.jacfwd(lambda d: lin.apply(unravel(d), variables, h).reshape(-1))(w0)
    return np.asarray(jac, np.float64), unravel
  return jacobian


@pytest.fixture(scope="session")
def six_examples(dense_jacobian):
  """`support.linearized_problem` on 6 images labelled `support.SIX_LABELS`: (lin, variables, features,
  labels, J, unravel)."""
  lin, variables, features, jac, unravel = support.linearized_problem(dense_jacobian, 6)
  return lin, variables, features, jnp.asarray(support.SIX_LABELS), jac, unravel


@pytest.fixture(scope="session")
def nine_examples(dense_jacobian):
  """`support.linearized_problem` on 9 images (3 per class, `support.NINE_LABELS`): (lin, variables,
  features, J)."""
  return support.linearized_problem(dense_jacobian, 9)[:4]
