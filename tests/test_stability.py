"""λmax(MH) by power iteration vs the dense eigenvalue; preconditioned SGD at the automatic step.

The problem of `test_fit` (a ResNet8 tail, 3,732 parameters, on N = 6 examples) with its dense Jacobian;
M is the damped K-FAC inverse, built densely by applying it to every basis vector.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
from jax.flatten_util import ravel_pytree

from lqf import fit, kfac, solve, stability
from support import LAM, SIX_LABELS, dense_objective, options, plain

N = len(SIX_LABELS)


@pytest.fixture(scope="module")
def problem(six_examples):
  """The problem, its K-FAC factors and L with LLᵀ = M, M (P, P) the K-FAC inverse applied to each
  basis vector."""
  lin, variables, features, labels, jac, unravel = six_examples
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths)
  precondition = solve.preconditioner(factors, LAM)
  columns = jax.vmap(lambda e: ravel_pytree(precondition(unravel(e)))[0])(
      jnp.eye(jac.shape[1], dtype=jnp.float32))
  m = np.asarray(columns, np.float64)
  return lin, variables, features, labels, jac, factors, np.linalg.cholesky((m + m.T) / 2)


def largest_symmetric_eigenvalue(matrix):
  """The largest eigenvalue of a dense symmetric matrix by Lanczos (full eigvalsh: ~10 s at P = 3,732)."""
  return float(scipy.sparse.linalg.eigsh(matrix, k=1, which="LA", v0=np.ones(matrix.shape[0]),
                                         return_eigenvectors=False)[0])


def dense_largest_eigenvalue(root, hess):
  """λmax(MH) = λmax(LᵀHL) for M = LLᵀ."""
  return largest_symmetric_eigenvalue(root.T @ hess @ root)


def batch_hessian(jac, idx):
  rows = (np.asarray(idx)[:, None] * 3 + np.arange(3)).reshape(-1)
  return jac[rows].T @ jac[rows] / len(idx) + LAM * np.eye(jac.shape[1])


def test_power_iteration_finds_the_dense_largest_eigenvalue(problem):
  lin, variables, features, labels, jac, factors, root = problem
  hess = batch_hessian(jac, np.arange(N))
  matvec, _ = solve.normal_equations(lin, variables, features, plain(labels), weight_decay=LAM)
  for precondition, dense_root in ((solve.preconditioner(factors, LAM), root), (lambda v: v, None)):
    expected = (largest_symmetric_eigenvalue(hess) if dense_root is None
                else dense_largest_eigenvalue(dense_root, hess))
    got = stability.largest_eigenvalue(matvec, precondition, lin.init_delta(variables), iterations=60)
    # A lower bound that converges to λmax; float32 products leave ~1e-5 relative.
    assert expected * (1 - 1e-3) <= got <= expected * (1 + 1e-5)


@pytest.mark.parametrize("batch_size", [3])
def test_auto_step_decreases_the_objective_and_twice_the_limit_diverges(problem, batch_size):
  """Minibatch K-FAC + SGD (β = 0.9): 'auto' takes `stability.AUTO_FRACTION` of η_max = 2(1 + β)/λmax(MH_B), H_B the
  curvature of the fit's first batch (checked densely for one batch order); over 4 batch orders the mean
  minibatch objective then decreases window by window (an estimate of the full objective in
  expectation), and every fit diverges at 2·η_max."""
  lin, variables, features, labels, jac, factors, root = problem
  sgd = dict(preconditioner="kfac", optimizer="sgd", momentum=0.9, batch_size=batch_size)
  windows = []
  for seed in range(4):
    _, history = fit.fit_linearized(lin, variables, features, plain(labels),
                                    options(learning_rate="auto", steps=80, **sgd), curvature=factors,
                                    seed=seed)
    limit = history["learning_rate"] / stability.AUTO_FRACTION
    if seed == 0:
      first = next(fit.batch_order(N, batch_size, seed))
      dense_limit = 2 * 1.9 / dense_largest_eigenvalue(root, batch_hessian(jac, first))
      np.testing.assert_allclose(limit, dense_limit, rtol=1e-3)
    windows.append([history["loss"][a:b].mean() for a, b in ((0, 10), (10, 20), (20, 40), (40, 80))])
    try:
      delta, _ = fit.fit_linearized(lin, variables, features, plain(labels),
                                    options(learning_rate=2 * limit, steps=200, **sgd), curvature=factors,
                                    seed=seed)
    except FloatingPointError:
      continue
    start = dense_objective(jac, features, labels, np.zeros(jac.shape[1]))
    assert dense_objective(jac, features, labels, np.asarray(ravel_pytree(delta)[0], np.float64)) > 1e3 * start
  mean = np.mean(windows, axis=0)
  assert np.all(np.diff(mean) < 0), mean


def test_limit_needs_a_positive_eigenvalue():
  with pytest.raises(ValueError, match=r"λmax\(MH\)=0.0 must be finite and > 0"):
    stability.stability_limit(0.0, 0.9)
  assert stability.stability_limit(3.8, 0.9) == pytest.approx(1.0)
  assert stability.auto_learning_rate(3.8, 0.9) == pytest.approx(stability.AUTO_FRACTION)
