"""Objectives of LQF on logits f (B, C) and integer labels y (B,).

The LQF objective of the offset δ = w − w0 is

  L(δ) = 1/(2N) Σ_i ‖f_lin(x_i; δ) − s·e_{y_i}‖² + (λ/2)‖δ‖²

(`squared_error` + `weight_decay`), an exact quadratic in δ with constant curvature
(1/N) Σ_i J_iᵀJ_i + λI. `cross_entropy` (+ the same weight decay) is the ablation.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

LOSSES = ("mse", "ce")


def regression_targets(labels: jnp.ndarray, num_classes: int, target_scale: float) -> jnp.ndarray:
  """s·e_y: (B,) integer labels -> (B, C) scaled one-hot targets."""
  return target_scale * jnp.eye(num_classes, dtype=jnp.float32)[labels]


def squared_error(logits: jnp.ndarray, labels: jnp.ndarray, target_scale: float) -> jnp.ndarray:
  """1/(2B) Σ_i ‖f_i − s·e_{y_i}‖² for logits (B, C) and labels (B,): a scalar."""
  targets = regression_targets(labels, logits.shape[-1], target_scale)
  return jnp.mean(jnp.sum(optax.l2_loss(logits, targets), axis=-1))


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """(1/B) Σ_i −log softmax(f_i)_{y_i} for logits (B, C) and labels (B,): a scalar."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def weight_decay(delta: Any, rate: float) -> jnp.ndarray:
  """(λ/2)‖δ‖² over all leaves of the pytree δ (decay toward w0)."""
  return 0.5 * rate * optax.tree_utils.tree_norm(delta, squared=True)


def data_loss(loss: str, logits: jnp.ndarray, labels: jnp.ndarray, target_scale: float) -> jnp.ndarray:
  """``"mse"``: `squared_error`; ``"ce"``: `cross_entropy` (``target_scale`` unused)."""
  if loss == "mse":
    return squared_error(logits, labels, target_scale)
  if loss == "ce":
    return cross_entropy(logits, labels)
  raise ValueError(f"loss={loss!r} is unknown: use one of {LOSSES}.")
