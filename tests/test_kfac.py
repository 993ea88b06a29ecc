"""K-FAC factors and preconditioner vs brute force (explicit im2col, per-example Jacobians, np.kron)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from lqf import kfac, step_rules

N = 5


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(nn.Dense(4, name="dense1")(x), 0.1)
    return nn.Dense(3, name="dense2")(x)


class ConvNet(nn.Module):
  """Strided conv with asymmetric padding + bias, BatchNorm, dilated VALID conv, mean-pool, Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), strides=2, padding=((1, 1), (0, 2)), name="conv1")(x)
    x = nn.leaky_relu(nn.BatchNorm(use_running_average=True, name="bn")(x), 0.1)
    x = nn.Conv(4, (2, 2), padding="VALID", kernel_dilation=2, use_bias=False, name="conv2")(x)
    return nn.Dense(2, name="head")(nn.leaky_relu(x, 0.1).mean(axis=(1, 2)))


def filled(model, x, seed=0):
  """Variables with random values (random BatchNorm statistics too)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  rng = np.random.default_rng(seed)
  def fill(path, s):
    positive = path[-1].key in ("var", "scale")
    return jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if positive else rng.normal(size=s.shape) * 0.7,
                       jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def paths(params):
  return list(traverse_util.flatten_dict(params, sep="/"))


def im2col_index(h, w, k, stride, pads, dilation):
  """Explicit loops: per output position, the (padded-image) indices of its patch in (ky, kx) order."""
  (pt, pb), (pl, pr) = pads
  hp, wp = h + pt + pb, w + pl + pr
  span = (k - 1) * dilation + 1
  rows = []
  for i in range(0, hp - span + 1, stride):
    for j in range(0, wp - span + 1, stride):
      rows.append([(i + ky * dilation, j + kx * dilation) for ky in range(k) for kx in range(k)])
  return np.array(rows), (hp, wp)


def patches(x, index, pads):
  """(H, W, C) -> (T, k·k·C) rows in HWIO kernel order, by explicit gathering."""
  (pt, pb), (pl, pr) = pads
  xp = jnp.pad(x, ((pt, pb), (pl, pr), (0, 0)))
  return xp[index[..., 0], index[..., 1]].reshape(index.shape[0], -1)


def convnet_by_hand(p, stats, x, e1, e2, e3):
  """ConvNet on one example (7, 7, 2) with perturbations e added to each layer's output s."""
  idx1, _ = im2col_index(7, 7, 3, 2, ((1, 1), (0, 2)), 1)
  a1 = patches(x, idx1, ((1, 1), (0, 2)))                                  # (16, 18)
  s1 = a1 @ p["conv1"]["kernel"].reshape(-1, 3) + p["conv1"]["bias"] + e1
  bn = stats["bn"]
  y = (s1 - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  z = nn.leaky_relu(y, 0.1).reshape(4, 4, 3)
  idx2, _ = im2col_index(4, 4, 2, 1, ((0, 0), (0, 0)), 2)
  a2 = patches(z, idx2, ((0, 0), (0, 0)))                                  # (4, 12)
  s2 = a2 @ p["conv2"]["kernel"].reshape(-1, 4) + e2
  a3 = nn.leaky_relu(s2, 0.1).mean(axis=0)
  return a3 @ p["head"]["kernel"] + p["head"]["bias"] + e3, (a1, a2, a3)


def convnet_per_example(variables, x):
  """Per example, by hand: layer inputs a (T, d) [+ ones for a bias], output gradients g (C, T, out)
  and BatchNorm gradients (C, 3) per leaf — numpy arrays."""
  p, stats = variables["params"], variables["batch_stats"]
  sizes = {"conv1": (16, 3), "conv2": (4, 4), "head": (1, 2)}
  zeros = [jnp.zeros(sizes[k]) for k in ("conv1", "conv2")] + [jnp.zeros(2)]

  @jax.jit
  def per_example(xi):
    acts = convnet_by_hand(p, stats, xi, *zeros)[1]
    jac = jax.jacrev(lambda *e: convnet_by_hand(p, stats, xi, *e)[0], argnums=(0, 1, 2))(*zeros)
    def with_bn(scale, bias):
      return convnet_by_hand({**p, "bn": {"scale": scale, "bias": bias}}, stats, xi, *zeros)[0]
    return acts, jac, jax.jacrev(with_bn, argnums=(0, 1))(p["bn"]["scale"], p["bn"]["bias"])

  ones = lambda a: np.concatenate([a, np.ones((a.shape[0], 1))], 1)  # noqa: E731
  out = []
  for xi in x:
    acts, jac, (js, jb) = jax.tree.map(lambda v: np.asarray(v, np.float64), per_example(xi))
    a = {"conv1": ones(acts[0]), "conv2": acts[1], "head": ones(acts[2][None])}
    g = {k: j.reshape(2, -1, sizes[k][1]) for k, j in zip(sizes, jac)}
    out.append((a, g, {"bn/scale": js, "bn/bias": jb}))
  return out


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


class WithTemperature(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="dense")(x) * self.param("temperature", nn.initializers.ones, ())


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
    (WithTemperature(), (3,), "'temperature' is not the kernel/bias"),
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


def test_ntk_approximation_brute_force():
  """K̃ = Σ_l (ā·ā')(ĝ·ĝ') + BatchNorm Gram + same-example fluctuation Gram, from explicit quantities;
  and K̃ = K exactly for an MLP (every layer has T = 1)."""
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(8).normal(size=(N, 7, 7, 2)), jnp.float32)
  v = filled(model, x)
  per_example = convnet_per_example(v, x)
  expected = np.zeros((N, 2, N, 2))
  for n, (a, g, d) in enumerate(per_example):
    for m, (a2, g2, d2) in enumerate(per_example):
      for k in a:
        expected[n, :, m] += (a[k].mean(0) @ a2[k].mean(0)) * g[k].sum(1) @ g2[k].sum(1).T
      for leaf in d:
        expected[n, :, m] += d[leaf] @ d2[leaf].T
    for k in a:
      jac_dev = [(a[k] - a[k].mean(0)).T @ (gc - gc.mean(0)) for gc in g[k]]  # Σ_t ã_t g̃_ctᵀ
      expected[n, :, n] += [[np.sum(jc * jk) for jk in jac_dev] for jc in jac_dev]
  got = kfac.ntk_approximation(model.apply, v, x, paths(v["params"]), batch_size=2)
  np.testing.assert_allclose(got, expected.reshape(2 * N, 2 * N), rtol=1e-4, atol=1e-5)

  model = MLP()
  x = jnp.asarray(np.random.default_rng(9).normal(size=(N, 5)), jnp.float32)
  v = filled(model, x)
  jac = jax.vmap(jax.jacfwd(lambda p, xi: model.apply({"params": p}, xi[None])[0]),
                 in_axes=(None, 0))(v["params"], x)
  flat = np.concatenate([np.asarray(j).reshape(N * 3, -1) for j in jax.tree.leaves(jac)], axis=1)
  np.testing.assert_allclose(kfac.ntk_approximation(model.apply, v, x, paths(v["params"])),
                             flat @ flat.T, rtol=1e-4, atol=1e-5)
