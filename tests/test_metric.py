"""Ridge in a curvature metric (`lqf.metric`): the metric's closed forms, and every exact quantity of the
generalized objective L_M(δ) = 1/(2N) Σ‖f0 + Jδ − t‖² + (λ/2)δᵀMδ against dense float64 solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
from jax.flatten_util import ravel_pytree

from lqf import fit, forget, influence, kfac, nystrom, solve
from lqf import metric as metric_lib
from support import C, LAM, SCALE, plain, random_weighted
MU = 1e-3  # the metric's damping: M ⪰ μI
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def metrics(six_examples):
  """{name: (`Metric`, M as a dense float64 matrix (P, P) from P products)} for K-FAC and Nyström."""
  lin, variables, features, _, jac, unravel = six_examples
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths)
  sketch = nystrom.sketch(lin.tail, variables, features.h, lin.trainable_paths)
  out = {}
  for name, curvature in (("kfac", factors), ("nystrom", sketch)):
    m = metric_lib.of(curvature, MU)
    eye = jnp.eye(jac.shape[1], dtype=jnp.float32)
    dense = np.asarray(jax.vmap(lambda e: ravel_pytree(m.product(unravel(e)))[0])(eye), np.float64)
    out[name] = (m, 0.5 * (dense + dense.T), factors)
  return out


def _largest_eigenvalue(hess) -> float:
  """‖H‖₂ of the symmetric positive definite H by Lanczos (a dense SVD of 3731² takes seconds)."""
  return float(scipy.sparse.linalg.eigsh(hess, k=1, which="LA", v0=np.ones(len(hess)),
                                         return_eigenvectors=False)[0])


def _dense_delta(unravel, x):
  return unravel(jnp.asarray(x, jnp.float32))


def test_kfac_metric_is_the_damped_kronecker_product(six_examples, metrics):
  """M·v per layer = (A + π√μI) ⊗ (G + √μ/π I) vec(v) (np.kron), (d + μ)·v on the diagonal leaves, and
  M⁻¹(Mv) = v: the metric is the matrix K-FAC's preconditioner inverts."""
  lin, variables, *_ = six_examples
  m, _, factors = metrics["kfac"]
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), lin.init_delta(variables))
  got = m.product(v)
  layer = "stage3/block1/conv2"
  a, g = (np.asarray(f, np.float64) for f in factors.kronecker[layer])
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  damped = np.kron(a + pi * np.sqrt(MU) * np.eye(len(a)), g + np.sqrt(MU) / pi * np.eye(len(g)))
  vec = np.asarray(v["stage3"]["block1"]["conv2"]["kernel"], np.float64).reshape(-1)
  expected = damped @ vec
  np.testing.assert_allclose(np.asarray(got["stage3"]["block1"]["conv2"]["kernel"]).reshape(-1), expected,
                             rtol=1e-4, atol=64 * EPS32 * np.abs(damped).sum(1).max() * np.abs(vec).max())
  d = np.asarray(factors.diagonal["stage3/block1/bn1/scale"], np.float64)
  np.testing.assert_allclose(got["stage3"]["block1"]["bn1"]["scale"],
                             (d + MU) * np.asarray(v["stage3"]["block1"]["bn1"]["scale"]), rtol=1e-5)
  back = ravel_pytree(m.inverse(got))[0]
  np.testing.assert_allclose(back, ravel_pytree(v)[0], rtol=0, atol=1e-3 * np.abs(ravel_pytree(v)[0]).max())


def test_metrics_are_symmetric_and_above_their_floor(metrics, six_examples):
  """M = Mᵀ ⪰ μI (`Metric.floor`), and the Nyström metric of a sketch that spans the range of Jᵀ
  (N·C = 18 ≤ ℓ) is exactly JᵀJ/N + μI."""
  *_, jac, _ = six_examples
  for name, (m, dense, _) in metrics.items():
    slack = m.floor * 1e-3 + 64 * EPS32 * np.abs(dense).max()
    np.linalg.cholesky(dense - (m.floor - slack) * np.eye(len(dense)))  # raises unless M ⪰ (μ − slack)I
  _, dense, _ = metrics["nystrom"]
  expected = jac.T @ jac / 6 + MU * np.eye(jac.shape[1])
  np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def _system(jac, features, targets, m_dense):
  """Dense H = JᵀCJ/N + λM and b = JᵀC(T − f0)/N (float64)."""
  n = features.f0.shape[0]
  c = np.repeat(np.asarray(targets.weights if targets.weights is not None else np.ones(n), np.float64), C)
  z = (np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)).reshape(-1)
  return jac.T @ (c[:, None] * jac) / n + LAM * m_dense, jac.T @ (c * z) / n


