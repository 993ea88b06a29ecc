"""Losses for graceful model updates: BCT, focal distillation (PC training), KD, LDI.

Shapes: ``new_logits``, ``old_logits`` (B, K) over the *new* label space; ``labels`` (B,) integers;
embeddings (B, D). The old model is frozen: every old quantity (old logits, old embedding, old
head) goes through ``jax.lax.stop_gradient``.

Class-index convention: the old model's K_old classes are 0..K_old−1 and keep their indices in
the new label space; classes K_old..K−1 are new. ``old_class_mask`` (K,) bool marks the classes
the old model knows; distillation terms only compare those (the old logits of the other columns
are ignored, whatever they hold).

Reduction: per-example terms ℓ_i are averaged over the batch, Σ_i w_i ℓ_i / Σ_i w_i with
optional per-example ``weights`` w (B,) — a 0/1 mask of padded examples gives the mean over the
real ones; without weights it is the plain mean. All losses are jit-able and return a scalar.

Positive-congruent training (Yan et al., CVPR 2021):
L = L_CE + λ · (1/B) Σ_i f_i · D(z_new,i, z_old,i) with the focal weight
f_i = α + β·1[ŷ_old,i = y_i] (α = 1, β = 0 is plain knowledge distillation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqf.losses import WeightedTargets

PC_METHODS = ("fd_kl", "fd_lm", "kd", "ldi", "none")


def _weighted_mean(per_example: jax.Array, weights: Any | None) -> jax.Array:
  """Σ_i w_i ℓ_i / Σ_i w_i (0 when all weights are 0), or the mean when ``weights`` is None."""
  if weights is None:
    return jnp.mean(per_example)
  weights = jnp.asarray(weights, per_example.dtype)
  if weights.shape != per_example.shape:
    raise ValueError(f"weights must have shape {per_example.shape} (one per example): got "
                     f"{weights.shape}.")
  total = jnp.sum(weights)
  return jnp.sum(weights * per_example) / jnp.where(total > 0, total, 1.0)


def _check_logits(new_logits: jax.Array, old_logits: jax.Array, labels: jax.Array | None,
                  old_class_mask: Any | None) -> None:
  """Raises ValueError unless logits are (B, K), labels (B,) and the mask (K,)."""
  if new_logits.ndim != 2 or old_logits.shape != new_logits.shape:
    raise ValueError(f"new_logits and old_logits must both be (B, K) over the new label space: got "
                     f"{new_logits.shape} and {old_logits.shape}.")
  if labels is not None and jnp.shape(labels) != new_logits.shape[:1]:
    raise ValueError(f"labels must have shape {new_logits.shape[:1]}: got {jnp.shape(labels)}.")
  if old_class_mask is not None and jnp.shape(old_class_mask) != new_logits.shape[1:]:
    raise ValueError(f"old_class_mask must be a ({new_logits.shape[1]},) bool array: got shape "
                     f"{jnp.shape(old_class_mask)}.")


def _mask_or_none(old_class_mask: Any | None) -> jax.Array | None:
  return None if old_class_mask is None else jnp.asarray(old_class_mask, bool)


def focal_weights(old_logits: jax.Array, labels: jax.Array, *, alpha: float = 1.0,
                  beta: float = 5.0, old_class_mask: Any | None = None) -> jax.Array:
  """Focal weights f_i = α + β·1[argmax_k z_old,i,k = y_i] (argmax over old classes), shape (B,).

  They depend only on the frozen old model and the labels (no gradient flows through them).
  """
  old_logits = jax.lax.stop_gradient(old_logits)
  mask = _mask_or_none(old_class_mask)
  if mask is not None:
    old_logits = jnp.where(mask, old_logits, -jnp.inf)
  old_right = jnp.argmax(old_logits, axis=-1) == labels
  return alpha + beta * old_right.astype(old_logits.dtype)


def _tempered_kl(new_logits: jax.Array, old_logits: jax.Array, temperature: float,
                 mask: jax.Array | None) -> jax.Array:
  """Per example T²·KL(σ(z_old/T) ‖ σ(z_new/T)), softmaxes renormalized over ``mask``; (B,)."""
  log_p_old = jax.nn.log_softmax(jax.lax.stop_gradient(old_logits) / temperature, where=mask)
  log_p_new = jax.nn.log_softmax(new_logits / temperature, where=mask)
  kl = optax.losses.kl_divergence_with_log_targets(log_p_new, log_p_old, where=mask)
  return temperature**2 * kl


def _half_squared_distance(new: jax.Array, old: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Per row ½ Σ_{k ∈ mask} (new_k − old_k)² with ``old`` frozen; (B, K) inputs, shape (B,)."""
  squared = optax.losses.l2_loss(new, jax.lax.stop_gradient(old))
  return jnp.sum(squared, axis=-1, where=mask)


