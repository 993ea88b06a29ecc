"""Certified forgetting (lqf.forget, lqf.influence.KernelFit.without) vs dense refits from scratch."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import common, forgetting
from lqf import forget, influence, kfac, solve
from lqf.losses import one_hot_targets
from lqf.runtime import config_util
from support import C, LAM, ROOT, SCALE, random_weighted
from support import NINE_LABELS as LABELS

N = len(LABELS)


@pytest.fixture(scope="module")
def problem(nine_examples):
  """A ResNet8 tail linearized on N = 9 images (3 per class) and its dense Jacobian J (N·C, P)."""
  return nine_examples


def dense_system(jac, features, targets, keep):
  """H' = J_RᵀC_RJ_R/N' + λI, b' = J_RᵀC_R(T_R − f0_R)/N' of the examples ``keep`` and ‖H'‖₂ (float64)."""
  rows = (keep[:, None] * C + np.arange(C)).reshape(-1)
  weights = np.ones(N) if targets.weights is None else np.asarray(targets.weights, np.float64)
  c = np.repeat(weights[keep], C)
  z = (np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)).reshape(-1)[rows]
  j = jac[rows]
  norm = LAM + np.linalg.eigvalsh(np.sqrt(c)[:, None] * (j @ j.T) * np.sqrt(c)[None, :])[-1] / len(keep)
  return j.T @ (c[:, None] * j) / len(keep) + LAM * np.eye(jac.shape[1]), j.T @ (c * z) / len(keep), norm


def forgotten(lin, variables, features, targets, removed, how):
  """Forget ``removed`` from the fitted optimum on all N: `forget_by_cg` from δ (kernel CG, as a user
  solves it; preconditioned with K-FAC for 'kfac'), or `forget_by_downdate` of the problem's KernelFit."""
  if how == "kernel":
    kernel = influence.kernel_fit(lin, variables, features, targets, weight_decay=LAM)
    return forget.forget_by_downdate(lin, variables, features, targets, removed, kernel=kernel, tol=1e-6)
  delta, _ = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM, tol=1e-6,
                                    maxiter=300)
  curvature = (kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths) if how == "kfac"
               else None)
  return forget.forget_by_cg(lin, variables, features, targets, removed, weight_decay=LAM, delta=delta,
                             curvature=curvature, tol=1e-6)


@pytest.mark.parametrize("how", ["parameter", "kfac", "kernel"])
@pytest.mark.parametrize("weighted", [False, True])
def test_forget_equals_the_dense_refit_on_the_retained_examples(problem, how, weighted):
  """δ' equals argmin of the objective on the 7 retained examples (dense solve, same λ) to 1e-4, the
  certificate is the dense residual of the NEW normal equations, and the distance bound holds."""
  lin, variables, features, jac = problem
  targets = random_weighted(N) if weighted else one_hot_targets(jnp.asarray(LABELS), C, SCALE)
  removed = np.array([4, 1])
  result = forgotten(lin, variables, features, targets, removed, how)
  keep = np.array([0, 2, 3, 5, 6, 7, 8])
  np.testing.assert_array_equal(result.retained, keep)
  hess, b, hess_norm = dense_system(jac, features, targets, keep)
  exact = np.linalg.solve(hess, b)
  got = np.asarray(ravel_pytree(result.delta)[0], np.float64)
  assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(exact)
  dense_residual = np.linalg.norm(b - hess @ got) / np.linalg.norm(b)
  # float32 rounding of the residual's products (as in test_solve.residual_rounding)
  rounding = 10 * np.finfo(np.float32).eps * hess_norm * np.linalg.norm(got) / np.linalg.norm(b)
  np.testing.assert_allclose(result.relative_residual, dense_residual, rtol=0.1, atol=rounding)
  assert result.relative_residual <= 1e-5   # tol 1e-6 on CG's recursive residual; float32 drift
  assert np.linalg.norm(got - exact) <= result.distance_bound + rounding * np.linalg.norm(b) / LAM
  # The old optimum is far from the new one: forgetting moved δ.
  full_hess, full_b, _ = dense_system(jac, features, targets, np.arange(N))
  assert np.linalg.norm(np.linalg.solve(full_hess, full_b) - exact) > 0.05 * np.linalg.norm(exact)