@pytest.mark.parametrize("name, method", [("kfac", "kernel"), ("kfac", "parameter"), ("nystrom", "kernel")])
def test_generalized_ridge_solve_matches_dense(six_examples, metrics, name, method):
  """δ* of (JᵀCJ/N + λM)δ = JᵀC(T − f0)/N (weighted targets) in both forms vs the dense float64 solve; the
  certificate is the residual recomputed in float64, and ‖δ − δ*‖ ≤ ‖r‖/(λμ)."""
  lin, variables, features, _, jac, unravel = six_examples
  m, m_dense, _ = metrics[name]
  targets = random_weighted(6)
  hess, rhs = _system(jac, features, targets, m_dense)
  optimum = np.linalg.solve(hess, rhs)
  delta, info = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM, method=method,
                                       metric=m, tol=1e-5, maxiter=400)
  x = np.asarray(ravel_pytree(delta)[0], np.float64)
  residual = np.linalg.norm(rhs - hess @ x) / np.linalg.norm(rhs)
  rounding = 10 * EPS32 * _largest_eigenvalue(hess) * np.linalg.norm(x) / np.linalg.norm(rhs)
  assert info.relative_residual <= 1e-5
  assert abs(residual - info.relative_residual) <= rounding + 1e-6, (residual, info.relative_residual)
  r = (residual + rounding) * np.linalg.norm(rhs)
  assert np.linalg.norm(x - optimum) <= r / (LAM * MU)
  # ‖J(δ − δ*)‖²/N ≤ (δ − δ*)ᵀH(δ − δ*) = rᵀH⁻¹r ≤ ‖r‖²/(λμ): the logits, to what the residual implies.
  assert np.linalg.norm(jac @ (x - optimum)) <= np.sqrt(6) * r / np.sqrt(LAM * MU)
  assert np.linalg.norm(jac @ (x - optimum)) <= 1e-3 * np.linalg.norm(jac @ optimum)
  # The Euclidean optimum is another point: the check has teeth.
  euclidean = np.linalg.solve(_system(jac, features, targets, np.eye(len(x)))[0], rhs)
  assert np.abs(euclidean - optimum).max() > 0.1 * np.abs(optimum).max()


def test_certify_measures_the_generalized_objective(six_examples, metrics):
  """`certify` with a metric: the suboptimality of a perturbed δ* against the dense objective
  ½‖f0 + Jδ − sY‖²/N + (λ/2)δᵀMδ."""
  lin, variables, features, labels, jac, unravel = six_examples
  m, m_dense, _ = metrics["kfac"]
  targets = plain(labels)
  hess, rhs = _system(jac, features, targets, m_dense)
  optimum = np.linalg.solve(hess, rhs)
  z = (SCALE * np.eye(C)[np.asarray(labels)] - np.asarray(features.f0, np.float64)).reshape(-1)
  objective = lambda d: 0.5 * np.sum((jac @ d - z) ** 2) / 6 + 0.5 * LAM * d @ m_dense @ d  # noqa: E731
  trial = optimum + 0.3 * np.random.default_rng(1).normal(size=optimum.shape) * np.abs(optimum).max()
  cert = solve.certify(lin, variables, features, targets, _dense_delta(unravel, trial), weight_decay=LAM,
                       metric=m, tol=1e-5, maxiter=400)
  expected = (objective(trial) - objective(optimum)) / (objective(0 * optimum) - objective(optimum))
  np.testing.assert_allclose(cert.relative_suboptimality, expected, rtol=1e-3)


def _dual_refit(kernel, z, n, keep, weight_decay):
  """α of the kept rows: (K_kk + NλI)⁻¹ z_k (N the full count: the penalty kept at Nλ)."""
  return np.linalg.solve(kernel[np.ix_(keep, keep)] + n * weight_decay * np.eye(len(keep)), z[keep])


def test_loo_in_a_metric_equals_refits(six_examples, metrics):
  """Leave-one-out logits of the metric problem, and the `RidgePath` curve over three λ, vs refitting
  without each example ((J_RᵀJ_R + NλM)δ = J_Rᵀz_R, predictions J_iδ), solved in dual form with the dense
  K_M = J M⁻¹ Jᵀ (M⁻¹ by a float64 solve with the materialized M)."""
  lin, variables, features, labels, jac, unravel = six_examples
  m, m_dense, _ = metrics["kfac"]
  targets = plain(labels)
  t = SCALE * np.eye(C)[np.asarray(labels)]
  z = (t - np.asarray(features.f0, np.float64)).reshape(-1)
  loo = influence.loo_predictions(lin, variables, features, targets, weight_decay=LAM, metric=m)
  kernel = jac @ np.linalg.solve(m_dense, jac.T)  # K_M = J M⁻¹ Jᵀ from the dense M (float64)
  for i in range(6):
    keep = np.flatnonzero(np.repeat(np.arange(6) != i, C))
    refit = kernel[i * C:(i + 1) * C, keep] @ _dual_refit(kernel, z, 6, keep, LAM)  # J_i δ^(−i)
    np.testing.assert_allclose(loo[i], np.asarray(features.f0[i]) + refit, rtol=1e-3,
                               atol=1e-3 * np.abs(t).max())
  path = influence.ridge_path(lin, variables, features, targets, metric=m)
  grid = (1e-3, 1e-1, 10.0)
  curve = path.loo_curve(targets, grid)
  for k, weight_decay in enumerate(grid):
    residuals = []
    for i in range(6):
      keep = np.flatnonzero(np.repeat(np.arange(6) != i, C))
      alpha = _dual_refit(kernel, z, 6, keep, weight_decay)
      residuals.append(z[i * C:(i + 1) * C] - kernel[i * C:(i + 1) * C, keep] @ alpha)
    residuals = np.array(residuals)
    np.testing.assert_allclose(curve.loss[k], np.mean(0.5 * np.sum(residuals ** 2, -1)), rtol=2e-3)
    assert curve.accuracy[k] == np.mean(np.argmax(t - residuals, -1) == np.asarray(labels))
  assert curve.best == grid[int(np.argmin(curve.loss))]