def focal_distillation_kl(new_logits: jax.Array, old_logits: jax.Array, labels: jax.Array, *,
                          alpha: float = 1.0, beta: float = 5.0, temperature: float = 100.0,
                          old_class_mask: Any | None = None,
                          weights: Any | None = None) -> jax.Array:
  """Focal distillation with the KL divergence (FD-KL).

  ℓ_i = (α + β·1[ŷ_old,i = y_i]) · T² · KL(σ(z_old,i/T) ‖ σ(z_new,i/T)), both softmaxes taken over
  the old classes only (renormalized) when ``old_class_mask`` is given; T = 100 in the paper.

  Args:
    new_logits: (B, K) logits of the model being trained.
    old_logits: (B, K) logits of the frozen old model (columns outside the mask are ignored).
    labels: (B,) integer labels.
    alpha: weight of every example.
    beta: extra weight of the examples the old model classifies correctly.
    temperature: softmax temperature T.
    old_class_mask: optional (K,) bool, True for the classes the old model knows.
    weights: optional (B,) per-example weights (e.g. a padding mask).

  Returns:
    Scalar Σ_i w_i ℓ_i / Σ_i w_i.
  """
  _check_logits(new_logits, old_logits, labels, old_class_mask)
  mask = _mask_or_none(old_class_mask)
  focal = focal_weights(old_logits, labels, alpha=alpha, beta=beta, old_class_mask=mask)
  return _weighted_mean(focal * _tempered_kl(new_logits, old_logits, temperature, mask), weights)


def knowledge_distillation(new_logits: jax.Array, old_logits: jax.Array, *,
                           temperature: float = 100.0, old_class_mask: Any | None = None,
                           weights: Any | None = None) -> jax.Array:
  """Knowledge distillation ℓ_i = T² · KL(σ(z_old,i/T) ‖ σ(z_new,i/T)): FD-KL with α = 1, β = 0.

  Args and masking as in `focal_distillation_kl` (no labels needed). Returns a scalar.
  """
  _check_logits(new_logits, old_logits, None, old_class_mask)
  mask = _mask_or_none(old_class_mask)
  return _weighted_mean(_tempered_kl(new_logits, old_logits, temperature, mask), weights)


def focal_distillation_lm(new_logits: jax.Array, old_logits: jax.Array, labels: jax.Array, *,
                          alpha: float = 1.0, beta: float = 5.0, old_class_mask: Any | None = None,
                          weights: Any | None = None) -> jax.Array:
  """Focal distillation with logit matching (FD-LM).

  ℓ_i = (α + β·1[ŷ_old,i = y_i]) · ½ Σ_{k old} (z_new,i,k − z_old,i,k)².

  For fixed old logits and labels this is a plain convex quadratic in ``new_logits``: the focal
  weights come from the old model only, the mask is a constant 0/1 selection and nothing
  stop-gradients the new logits. With a linearized model z_new = f0 + J·δ it stays quadratic in δ,
  so it can be added to a least-squares (LQF) objective; its Hessian in z_new is
  diag(w_i f_i 1[k old]) / Σ_i w_i.

  Args:
    new_logits: (B, K) logits of the model being trained.
    old_logits: (B, K) logits of the frozen old model (columns outside the mask are ignored).
    labels: (B,) integer labels.
    alpha: weight of every example.
    beta: extra weight of the examples the old model classifies correctly.
    old_class_mask: optional (K,) bool, True for the classes the old model knows.
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i ℓ_i / Σ_i w_i.
  """
  _check_logits(new_logits, old_logits, labels, old_class_mask)
  mask = _mask_or_none(old_class_mask)
  focal = focal_weights(old_logits, labels, alpha=alpha, beta=beta, old_class_mask=mask)
  return _weighted_mean(focal * _half_squared_distance(new_logits, old_logits, mask), weights)