@pytest.mark.parametrize("how", ["parameter", "kernel"])
def test_forgetting_a_class_removes_it(problem, how):
  """Forget every example of class 0: their logits become f0 + J δ'* with δ'* the dense optimum of
  the other classes' examples alone, and the class-0 logit of those images drops from near s."""
  lin, variables, features, jac = problem
  targets = one_hot_targets(jnp.asarray(LABELS), C, SCALE)
  removed = np.flatnonzero(LABELS == 0)
  result = forgotten(lin, variables, features, targets, removed, how)
  hess, b, _ = dense_system(jac, features, targets, np.flatnonzero(LABELS != 0))
  others = np.linalg.solve(hess, b)
  logits = np.asarray(lin.apply(result.delta, variables, features.h[removed]), np.float64)
  rows = (removed[:, None] * C + np.arange(C)).reshape(-1)
  expected = np.asarray(features.f0, np.float64)[removed] + (jac[rows] @ others).reshape(-1, C)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  full_hess, full_b, _ = dense_system(jac, features, targets, np.arange(N))
  before = np.asarray(features.f0, np.float64)[removed] + (
      jac[rows] @ np.linalg.solve(full_hess, full_b)).reshape(-1, C)
  assert before[:, 0].min() > 0.5 * SCALE             # fitted: near the target s·e_0
  assert np.all(logits[:, 0] < before[:, 0] - 0.25 * SCALE)   # forgotten: nothing pulls them to s


def test_kernel_downdate_equals_the_kernel_fit_of_the_retained_examples(problem):
  """KernelFit.without (Schur complement + ridge shift) equals inverting the retained examples' dual
  A' = C_R^½K_RRC_R^½ + N'λI directly (float64, one kernel K = JJᵀ for both)."""
  _, _, features, jac = problem
  targets = random_weighted(N, seed=8)
  weights = np.asarray(targets.weights, np.float64)
  z = np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)
  full = influence.KernelFit.from_kernel(jac @ jac.T, z, weights, LAM)
  removed = np.array([7, 0, 2])
  keep = np.setdiff1d(np.arange(N), removed)
  rows = (keep[:, None] * C + np.arange(C)).reshape(-1)
  root = np.repeat(np.sqrt(weights[keep]), C)
  a_new = root[:, None] * (jac[rows] @ jac[rows].T) * root[None, :] + len(keep) * LAM * np.eye(len(rows))
  down = full.without(removed)
  np.testing.assert_allclose(down.a_inv, np.linalg.inv(a_new), rtol=1e-7,
                             atol=1e-9 * np.abs(np.linalg.inv(a_new)).max())
  np.testing.assert_allclose(down.alpha.reshape(-1), np.linalg.solve(a_new, root * z[keep].reshape(-1)),
                             rtol=1e-7, atol=1e-9 * np.abs(down.alpha).max())


