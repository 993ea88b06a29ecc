"""Objectives of LQF on logits f (B, C) and integer labels y (B,).

The LQF objective of the offset δ = w − w0 is

  L(δ) = 1/(2N) Σ_i ‖f_lin(x_i; δ) − s·e_{y_i}‖² + (λ/2)‖δ‖²

an exact quadratic in δ with constant curvature (1/N) Σ_i J_iᵀJ_i + λI. Its general form, and the one
target type of this package, is weighted least squares against per-example targets t_i with weights
c_i > 0 (`WeightedTargets`, `weighted_squared_error`):

  L(δ) = 1/(2N) Σ_i c_i ‖f_lin(x_i; δ) − t_i‖² + (λ/2)‖δ‖²,   curvature (1/N) Σ_i c_i J_iᵀJ_i + λI,

still constant in δ; t_i = s·e_{y_i}, c_i = 1 is the plain objective (`one_hot_targets`). Any sum of
per-example quadratics in f_i with scalar curvature, e.g. least squares plus focal distillation by
logit matching (`compat.fd_lm_targets`), collapses to this form up to a constant.

The ablation ``loss='ce'`` is the cross-entropy against each target's class argmax_k t_ik (y_i for
s·e_{y_i}), weighted by c_i (`data_loss`), + the same weight decay.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

LOSSES = ("mse", "ce")


class WeightedTargets(NamedTuple):
  """Per-example regression targets and weights of `weighted_squared_error`.

  Attributes:
    targets: t (B, C).
    weights: c (B,), positive; None means c = 1 (the plain problem: no weighting is computed).
  """
  targets: jnp.ndarray
  weights: jnp.ndarray | None = None


def one_hot_targets(labels: jnp.ndarray, num_classes: int, target_scale: float) -> WeightedTargets:
  """The plain LQF problem as `WeightedTargets`: t_i = s·e_{y_i} (B, C), c_i = 1 (``weights=None``);
  (B,) labels."""
  return WeightedTargets(target_scale * jnp.eye(num_classes, dtype=jnp.float32)[labels])


def example_weights(targets: WeightedTargets) -> jnp.ndarray:
  """c (B,) of ``targets``: its weights, or ones for the plain problem."""
  if targets.weights is None:
    return jnp.ones(jnp.shape(targets.targets)[:1], jnp.float32)
  return targets.weights


def check_targets(targets: WeightedTargets, logits_shape: tuple[int, ...]) -> None:
  """Raises ValueError unless t is (N, C) like the logits and c is (N,) and positive (or None)."""
  shapes = (jnp.shape(targets.targets), jnp.shape(example_weights(targets)))
  if shapes != (tuple(logits_shape), tuple(logits_shape[:1])):
    raise ValueError(f"targets must hold t {tuple(logits_shape)} and weights {tuple(logits_shape[:1])} "
                     f"(one row per training example): got {shapes[0]} and {shapes[1]}.")
  if targets.weights is not None and not bool(jnp.all(targets.weights > 0)):
    raise ValueError("targets.weights must be positive: use c_i > 0 (e.g. fd_lm_targets with "
                     "alpha, beta, lam >= 0).")


def weighted_squared_error(logits: jnp.ndarray, targets: WeightedTargets) -> jnp.ndarray:
  """1/(2B) Σ_i c_i ‖f_i − t_i‖² for logits (B, C) and `WeightedTargets` ((B, C), (B,)): a scalar."""
  per_example = jnp.sum(optax.l2_loss(logits, targets.targets), axis=-1)
  return jnp.mean(_weighted(targets.weights, per_example))


def _weighted(weights: jnp.ndarray | None, per_example: jnp.ndarray) -> jnp.ndarray:
  return per_example if weights is None else weights * per_example


def weight_decay(delta: Any, rate: float) -> jnp.ndarray:
  """(λ/2)‖δ‖² over all leaves of the pytree δ (decay toward w0)."""
  return 0.5 * rate * optax.tree_utils.tree_norm(delta, squared=True)


def data_loss(loss: str, logits: jnp.ndarray, targets: WeightedTargets) -> jnp.ndarray:
  """The data term of ``loss`` on logits (B, C) against `WeightedTargets` ((B, C), (B,)).

  ``"mse"``: `weighted_squared_error`. ``"ce"``: (1/B) Σ_i c_i·(−log softmax(f_i)_{k_i}) with the class
  k_i = argmax_k t_ik of each target.
  """
  if loss == "mse":
    return weighted_squared_error(logits, targets)
  if loss == "ce":
    classes = jnp.argmax(targets.targets, axis=-1)
    return jnp.mean(_weighted(targets.weights,
                              optax.softmax_cross_entropy_with_integer_labels(logits, classes)))
  raise ValueError(f"loss={loss!r} is unknown: use one of {LOSSES}.")
