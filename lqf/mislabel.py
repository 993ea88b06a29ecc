"""Ranking training examples by how likely their label is wrong, with the exact leave-one-out of LQF.

A flipped label is one that the other training examples contradict: the model fitted without example i
predicts i's true class, far from its given target. For the LQF optimum that model is closed-form
(`lqf.influence`, kernel form: A = C^½KC^½ + NλI, α = A⁻¹C^½z, z = T − f0):

  fitted residual      t_i − f(x_i)      = Nλ·α_i/√c_i,
  leave-one-out        t_i − f^(−i)(x_i) = [A⁻¹]_ii⁻¹α_i/√c_i     (the penalty kept at Nλ),

so every score below costs one C×C solve per example once A⁻¹ is known (`lqf.influence.kernel_fit`).
Scores, higher = more suspicious (`label_scores`), with y_i = argmax_k t_ik the given class:

  loo_loss_i       = ½c_i‖t_i − f^(−i)(x_i)‖²                       (the leave-one-out loss)
  self_influence_i = loo_loss_i − ½c_i‖t_i − f(x_i)‖²               (how much its own loss rises when it
                                                                      leaves the training set)
  loo_margin_i     = max_{k≠y_i} f^(−i)_k(x_i) − f^(−i)_{y_i}(x_i)  (> 0: the others outvote its label)

The fitted loss ½c_i‖t_i − f(x_i)‖² itself is the baseline these improve on: a model that interpolates
its training set fits a wrong label as well as a right one (small fitted residual), while the
leave-one-out residual divides by 1 − H_ii, largest exactly where the example is fitted only by itself.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lqf.influence import KernelFit
from lqf.losses import WeightedTargets, check_targets, example_weights


class LabelScores(NamedTuple):
  """Per-example suspicion scores (N,), higher = more likely mislabelled (module docstring).

  Attributes:
    loo_loss: ½c_i‖t_i − f^(−i)(x_i)‖².
    self_influence: loo_loss_i − ½c_i‖t_i − f(x_i)‖².
    loo_margin: max_{k≠y_i} f^(−i)_k(x_i) − f^(−i)_{y_i}(x_i).
    fitted_loss: ½c_i‖t_i − f(x_i)‖² of the optimum on all N (the baseline).
  """
  loo_loss: np.ndarray
  self_influence: np.ndarray
  loo_margin: np.ndarray
  fitted_loss: np.ndarray


def label_scores(kernel: KernelFit, targets: WeightedTargets) -> LabelScores:
  """The scores of the N training examples of ``kernel`` (`lqf.influence.kernel_fit` of the problem
  with these ``targets``, t (N, C), c (N,)); float64."""
  check_targets(targets, kernel.alpha.shape)
  n, num_classes = kernel.alpha.shape
  weights = np.asarray(example_weights(targets), np.float64)
  t = np.asarray(targets.targets, np.float64)
  loo_residual = kernel.loo_residuals()                                   # t_i − f^(−i)(x_i)
  fitted_residual = n * kernel.weight_decay * kernel.alpha / np.sqrt(weights)[:, None]
  loo_loss = 0.5 * weights * np.sum(loo_residual ** 2, axis=-1)
  fitted_loss = 0.5 * weights * np.sum(fitted_residual ** 2, axis=-1)
  loo = t - loo_residual
  given = np.argmax(t, axis=-1)
  others = np.where(np.eye(num_classes, dtype=bool)[given], -np.inf, loo)
  margin = others.max(axis=-1) - loo[np.arange(n), given]
  return LabelScores(loo_loss, loo_loss - fitted_loss, margin, fitted_loss)
