"""Objectives of LQF on logits f (B, C) and integer labels y (B,).

The LQF objective of the offset δ = w − w0 is

  L(δ) = 1/(2N) Σ_i ‖f_lin(x_i; δ) − s·e_{y_i}‖² + (λ/2)‖δ‖²

(`squared_error` + `weight_decay`), an exact quadratic in δ with constant curvature
(1/N) Σ_i J_iᵀJ_i + λI. `cross_entropy` (+ the same weight decay) is the ablation.

Its general form is weighted least squares against per-example targets t_i with weights c_i > 0
(`WeightedTargets`, `weighted_squared_error`):

  L(δ) = 1/(2N) Σ_i c_i ‖f_lin(x_i; δ) − t_i‖² + (λ/2)‖δ‖²,   curvature (1/N) Σ_i c_i J_iᵀJ_i + λI,

still constant in δ; t_i = s·e_{y_i}, c_i = 1 is the plain objective (`one_hot_targets`). Any sum of
per-example quadratics in f_i with scalar curvature, e.g. least squares plus focal distillation by
logit matching (`compat.fd_lm_targets`), collapses to this form up to a constant.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

LOSSES = ("mse", "ce")


def regression_targets(labels: jnp.ndarray, num_classes: int, target_scale: float) -> jnp.ndarray:
  """s·e_y: (B,) integer labels -> (B, C) scaled one-hot targets."""
  return target_scale * jnp.eye(num_classes, dtype=jnp.float32)[labels]


class WeightedTargets(NamedTuple):
  """Per-example regression targets and weights of `weighted_squared_error`.

  Attributes:
    targets: t (B, C).
    weights: c (B,), positive.
  """
  targets: jnp.ndarray
  weights: jnp.ndarray


def one_hot_targets(labels: jnp.ndarray, num_classes: int, target_scale: float) -> WeightedTargets:
  """The plain LQF problem as `WeightedTargets`: t_i = s·e_{y_i}, c_i = 1; (B,) labels."""
  return WeightedTargets(regression_targets(labels, num_classes, target_scale),
                         jnp.ones(jnp.shape(labels), jnp.float32))


def check_targets(targets: WeightedTargets, logits_shape: tuple[int, ...]) -> None:
  """Raises ValueError unless t is (N, C) like the logits and c is (N,) and positive."""
  shapes = (jnp.shape(targets.targets), jnp.shape(targets.weights))
  if shapes != (tuple(logits_shape), tuple(logits_shape[:1])):
    raise ValueError(f"targets must hold t {tuple(logits_shape)} and weights {tuple(logits_shape[:1])} "
                     f"(one row per training example): got {shapes[0]} and {shapes[1]}.")
  if not bool(jnp.all(targets.weights > 0)):
    raise ValueError("targets.weights must be positive: use c_i > 0 (e.g. fd_lm_targets with "
                     "alpha, beta, lam >= 0).")


def weighted_squared_error(logits: jnp.ndarray, targets: WeightedTargets) -> jnp.ndarray:
  """1/(2B) Σ_i c_i ‖f_i − t_i‖² for logits (B, C) and `WeightedTargets` ((B, C), (B,)): a scalar."""
  per_example = jnp.sum(optax.l2_loss(logits, targets.targets), axis=-1)
  return jnp.mean(targets.weights * per_example)


def squared_error(logits: jnp.ndarray, labels: jnp.ndarray, target_scale: float) -> jnp.ndarray:
  """1/(2B) Σ_i ‖f_i − s·e_{y_i}‖² for logits (B, C) and labels (B,): a scalar."""
  return weighted_squared_error(logits, one_hot_targets(labels, logits.shape[-1], target_scale))


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """(1/B) Σ_i −log softmax(f_i)_{y_i} for logits (B, C) and labels (B,): a scalar."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def weight_decay(delta: Any, rate: float) -> jnp.ndarray:
  """(λ/2)‖δ‖² over all leaves of the pytree δ (decay toward w0)."""
  return 0.5 * rate * optax.tree_utils.tree_norm(delta, squared=True)


def data_loss(loss: str, logits: jnp.ndarray, labels: jnp.ndarray | None, target_scale: float,
              targets: WeightedTargets | None = None) -> jnp.ndarray:
  """The data term of ``loss`` on logits (B, C).

  ``"mse"``: `weighted_squared_error` against ``targets`` when given (``labels`` and
  ``target_scale`` are then unused), else `squared_error`. ``"ce"``: `cross_entropy`
  (``target_scale`` unused, ``targets`` must be None).
  """
  if targets is not None and loss != "mse":
    raise ValueError(f"loss={loss!r} with regression targets: weighted targets need loss='mse'.")
  if loss == "mse":
    if targets is not None:
      return weighted_squared_error(logits, targets)
    return squared_error(logits, labels, target_scale)
  if loss == "ce":
    return cross_entropy(logits, labels)
  raise ValueError(f"loss={loss!r} is unknown: use one of {LOSSES}.")