def test_bad_inputs_are_errors(problem):
  lin, variables, features, _ = problem
  targets = one_hot_targets(jnp.asarray(LABELS), C, SCALE)
  delta = lin.init_delta(variables)
  with pytest.raises(ValueError, match="distinct positions in 0..8"):
    forget.forget_by_cg(lin, variables, features, targets, [1, 1], weight_decay=LAM, delta=delta)
  with pytest.raises(ValueError, match="distinct positions in 0..8"):
    forget.forget_by_cg(lin, variables, features, targets, [9], weight_decay=LAM, delta=delta)
  with pytest.raises(ValueError, match="leaves no problem"):
    forget.forget_by_cg(lin, variables, features, targets, np.arange(N), weight_decay=LAM, delta=delta)
  kernel = influence.kernel_fit(lin, variables, features, targets, weight_decay=LAM)
  with pytest.raises(ValueError, match="pass the KernelFit of this problem"):
    forget.forget_by_downdate(lin, variables, jax.tree.map(lambda a: a[:5], features),
                              jax.tree.map(lambda a: a[:5], targets), [1], kernel=kernel)


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
  """experiments.forgetting on its quick config: the membership table is the accuracy and loss of the
  saved logits, every forgotten set has its size, every certificate meets the tolerance and bounds the
  distance to the retrained optimum, and the forgotten optimum's logits on S are the retrained one's."""
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "forgetting_mnist", "quick")
  config.pretrain.model.width = 4  # a narrow source: nothing checked here depends on the width
  config.fractions = (0.25,)  # one forgotten-set size: the checks below loop over whatever is there
  config.tight_tol = 1e-5  # the study's 1e-6 lies below float32's floor (below): CG would run to maxiter
  results = common.run_study(forgetting.run, forgetting.markdown, config, str(tmp_path))
  with np.load(tmp_path / forgetting.PREDICTIONS_FILE) as saved:
    arrays = dict(saved)
  s = config.lqf.target_scale
  for variant, by_fraction in results["membership"].items():
    for fraction, stats in by_fraction.items():
      for name in ("seen", "forgotten", "retrained", "test_forgotten"):
        accuracy, loss = [], []
        for seed in config.seeds:
          cell = f"{variant}/seed{seed}/f{fraction}"
          logits = arrays[f"{cell}/{name}"]
          labels = arrays["test_labels"] if name.startswith("test") else arrays[f"{cell}/labels"]
          accuracy.append(np.mean(logits.argmax(1) == labels))
          loss.append(np.mean(np.sum((logits - s * np.eye(logits.shape[1])[labels]) ** 2, 1)) / 2)
          assert len(arrays[f"{cell}/removed"]) == max(1, round(float(fraction) * 25))
        assert stats[name]["accuracy"]["mean"] == pytest.approx(np.mean(accuracy))
        assert stats[name]["accuracy"]["std"] == pytest.approx(np.std(accuracy, ddof=1))
        assert stats[name]["loss"]["mean"] == pytest.approx(np.mean(loss), rel=1e-5)
      auc = []
      for seed in config.seeds:  # P(a member's loss < a test image's loss), ties count half
        cell = f"{variant}/seed{seed}/f{fraction}"
        member = forgetting.example_losses(arrays[f"{cell}/forgotten"], arrays[f"{cell}/labels"], s)
        test = forgetting.example_losses(arrays[f"{cell}/test_forgotten"], arrays["test_labels"], s)
        auc.append(np.mean((member[:, None] < test[None]) + 0.5 * (member[:, None] == test[None])))
      assert stats["attack"]["forgotten"]["mean"] == pytest.approx(np.mean(auc))
  # A residual recomputed in float32 over P parameters is only known to about ε·√P of ‖b‖ (≈ 3e-5 for
  # the width-16 tail's P = 58,053, an upper bound for this narrower one); the tight tolerance (1e-6) lies
  # below that, so it is checked against that floor.
  floor = np.finfo(np.float32).eps * np.sqrt(58_053)
  for row in results["rows"]:
    for form, tol in (("kernel", config.tol), ("parameter", config.tol), ("kernel_tight", config.tight_tol)):
      assert row[form]["relative_residual"] <= max(2 * tol, floor)
      # ‖δ' − δ'_retrained‖ ≤ the two certificates' bounds ρ‖b'‖/(λμ) (the retrained one is a solve too).
      retrained_bound = row[form]["bound_over_norm"] * row["retrain_relative_residual"] / row[form][
          "relative_residual"]
      assert row[form]["relative_distance"] <= row[form]["bound_over_norm"] + retrained_bound
  # The outputs, which the residual pins down (H ⪰ λμI leaves δ loose along directions J does not see):
  # on S, the forgotten optimum's logits are the retrained one's, to the solves' tolerance.
  for key in arrays:
    if key.startswith("heldout_head/") and key.endswith("/forgotten"):
      forgotten, retrained = arrays[key], arrays[key.replace("/forgotten", "/retrained")]
      assert np.abs(forgotten - retrained).max() <= 1e-2 * np.abs(retrained).max()
  table = (tmp_path / "results.md").read_text()
  assert "n = 2 seeds" in table and "| 25 % (6) | forget, kernel form (ρ ≤ 1e-05) |" in table
  assert (tmp_path / "forgetting.png").stat().st_size > 1000
