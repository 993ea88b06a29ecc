"""ResNet8 linearized around w0: f_lin(·; 0) = f(·; w0), second-order Taylor error, paths agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lqf import kfac
from lqf import linearize as lin_lib
from support import TAIL, random_delta, small_problem


def test_trainable_mask_and_split():
  model, variables, _ = small_problem()
  mask = traverse_util.flatten_dict(lin_lib.trainable_mask(variables["params"], TAIL), sep="/")
  assert mask["stage3/block1/conv2/kernel"] and mask["head/bias"]
  assert not mask["stage2/block1/conv1/kernel"]
  lin = lin_lib.linearize(model, variables, TAIL)
  assert lin.split == "stage3/block1"
  assert set(lin.trainable_paths) == {k for k, m in mask.items() if m}
  assert lin_lib.linearize(model, variables, "all").split == "stem"
  assert lin_lib.linearize(model, variables, "^head/").split == "head"
  with pytest.raises(ValueError, match="matches no parameter"):
    lin_lib.trainable_mask(variables["params"], "^stage9/")


@pytest.mark.parametrize("trainable", [TAIL, "all"])
def test_zero_offset_and_cached_path(trainable):
  model, variables, x = small_problem()
  lin = lin_lib.linearize(model, variables, trainable)
  features = lin.features(variables, x, 3)  # two batches: 3 + 1 (padded to 3)
  f = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(features.f0, f, rtol=1e-5, atol=1e-5)
  apply = jax.jit(lin.apply)
  np.testing.assert_allclose(apply(lin.init_delta(variables), variables, features.h), f,
                             rtol=1e-5, atol=1e-5)
  delta = random_delta(lin, variables)
  cached = apply(delta, variables, features.h)
  np.testing.assert_allclose(cached, jax.jit(lin.apply_images)(delta, variables, x), rtol=1e-5,
                             atol=1e-5)
  f0, jvp = lin_lib.jit_tangent(lin, variables, features.h)
  # The transpose of the tangent map is its adjoint: <Jᵀr, δ> = <r, Jδ>.
  r = jnp.asarray(np.random.default_rng(3).normal(size=f0.shape), jnp.float32)
  jd, jt_r = jax.jit(lambda j, d, r: (j(d), jax.linear_transpose(j, d)(r)[0]))(jvp, delta, r)
  np.testing.assert_allclose(f0 + jd, cached, rtol=1e-5, atol=1e-4)
  lhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(jt_r), jax.tree.leaves(delta)))
  np.testing.assert_allclose(lhs, jnp.vdot(r, jd), rtol=1e-4)


@pytest.mark.parametrize("trainable", [TAIL, "all"])
def test_taylor_error_is_second_order(trainable):
  """f(w0 + εδ) − f_lin(εδ) = ½ε²·D²f(w0)[δ, δ] + O(ε³).

  Slope 1 makes the activations linear, so f is a smooth polynomial in w (products of weights and
  BatchNorm scales) and Taylor's theorem applies without kinks; the leaky network's first order is
  checked in `test_first_order_with_kinks`.
  """
  model, variables, x = small_problem(negative_slope=1.0)
  lin = lin_lib.linearize(model, variables, trainable)
  h = lin.trunk(variables, x)
  delta = random_delta(lin, variables)
  second = jax.jvp(lambda w: jax.jvp(lin.tail_fn(variables, h), (w,), (delta,))[1],
                   (lin_lib.select(variables["params"], lin.trainable_paths),), (delta,))[1]
  assert float(jnp.linalg.norm(second)) > 1.0  # the network is not linear in w: the check has teeth
  ratios = []
  for eps in (4e-3, 2e-3, 1e-3):  # float32: below 1e-3 rounding of the logits dominates ε²
    d = jax.tree.map(lambda a: eps * a, delta)
    error = model.apply(lin.merge(variables, d), x) - lin.apply(d, variables, h)
    deviation = jnp.linalg.norm(error / eps ** 2 - 0.5 * second)
    assert float(deviation) < 0.08 * float(jnp.linalg.norm(0.5 * second))
    ratios.append(float(jnp.linalg.norm(error)) / eps ** 2)
  np.testing.assert_allclose(ratios, ratios[-1], rtol=0.08)


@pytest.mark.parametrize("trainable", [TAIL, "all"])
def test_first_order_with_kinks(trainable):
  """Leaky network (kinks): the error relative to the first-order term ε·Jδ vanishes with ε."""
  model, variables, x = small_problem()
  lin = lin_lib.linearize(model, variables, trainable)
  h = lin.trunk(variables, x)
  delta = random_delta(lin, variables)
  for eps, bound in ((1e-3, 0.1), (1e-4, 0.01)):
    d = jax.tree.map(lambda a: eps * a, delta)
    first = lin.apply(d, variables, h) - model.apply(variables, x)
    error = model.apply(lin.merge(variables, d), x) - lin.apply(d, variables, h)
    assert float(jnp.linalg.norm(error)) < bound * float(jnp.linalg.norm(first))


def test_merge_select_replace():
  model, variables, _ = small_problem()
  lin = lin_lib.linearize(model, variables, TAIL)
  delta = random_delta(lin, variables)
  merged = traverse_util.flatten_dict(lin.merge(variables, delta)["params"], sep="/")
  w0 = traverse_util.flatten_dict(variables["params"], sep="/")
  d = traverse_util.flatten_dict(delta, sep="/")
  for k, v in merged.items():
    np.testing.assert_allclose(v, w0[k] + d[k] if k in d else w0[k])
  selected = lin_lib.select(variables["params"], lin.trainable_paths)
  assert set(traverse_util.flatten_dict(selected, sep="/")) == set(d)


def test_split_batches_pads_and_masks():
  x = jnp.arange(7.0)
  xs, mask = lin_lib.split_batches(x, 3)
  assert xs.shape == (3, 3) and mask.shape == (3, 3)
  np.testing.assert_array_equal(xs.reshape(-1)[:7], x)
  np.testing.assert_array_equal(mask.reshape(-1), [1] * 7 + [0] * 2)


def test_equal_linearizations_share_compiled_programs():
  """Each task of a sweep builds its own model instance and head; equal linearizations must reuse the
  programs jitted with ``lin.tail`` static (a bound method compares its instance by identity: one
  compile per task)."""
  model, variables, x = small_problem()
  other = jax.tree.map(lambda a: a + 0.5, variables)  # a new head (and more): same shapes
  lin_a = lin_lib.linearize(model, variables, TAIL)
  lin_b = lin_lib.linearize(model.clone(), other, TAIL)
  assert lin_a is not lin_b and lin_a.tail == lin_b.tail and hash(lin_a.tail) == hash(lin_b.tail)
  h = lin_a.trunk(variables, x)
  kfac.curvature_factors(lin_a.tail, variables, h, lin_a.trainable_paths)
  compiled = kfac._factor_sums._cache_size()  # pylint: disable=protected-access
  factors = kfac.curvature_factors(lin_b.tail, other, h, lin_b.trainable_paths)
  assert kfac._factor_sums._cache_size() == compiled  # pylint: disable=protected-access
  expected = kfac.curvature_factors(lin_b.tail.__call__, other, h, lin_b.trainable_paths)  # a new program
  for got, want in zip(jax.tree.leaves(factors), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