def test_forgetting_in_a_metric_is_the_retained_optimum(six_examples, metrics):
  """`forget_by_downdate` of the metric problem vs the dense optimum on the retained examples with the
  same M; the bound ρ‖b'‖/(λμ) holds."""
  lin, variables, features, labels, jac, unravel = six_examples
  m, m_dense, _ = metrics["kfac"]
  targets = plain(labels)
  kernel = influence.kernel_fit(lin, variables, features, targets, weight_decay=LAM, metric=m)
  out = forget.forget_by_downdate(lin, variables, features, targets, np.array([1, 4]), kernel=kernel,
                                  metric=m, tol=1e-5)
  keep = np.repeat(~np.isin(np.arange(6), [1, 4]), C)
  z = (SCALE * np.eye(C)[np.asarray(labels)] - np.asarray(features.f0, np.float64)).reshape(-1)
  hess = jac[keep].T @ jac[keep] / 4 + LAM * m_dense
  expected = np.linalg.solve(hess, jac[keep].T @ z[keep] / 4)
  x = np.asarray(ravel_pytree(out.delta)[0], np.float64)
  assert out.relative_residual <= 1e-5
  assert np.linalg.norm(x - expected) <= out.distance_bound * 1.01
  np.testing.assert_allclose(x, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def test_exact_fit_with_loo_weight_decay(six_examples, metrics):
  """``FitOptions(optimizer='exact', weight_decay='loo', regularizer='kfac')``: λ is the grid's
  argmin of the leave-one-out loss (dual refits in float64 over `lqf.influence.LOO_GRID`), and δ is the
  dense optimum at that λ in K-FAC's metric (damping ``metric_damping``)."""
  lin, variables, features, labels, jac, unravel = six_examples
  _, m_dense, _ = metrics["kfac"]
  targets = plain(labels)
  options = fit.FitOptions(optimizer="exact", weight_decay="loo", regularizer="kfac", metric_damping=MU)
  delta, history = fit.fit_linearized(lin, variables, features, targets, options)
  z = (SCALE * np.eye(C)[np.asarray(labels)] - np.asarray(features.f0, np.float64)).reshape(-1)
  kernel = jac @ np.linalg.solve(m_dense, jac.T)
  loss = []
  for weight_decay in influence.LOO_GRID:
    residuals = [z[i * C:(i + 1) * C] - kernel[i * C:(i + 1) * C, keep] @ _dual_refit(kernel, z, 6, keep,
                                                                                      weight_decay)
                 for i in range(6) for keep in [np.flatnonzero(np.repeat(np.arange(6) != i, C))]]
    loss.append(np.mean(0.5 * np.sum(np.array(residuals) ** 2, -1)))
  chosen = influence.LOO_GRID[int(np.argmin(loss))]
  assert history["weight_decay"] == chosen
  hess = jac.T @ jac / 6 + chosen * m_dense
  expected = np.linalg.solve(hess, jac.T @ z / 6)
  assert history["relative_residual"] <= 1e-4
  np.testing.assert_allclose(ravel_pytree(delta)[0], expected, rtol=0, atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize("kw, message", [
    (dict(regularizer="ridge"), "regularizer='ridge' is unknown"),
    (dict(weight_decay="loo"), "weight_decay='loo' .* optimizer='exact'"),
    (dict(regularizer="kfac"), "regularizer='kfac' .* optimizer='exact'"),
    (dict(optimizer="exact", loss="ce"), "optimizer='exact' .* loss='mse'"),
    (dict(optimizer="exact", metric_damping=0.0), "metric_damping=0.0"),
    (dict(weight_decay="auto"), "weight_decay='auto'"),
])
def test_bad_options_are_one_line(kw, message):
  with pytest.raises(ValueError, match=message) as e:
    fit.FitOptions(**kw)
  assert "\n" not in str(e.value)
