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

Positive-congruent training (Yan et al., CVPR 2021), per-example focal weight
f_i = α + β·1[ŷ_old,i = y_i] (α = 1, β = 0 is plain knowledge distillation) and two weightings of
the cross-entropy (`cross_entropy`) and the distillation term D = (1/B) Σ_i f_i·ℓ_i, composed by the
caller, e.g. ``cross_entropy(z, y) + lam * focal_distillation_kl(z, z_old, y)``:

* L = L_CE + λ·D (this library's original convention, the studies' ``weighting='sum'``);
* L = (1 − a)·L_CE + a·D with a ∈ [0, 1] (the studies' ``weighting='reference'``, ``kd_alpha``), as the
  reference implementation (amazon-science/regression-constraint-model-upgrade) trains; its README
  recipe for FD-KL is T = 100, α = 1, β = 5, a = 0.9, and ELODI's is LDI with ξ = 0, the
  ground-truth class excluded, a = 0.8 against 8 ensemble members. 'sum' with λ equals 'reference'
  with a = λ/(1 + λ) up to the overall factor 1 + λ (a learning-rate scale for SGD).

Scalings of the distillation terms, stated per function: FD-KL and KD T²·KL (as the reference);
FD-LM ½Σ_k (``reduction='half_sum'``) or the reference's mean over classes (``'mean'``, K/2 times
smaller); LDI the mean over classes, optionally with the ground-truth term zeroed
(``exclude_gt``, the reference's ``li_exclude_gt``). One difference from the reference is kept on
purpose: there the per-example KL and LDI losses (shape (B,)) are multiplied by focal weights of
shape (B, 1), which broadcasts to (B, B), so its FD-KL and LDI use mean_i(f_i)·mean_i(ℓ_i) — the
batch's mean focal weight times plain KD — while its FD-LM (loss (B, K)) weights each example.
Here every term weights each example by f_i, as the paper's formula does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqf.losses import WeightedTargets

# FD-LM per example: ½Σ_k Δz_k² ('half_sum') or the reference's (1/K)Σ_k Δz_k² ('mean').
FD_LM_REDUCTIONS = ("half_sum", "mean")


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


def cross_entropy(logits: jax.Array, labels: jax.Array, *, weights: Any | None = None) -> jax.Array:
  """L_CE = Σ_i w_i CE(z_i, y_i) / Σ_i w_i (the mean without ``weights``), optax's softmax
  cross-entropy over all K classes; logits (B, K), labels (B,) integers."""
  return _weighted_mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels), weights)


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


def _squared_distance(new: jax.Array, old: jax.Array, mask: jax.Array | None,
                      reduction: str) -> jax.Array:
  """Per row ½ Σ_{k ∈ mask} (new_k − old_k)² ('half_sum') or mean_{k ∈ mask} (new_k − old_k)²
  ('mean'), with ``old`` frozen; (B, K) inputs, shape (B,)."""
  if reduction not in FD_LM_REDUCTIONS:
    raise ValueError(f"reduction={reduction!r} is unknown: use one of {FD_LM_REDUCTIONS}.")
  squared = jnp.square(new - jax.lax.stop_gradient(old))
  if reduction == "mean":
    return jnp.mean(squared, axis=-1, where=mask)
  return 0.5 * jnp.sum(squared, axis=-1, where=mask)


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
                          alpha: float = 1.0, beta: float = 5.0, reduction: str = "half_sum",
                          old_class_mask: Any | None = None,
                          weights: Any | None = None) -> jax.Array:
  """Focal distillation with logit matching (FD-LM).

  ℓ_i = (α + β·1[ŷ_old,i = y_i]) · d_i with, over the K' classes the old model knows,
  d_i = ½ Σ_k (z_new,i,k − z_old,i,k)² (``reduction='half_sum'``) or
  d_i = (1/K') Σ_k (z_new,i,k − z_old,i,k)² (``'mean'``: the reference implementation's
  ``MSELoss`` averaged over classes, K'/2 times smaller than 'half_sum').

  For fixed old logits and labels this is a plain convex quadratic in ``new_logits``: the focal
  weights come from the old model only, the mask is a constant 0/1 selection and nothing
  stop-gradients the new logits. With a linearized model z_new = f0 + J·δ it stays quadratic in δ,
  so it can be added to a least-squares (LQF) objective; its Hessian in z_new is
  diag(w_i f_i 1[k old]) / Σ_i w_i ('half_sum'; times 2/K' for 'mean').

  Args:
    new_logits: (B, K) logits of the model being trained.
    old_logits: (B, K) logits of the frozen old model (columns outside the mask are ignored).
    labels: (B,) integer labels.
    alpha: weight of every example.
    beta: extra weight of the examples the old model classifies correctly.
    reduction: one of `FD_LM_REDUCTIONS` ('half_sum' or 'mean'), see above.
    old_class_mask: optional (K,) bool, True for the classes the old model knows.
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i ℓ_i / Σ_i w_i.
  """
  _check_logits(new_logits, old_logits, labels, old_class_mask)
  mask = _mask_or_none(old_class_mask)
  focal = focal_weights(old_logits, labels, alpha=alpha, beta=beta, old_class_mask=mask)
  return _weighted_mean(focal * _squared_distance(new_logits, old_logits, mask, reduction),
                        weights)


