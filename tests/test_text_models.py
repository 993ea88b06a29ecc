"""Tests of lqf.models.text: output convention, padding, and the compat losses through the models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import compat
from lqf.models.text import create_text_model, masked_max, masked_mean

K, VOCAB, L = 5, 40, 9
CONFIGS = {
    "transformer_mean": dict(name="transformer", width=16, depth=2, num_heads=4, mlp_dim=24,
                             dropout=0.1, pooling="mean"),
    "transformer_cls": dict(name="transformer", width=16, depth=1, num_heads=2, mlp_dim=16,
                            dropout=0.1, pooling="cls"),
    "cnn": dict(name="cnn", width=8, kernel_sizes=(2, 3), dropout=0.1),
    "bag_of_embeddings": dict(name="bag_of_embeddings", width=12, dropout=0.1),
}
EMBEDDING_DIMS = {"transformer_mean": 16, "transformer_cls": 16, "cnn": 16,
                  "bag_of_embeddings": 12}


def _model(name):
  return create_text_model(ml_collections.ConfigDict(CONFIGS[name]), K, VOCAB, L)


def _tokens(seed, batch=6):
  """Random ids in [1, VOCAB) with random lengths 1..L, right-padded with 0."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (batch, L))
  lengths = rng.integers(1, L + 1, batch)
  return jnp.asarray(np.where(np.arange(L) < lengths[:, None], tokens, 0), jnp.int32)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_embedding_and_head_follow_the_resnet_convention(name):
  model, tokens = _model(name), _tokens(0)
  variables = model.init(jax.random.key(0), tokens)
  logits, emb = model.apply(variables, tokens, return_embedding=True)
  assert logits.shape == (6, K) and logits.dtype == jnp.float32
  assert emb.shape == (6, EMBEDDING_DIMS[name])
  np.testing.assert_array_equal(model.apply(variables, tokens), logits)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, emb @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  dropped = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(dropped, logits)  # dropout is on in training mode only


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_changes_nothing(name):
  model = _model(name)
  short = np.random.default_rng(1).integers(1, VOCAB, (6, 4))
  short[0, 2:] = 0  # one text is itself padded
  long = np.pad(short, ((0, 0), (0, L - 4)))  # the same texts padded to length L
  variables = model.init(jax.random.key(0), jnp.asarray(long))
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(long)),
                             model.apply(variables, jnp.asarray(short)), rtol=1e-5, atol=1e-5)


def test_masked_pooling_matches_a_loop_and_an_empty_text_pools_to_zero():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 5, 2)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  for b in range(2):
    np.testing.assert_allclose(masked_mean(x, mask)[b], x[b][mask[b]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(masked_max(x, mask)[b], x[b][mask[b]].max(0), rtol=1e-6)
  np.testing.assert_array_equal(masked_mean(x, mask)[2], 0.0)
  np.testing.assert_array_equal(masked_max(x, mask)[2], 0.0)


def _distillation_setup(name, seed):
  model, tokens = _model(name), _tokens(seed)
  params = model.init(jax.random.key(seed), tokens)["params"]
  old_logits = 3.0 * jax.random.normal(jax.random.key(seed + 10), (6, K))
  labels = np.array(jnp.argmax(old_logits, -1))
  labels[3:] = (labels[3:] + 1) % K  # the old model is right on half of the batch
  return model, tokens, params, old_logits, labels


@pytest.mark.parametrize("name", ["transformer_mean", "cnn"])
def test_fd_kl_gradient_through_a_text_model_matches_central_differences(name):
  with jax.enable_x64(True):
    model, tokens, params, old_logits, labels = _distillation_setup(name, 4)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    old_logits = jnp.asarray(old_logits, jnp.float64)

    def loss(p):
      logits = model.apply({"params": p}, tokens)
      return compat.pc_training_loss(logits, old_logits, labels, method="fd_kl", lam=1.0,
                                     alpha=1.0, beta=5.0, temperature=2.0)
    loss = jax.jit(loss)
    grad = jax.grad(loss)(params)
    leaves, treedef = jax.tree.flatten(params)
    for d in range(3):
      keys = jax.random.split(jax.random.key(100 + d), len(leaves))
      direction = treedef.unflatten([jax.random.normal(k, p.shape, jnp.float64)
                                     for k, p in zip(keys, leaves)])
      analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad),
                                                     jax.tree.leaves(direction)))
      eps = 1e-5
      shifted = lambda s: jax.tree.map(lambda p, v: p + s * eps * v, params, direction)
      numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("name", ["transformer_cls", "bag_of_embeddings"])
def test_kd_is_fd_with_beta_zero_through_a_text_model(name):
  model, tokens, params, old_logits, labels = _distillation_setup(name, 5)

  def loss(p, **kw):
    return compat.pc_training_loss(model.apply({"params": p}, tokens), old_logits, labels,
                                   lam=0.7, temperature=3.0, **kw)
  kd_value, kd_grad = jax.value_and_grad(lambda p: loss(p, method="kd"))(params)
  fd_value, fd_grad = jax.value_and_grad(
      lambda p: loss(p, method="fd_kl", alpha=1.0, beta=0.0))(params)
  np.testing.assert_allclose(kd_value, fd_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), kd_grad,
               fd_grad)
  with_beta = loss(params, method="fd_kl", alpha=1.0, beta=5.0)
  assert with_beta > fd_value  # the old model is right on some examples: they weigh more


def test_flip_metrics_of_two_text_models_match_a_loop():
  old_model, new_model, tokens = _model("cnn"), _model("transformer_mean"), _tokens(6, batch=64)
  old = np.asarray(old_model.apply(old_model.init(jax.random.key(1), tokens), tokens).argmax(-1))
  new = np.asarray(new_model.apply(new_model.init(jax.random.key(2), tokens), tokens).argmax(-1))
  labels = np.random.default_rng(0).integers(0, K, 64)
  labels[:20] = old[:20]
  negative = sum(o == y and n != y for o, n, y in zip(old, new, labels))
  summary = compat.flip_summary(labels, old, new)
  assert summary["nfr"] == negative / 64 and negative > 0
  assert summary["nfi"] == negative / sum(n != y for n, y in zip(new, labels))


def test_config_errors_name_the_field():
  bad = dict(CONFIGS["transformer_mean"], num_heads=3)
  with pytest.raises(ValueError, match="model.num_heads=3"):
    create_text_model(ml_collections.ConfigDict(bad), K, VOCAB, L)
  with pytest.raises(ValueError, match="model.name='lstm'"):
    create_text_model(ml_collections.ConfigDict(dict(name="lstm", width=4)), K, VOCAB, L)
  model = create_text_model(ml_collections.ConfigDict(dict(CONFIGS["transformer_mean"],
                                                           pooling="max")), K, VOCAB, L)
  with pytest.raises(ValueError, match="model.pooling='max'"):
    model.init(jax.random.key(0), _tokens(0))
