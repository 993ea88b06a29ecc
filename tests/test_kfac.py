"""K-FAC factors and preconditioner vs brute force (explicit im2col, per-example Jacobians, np.kron)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lqf import kfac, step_rules
from support import ConvNet, convnet_by_hand, convnet_per_example, filled, MLP, N, paths

def brute_force_convnet(variables, x, reduce=False, weights=None):
  """Factors from explicit per-example patches and Jacobians w.r.t. the layer outputs (numpy sums);
  per-example ``weights`` c multiply the output-side sums (G and the diagonal)."""
  a_sum, g_sum, diag = {}, {}, {}
  weights = np.ones(len(x)) if weights is None else weights
  for (a, g, d), c in zip(convnet_per_example(variables, x), weights):
    for k in a:
      ak, gk = (a[k].mean(0, keepdims=True), g[k].sum(1, keepdims=True)) if reduce else (a[k], g[k])
      a_sum[k] = a_sum.get(k, 0.0) + sum(np.outer(r, r) for r in ak)
      g_sum[k] = g_sum.get(k, 0.0) + c * sum(np.outer(r, r) for gc in gk for r in gc)
    for k, v in d.items():
      diag[k] = diag.get(k, 0.0) + c * np.sum(v ** 2, 0)
  positions = {k: 1 if reduce else g[k].shape[1] for k in g}
  return ({k: (a_sum[k] / len(x), g_sum[k] / (len(x) * positions[k])) for k in a_sum},
          {k: d / len(x) for k, d in diag.items()})


def test_factors_mlp_brute_force():
  model = MLP()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(N, 5)), jnp.float32)
  v = filled(model, x)
  p = v["params"]
  factors = kfac.curvature_factors(model.apply, v, x, paths(p), batch_size=2)  # 3 batches, padded
  w1, b1, w2 = (np.asarray(p["dense1"]["kernel"]), np.asarray(p["dense1"]["bias"]),
                np.asarray(p["dense2"]["kernel"]))
  a1 = a2 = g1 = g2 = 0.0
  for xi in np.asarray(x, np.float64):
    s1 = xi @ w1 + b1
    z = np.where(s1 > 0, s1, 0.1 * s1)
    a1 = a1 + np.outer(np.append(xi, 1), np.append(xi, 1))
    a2 = a2 + np.outer(np.append(z, 1), np.append(z, 1))
    g2 = g2 + np.eye(3)                                                    # ∂f_c/∂s2 = e_c
    d = np.where(s1 > 0, 1.0, 0.1)
    g1 = g1 + sum(np.outer(w2[:, c] * d, w2[:, c] * d) for c in range(3))  # ∂f_c/∂s1 = W2[:, c]·σ'
  expected = {"dense1": (a1 / N, g1 / N), "dense2": (a2 / N, g2 / N)}
  assert set(factors.kronecker) == set(expected) and not factors.diagonal
  for k, (a, g) in expected.items():
    np.testing.assert_allclose(factors.kronecker[k][0], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(factors.kronecker[k][1], g, rtol=1e-5, atol=1e-6)


def test_weighted_factors_mlp_brute_force():
  """Per-example weights c: A = (1/N) Σ a aᵀ, G = (1/N) Σ_i c_i J_iᵀJ_i with J_i = ∂f(x_i)/∂s the
  explicit per-sample Jacobian w.r.t. the layer output (jax.jacfwd of the network by hand)."""
  model = MLP()
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(N, 5)), jnp.float32)
  c = rng.uniform(0.5, 6.0, N)
  v = filled(model, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  factors = kfac.curvature_factors(model.apply, v, x, paths(v["params"]), batch_size=2, weights=c)

  def hidden(xi, e1):
    s1 = xi @ p["dense1"]["kernel"] + p["dense1"]["bias"] + e1
    return jnp.where(s1 > 0, s1, 0.1 * s1)

  def by_hand(xi, e1, e2):  # the logits with perturbations e added to the layer outputs s1, s2
    return hidden(xi, e1) @ p["dense2"]["kernel"] + p["dense2"]["bias"] + e2

  expected = {"dense1": [0.0, 0.0], "dense2": [0.0, 0.0]}
  for xi, ci in zip(np.asarray(x, np.float64), c):
    j1, j2 = (np.asarray(j, np.float64) for j in jax.jacfwd(by_hand, argnums=(1, 2))(
        xi, np.zeros(4), np.zeros(3)))                                     # (3, 4), (3, 3)
    z = np.asarray(hidden(xi, np.zeros(4)), np.float64)
    for name, a, j in (("dense1", np.append(xi, 1), j1), ("dense2", np.append(z, 1), j2)):
      expected[name][0] = expected[name][0] + np.outer(a, a) / N
      expected[name][1] = expected[name][1] + ci * j.T @ j / N
  for k, (a, g) in expected.items():
    np.testing.assert_allclose(factors.kronecker[k][0], a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(factors.kronecker[k][1], g, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="weights must be 5 positive per-example weights"):
    kfac.curvature_factors(model.apply, v, x, paths(v["params"]), weights=-c)


@pytest.mark.parametrize("weight_sharing, weighted", [("expand", False), ("reduce", False),
                                                      ("expand", True)])
def test_factors_conv_brute_force(weight_sharing, weighted):
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(N, 7, 7, 2)), jnp.float32)
  v = filled(model, x)
  by_hand = convnet_by_hand(v["params"], v["batch_stats"], x[0], jnp.zeros((16, 3)), jnp.zeros((4, 4)),
                            jnp.zeros(2))[0]
  np.testing.assert_allclose(by_hand, model.apply(v, x[:1])[0], rtol=1e-5)  # the same network
  weights = np.random.default_rng(8).uniform(0.5, 6.0, N) if weighted else None
  factors = kfac.curvature_factors(model.apply, v, x, paths(v["params"]), batch_size=3,
                                   weight_sharing=weight_sharing, weights=weights)
  kron, diag = brute_force_convnet(v, x, reduce=weight_sharing == "reduce", weights=weights)
  for k, (a, g) in kron.items():
    np.testing.assert_allclose(factors.kronecker[k][0], a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(factors.kronecker[k][1], g, rtol=1e-4, atol=1e-6)
  for k, d in diag.items():
    np.testing.assert_allclose(factors.diagonal[k], d, rtol=1e-4, atol=1e-6)


def test_rademacher_estimate_is_unbiased():
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(N, 7, 7, 2)), jnp.float32)
  v = filled(model, x)
  exact = kfac.curvature_factors(model.apply, v, x, paths(v["params"]))
  estimate = kfac.curvature_factors(model.apply, v, x, paths(v["params"]), estimator="rademacher",
                                    num_vectors=4000, rng=jax.random.key(0))
  for k, (a, g) in exact.kronecker.items():
    np.testing.assert_allclose(estimate.kronecker[k][0], a, rtol=1e-5)   # A has no randomness
    assert np.linalg.norm(estimate.kronecker[k][1] - g) < 0.05 * np.linalg.norm(g)
  for k, d in exact.diagonal.items():
    assert np.linalg.norm(estimate.diagonal[k] - d) < 0.05 * np.linalg.norm(d)


def gauss_newton_block(model, v, x, layer):
  """(1/N) Σ_n J_nᵀJ_n for one layer's [kernel rows; bias] (row-major vec), by jax.jacfwd."""
  p = v["params"]

  def f(w, xi):
    kernel, bias = w[:-1].reshape(p[layer]["kernel"].shape), w[-1]
    q = {**p, layer: {"kernel": kernel, "bias": bias}}
    return model.apply({**v, "params": q}, xi[None])[0]

  out = p[layer]["bias"].shape[0]
  w = jnp.concatenate([p[layer]["kernel"].reshape(-1, out), p[layer]["bias"][None]])
  jac = jax.vmap(jax.jacfwd(lambda w, xi: f(w, xi)), in_axes=(None, 0))(w, x)   # (N, C, rows, out)
  jac = np.asarray(jac).reshape(len(x), jac.shape[1], -1)
  return np.einsum("ncp,ncq->pq", jac, jac) / len(x)


class LinearModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="dense")(x)


class PooledConv(nn.Module):
  """A conv whose outputs are mean-pooled linearly: g_t is the same at every position."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (2, 2), padding="SAME", name="conv")(x)
    return x.mean(axis=(1, 2))


def test_kronecker_product_is_the_gauss_newton_block_where_exact():
  """A ⊗ G (np.kron, row-major [kernel; bias]) = the layer's block of (1/N)Σ J_nᵀJ_n when K-FAC is exact:
  a linear Dense model ('expand', T = 1) and a linearly pooled conv ('reduce')."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(N, 4)), jnp.float32)
  model = LinearModel()
  v = filled(model, x)
  a, g = kfac.curvature_factors(model.apply, v, x, paths(v["params"])).kronecker["dense"]
  np.testing.assert_allclose(np.kron(a, g), gauss_newton_block(model, v, x, "dense"), rtol=1e-5,
                             atol=1e-6)
  x = jnp.asarray(rng.normal(size=(N, 4, 4, 2)), jnp.float32)
  model = PooledConv()
  v = filled(model, x)
  a, g = kfac.curvature_factors(model.apply, v, x, paths(v["params"]),
                                weight_sharing="reduce").kronecker["conv"]
  np.testing.assert_allclose(np.kron(a, g), gauss_newton_block(model, v, x, "conv"), rtol=1e-4,
                             atol=1e-6)


