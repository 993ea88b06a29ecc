"""Tests of compat.losses against numpy formulas, finite differences and hand-computed values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compat import losses

B, K = 6, 5
OLD_MASK = np.array([True, True, True, False, False])  # the old model knows classes 0..2


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


def test_pc_training_loss_combines_cross_entropy_and_each_term():
  new, old, labels = _batch(6)
  ce = -np.mean(_np_log_softmax(new, np.ones(K, bool))[np.arange(B), labels])
  kw = dict(old_class_mask=OLD_MASK)
  terms = {"fd_kl": losses.focal_distillation_kl(new, old, labels, temperature=7.0, **kw),
           "fd_lm": losses.focal_distillation_lm(new, old, labels, **kw),
           "kd": losses.knowledge_distillation(new, old, temperature=7.0, **kw),
           "ldi": losses.logit_difference_inhibition(new, old, xi=0.1, class_mask=OLD_MASK)}
  loss_fn = jax.jit(losses.pc_training_loss, static_argnames="method")
  for method, term in terms.items():
    got = loss_fn(new, old, labels, method=method, lam=0.3, temperature=7.0, xi=0.1, **kw)
    np.testing.assert_allclose(got, ce + 0.3 * term, rtol=1e-5)
  np.testing.assert_allclose(losses.pc_training_loss(new, None, labels, method="none"), ce,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="method='fd' is unknown"):
    losses.pc_training_loss(new, old, labels, method="fd")
  with pytest.raises(ValueError, match="old_logits is None"):
    losses.pc_training_loss(new, None, labels, method="kd")


def test_weights_as_padding_mask_give_the_mean_over_real_examples():
  new, old, labels = _batch(7)
  mask = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
  padded = new.copy()
  padded[4:] = 1e3  # garbage in padded rows must not leak
  got = losses.pc_training_loss(padded, old, labels, method="fd_lm", weights=mask)
  real = losses.pc_training_loss(new[:4], old[:4], labels[:4], method="fd_lm")
  np.testing.assert_allclose(got, real, rtol=1e-6)


def test_synthesized_old_head_is_old_head_plus_class_means():
  rng = np.random.default_rng(8)
  num_old, num_new, dim = 3, 5, 4
  old_emb = rng.normal(size=(20, dim)).astype(np.float32)
  labels = np.concatenate([np.arange(num_new), rng.integers(0, num_new, 15)])
  old_kernel = rng.normal(size=(dim, num_old)).astype(np.float32)
  old_bias = rng.normal(size=num_old).astype(np.float32)
  kernel, bias = losses.synthesize_old_head(old_emb, labels, old_kernel, old_bias, num_new)
  assert kernel.shape == (dim, num_new) and bias.shape == (num_new,)
  np.testing.assert_array_equal(kernel[:, :num_old], old_kernel)
  np.testing.assert_array_equal(bias, np.concatenate([old_bias, np.zeros(2, np.float32)]))
  for k in range(num_old, num_new):
    np.testing.assert_allclose(kernel[:, k], old_emb[labels == k].mean(axis=0), rtol=1e-6)
  with pytest.raises(ValueError, match=r"new classes \[4\] have no example"):
    losses.synthesize_old_head(old_emb[labels != 4], labels[labels != 4], old_kernel, old_bias,
                               num_new)


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
  grad_emb, grad_kernel, grad_bias = jax.grad(losses.bct_influence_loss, argnums=(0, 2, 3))(
      jnp.asarray(emb), labels, jnp.asarray(kernel), jnp.asarray(bias))
  assert np.all(grad_kernel == 0.0) and np.all(grad_bias == 0.0)
  softmax = np.exp(_np_log_softmax(logits, np.ones(K, bool)))
  np.testing.assert_allclose(grad_emb, (softmax - np.eye(K)[labels]) @ kernel.T / B, atol=1e-5)


def test_l2_embedding_loss_matches_numpy():
  rng = np.random.default_rng(10)
  new, old = rng.normal(size=(2, B, 3)).astype(np.float32)
  expected = np.mean(0.5 * np.sum((new.astype(np.float64) - old)**2, axis=1))
  np.testing.assert_allclose(losses.l2_embedding_loss(new, old), expected, rtol=1e-6)
  assert np.all(jax.grad(losses.l2_embedding_loss, argnums=1)(new, jnp.asarray(old)) == 0.0)
