"""Tests of lqf.models.text: output convention, padding, the compat losses through the models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import compat
from lqf.models.text import create_text_model, masked_max, masked_mean

K, VOCAB, L = 5, 40, 9
CONFIGS = {
    "transformer_mean": dict(name="transformer", width=8, depth=2, num_heads=2, mlp_dim=12,
                             dropout=0.1, pooling="mean"),
    "transformer_cls": dict(name="transformer", width=16, depth=1, num_heads=2, mlp_dim=16,
                            dropout=0.1, pooling="cls"),
    "cnn": dict(name="cnn", width=8, kernel_sizes=(2, 3), dropout=0.1),
    "bag_of_embeddings": dict(name="bag_of_embeddings", width=12, dropout=0.1),
}
EMBEDDING_DIMS = {"transformer_mean": 8, "transformer_cls": 16, "cnn": 16,
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
def test_resnet_output_convention_padding_and_dropout(name):
  model, tokens = _model(name), _tokens(0)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  # The same texts as (6, 4) ids and padded to (6, L); one text is itself padded.
  short = np.random.default_rng(1).integers(1, VOCAB, (6, 4))
  short[0, 2:] = 0
  long = np.pad(short, ((0, 0), (0, L - 4)))

  @jax.jit
  def outputs(v, rng):
    return (model.apply(v, tokens, return_embedding=True), model.apply(v, tokens),
            model.apply(v, short), model.apply(v, long),
            model.apply(v, tokens, train=True, rngs={"dropout": rng}))
  (logits, emb), logits_only, short_logits, long_logits, dropped = outputs(
      variables, jax.random.key(1))
  assert logits.shape == (6, K) and logits.dtype == jnp.float32
  assert emb.shape == (6, EMBEDDING_DIMS[name])
  np.testing.assert_allclose(logits_only, logits, rtol=1e-6)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, emb @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(long_logits, short_logits, rtol=1e-5, atol=1e-5)  # padding: no-op
  assert not np.allclose(dropped, logits)  # dropout is on in training mode only


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
  params = jax.jit(model.init)(jax.random.key(seed), tokens)["params"]
  old_logits = 3.0 * jax.random.normal(jax.random.key(seed + 10), (6, K))
  labels = np.array(jnp.argmax(old_logits, -1))
  labels[3:] = (labels[3:] + 1) % K  # the old model is right on half of the batch
  return model, tokens, params, old_logits, labels


@pytest.mark.parametrize("name", ["transformer_cls", "cnn"])
def test_fd_kl_gradient_through_a_text_model_matches_central_differences(name):
  with jax.enable_x64(True):
    model, tokens, params, old_logits, labels = _distillation_setup(name, 4)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    old_logits = jnp.asarray(old_logits, jnp.float64)

    def loss(p):
      logits = model.apply({"params": p}, tokens)
      return compat.cross_entropy(logits, labels) + compat.focal_distillation_kl(
          logits, old_logits, labels, alpha=1.0, beta=5.0, temperature=2.0)

    @jax.jit
    def check(p, key, eps):
      """(∇L·v, [L(p + εv) − L(p − εv)] / 2ε) along a random direction v."""
      leaves, treedef = jax.tree.flatten(p)
      keys = jax.random.split(key, len(leaves))
      v = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(jax.grad(loss)(p)),
                                                    jax.tree.leaves(v)))
      shifted = lambda sign: jax.tree.map(lambda x, d: x + sign * eps * d, p, v)
      return analytic, (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
    for d in range(2):
      analytic, numeric = check(params, jax.random.key(100 + d), 1e-6)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("name", ["transformer_mean", "bag_of_embeddings"])
def test_kd_is_fd_with_beta_zero_through_a_text_model(name):
  model, tokens, params, old_logits, labels = _distillation_setup(name, 5)

  def loss(p, term):
    logits = model.apply({"params": p}, tokens)
    return compat.cross_entropy(logits, labels) + 0.7 * term(logits)
  kd_value, kd_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda z: compat.knowledge_distillation(
      z, old_logits, temperature=3.0))))(params)
  fd_value, fd_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda z: compat.focal_distillation_kl(
      z, old_logits, labels, alpha=1.0, beta=0.0, temperature=3.0))))(params)
  np.testing.assert_allclose(kd_value, fd_value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), kd_grad,
               fd_grad)
  with_beta = jax.jit(lambda p: loss(p, lambda z: compat.focal_distillation_kl(
      z, old_logits, labels, alpha=1.0, beta=5.0, temperature=3.0)))(params)
  assert with_beta > fd_value  # the old model is right on some examples: they weigh more


def test_flip_metrics_of_two_text_models_match_a_loop():
  tokens = _tokens(6, batch=64)

  def predict(name, seed):
    model = _model(name)
    return np.asarray(jax.jit(lambda t: model.apply(model.init(jax.random.key(seed), t), t))(
        tokens).argmax(-1))
  old, new = predict("cnn", 1), predict("transformer_mean", 2)
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