def test_preconditioned_update_is_a_damped_kronecker_solve():
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(N, 7, 7, 2)), jnp.float32)
  v = filled(model, x)
  factors = kfac.curvature_factors(model.apply, v, x, paths(v["params"]))
  rng = np.random.default_rng(6)
  grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), v["params"])
  lam = 0.01
  tx = kfac.kfac_precondition(factors, lam)
  updates, _ = tx.update(grads, tx.init(grads))
  for layer in ("conv1", "head"):  # kernel + bias: rows [kernel (…·in); bias], vec row-major
    a, g = (np.asarray(m, np.float64) for m in factors.kronecker[layer])
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    damped = np.kron(a + pi * np.sqrt(lam) * np.eye(len(a)), g + np.sqrt(lam) / pi * np.eye(len(g)))
    out = g.shape[0]
    vec = np.concatenate([np.asarray(grads[layer]["kernel"]).reshape(-1, out),
                          np.asarray(grads[layer]["bias"])[None]]).reshape(-1)
    expected = np.linalg.solve(damped, vec).reshape(-1, out)
    got = np.concatenate([np.asarray(updates[layer]["kernel"]).reshape(-1, out),
                          np.asarray(updates[layer]["bias"])[None]])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
  for leaf in ("scale", "bias"):
    np.testing.assert_allclose(updates["bn"][leaf],
                               grads["bn"][leaf] / (factors.diagonal[f"bn/{leaf}"] + lam), rtol=1e-5)
  np.testing.assert_allclose(updates["conv2"]["kernel"], kfac.apply_inverse(
      kfac.kfac_inverse(factors, lam), grads)["conv2"]["kernel"], rtol=1e-6)


class Grouped(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (1, 1), feature_group_count=2, name="conv")(x).mean(axis=(1, 2))


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3, name="dense")
    return dense(dense(x))


@pytest.mark.parametrize("model, shape, message", [
    (Grouped(), (2, 2, 4), "layer 'conv': K-FAC supports plain convolutions"),
    (Shared(), (3,), "layer 'dense' is applied more than once"),
])
def test_unsupported_layers_are_errors(model, shape, message):
  x = jnp.ones((2, *shape))
  v = filled(model, x)
  with pytest.raises(ValueError, match=message):
    kfac.curvature_factors(model.apply, v, x, paths(v["params"]))


def test_update_tree_must_match_the_factors():
  model = MLP()
  x = jnp.ones((2, 5))
  v = filled(model, x)
  factors = kfac.curvature_factors(model.apply, v, x, ["dense2/kernel", "dense2/bias"])
  with pytest.raises(ValueError, match="'dense1/(kernel|bias)' has no K-FAC block"):
    kfac.kfac_precondition(factors, 1e-3).init(v["params"])


def test_quadratic_model_step_is_conjugate_gradient():
  """With u = g, minimising the exact quadratic over (u, m) each step reproduces CG's iterates."""
  rng = np.random.default_rng(7)
  s_mat = rng.normal(size=(30, 12))
  hess, b = s_mat.T @ s_mat, rng.normal(size=12)
  tx = optax.chain(step_rules.quadratic_model_step(jnp.zeros(30)))
  x = jnp.zeros(12)
  state = tx.init(x)
  cg_x, r = np.zeros(12), b.copy()
  p = r.copy()
  for _ in range(6):
    grad = jnp.asarray(hess @ np.asarray(x) - b, jnp.float32)
    update, state = tx.update(grad, state, x, grad=grad,
                              sqrt_curvature=lambda v: jnp.asarray(s_mat, jnp.float32) @ v)
    x = x + update
    alpha = (r @ r) / (p @ hess @ p)
    cg_x, r_new = cg_x + alpha * p, r - alpha * hess @ p
    p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    np.testing.assert_allclose(x, cg_x, rtol=2e-3, atol=2e-3 * np.abs(cg_x).max())