def fd_lm_targets(labels: jax.Array, old_logits: jax.Array, *, target_scale: float, alpha: float,
                  beta: float, lam: float) -> WeightedTargets:
  """Least squares + FD-LM against an old model as one weighted least-squares problem (LQF).

  For fixed old logits φ_i the sum of the two quadratics in f is one weighted quadratic:

    ½‖f − s·e_{y_i}‖² + λ·w_i·½‖f − φ_i‖² = ½·c_i·‖f − t_i‖² + const,
    w_i = α + β·1[argmax_k φ_ik = y_i],  c_i = 1 + λ·w_i,  t_i = (s·e_{y_i} + λ·w_i·φ_i) / c_i,

  so regression-constrained LQF (`lqf.fit.fit_linearized` with these targets) is still an exact
  convex quadratic in δ with constant curvature (1/N) Σ_i c_i J_iᵀJ_i + λ_δI. β = 0 is knowledge
  distillation by logit matching (KD-LM). Convention: FD-LM here is ½Σ_k (sum over classes, as
  `focal_distillation_lm`), next to the least squares' ½‖f − s·e_y‖².

  Args:
    labels: (N,) integer labels.
    old_logits: (N, C) logits φ of the frozen old model on the same examples (same label space).
    target_scale: s.
    alpha: focal weight of every example (α = 1, β = 0: KD by logit matching).
    beta: extra weight of the examples the old model classifies correctly.
    lam: λ, the weight of the distillation term.

  Returns:
    `lqf.losses.WeightedTargets` t (N, C), c (N,).
  """
  old_logits = jnp.asarray(old_logits, jnp.float32)
  if old_logits.ndim != 2 or old_logits.shape[:1] != jnp.shape(labels):
    raise ValueError(f"old_logits must be (N, C) for the N={jnp.shape(labels)[0]} labels: got "
                     f"{old_logits.shape}.")
  if min(alpha, beta, lam) < 0:
    raise ValueError(f"alpha={alpha}, beta={beta}, lam={lam}: FD-LM weights must be >= 0.")
  distill = lam * focal_weights(old_logits, labels, alpha=alpha, beta=beta)
  one_hot = target_scale * jax.nn.one_hot(labels, old_logits.shape[-1], dtype=jnp.float32)
  weights = 1.0 + distill
  return WeightedTargets((one_hot + distill[:, None] * old_logits) / weights[:, None], weights)


def logit_difference_inhibition(new_logits: jax.Array, ref_logits: jax.Array, *, xi: float = 0.0,
                                p: float = 2, class_mask: Any | None = None,
                                weights: Any | None = None) -> jax.Array:
  """Logit difference inhibition (ELODI): ℓ_i = mean_k max(|z_new,i,k − z_ref,i,k| − ξ, 0)^p.

  Args:
    new_logits: (B, K) logits of the model being trained.
    ref_logits: (B, K) frozen reference logits (ELODI: the mean logits of an ensemble).
    xi: dead zone ξ ≥ 0 inside which differences are not penalized.
    p: exponent (2 in the paper).
    class_mask: optional (K,) bool; the mean runs over the masked-in classes only.
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i ℓ_i / Σ_i w_i.
  """
  _check_logits(new_logits, ref_logits, None, class_mask)
  excess = jnp.maximum(jnp.abs(new_logits - jax.lax.stop_gradient(ref_logits)) - xi, 0.0)
  return _weighted_mean(jnp.mean(excess**p, axis=-1, where=_mask_or_none(class_mask)), weights)


