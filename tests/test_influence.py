"""Closed-form leave-one-out and test influence vs refitting without each sample (dense solves)."""

import jax.numpy as jnp
import numpy as np
import pytest

from lqf import influence
from lqf import linearize as lin_lib
from lqf.losses import WeightedTargets, one_hot_targets
from support import TAIL, small_problem
LAM, SCALE, N = 0.05, 15.0, 6


@pytest.fixture(scope="module")
def problem(dense_jacobian):
  model, variables, x = small_problem(n=N + 2)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, x[:N])
  test_features = lin.features(variables, x[N:])
  return (lin, variables, features, labels, test_features, dense_jacobian(lin, variables, features.h)[0],
          dense_jacobian(lin, variables, test_features.h)[0])


def refit_without(jac, z, i, c=3):
  """argmin_δ ½Σ_{j≠i}‖J_jδ − z_j‖² + (Nλ/2)‖δ‖² (the 1/N objective with sample i's term dropped)."""
  keep = np.ones(len(z), bool)
  if i is not None:
    keep[i * c:(i + 1) * c] = False
  j = jac[keep]
  return np.linalg.solve(j.T @ j + N * LAM * np.eye(jac.shape[1]), j.T @ z[keep])


def test_empirical_ntk(problem):
  lin, variables, features, _, test_features, jac, jac_test = problem
  np.testing.assert_allclose(influence.empirical_ntk(lin, variables, features.h), jac @ jac.T,
                             rtol=1e-4, atol=1e-4 * np.abs(jac @ jac.T).max())
  np.testing.assert_allclose(influence.empirical_ntk(lin, variables, test_features.h, features.h),
                             jac_test @ jac.T, rtol=1e-4, atol=1e-4 * np.abs(jac_test @ jac.T).max())


def test_loo_and_influence_equal_refits(problem):
  lin, variables, features, labels, test_features, jac, jac_test = problem
  targets = SCALE * np.eye(3)[np.asarray(labels)]
  z = (targets - np.asarray(features.f0, np.float64)).reshape(-1)
  full = refit_without(jac, z, None)
  loo = influence.loo_predictions(lin, variables, features, one_hot_targets(labels, 3, SCALE),
                                  weight_decay=LAM)
  effect = influence.influence_on_test(lin, variables, features, one_hot_targets(labels, 3, SCALE),
                                       test_features, weight_decay=LAM)
  assert effect.shape == (2, N, 3)
  for i in range(N):
    delta = refit_without(jac, z, i)
    expected = np.asarray(features.f0[i], np.float64) + (jac @ delta).reshape(N, 3)[i]
    np.testing.assert_allclose(loo[i], expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(effect[:, i], (jac_test @ (delta - full)).reshape(2, 3), rtol=1e-3,
                               atol=1e-3 * np.abs(jac_test @ full).max())
  # Removing a sample changes its own prediction: the check has teeth.
  fitted = np.asarray(features.f0, np.float64) + (jac @ full).reshape(N, 3)
  assert np.abs(loo - fitted).max() > 0.1


def test_weighted_loo_and_influence_equal_refits(problem):
  """The weighted problem (c_i ≠ 1, e.g. FD-LM): the closed forms equal dense refits without sample i of
  argmin ½Σ_{j≠i} c_j‖J_jδ − z_j‖² + (Nλ/2)‖δ‖², z = T − f0."""
  lin, variables, features, _, test_features, jac, jac_test = problem
  rng = np.random.default_rng(7)
  targets = WeightedTargets(jnp.asarray(rng.normal(size=(N, 3)) * 5, jnp.float32),
                            jnp.asarray(rng.uniform(0.5, 6.0, N), jnp.float32))
  root = np.repeat(np.sqrt(np.asarray(targets.weights, np.float64)), 3)
  z = (np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)).reshape(-1)
  full = refit_without(root[:, None] * jac, root * z, None)
  loo = influence.loo_predictions(lin, variables, features, targets, weight_decay=LAM)
  effect = influence.influence_on_test(lin, variables, features, targets, test_features, weight_decay=LAM)
  for i in range(N):
    delta = refit_without(root[:, None] * jac, root * z, i)
    expected = np.asarray(features.f0[i], np.float64) + (jac @ delta).reshape(N, 3)[i]
    np.testing.assert_allclose(loo[i], expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(effect[:, i], (jac_test @ (delta - full)).reshape(2, 3), rtol=1e-3,
                               atol=1e-3 * np.abs(jac_test @ full).max())
