"""The new task's classifier head, set before linearizing (it decides what the linearization can do).

* ``zero``: W = 0, b = 0. Every Jacobian below the head then vanishes (∂f/∂h = Wᵀ = 0), so LQF
  degenerates to a linear probe — kept only to show that.
* ``random``: LeCun-normal W (Flax's Dense init), b = 0.
* ``ridge``: W, b = argmin ‖E W + 1bᵀ − s·Y‖² + α‖W‖², α = ``penalty``·N (E: pretrained embeddings,
  Y: one-hot labels, s: target scale). A penalty that is too small interpolates a few-shot training set
  (64-dim embeddings, 5 images at 1 shot): the residual is then zero and LQF has nothing left to fit.
"""

from __future__ import annotations

import jax
import numpy as np

HEAD_INITS = ("ridge", "random", "zero")


def ridge_head(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, *, target_scale: float,
               penalty: float) -> tuple[np.ndarray, np.ndarray]:
  """Closed-form ridge regression of s·one-hot on embeddings, bias unpenalised.

  W = (ĒᵀĒ + αI)⁻¹ Ēᵀ (sY − 1ȳᵀ) with centred Ē = E − 1ēᵀ, b = sȳ − Wᵀē, α = penalty·N.

  Returns:
    kernel (D, K) and bias (K,), float32.
  """
  e = np.asarray(embeddings, np.float64)
  y = target_scale * np.eye(num_classes)[np.asarray(labels)]
  e_mean, y_mean = e.mean(0), y.mean(0)
  ec = e - e_mean
  alpha = penalty * len(e)
  kernel = np.linalg.solve(ec.T @ ec + alpha * np.eye(e.shape[1]), ec.T @ (y - y_mean))
  bias = y_mean - e_mean @ kernel
  return kernel.astype(np.float32), bias.astype(np.float32)


def init_head(kind: str, embeddings: np.ndarray, labels: np.ndarray, num_classes: int, *,
              target_scale: float, penalty: float, seed: int) -> dict[str, np.ndarray]:
  """``{'kernel': (D, K), 'bias': (K,)}`` for the new head (``kind`` in `HEAD_INITS`)."""
  dim = embeddings.shape[1]
  if kind == "ridge":
    kernel, bias = ridge_head(embeddings, labels, num_classes, target_scale=target_scale,
                              penalty=penalty)
  elif kind == "random":
    kernel = np.asarray(jax.nn.initializers.lecun_normal()(jax.random.key(seed), (dim, num_classes)))
    bias = np.zeros(num_classes, np.float32)
  elif kind == "zero":
    kernel, bias = np.zeros((dim, num_classes), np.float32), np.zeros(num_classes, np.float32)
  else:
    raise ValueError(f"config.lqf.head_init={kind!r} is unknown: use one of {HEAD_INITS}.")
  return {"kernel": kernel, "bias": bias}