def pc_training_loss(new_logits: jax.Array, old_logits: jax.Array | None, labels: jax.Array, *,
                     method: str = "fd_kl", lam: float = 1.0, alpha: float = 1.0,
                     beta: float = 5.0, temperature: float = 100.0, xi: float = 0.0,
                     p: float = 2, old_class_mask: Any | None = None,
                     weights: Any | None = None) -> jax.Array:
  """Positive-congruent training objective L = L_CE(z_new, y) + λ · D (one entry for train loops).

  ``method`` picks D: ``fd_kl`` (`focal_distillation_kl`), ``fd_lm`` (`focal_distillation_lm`),
  ``kd`` (`knowledge_distillation`), ``ldi`` (`logit_difference_inhibition` against
  ``old_logits``, which then holds the reference/ensemble logits) or ``none`` (plain CE;
  ``old_logits`` may be None). The CE is optax's softmax cross-entropy over all K classes.

  Args:
    new_logits: (B, K) logits of the model being trained.
    old_logits: (B, K) frozen old (or reference) logits; None only with ``method='none'``.
    labels: (B,) integer labels.
    method: one of `PC_METHODS`.
    lam: weight λ of the distillation term.
    alpha: focal weight of every example (fd_kl, fd_lm).
    beta: extra focal weight of examples the old model gets right (fd_kl, fd_lm).
    temperature: softmax temperature (fd_kl, kd).
    xi: dead zone (ldi).
    p: exponent (ldi).
    old_class_mask: optional (K,) bool of the classes the old model knows.
    weights: optional (B,) per-example weights, applied to both terms.

  Returns:
    Scalar loss.
  """
  if method not in PC_METHODS:
    raise ValueError(f"method={method!r} is unknown: use one of {PC_METHODS}.")
  ce = _weighted_mean(optax.losses.softmax_cross_entropy_with_integer_labels(new_logits, labels),
                      weights)
  if method == "none":
    return ce
  if old_logits is None:
    raise ValueError(f"old_logits is None: method={method!r} needs the old model's logits (or use "
                     "method='none').")
  common = dict(old_class_mask=old_class_mask, weights=weights)
  if method == "fd_kl":
    distill = focal_distillation_kl(new_logits, old_logits, labels, alpha=alpha, beta=beta,
                                    temperature=temperature, **common)
  elif method == "fd_lm":
    distill = focal_distillation_lm(new_logits, old_logits, labels, alpha=alpha, beta=beta,
                                    **common)
  elif method == "kd":
    distill = knowledge_distillation(new_logits, old_logits, temperature=temperature, **common)
  else:
    distill = logit_difference_inhibition(new_logits, old_logits, xi=xi, p=p,
                                          class_mask=old_class_mask, weights=weights)
  return ce + lam * distill


def bct_influence_loss(new_emb: jax.Array, labels: jax.Array, old_head_kernel: jax.Array,
                       old_head_bias: jax.Array, *, weights: Any | None = None) -> jax.Array:
  """BCT influence loss CE(w_old·φ_new(x) + b_old, y) with the old head frozen (stop_gradient).

  The full BCT objective is CE(new head) + λ · this term (Shen et al., CVPR 2020). For classes the
  old model never saw, build the head with `synthesize_old_head`.

  Args:
    new_emb: (B, D) embeddings φ_new(x) of the model being trained.
    labels: (B,) integer labels in [0, K).
    old_head_kernel: (D, K) old classifier kernel (Flax layout).
    old_head_bias: (K,) old classifier bias.
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i CE_i / Σ_i w_i.
  """
  shapes = (new_emb.shape, jnp.shape(labels), old_head_kernel.shape, old_head_bias.shape)
  if (new_emb.ndim != 2 or old_head_kernel.shape[:1] != new_emb.shape[1:]
      or old_head_bias.shape != old_head_kernel.shape[1:] or shapes[1] != new_emb.shape[:1]):
    raise ValueError(f"new_emb (B, D), labels (B,), old_head_kernel (D, K), old_head_bias (K,) "
                     f"expected: got {shapes}.")
  logits = new_emb @ jax.lax.stop_gradient(old_head_kernel) + jax.lax.stop_gradient(old_head_bias)
  return _weighted_mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels),
                        weights)


