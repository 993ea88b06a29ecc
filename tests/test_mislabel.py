"""Label-noise scores (lqf.mislabel) vs brute-force dense refits without each training example."""

import jax.numpy as jnp
import numpy as np
import pytest

from lqf import influence, mislabel
from lqf.losses import one_hot_targets
from test_forget import C, LABELS, LAM, N, SCALE, problem, random_weighted  # noqa: F401  (fixture)


def refit_logits(jac, features, targets, i):
  """f^(−i)(x_i), or f(x) of every example for i = None, from the dense optimum of
  ½Σ_{j≠i} c_j‖f0_j + J_jδ − t_j‖² + (Nλ/2)‖δ‖² (float64)."""
  weights = np.ones(N) if targets.weights is None else np.asarray(targets.weights, np.float64)
  keep = np.ones(N, bool) if i is None else np.arange(N) != i
  rows = np.repeat(keep, C)
  c = np.repeat(weights, C)[rows]
  f0 = np.asarray(features.f0, np.float64)
  z = (np.asarray(targets.targets, np.float64) - f0).reshape(-1)[rows]
  j = jac[rows]
  # δ = Jᵀ(CJJᵀ + NλI)⁻¹Cz, the push-through form of (JᵀCJ + NλI)⁻¹JᵀCz (P ≫ N·C).
  delta = j.T @ np.linalg.solve(c[:, None] * (j @ j.T) + N * LAM * np.eye(len(z)), c * z)
  logits = f0 + (jac @ delta).reshape(N, C)
  return logits if i is None else logits[i]


@pytest.mark.parametrize("weighted", [False, True])
def test_scores_equal_brute_force_refits(problem, weighted):
  lin, variables, features, jac = problem
  targets = random_weighted(seed=11) if weighted else one_hot_targets(jnp.asarray(LABELS), C, SCALE)
  kernel = influence.kernel_fit(lin, variables, features, targets, weight_decay=LAM)
  scores = mislabel.label_scores(kernel, targets)
  t = np.asarray(targets.targets, np.float64)
  c = np.ones(N) if targets.weights is None else np.asarray(targets.weights, np.float64)
  fitted = refit_logits(jac, features, targets, None)
  loo = np.stack([refit_logits(jac, features, targets, i) for i in range(N)])
  loo_loss = 0.5 * c * ((t - loo) ** 2).sum(-1)
  fitted_loss = 0.5 * c * ((t - fitted) ** 2).sum(-1)
  given = t.argmax(-1)
  margin = np.array([max(loo[i, k] for k in range(C) if k != given[i]) - loo[i, given[i]]
                     for i in range(N)])
  scale = loo_loss.max()
  np.testing.assert_allclose(scores.loo_loss, loo_loss, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(scores.fitted_loss, fitted_loss, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(scores.self_influence, loo_loss - fitted_loss, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(scores.loo_margin, margin, rtol=1e-3, atol=1e-3)
  assert np.all(scores.loo_loss > scores.fitted_loss)   # leaving an example out never fits it better
