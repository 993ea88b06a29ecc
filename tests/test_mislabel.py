"""Label-noise scores (lqf.mislabel) vs brute-force dense refits without each training example."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, mislabels
from lqf import influence, mislabel
from lqf.losses import one_hot_targets
from lqf.runtime import config_util
from support import C, LAM, ROOT, SCALE, random_weighted
from support import NINE_LABELS as LABELS

N = len(LABELS)


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
def test_scores_equal_brute_force_refits(nine_examples, weighted):
  lin, variables, features, jac = nine_examples
  targets = random_weighted(N, seed=11) if weighted else one_hot_targets(jnp.asarray(LABELS), C, SCALE)
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


def test_flip_labels_changes_exactly_the_flipped_examples():
  labels = np.repeat(np.arange(5), 25)
  noisy, flipped = mislabels.flip_labels(labels, 5, 0.1, seed=3)
  assert flipped.sum() == 12 and np.all(noisy[flipped] != labels[flipped])
  np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
  assert set(noisy) <= set(range(5))


def average_precision(scores, positives):
  """Mean over the positives of the precision among the examples ranked at or above each one."""
  order = np.argsort(-scores)
  hits = positives[order]
  return np.mean([hits[:k + 1].mean() for k in np.flatnonzero(hits)])


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
  """experiments.mislabels on its quick config: the detection metrics and accuracies in the results are
  those recomputed from the saved scores and test logits, the flips are what they should be, and the
  oracle drops exactly the flipped examples."""
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "mislabels_mnist", "quick")
  config.pretrain.model.width = 4  # a narrow source: nothing checked here depends on the width
  results = common.run_study(mislabels.run, mislabels.markdown, config, str(tmp_path))
  with np.load(tmp_path / mislabels.PREDICTIONS_FILE) as saved:
    arrays = dict(saved)
  for target, r in results["results"].items():
    test_labels = arrays[f"{target}/test_labels"]
    for seed, detection, accuracy in zip(config.seeds, r["detection"], r["accuracy"]):
      cell = lambda k: arrays[f"{target}/seed{seed}/{k}"]  # noqa: E731
      flipped = cell("flipped")
      m = round(config.noise_fraction * len(flipped))
      assert flipped.sum() == m and np.all((cell("noisy") != cell("labels")) == flipped)
      np.testing.assert_array_equal(np.sort(cell("dropped/oracle")), np.flatnonzero(flipped))
      for score in mislabels.SCORES:
        values = cell(f"score/{score}")
        assert detection[f"precision_at_m/{score}"] == pytest.approx(flipped[np.argsort(-values)[:m]].mean())
        assert detection[f"average_precision/{score}"] == pytest.approx(average_precision(values, flipped))
      for fit in ("noisy/refit", "noisy/exact", "clean/refit", "drop_loo_loss/exact", "drop_oracle/refit"):
        assert accuracy[fit] == pytest.approx(np.mean(cell(f"test/{fit}").argmax(1) == test_labels))
    ap = [d["average_precision/loo_loss"] for d in r["detection"]]
    assert r["detection_summary"]["average_precision/loo_loss"]["std"] == pytest.approx(np.std(ap, ddof=1))
  assert "n = 2 seeds" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "mislabels.png").stat().st_size > 1000
