"""PCG on the LQF normal equations vs a dense closed-form solve with the materialized Jacobian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
from jax.flatten_util import ravel_pytree

from lqf import kfac, nystrom, solve
from lqf import linearize as lin_lib
from lqf.losses import WeightedTargets, one_hot_targets
from support import TAIL, small_problem
LAM, SCALE = 1e-2, 15.0
EPS32 = float(np.finfo(np.float32).eps)


def plain(labels):
  return one_hot_targets(labels, 3, SCALE)


def residual_rounding(hess, x, b):
  """The float32 rounding scale of a relative residual ‖b − Hx‖/‖b‖ computed with float32 products:
  about ε₃₂·‖H‖‖x‖/‖b‖ (ten times that as the floor). Near the solution the residual itself is of this
  size, and comparing two float32 computations of it measures rounding noise (it failed at rtol 0.1 on
  another machine: 3.5e-7 vs 5.2e-7)."""
  return 10 * EPS32 * _largest_eigenvalue(hess) * np.linalg.norm(x) / np.linalg.norm(b)


def _largest_eigenvalue(hess) -> float:
  """‖H‖₂ of the symmetric positive definite H by Lanczos (a full SVD of H took 14 s per call)."""
  return float(scipy.sparse.linalg.eigsh(hess, k=1, which="LA", v0=np.ones(hess.shape[0]),
                                         return_eigenvectors=False)[0])


@pytest.fixture(scope="module")
def problem(dense_jacobian):
  """A ResNet8 tail on 6 examples, and its dense H = JᵀJ/N + λI and b = Jᵀ(sY − f0)/N (float64)."""
  model, variables, x = small_problem(n=6)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, x)
  jac, unravel = dense_jacobian(lin, variables, features.h)              # (N·C, P)
  z = (SCALE * np.eye(3)[labels] - np.asarray(features.f0, np.float64)).reshape(-1)
  hess = jac.T @ jac / 6 + LAM * np.eye(jac.shape[1])
  return lin, variables, features, labels, hess, jac.T @ z / 6, unravel


@pytest.fixture(scope="module")
def weighted(problem, dense_jacobian):
  """Random `WeightedTargets` t (6, 3), c (6,) and the dense weighted system
  H = JᵀCJ/N + λI, b = JᵀC(T − f0)/N (C = diag(c) repeated over the 3 outputs)."""
  lin, variables, features, *_ = problem
  jac, _ = dense_jacobian(lin, variables, features.h)
  rng = np.random.default_rng(5)
  targets = WeightedTargets(jnp.asarray(rng.normal(size=(6, 3)) * 5, jnp.float32),
                            jnp.asarray(rng.uniform(0.5, 6.0, 6), jnp.float32))
  c = np.repeat(np.asarray(targets.weights, np.float64), 3)
  z = (np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)).reshape(-1)
  hess = jac.T @ (c[:, None] * jac) / 6 + LAM * np.eye(jac.shape[1])
  return targets, hess, jac.T @ (c * z) / 6


def test_conjugate_gradient_dense():
  rng = np.random.default_rng(0)
  u = rng.normal(size=(40, 40))
  hess = u @ np.diag(np.exp(rng.uniform(-3, 3, 40))) @ u.T + np.eye(40)
  b = rng.normal(size=40)
  precondition = jnp.asarray(np.diag(1 / np.diag(hess)), jnp.float32)
  matvec = jax.jit(lambda v: jnp.asarray(hess, jnp.float32) @ v)
  x, info = solve.conjugate_gradient(matvec, jnp.asarray(b, jnp.float32), tol=1e-5, maxiter=200,
                                     precondition=lambda v: precondition @ v)
  np.testing.assert_allclose(x, np.linalg.solve(hess, b), rtol=1e-3, atol=1e-4)
  assert info.relative_residual < 1e-5 + residual_rounding(hess, np.asarray(x, np.float64), b)
  assert info.iterations == len(info.residual_history) - 1
  dense_residual = np.linalg.norm(b - hess @ np.asarray(x, np.float64)) / np.linalg.norm(b)
  np.testing.assert_allclose(info.relative_residual, dense_residual, rtol=0.1)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_normal_equations_match_dense(problem, batch_size):
  lin, variables, features, labels, hess, b, unravel = problem
  matvec, rhs = solve.normal_equations(lin, variables, features, plain(labels), weight_decay=LAM,
                                       batch_size=batch_size)
  v = np.random.default_rng(1).normal(size=hess.shape[0])
  np.testing.assert_allclose(ravel_pytree(matvec(unravel(jnp.asarray(v, jnp.float32))))[0], hess @ v,
                             rtol=1e-4, atol=1e-4 * np.abs(hess @ v).max())
  np.testing.assert_allclose(ravel_pytree(rhs)[0], b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def curvature(name, lin, variables, features, weights=None, rank=128):
  if name == "kfac":
    return kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths, weights=weights)
  if name == "nystrom":
    return nystrom.sketch(lin.tail, variables, features.h, lin.trainable_paths, weights=weights, rank=rank)
  return None


@pytest.mark.parametrize("method, preconditioner, batch_size", [
    ("parameter", None, None), ("parameter", "kfac", None), ("parameter", "kfac", 4),
    ("parameter", "nystrom", None), ("parameter", "nystrom", 4), ("kernel", None, None),
    ("auto", None, None), ("auto", None, 4)])
def test_solution_matches_dense_solve(problem, method, preconditioner, batch_size):
  """Every method reaches the dense optimum; 'auto' with batches sketches a Nyström preconditioner."""
  lin, variables, features, labels, hess, b, _ = problem
  delta, info = solve.solve_linearized(lin, variables, features, plain(labels), weight_decay=LAM,
                                       method=method, tol=1e-6, maxiter=300, batch_size=batch_size,
                                       curvature=curvature(preconditioner, lin, variables, features))
  exact = np.linalg.solve(hess, b)
  got = np.asarray(ravel_pytree(delta)[0], np.float64)
  assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(exact)
  dense_residual = np.linalg.norm(b - hess @ got) / np.linalg.norm(b)
  np.testing.assert_allclose(info.relative_residual, dense_residual, rtol=0.1,
                             atol=residual_rounding(hess, got, b))
  assert info.relative_residual < 1e-5
  assert info.iterations == len(info.residual_history) - 1


@pytest.mark.parametrize("batch_size", [None, 4])
def test_weighted_normal_equations_match_dense(problem, weighted, batch_size):
  lin, variables, features, _, _, _, unravel = problem
  targets, hess, b = weighted
  matvec, rhs = solve.normal_equations(lin, variables, features, targets, weight_decay=LAM,
                                       batch_size=batch_size)
  v = np.random.default_rng(1).normal(size=hess.shape[0])
  np.testing.assert_allclose(ravel_pytree(matvec(unravel(jnp.asarray(v, jnp.float32))))[0], hess @ v,
                             rtol=1e-4, atol=1e-4 * np.abs(hess @ v).max())
  np.testing.assert_allclose(ravel_pytree(rhs)[0], b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("method, preconditioner", [("parameter", None), ("parameter", "kfac"),
                                                    ("parameter", "nystrom"), ("kernel", None)])
def test_weighted_solution_matches_dense_solve(problem, weighted, method, preconditioner):
  """The weighted problem's optimum (CG in parameter space, plain or preconditioned with K-FAC factors
  or a Nyström sketch of the same weights; the weighted kernel form) equals the dense solve, and the
  certificate is the dense residual. (K-FAC-preconditioned CG needs ~350 iterations here: see
  `lqf.solve`.)"""
  lin, variables, features, *_ = problem
  targets, hess, b = weighted
  delta, info = solve.solve_linearized(
      lin, variables, features, targets, weight_decay=LAM, method=method, tol=1e-6, maxiter=500,
      curvature=curvature(preconditioner, lin, variables, features, weights=targets.weights))
  exact = np.linalg.solve(hess, b)
  got = np.asarray(ravel_pytree(delta)[0], np.float64)
  assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(exact)
  dense_residual = np.linalg.norm(b - hess @ got) / np.linalg.norm(b)
  np.testing.assert_allclose(info.relative_residual, dense_residual, rtol=0.1,
                             atol=residual_rounding(hess, got, b))


def test_nystrom_pcg_converges_in_the_distinct_eigenvalues_it_leaves(problem):
  """A rank-8 sketch of the 18-dimensional range of Jᵀ: MH has eigenvalue 1 on span U, 10 more in the
  rest of the range and one on the null space of J, so PCG reaches the dense optimum in ≤ 12 iterations
  in exact arithmetic (float32 products: a few more to 1e-6)."""
  lin, variables, features, labels, hess, b, _ = problem
  sketch = curvature("nystrom", lin, variables, features, rank=8)
  delta, info = solve.solve_linearized(lin, variables, features, plain(labels), weight_decay=LAM,
                                       method="parameter", curvature=sketch, tol=1e-6, maxiter=300)
  exact = np.linalg.solve(hess, b)
  assert np.linalg.norm(np.asarray(ravel_pytree(delta)[0], np.float64) - exact) <= 1e-4 * np.linalg.norm(exact)
  assert info.iterations <= 16


def test_kernel_form_bad_options(problem):
  lin, variables, features, labels, *_ = problem
  with pytest.raises(ValueError, match="method='kernel' uses its own preconditioner"):
    solve.solve_linearized(lin, variables, features, plain(labels), method="kernel", batch_size=4)
  with pytest.raises(ValueError, match="method='dual' is unknown"):
    solve.solve_linearized(lin, variables, features, plain(labels), method="dual")