def l2_embedding_loss(new_emb: jax.Array, old_emb: jax.Array, *,
                      weights: Any | None = None) -> jax.Array:
  """ℓ_i = ½‖φ_new(x_i) − φ_old(x_i)‖² to the frozen old embedding (stop_gradient).

  The naive compatibility baseline: BCT reports that it fails the compatibility criterion.

  Args:
    new_emb: (B, D) embeddings of the model being trained.
    old_emb: (B, D) embeddings of the frozen old model.
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i ℓ_i / Σ_i w_i.
  """
  if new_emb.ndim != 2 or old_emb.shape != new_emb.shape:
    raise ValueError(f"new_emb and old_emb must both be (B, D): got {new_emb.shape} and "
                     f"{old_emb.shape}.")
  return _weighted_mean(_half_squared_distance(new_emb, old_emb, None), weights)


def synthesize_old_head(old_emb: Any, labels: Any, old_kernel: Any, old_bias: Any,
                        num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Extends the old classifier to the new label space for BCT.

  Old classes 0..K_old−1 keep their columns; for each new class k ∈ [K_old, num_classes) the
  column is the class mean of the old embedding, w_old[:, k] = mean_{i: y_i = k} φ_old(x_i), with
  bias 0. Called once, outside jit, on the (new) training set; every new class needs an example.

  Args:
    old_emb: (N, D) old-model embeddings φ_old(x_i).
    labels: (N,) integer labels in [0, num_classes).
    old_kernel: (D, K_old) old classifier kernel.
    old_bias: (K_old,) old classifier bias.
    num_classes: K_new ≥ K_old.

  Returns:
    (kernel (D, K_new), bias (K_new,)).
  """
  old_emb, old_kernel, old_bias = (jnp.asarray(a) for a in (old_emb, old_kernel, old_bias))
  labels_np = np.asarray(labels)
  num_old = old_kernel.shape[1]
  if (old_emb.ndim != 2 or old_kernel.shape[0] != old_emb.shape[1]
      or old_bias.shape != (num_old,) or labels_np.shape != old_emb.shape[:1]):
    raise ValueError(f"old_emb (N, D), labels (N,), old_kernel (D, K_old), old_bias (K_old,) "
                     f"expected: got {old_emb.shape}, {labels_np.shape}, {old_kernel.shape}, "
                     f"{old_bias.shape}.")
  if num_classes < num_old:
    raise ValueError(f"num_classes={num_classes} is below the old head's {num_old} classes: the "
                     "new label space must contain the old one.")
  if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, num_classes={num_classes}): got range "
                     f"[{labels_np.min()}, {labels_np.max()}].")
  counts = np.bincount(labels_np, minlength=num_classes)
  missing = [k for k in range(num_old, num_classes) if counts[k] == 0]
  if missing:
    raise ValueError(f"new classes {missing} have no example in labels: pass old embeddings of "
                     "every new class to synthesize its old-head column.")
  sums = jax.ops.segment_sum(old_emb, jnp.asarray(labels_np), num_segments=num_classes)
  new_columns = (sums[num_old:] / counts[num_old:, None].astype(old_emb.dtype)).T
  kernel = jnp.concatenate([old_kernel, new_columns.astype(old_kernel.dtype)], axis=1)
  bias = jnp.concatenate([old_bias, jnp.zeros(num_classes - num_old, old_bias.dtype)])
  return kernel, bias
