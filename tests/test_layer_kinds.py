"""K-FAC on any Flax model: each layer kind's per-example quantities against ``jax.grad``, its factors against
a dense float64 Gauss-Newton block, and the diagonal fallback (with its one warning)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lqf import kfac, layers
from lqf.precision import exact
from support import filled, paths

EPS = float(np.finfo(np.float32).eps)


class Tokens(nn.Module):
  """Token sequences (B, L, d): a position embedding, LayerNorm, attention (DenseGeneral q/k/v/out), a
  Dense over the tokens, a Dense head on their mean."""

  @nn.compact
  def __call__(self, x):
    x = x + self.param("pos", nn.initializers.normal(0.5), x.shape[1:])
    y = nn.LayerNorm(name="ln")(x)
    x = x + nn.MultiHeadDotProductAttention(2, name="attention")(y, y)
    x = nn.leaky_relu(nn.Dense(6, name="mlp")(x), 0.1)
    return nn.Dense(3, name="head")(x.mean(axis=1))


class Projections(nn.Module):
  """One example, one position (T = 1): DenseGeneral to features (2, 3), back over both axes, a Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(nn.DenseGeneral((2, 3), name="split")(x), 0.1)
    x = nn.leaky_relu(nn.DenseGeneral(4, axis=(-2, -1), name="merge")(x), 0.1)
    return nn.Dense(3, name="head")(x)


class OnePatch(nn.Module):
  """A 3×3 convolution with one output position (VALID on a 3×3 input), then a Dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(nn.Conv(4, (3, 3), padding="VALID", name="conv")(x), 0.1)
    return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def _matrix(flat, layer):
  """A Kronecker layer's kernel (+ bias row) as the matrix (in_dim, out_dim)."""
  rows = [flat[f"{layer.name}/{leaf}"].reshape(-1, layer.out_dim) for leaf in layer.leaves]
  return jnp.concatenate(rows, axis=0)


def test_each_kind_gives_the_kernel_gradient():
  """Σ_t a_t g_ctᵀ = ∂f_c/∂W for Dense over tokens, the DenseGeneral projections of attention (L = 4
  positions) and the head, per example and class; tolerance: float32 rounding of the sum over t."""
  model = Tokens()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4)), jnp.float32)
  v = filled(model, x)
  trainable = frozenset(paths(v["params"]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the fallback's warning: its own test
    found = layers.find_layers(model.apply, v, x[:1], trainable)
  kron = {l.name: l for l in found if l.kind == "kronecker"}
  assert set(kron) == {"attention/query", "attention/key", "attention/value", "attention/out", "mlp", "head"}
  assert kron["attention/query"].positions == 4 and kron["attention/out"].in_dim == 4 + 1
  quantities = jax.jit(exact(layers.per_example_quantities), static_argnums=(0, 2))
  gradients = jax.jit(exact(jax.jacrev(lambda p, xi: model.apply({"params": p}, xi[None])[0])))
  for xi in x:
    a, g, _ = quantities(model.apply, v, tuple(found), xi, jnp.eye(3))
    flat = traverse_util.flatten_dict(gradients(v["params"], xi), sep="/")  # leaves (C, *shape)
    for c in range(3):
      for name, layer in kron.items():
        got = np.einsum("td,te->de", a[name], g[name][c], dtype=np.float64)
        bound = 8 * layer.positions * EPS * np.einsum("td,te->de", np.abs(a[name]), np.abs(g[name][c]))
        expected = _matrix({k: w[c] for k, w in flat.items()}, layer)
        np.testing.assert_array_less(np.abs(got - np.asarray(expected)), bound + 1e-30)


@pytest.mark.parametrize("model, shape, names", [
    (Projections(), (5,), {"split", "merge", "head"}),
    (OnePatch(), (3, 3, 2), {"conv", "head"}),
])
def test_factors_equal_the_dense_block_for_one_position(model, shape, names):
  """One example at T = 1: A ⊗ G is the layer's Gauss-Newton block Σ_c J_cᵀJ_c exactly (DenseGeneral with
  features (2, 3), DenseGeneral over axes (-2, -1), Conv, Dense); J by ``jax.jacfwd``, products in float64."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, *shape)), jnp.float32)
  v = filled(model, x)
  factors = kfac.curvature_factors(model.apply, v, x, paths(v["params"]))
  jac = exact(jax.jacfwd(lambda p: model.apply({"params": p}, x)[0]))(v["params"])
  flat = traverse_util.flatten_dict(jac, sep="/")
  for name, (a, g) in factors.kronecker.items():
    out = g.shape[0]
    j = np.concatenate([np.asarray(flat[f"{name}/{leaf}"], np.float64).reshape(3, -1, out)
                        for leaf in ("kernel", "bias")], axis=1).reshape(3, -1)  # (C, rows·out)
    block = j.T @ j
    kron = np.kron(np.asarray(a, np.float64), np.asarray(g, np.float64))
    np.testing.assert_allclose(kron, block, rtol=0, atol=64 * EPS * np.abs(block).max())
  assert set(factors.kronecker) == names and not factors.diagonal


def test_parameters_of_other_layers_get_the_gauss_newton_diagonal_and_one_warning():
  """LayerNorm scale/bias and a position embedding: diagonal blocks (1/N) Σ_i Σ_c (∂f_ic/∂θ)², equal to the
  diagonal of the dense JᵀJ/N (float64 products); the warning is one line naming a parameter."""
  model = Tokens()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 4)), jnp.float32)
  v = filled(model, x)
  trainable = ["pos", "ln/scale", "ln/bias", "head/kernel"]
  with pytest.warns(UserWarning) as record:
    factors = kfac.curvature_factors(model.apply, v, x, trainable)
  message = str(record[0].message)
  assert "\n" not in message and "'ln/bias'" in message and "3 trainable parameters" in message
  assert set(factors.diagonal) == {"pos", "ln/scale", "ln/bias"} and set(factors.kronecker) == {"head"}
  jac = jax.jit(exact(jax.jacfwd(lambda p: model.apply({"params": p}, x))))(v["params"])
  flat = traverse_util.flatten_dict(jac, sep="/")
  for path, diagonal in factors.diagonal.items():
    j = np.asarray(flat[path], np.float64)  # (N, C, *leaf)
    expected = (j ** 2).sum(axis=(0, 1)) / len(x)
    np.testing.assert_allclose(diagonal, expected, rtol=0, atol=16 * EPS * np.abs(expected).max())
