"""The Kronecker-structured NTK approximation vs explicit per-example quantities and the exact NTK."""

import jax
import jax.numpy as jnp
import numpy as np

from lqf import ntk
from support import ConvNet, convnet_per_example, filled, MLP, N, paths


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
  got = ntk.ntk_approximation(model.apply, v, x, paths(v["params"]), batch_size=2)
  np.testing.assert_allclose(got, expected.reshape(2 * N, 2 * N), rtol=1e-4, atol=1e-5)

  model = MLP()
  x = jnp.asarray(np.random.default_rng(9).normal(size=(N, 5)), jnp.float32)
  v = filled(model, x)
  jac = jax.vmap(jax.jacfwd(lambda p, xi: model.apply({"params": p}, xi[None])[0]),
                 in_axes=(None, 0))(v["params"], x)
  flat = np.concatenate([np.asarray(j).reshape(N * 3, -1) for j in jax.tree.leaves(jac)], axis=1)
  np.testing.assert_allclose(ntk.ntk_approximation(model.apply, v, x, paths(v["params"])),
                             flat @ flat.T, rtol=1e-4, atol=1e-5)
