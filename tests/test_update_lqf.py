"""Regression-free LQF (compat.fd_lm_targets, experiments.update_lqf, lqf.solve.certify) vs independent
computations: the explicit FD-LM sum, the dense weighted ridge optimum, and flip metrics recomputed from
the study's saved predictions."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import compat
from experiments import update as update_experiment
from experiments import common, update_lqf
from lqf import fit, losses, methods, solve
from lqf.runtime import config_util
from lqf.runtime import task as task_lib
from support import C, LAM, ROOT, SCALE, SIX_LABELS, TAIL, small_problem

N = len(SIX_LABELS)


def quick_config():
  return config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "update_lqf_mnist", "quick")


def logits_problem(seed=0, n=8, c=4):
  """Random new logits f, labels y and old logits φ with argmax φ = y on the first half only."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  old = rng.normal(size=(n, c)) * 4
  old[np.arange(n), labels] = np.where(np.arange(n) < n // 2, 20.0, -20.0)
  return (jnp.asarray(rng.normal(size=(n, c)) * 5, jnp.float32), jnp.asarray(labels),
          jnp.asarray(old, jnp.float32))


@pytest.mark.parametrize("alpha, beta, lam", [(1.0, 5.0, 0.7), (0.5, 2.0, 3.0)])
def test_weighted_objective_is_least_squares_plus_fd_lm(alpha, beta, lam):
  """1/(2B) Σ c_i ‖f_i − t_i‖² = squared error + λ·FD-LM (compat.focal_distillation_lm) + const,
  with equal gradients in f, and c_i = 1 + λ(α + β·1[old right])."""
  f, labels, old = logits_problem()
  targets = compat.fd_lm_targets(labels, old, target_scale=SCALE, alpha=alpha, beta=beta, lam=lam)
  right = np.arange(len(labels)) < len(labels) // 2
  np.testing.assert_allclose(targets.weights, 1 + lam * (alpha + beta * right), rtol=1e-6)

  def explicit(z):
    squared_error = jnp.mean(0.5 * jnp.sum((z - SCALE * jax.nn.one_hot(labels, 4)) ** 2, -1))
    return squared_error + lam * compat.focal_distillation_lm(
        z, old, labels, alpha=alpha, beta=beta)

  def weighted(z):
    return losses.weighted_squared_error(z, targets)

  other = f + jnp.asarray(np.random.default_rng(1).normal(size=f.shape) * 3, jnp.float32)
  np.testing.assert_allclose(explicit(f) - weighted(f), explicit(other) - weighted(other),
                             rtol=1e-5, atol=1e-3)
  for z in (f, other):
    np.testing.assert_allclose(jax.grad(weighted)(z), jax.grad(explicit)(z), rtol=1e-5, atol=1e-5)


def test_beta_zero_is_kd_by_logit_matching():
  """β = 0: c_i = 1 + λα for every example and the objective is ½‖f − s·e_y‖² + λα·½‖f − φ‖² (numpy)."""
  f, labels, old = logits_problem(seed=2)
  alpha, lam = 1.0, 0.4
  targets = compat.fd_lm_targets(labels, old, target_scale=SCALE, alpha=alpha, beta=0.0, lam=lam)
  np.testing.assert_allclose(targets.weights, np.full(len(labels), 1 + lam * alpha), rtol=1e-6)
  one_hot = SCALE * np.eye(4)[np.asarray(labels)]

  def kd(z):
    z = np.asarray(z, np.float64)
    return np.mean(0.5 * np.sum((z - one_hot) ** 2, -1)
                   + lam * alpha * 0.5 * np.sum((z - np.asarray(old, np.float64)) ** 2, -1))

  other = f + 2.0
  np.testing.assert_allclose(kd(f) - losses.weighted_squared_error(f, targets),
                             kd(other) - losses.weighted_squared_error(other, targets), rtol=1e-5)
  kd_grad = (np.asarray(f) - one_hot + lam * alpha * (np.asarray(f) - np.asarray(old))) / len(labels)
  np.testing.assert_allclose(jax.grad(losses.weighted_squared_error)(f, targets), kd_grad, rtol=1e-5,
                             atol=1e-6)


@pytest.fixture(scope="module")
def network_problem(six_examples):
  """A ResNet8 tail linearized on 6 images, old logits (3 of 6 right), and the dense weighted ridge
  optimum δ* = (JᵀCJ/N + λI)⁻¹ JᵀC(T − f0)/N of least squares + FD-LM (float64)."""
  lin, variables, features, labels, jac, _ = six_examples          # J: (N·C, P)
  old = np.random.default_rng(4).normal(size=(N, C)) * 3
  old[np.arange(N), np.asarray(labels)] += np.array([10, 10, 10, -10, -10, -10])
  distill = dict(alpha=1.0, beta=5.0, lam=0.5)
  w = distill["alpha"] + distill["beta"] * (old.argmax(-1) == np.asarray(labels))
  c = 1 + distill["lam"] * w
  t = (SCALE * np.eye(C)[np.asarray(labels)] + distill["lam"] * w[:, None] * old) / c[:, None]
  cc = np.repeat(c, C)
  z = (t - np.asarray(features.f0, np.float64)).reshape(-1)
  hess = jac.T @ (cc[:, None] * jac) / N + LAM * np.eye(jac.shape[1])
  optimum = np.linalg.solve(hess, jac.T @ (cc * z) / N)
  return lin, variables, features, labels, jnp.asarray(old, jnp.float32), distill, optimum, hess


def test_fd_lm_fit_is_the_dense_weighted_ridge_solution(network_problem):
  """Exact-step CG on the weighted quadratic (no preconditioner) reaches δ* to 1e-4; with K-FAC
  (weighted factors) 40 steps reach 99.9 % of the objective decrease."""
  lin, variables, features, labels, old, distill, optimum, hess = network_problem
  targets = compat.fd_lm_targets(labels, old, target_scale=SCALE, **distill)
  delta, _ = fit.fit_linearized(lin, variables, features, targets,
                                fit.FitOptions(weight_decay=LAM, preconditioner="none", steps=60))
  got = np.asarray(ravel_pytree(delta)[0], np.float64)
  assert np.linalg.norm(got - optimum) <= 1e-4 * np.linalg.norm(optimum)
  delta, history = fit.fit_linearized(lin, variables, features, targets,
                                      fit.FitOptions(weight_decay=LAM, steps=40))
  got = np.asarray(ravel_pytree(delta)[0], np.float64)
  # L(δ) − L(δ*) = ½(δ − δ*)ᵀH(δ − δ*) for a quadratic; L(0) − L* likewise with δ = 0.
  gap = lambda d: 0.5 * (d - optimum) @ hess @ (d - optimum)  # noqa: E731
  assert gap(got) <= 1e-3 * gap(0 * optimum)
  assert np.all(np.diff(history["loss"]) <= 1e-6 * history["loss"][0])


def test_certificate_against_the_dense_optimum(network_problem):
  """`lqf.solve.certify` of a 10-step K-FAC fit (and the study's `certify`, which adds test
  predictions): its exact solve meets the tolerance, and the distance and suboptimality it reports
  are those of the dense optimum δ*."""
  lin, variables, features, labels, old, distill, optimum, hess = network_problem
  targets = compat.fd_lm_targets(labels, old, target_scale=SCALE, **distill)
  delta, _ = fit.fit_linearized(lin, variables, features, targets, fit.FitOptions(weight_decay=LAM, steps=10))
  images = small_problem(n=N)[2]
  task = task_lib.Task(lin.model, variables, (np.asarray(images), np.asarray(labels)))
  lqf = methods.LQFSettings(fit=fit.FitOptions(weight_decay=LAM), trainable=TAIL, target_scale=SCALE)
  new = common.LinearizedClassifier(lin, variables, delta)
  test_h = lin.trunk_features(variables, np.asarray(images))
  report = update_lqf.certify(new, task, targets, lqf, (test_h, np.asarray(labels)), tol=1e-6,
                              maxiter=300)
  assert report["relative_residual"] <= 1e-6
  got = np.asarray(ravel_pytree(delta)[0], np.float64)
  np.testing.assert_allclose(report["relative_distance"],
                             np.linalg.norm(got - optimum) / np.linalg.norm(optimum), rtol=1e-3)
  gap = lambda d: 0.5 * (d - optimum) @ hess @ (d - optimum)  # noqa: E731
  np.testing.assert_allclose(report["relative_suboptimality"], gap(got) / gap(0 * optimum), rtol=1e-2)
  unravel = ravel_pytree(lin.init_delta(variables))[1]
  dense_pred = np.asarray(lin.apply(unravel(jnp.asarray(optimum, jnp.float32)), variables,
                                    features.h)).argmax(-1)
  assert report["test_error_optimum"] == pytest.approx(compat.error_rate(labels, dense_pred))
  assert report["test_agreement"] == pytest.approx(np.mean(
      dense_pred == np.asarray(lin.apply(delta, variables, features.h)).argmax(-1)))
  certificate = solve.certify(lin, variables, features, targets, delta, weight_decay=LAM, tol=1e-6,
                              maxiter=300)
  assert certificate.relative_distance == pytest.approx(report["relative_distance"])


def test_bad_inputs_are_errors():
  f, labels, old = logits_problem()
  with pytest.raises(ValueError, match="old_logits must be"):
    compat.fd_lm_targets(labels, old[:3], target_scale=SCALE, alpha=1.0, beta=5.0, lam=1.0)
  with pytest.raises(ValueError, match="FD-LM weights must be >= 0"):
    compat.fd_lm_targets(labels, old, target_scale=SCALE, alpha=1.0, beta=5.0, lam=-1.0)
  config = quick_config()
  config.new_shots = config.old_shots
  with pytest.raises(ValueError, match="a data update needs 0 < old_shots < new_shots"):
    update_lqf.run(config, "/nonexistent")


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
  """`experiments/update.py` on the quick config: every row's flip metrics equal those recomputed
  from the saved predictions, the certificate holds, and the tables are written."""
  config = quick_config()
  config.pretrain.model.width = 4  # a narrow source: nothing checked here depends on the width
  results = update_experiment.run(config, str(tmp_path))
  with np.load(tmp_path / update_lqf.PREDICTIONS_FILE) as saved:
    predictions = dict(saved)
  rows = ["old", "none", *config.methods]
  for target, r in results["results"].items():
    labels = predictions[f"{target}/labels"]
    assert set(r["runs"]) == set(rows)
    for name in rows:
      for run in r["runs"][name]:
        old = predictions[f"{target}/seed{run['seed']}/old"]
        new = predictions[f"{target}/seed{run['seed']}/{name}"]
        assert run["nfr"] == pytest.approx(compat.negative_flip_rate(labels, old, new))
        assert run["pfr"] == pytest.approx(compat.positive_flip_rate(labels, old, new))
        assert run["error_rate_new"] == pytest.approx(compat.error_rate(labels, new))
      mean_nfr = np.mean([run["nfr"] for run in r["runs"][name]])
      assert r["summary"][name]["nfr"]["mean"] == pytest.approx(mean_nfr)
    for name, target_check in r["targets"].items():
      base, row = r["summary"]["none"], r["summary"][name]
      assert target_check["error_change"]["mean"] == pytest.approx(
          row["error_rate_new"]["mean"] - base["error_rate_new"]["mean"])
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["study"] == "lqf_pct"
  assert "| none (plain LQF, new shots) |" in (tmp_path / "results.md").read_text()
