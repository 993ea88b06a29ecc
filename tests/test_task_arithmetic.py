"""Task arithmetic on the linearized model (lqf.task_arithmetic) vs the dense Jacobian and NumPy."""

import os

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import common
from experiments import task_arithmetic as task_arithmetic_study
from lqf import task_arithmetic
from lqf.runtime import config_util
from support import NINE_LABELS, ROOT, random_delta

N = len(NINE_LABELS)


def test_task_vector_sums_are_exact_on_the_linearized_model(nine_examples):
  """TangentPath.logits(α) = f0 + J·α(δ_A + δ_B) and per-task f0 + J(α_Aδ_A + α_Bδ_B) with the dense
  J (N·C, P); add_task_vectors is the NumPy sum of the raveled vectors."""
  lin, variables, features, jac = nine_examples
  deltas = [random_delta(lin, variables, seed=s) for s in (2, 3)]
  ravel = lambda d: np.asarray(ravel_pytree(d)[0], np.float64)  # noqa: E731
  vectors = [ravel(d) for d in deltas]
  summed = ravel(task_arithmetic.add_task_vectors(deltas, 0.7))
  rounding = 4 * np.finfo(np.float32).eps * 0.7 * (np.abs(vectors[0]) + np.abs(vectors[1]))  # 2 roundings
  assert np.all(np.abs(summed - 0.7 * (vectors[0] + vectors[1])) <= rounding)
  path = task_arithmetic.tangent_path(lin, variables, features, deltas)
  f0 = np.asarray(features.f0, np.float64)
  assert path.effects.shape == (2, N, f0.shape[1])
  for scales in (0.7, (0.4, 1.3)):
    a, b = np.broadcast_to(scales, (2,))
    expected = f0 + (jac @ (a * vectors[0] + b * vectors[1])).reshape(f0.shape)
    np.testing.assert_allclose(path.logits(scales), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_choose_scale_takes_the_best_heldout_score_and_the_smallest_on_ties():
  scales = [0.0, 0.25, 0.5, 0.75, 1.0]
  assert task_arithmetic.choose_scale(scales, [0.1, 0.6, 0.8, 0.8, 0.7]) == 0.5
  assert task_arithmetic.choose_scale(scales[::-1], [0.7, 0.8, 0.8, 0.6, 0.1]) == 0.5
  with pytest.raises(ValueError, match="one held-out score per scale"):
    task_arithmetic.choose_scale(scales, [0.1, 0.2])
  with pytest.raises(ValueError, match="at least one task vector"):
    task_arithmetic.add_task_vectors([], 1.0)


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
  """experiments.task_arithmetic on its quick config: α* is the best held-out task-mean accuracy (smallest
  on ties) and every test accuracy in the results is recomputed from the saved predictions."""
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "task_arithmetic_mnist",
                                    "quick")
  config.pretrain.model.width = 4  # a narrow source: nothing checked here depends on the width
  results = common.run_study(task_arithmetic_study.run, task_arithmetic_study.markdown, config,
                             str(tmp_path))
  with np.load(tmp_path / task_arithmetic_study.PREDICTIONS_FILE) as saved:
    arrays = dict(saved)
  scales = np.asarray(config.scales)
  names = list(config.tasks)
  for method in task_arithmetic_study.METHODS:
    for seed, run in zip(config.seeds, results["results"][method]["runs"]):
      def accuracy(name, split, kind, seed=seed, method=method):
        labels = arrays[f"seed{seed}/{name}/{split}/labels"]
        return (arrays[f"seed{seed}/{name}/{split}/{method}/{kind}"] == labels).mean(-1)
      heldout = sum(accuracy(name, "heldout", "sum") for name in names) / len(names)
      best = max(range(len(scales)), key=lambda k: (heldout[k], -scales[k]))
      assert run["scale"] == scales[best]
      for name in names:
        test = accuracy(name, "test", "sum")
        assert run[f"{name}/sum"] == pytest.approx(test[best])
        assert run[f"{name}/zero"] == pytest.approx(test[0])
        assert run[f"{name}/sum_at_1"] == pytest.approx(test[list(scales).index(1.0)])
        assert run[f"{name}/normalized"] == pytest.approx(test[best] / accuracy(name, "test", "alone"))
  assert "n = 2 seeds" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "task_arithmetic.png").stat().st_size > 1000
