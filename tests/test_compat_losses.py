"""Tests of compat.losses against numpy formulas, finite differences and hand-computed values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compat import losses

B, K = 6, 5
OLD_MASK = np.array([True, True, True, False, False])  # the old model knows classes 0..2
EPS32 = float(np.finfo(np.float32).eps)


def _batch(seed, scale=3.0):
  rng = np.random.default_rng(seed)
  new = (scale * rng.normal(size=(B, K))).astype(np.float32)
  old = (scale * rng.normal(size=(B, K))).astype(np.float32)
  labels = rng.integers(0, K, B)
  labels[:2] = np.argmax(old[:2, :3], axis=1)  # the old model is right on at least two examples
  return new, old, labels


def _np_log_softmax(z, mask):
  z = np.where(mask, z.astype(np.float64), -np.inf)
  shifted = z - z.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _np_focal(old, labels, alpha, beta, mask):
  return np.array([alpha + beta * (np.argmax(np.where(mask, o, -np.inf)) == y)
                   for o, y in zip(old, labels)])


def _np_tempered_kl(new, old, temperature, mask):
  """T² Σ_k p_old,k (log p_old,k − log p_new,k) over the masked classes, per example."""
  log_p_old = np.where(mask, _np_log_softmax(old / temperature, mask), 0.0)
  log_p_new = np.where(mask, _np_log_softmax(new / temperature, mask), 0.0)
  return temperature**2 * np.sum(mask * np.exp(log_p_old) * (log_p_old - log_p_new), axis=1)


@pytest.mark.parametrize("mask", [None, OLD_MASK])
@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_focal_distillation_kl_matches_numpy(mask, temperature):
  new, old, labels = _batch(0)
  full = np.ones(K, bool) if mask is None else mask
  expected = np.mean(_np_focal(old, labels, 1.0, 5.0, full)
                     * _np_tempered_kl(new, old, temperature, full))
  got = losses.focal_distillation_kl(new, old, labels, temperature=temperature,
                                     old_class_mask=mask)
  # At T = 100 the float32 KL (~1e-4 before the T² factor) loses digits to cancellation.
  np.testing.assert_allclose(got, expected, rtol=1e-5 * temperature)


@pytest.mark.parametrize("mask", [None, OLD_MASK])
def test_focal_distillation_with_beta_zero_is_knowledge_distillation(mask):
  new, old, labels = _batch(1)
  weights = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 1.0])
  fd = losses.focal_distillation_kl(new, old, labels, alpha=1.0, beta=0.0, temperature=4.0,
                                    old_class_mask=mask, weights=weights)
  kd = losses.knowledge_distillation(new, old, temperature=4.0, old_class_mask=mask,
                                     weights=weights)
  np.testing.assert_allclose(fd, kd, rtol=1e-6)
  full = np.ones(K, bool) if mask is None else mask
  expected = np.sum(weights * _np_tempered_kl(new, old, 4.0, full)) / weights.sum()
  np.testing.assert_allclose(kd, expected, rtol=1e-4)


@pytest.mark.parametrize("mask", [None, OLD_MASK])
def test_focal_distillation_kl_gradient_matches_central_differences(mask):
  new, old, labels = _batch(2)
  with jax.enable_x64(True):
    new64, old64 = jnp.asarray(new, jnp.float64), jnp.asarray(old, jnp.float64)
    loss = jax.jit(lambda z: losses.focal_distillation_kl(z, old64, labels, temperature=3.0,
                                                          old_class_mask=mask))
    grad = np.asarray(jax.grad(loss)(new64))
    eps, numeric = 1e-6, np.zeros((B, K))
    for i in range(B):
      for k in range(K):
        step = jnp.zeros((B, K), jnp.float64).at[i, k].set(eps)
        numeric[i, k] = (loss(new64 + step) - loss(new64 - step)) / (2 * eps)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
  if mask is not None:  # classes the old model lacks get no distillation gradient
    assert np.all(grad[:, ~mask] == 0.0)


def test_focal_distillation_lm_by_hand():
  new = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], np.float32)
  old = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 9.0]], np.float32)
  labels = np.array([0, 1])  # old is right on example 0 (argmax 0), wrong on example 1 (argmax 2)
  # Example 0: ½(1 + 4 + 1) = 3 with weight α + β = 1 + 5; example 1: ½(1 + 1 + 36) = 19, weight 1.
  got = losses.focal_distillation_lm(new, old, labels, alpha=1.0, beta=5.0)
  np.testing.assert_allclose(got, (6 * 3 + 1 * 19) / 2, rtol=1e-6)
  # With class 2 unknown to the old model, its argmax is 0 on example 1 (still wrong).
  got = losses.focal_distillation_lm(new, old, labels, old_class_mask=np.array([True, True, False]))
  np.testing.assert_allclose(got, (6 * 2.5 + 1 * 1.0) / 2, rtol=1e-6)


def test_focal_distillation_lm_is_a_plain_quadratic_in_new_logits():
  new, old, labels = _batch(3)
  weights = np.array([1.0, 2.0, 0.0, 1.0, 1.0, 3.0])
  loss = lambda z: losses.focal_distillation_lm(z.reshape(B, K), old, labels,
                                                old_class_mask=OLD_MASK, weights=weights)
  focal = _np_focal(old, labels, 1.0, 5.0, OLD_MASK)
  expected = np.diag((weights[:, None] * focal[:, None] * OLD_MASK[None, :]).ravel()
                     / weights.sum())
  hessian_fn = jax.jit(jax.hessian(loss))
  for z in (new, 10 * new + 1):  # the Hessian is the same everywhere
    hessian = hessian_fn(jnp.asarray(z).ravel())
    np.testing.assert_allclose(hessian, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["fd_kl", "fd_lm", "kd", "ldi"])
def test_masked_classes_change_nothing(name):
  new, old, labels = _batch(4)
  labels = np.minimum(labels, 2)  # labels of classes the old model knows
  fn = {"fd_kl": functools.partial(losses.focal_distillation_kl, labels=labels,
                                   old_class_mask=OLD_MASK),
        "fd_lm": functools.partial(losses.focal_distillation_lm, labels=labels,
                                   old_class_mask=OLD_MASK),
        "kd": functools.partial(losses.knowledge_distillation, old_class_mask=OLD_MASK),
        "ldi": functools.partial(losses.logit_difference_inhibition, class_mask=OLD_MASK)}[name]
  base = fn(new, old)
  changed_new, changed_old = new.copy(), old.copy()
  changed_new[:, 3:] += 50.0
  changed_old[:, 3:] = 100.0  # would flip the old argmax if the mask were ignored
  np.testing.assert_allclose(fn(changed_new, changed_old), base, rtol=1e-6)
  assert abs(float(fn(new + np.eye(K)[0], old)) - float(base)) > 1e-3  # known classes do count


@pytest.mark.parametrize("xi, p", [(0.0, 2), (0.5, 2), (0.3, 1)])
def test_logit_difference_inhibition_matches_numpy(xi, p):
  new, ref, _ = _batch(5)
  expected = np.mean(np.maximum(np.abs(new.astype(np.float64) - ref) - xi, 0.0)**p)
  got = losses.logit_difference_inhibition(new, ref, xi=xi, p=p)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cross_entropy_is_the_weighted_mean_of_the_numpy_log_softmax():
  new, _, labels = _batch(6)
  per_example = -_np_log_softmax(new, np.ones(K, bool))[np.arange(B), labels]
  tol = 8 * EPS32 * np.abs(new).max()  # float32 log-sum-exp of logits up to max|z|
  np.testing.assert_allclose(losses.cross_entropy(new, labels), per_example.mean(), rtol=0, atol=tol)
  w = np.arange(1.0, B + 1)
  np.testing.assert_allclose(losses.cross_entropy(new, labels, weights=w), w @ per_example / w.sum(),
                             rtol=0, atol=tol)


def test_weights_as_padding_mask_give_the_mean_over_real_examples():
  new, old, labels = _batch(7)
  mask = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
  padded = new.copy()
  padded[4:] = 1e3  # garbage in padded rows must not leak
  np.testing.assert_allclose(losses.cross_entropy(padded, labels, weights=mask),
                             losses.cross_entropy(new[:4], labels[:4]), rtol=4 * B * EPS32)
  np.testing.assert_allclose(losses.focal_distillation_lm(padded, old, labels, weights=mask),
                             losses.focal_distillation_lm(new[:4], old[:4], labels[:4]), rtol=4 * B * EPS32)


def test_bct_pseudo_classifier_is_the_class_means_of_normalized_old_embeddings():
  rng = np.random.default_rng(8)
  num_classes, dim = 5, 4
  old_emb = (3.0 * rng.normal(size=(20, dim)) + 1.0).astype(np.float32)
  labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, 15)])
  kernel = losses.bct_pseudo_classifier(old_emb, labels, num_classes)
  assert kernel.shape == (dim, num_classes)
  unit = old_emb.astype(np.float64) / np.linalg.norm(old_emb.astype(np.float64), axis=1,
                                                      keepdims=True)
  expected = np.stack([unit[labels == k].mean(axis=0) for k in range(num_classes)], axis=1)
  # float32 sums of ≤ 20 unit-norm rows: relative rounding ~20·2⁻²⁴.
  np.testing.assert_allclose(kernel, expected, rtol=0, atol=20 * 2.0**-24 * 4)
  assert np.all(np.linalg.norm(np.asarray(kernel), axis=0) <= 1.0 + 1e-6)  # means of unit vectors
  with pytest.raises(ValueError, match=r"classes \[4\] have no example"):
    losses.bct_pseudo_classifier(old_emb[labels != 4], labels[labels != 4], num_classes)


def test_bct_influence_loss_uses_the_frozen_old_head():
  rng = np.random.default_rng(9)
  emb = rng.normal(size=(B, 4)).astype(np.float32)
  kernel = rng.normal(size=(4, K)).astype(np.float32)
  bias = rng.normal(size=K).astype(np.float32)
  labels = rng.integers(0, K, B)
  logits = emb.astype(np.float64) @ kernel + bias
  expected = -np.mean(_np_log_softmax(logits, np.ones(K, bool))[np.arange(B), labels])
  np.testing.assert_allclose(losses.bct_influence_loss(emb, labels, kernel, bias), expected,
                             rtol=1e-5)
  no_bias = -np.mean(_np_log_softmax(logits - bias, np.ones(K, bool))[np.arange(B), labels])
  np.testing.assert_allclose(losses.bct_influence_loss(emb, labels, kernel), no_bias, rtol=1e-5)
  grad_emb, grad_kernel, grad_bias = jax.grad(losses.bct_influence_loss, argnums=(0, 2, 3))(
      jnp.asarray(emb), labels, jnp.asarray(kernel), jnp.asarray(bias))
  assert np.all(grad_kernel == 0.0) and np.all(grad_bias == 0.0)
  softmax = np.exp(_np_log_softmax(logits, np.ones(K, bool)))
  np.testing.assert_allclose(grad_emb, (softmax - np.eye(K)[labels]) @ kernel.T / B, atol=1e-5)


def test_l2_embedding_loss_is_the_mse_of_normalized_embeddings():
  rng = np.random.default_rng(10)
  new, old = (5.0 * rng.normal(size=(2, B, 3))).astype(np.float32)
  unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  expected = np.mean((unit(new) - unit(old))**2)  # torch's MSELoss(F.normalize(·), F.normalize(·))
  np.testing.assert_allclose(losses.l2_embedding_loss(new, old), expected, rtol=1e-5)
  cosine = np.sum(unit(new) * unit(old), axis=1)
  np.testing.assert_allclose(losses.l2_embedding_loss(new, old), np.mean(2 * (1 - cosine) / 3),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.l2_embedding_loss(3.0 * new, 0.5 * old), expected, rtol=1e-5)
  assert np.all(jax.grad(losses.l2_embedding_loss, argnums=1)(new, jnp.asarray(old)) == 0.0)


# --- the reference implementation's recipes (amazon-science/regression-constraint-model-upgrade) ---


def _np_reference_focal_loss(new, old, labels, alpha, beta, sample_loss):
  """The reference's FocalDistillationLoss.forward in numpy: (sample_loss * loss_weights).mean()
  with loss_weights of shape (B, 1) — for a (B,) sample loss this broadcasts to (B, B)."""
  weights = (np.argmax(old, axis=1) == labels).astype(np.float64)[:, None] * beta + alpha
  return np.mean(sample_loss * weights)


def test_fd_lm_mean_reduction_is_the_reference_mse():
  new, old, labels = _batch(11)
  sample_loss = (new.astype(np.float64) - old)**2  # MSELoss(reduction='none'): (B, K)
  expected = _np_reference_focal_loss(new, old, labels, 1.0, 5.0, sample_loss)
  got = losses.focal_distillation_lm(new, old, labels, alpha=1.0, beta=5.0, reduction="mean")
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  half_sum = losses.focal_distillation_lm(new, old, labels, alpha=1.0, beta=5.0)
  np.testing.assert_allclose(half_sum, K / 2 * expected, rtol=1e-5)  # ½Σ_k = (K/2)·mean_k
  masked = losses.focal_distillation_lm(new, old, labels, reduction="mean", old_class_mask=OLD_MASK)
  focal = _np_focal(old, labels, 1.0, 5.0, OLD_MASK)
  np.testing.assert_allclose(masked, np.mean(focal * np.mean(sample_loss[:, OLD_MASK], axis=1)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="reduction='sum' is unknown"):
    losses.focal_distillation_lm(new, old, labels, reduction="sum")


def test_reference_fd_kl_broadcast_is_mean_weight_times_kd():
  """What the reference computes for FD-KL ((B,) loss × (B, 1) weights) is the batch's mean focal
  weight times KD; ours weights each example (documented in compat.losses)."""
  new, old, labels = _batch(12)
  full = np.ones(K, bool)
  sample_loss = _np_tempered_kl(new, old, 100.0, full)
  reference = _np_reference_focal_loss(new, old, labels, 1.0, 5.0, sample_loss)
  focal = _np_focal(old, labels, 1.0, 5.0, full)
  np.testing.assert_allclose(reference, focal.mean() * sample_loss.mean(), rtol=1e-12)
  ours = losses.focal_distillation_kl(new, old, labels, temperature=100.0)
  np.testing.assert_allclose(ours, np.mean(focal * sample_loss), rtol=1e-3)  # T = 100: see above


@pytest.mark.parametrize("xi", [0.0, 0.5])
def test_ldi_exclude_gt_matches_the_reference(xi):
  new, ref, labels = _batch(13)
  diff = np.maximum(np.abs(new.astype(np.float64) - ref) - xi, 1e-7)  # the reference clamps at 1e-7
  expected = np.mean(np.mean((1.0 - np.eye(K)[labels]) * diff**2, axis=1))  # mean over all K
  got = losses.logit_difference_inhibition(new, ref, xi=xi, labels=labels, exclude_gt=True)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-13)
  moved = new.copy()
  moved[np.arange(B), labels] += 100.0  # the true class's logit may move freely
  np.testing.assert_allclose(
      losses.logit_difference_inhibition(moved, ref, xi=xi, labels=labels, exclude_gt=True), got,
      rtol=1e-6)
  with pytest.raises(ValueError, match="exclude_gt=True needs the labels"):
    losses.logit_difference_inhibition(new, ref, exclude_gt=True)