def fd_lm_targets(labels: jax.Array, old_logits: jax.Array, *, target_scale: float, alpha: float,
                  beta: float, lam: float) -> WeightedTargets:
  """Least squares + FD-LM against an old model as one weighted least-squares problem (LQF).

  For fixed old logits φ_i the sum of the two quadratics in f is one weighted quadratic:

    ½‖f − s·e_{y_i}‖² + λ·w_i·½‖f − φ_i‖² = ½·c_i·‖f − t_i‖² + const,
    w_i = α + β·1[argmax_k φ_ik = y_i],  c_i = 1 + λ·w_i,  t_i = (s·e_{y_i} + λ·w_i·φ_i) / c_i,

  so regression-constrained LQF (`lqf.fit.fit_linearized` with these targets) is still an exact
  convex quadratic in δ with constant curvature (1/N) Σ_i c_i J_iᵀJ_i + λ_δI. β = 0 is knowledge
  distillation by logit matching (KD-LM). Convention: FD-LM here is ½Σ_k (sum over classes,
  `focal_distillation_lm` with ``reduction='half_sum'``), next to the least squares' ½‖f − s·e_y‖².
  The reference implementation's FD-LM, the mean over the C classes with weight λ_ref, is this with
  ``lam`` = 2·λ_ref / C (and its (1 − kd_alpha, kd_alpha) weighting with ``lam`` = kd_alpha/(1 −
  kd_alpha) up to the overall factor).

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
                                p: float = 2, labels: jax.Array | None = None,
                                exclude_gt: bool = False, class_mask: Any | None = None,
                                weights: Any | None = None) -> jax.Array:
  """Logit difference inhibition (ELODI): ℓ_i = (1/K') Σ_k m_ik · max(|z_new,i,k − z_ref,i,k| − ξ, 0)^p.

  The mean runs over the K' classes of ``class_mask`` (all K without it); m_ik = 0 for the
  ground-truth class k = y_i when ``exclude_gt`` (the reference implementation's ``li_exclude_gt``,
  on in ELODI's recipe: the true class's logit may move freely), else 1. As in the reference, the
  excluded term still counts in K' (it divides by the number of classes, not K' − 1). The reference
  clamps the excess at 1e-7 instead of 0, which adds at most 1e-14 per term at p = 2; here it is 0.

  Args:
    new_logits: (B, K) logits of the model being trained.
    ref_logits: (B, K) frozen reference logits (ELODI: the mean logits of an ensemble).
    xi: dead zone ξ ≥ 0 inside which differences are not penalized (ELODI's recipe: 0).
    p: exponent (2 in the paper).
    labels: (B,) integer labels; required with ``exclude_gt``.
    exclude_gt: leave out the ground-truth class's term.
    class_mask: optional (K,) bool; the mean runs over the masked-in classes only.
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i ℓ_i / Σ_i w_i.
  """
  _check_logits(new_logits, ref_logits, labels, class_mask)
  excess = jnp.maximum(jnp.abs(new_logits - jax.lax.stop_gradient(ref_logits)) - xi, 0.0)
  terms = excess**p
  if exclude_gt:
    if labels is None:
      raise ValueError("exclude_gt=True needs the labels: pass labels=(B,) integers.")
    terms = jnp.where(jax.nn.one_hot(labels, new_logits.shape[-1], dtype=bool), 0.0, terms)
  return _weighted_mean(jnp.mean(terms, axis=-1, where=_mask_or_none(class_mask)), weights)


def bct_influence_loss(new_emb: jax.Array, labels: jax.Array, old_head_kernel: jax.Array,
                       old_head_bias: jax.Array | None = None, *,
                       weights: Any | None = None) -> jax.Array:
  """BCT influence loss CE(W_oldᵀ·φ_new(x) + b_old, y) with the old classifier frozen (stop_gradient).

  The full BCT objective is CE(new head) + λ · this term (Shen et al., CVPR 2020; λ = 1 in the
  reference implementation). The reference's old classifier is `bct_pseudo_classifier` (no bias)
  applied to the new model's raw (unnormalized) embedding, as here.

  Args:
    new_emb: (B, D) embeddings φ_new(x) of the model being trained.
    labels: (B,) integer labels in [0, K).
    old_head_kernel: (D, K) old classifier kernel (Flax layout).
    old_head_bias: optional (K,) old classifier bias (None: no bias, as the pseudo classifier).
    weights: optional (B,) per-example weights.

  Returns:
    Scalar Σ_i w_i CE_i / Σ_i w_i.
  """
  bias_shape = None if old_head_bias is None else old_head_bias.shape
  shapes = (new_emb.shape, jnp.shape(labels), old_head_kernel.shape, bias_shape)
  if (new_emb.ndim != 2 or old_head_kernel.shape[:1] != new_emb.shape[1:]
      or bias_shape not in (None, old_head_kernel.shape[1:]) or shapes[1] != new_emb.shape[:1]):
    raise ValueError(f"new_emb (B, D), labels (B,), old_head_kernel (D, K), old_head_bias (K,) or "
                     f"None expected: got {shapes}.")
  logits = new_emb @ jax.lax.stop_gradient(old_head_kernel)
  if old_head_bias is not None:
    logits = logits + jax.lax.stop_gradient(old_head_bias)
  return _weighted_mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels),
                        weights)


def _unit_rows(x: jax.Array) -> jax.Array:
  """x_i / ‖x_i‖ (all-zero rows stay zero), as torch's ``F.normalize(x, dim=1)`` (ε = 1e-12)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def l2_embedding_loss(new_emb: jax.Array, old_emb: jax.Array, *,
                      weights: Any | None = None) -> jax.Array:
  """The L2 compatibility baseline of the BCT reference: ℓ_i = (1/D) ‖φ̂_new(x_i) − φ̂_old(x_i)‖².

  φ̂ = φ/‖φ‖ (both embeddings L2-normalized, the old one frozen); the mean over the D dimensions
  and the batch is torch's ``MSELoss`` on ``F.normalize``d features, as openBCT trains it. Since
  both are unit vectors, ℓ_i = 2(1 − cos(φ_new, φ_old))/D. BCT reports that this baseline fails the
  compatibility criterion.

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
  diff = _unit_rows(new_emb) - jax.lax.stop_gradient(_unit_rows(old_emb))
  return _weighted_mean(jnp.mean(jnp.square(diff), axis=-1), weights)


def bct_pseudo_classifier(old_emb: Any, labels: Any, num_classes: int) -> jax.Array:
  """The old classifier of BCT as the reference implementation (openBCT) builds it.

  For every class k of the new training set, w_old[:, k] = mean_{i: y_i = k} φ_old(x_i)/‖φ_old(x_i)‖:
  the class mean of the L2-normalized old embeddings (openBCT's old model returns
  ``F.normalize(x)``), for the old classes too — their trained columns (norm and bias) are not
  used, so old and new classes compete on one scale. It is used without bias, frozen, on the new
  model's raw embedding (`bct_influence_loss`). Called once, outside jit, on the new training set;
  every class needs an example.

  Args:
    old_emb: (N, D) old-model embeddings φ_old(x_i) of the new training set.
    labels: (N,) integer labels in [0, num_classes).
    num_classes: K, the new label space.

  Returns:
    kernel (D, K) (Flax layout).
  """
  old_emb = jnp.asarray(old_emb, jnp.float32)
  labels_np = np.asarray(labels)
  if old_emb.ndim != 2 or labels_np.shape != old_emb.shape[:1]:
    raise ValueError(f"old_emb (N, D) and labels (N,) expected: got {old_emb.shape}, "
                     f"{labels_np.shape}.")
  if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, num_classes={num_classes}): got range "
                     f"[{labels_np.min()}, {labels_np.max()}].")
  counts = np.bincount(labels_np, minlength=num_classes)
  missing = [k for k in range(num_classes) if counts[k] == 0]
  if missing:
    raise ValueError(f"classes {missing} have no example in labels: pass old embeddings of every "
                     "class of the new training set.")
  sums = jax.ops.segment_sum(_unit_rows(old_emb), jnp.asarray(labels_np), num_segments=num_classes)
  return (sums / jnp.asarray(counts, jnp.float32)[:, None]).T
