"""Logit ensembles: the mean of the members' logits (the ELODI reference, and a baseline)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def ensemble_logits(logits: Sequence[jax.Array] | jax.Array) -> jax.Array:
  """Mean logits z̄ = (1/M) Σ_m z_m of M members.

  Args:
    logits: a sequence of M arrays (B, K) or one stacked (M, B, K) array.

  Returns:
    (B, K) mean logits.
  """
  stacked = jnp.stack(logits) if isinstance(logits, (list, tuple)) else jnp.asarray(logits)
  if stacked.ndim != 3 or stacked.shape[0] == 0:
    raise ValueError(f"logits must be M >= 1 arrays (B, K) or one (M, B, K) array: got stacked "
                     f"shape {stacked.shape}.")
  return jnp.mean(stacked, axis=0)


def ensemble_predict(logits: Sequence[jax.Array] | jax.Array) -> jax.Array:
  """Ensemble prediction argmax_k z̄_k, shape (B,); ``logits`` as in `ensemble_logits`."""
  return jnp.argmax(ensemble_logits(logits), axis=-1)
