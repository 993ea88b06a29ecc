"""fit_linearized vs dense closed forms: the K-FAC optimum, first steps of SGD (MSE/CE, minibatch)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from lqf import fit, guard, influence, losses, preconditioners, solve
from lqf import linearize as lin_lib
from support import LAM, SCALE, SIX_LABELS, dense_objective, options, plain, small_problem

N = len(SIX_LABELS)


@pytest.fixture(scope="module")
def problem(six_examples):
  """(lin, variables, features, labels, J (N·C, P) float64, unravel) on N = 6 images."""
  return six_examples


@pytest.mark.parametrize("preconditioner, steps, gap", [("kfac", 40, 1e-3), ("none", 30, 1e-6),
                                                     ("nystrom", 3, 1e-6)])
def test_quadratic_steps_reach_the_optimum(problem, preconditioner, steps, gap):
  """K-FAC with the exact step size and momentum, without preconditioner (= CG) and with the Nyström
  sketch (exact here: rank 128 ≥ N·C = 18, so M = H⁻¹ and the first step lands on δ*) reach the
  dense optimum.

  (K-FAC is faster early and slower in the tail here: 3.7k parameters, 18 residuals, see lqf.solve.)
  """
  lin, variables, features, labels, jac, _ = problem
  z = (SCALE * np.eye(3)[np.asarray(labels)] - np.asarray(features.f0, np.float64)).reshape(-1)
  optimum = np.linalg.solve(jac.T @ jac / N + LAM * np.eye(jac.shape[1]), jac.T @ z / N)
  best, start = (dense_objective(jac, features, labels, d) for d in (optimum, 0 * optimum))
  delta, history = fit.fit_linearized(lin, variables, features, plain(labels),
                                      options(preconditioner=preconditioner, steps=steps))
  got = dense_objective(jac, features, labels, np.asarray(ravel_pytree(delta)[0], np.float64))
  assert got - best <= gap * (start - best)
  np.testing.assert_allclose(history["loss"][0], start, rtol=1e-5)
  assert np.all(np.diff(history["loss"]) <= 1e-6 * start)  # exact line search: monotone


@flax.struct.dataclass
class JacobiDiagonal:
  """diag(H₀) = (1/N) Σ_i c_i Σ_c (∂f_c(x_i)/∂δ)², a pytree like δ."""
  diagonal: Any


def _jacobi_compute(lin, variables, h, weights, options):
  del options
  c = jnp.ones(h.shape[0]) if weights is None else weights
  jac = influence.jacobian(lin, variables, h)            # leaves (N, C, *leaf)
  return JacobiDiagonal(jax.tree.map(lambda j: jnp.einsum("n,nc...->...", c, j ** 2) / h.shape[0], jac))


def _jacobi_inverse(curvature, damping):
  inverse = jax.tree.map(lambda d: 1.0 / (d + damping), curvature.diagonal)
  return lambda v: jax.tree.map(jnp.multiply, v, inverse)


def _jacobi_metric(curvature, damping):
  damped = jax.tree.map(lambda d: d + damping, curvature.diagonal)
  return lambda v: jax.tree.map(jnp.multiply, v, damped)


def _jacobi_transform(curvature, damping):
  apply = _jacobi_inverse(curvature, damping)
  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda updates, state, params=None: (apply(updates), state))


if "jacobi" not in preconditioners.names():  # a new preconditioner: one object and one line
  preconditioners.register("jacobi", preconditioners.Preconditioner(
      JacobiDiagonal, _jacobi_compute, _jacobi_inverse, _jacobi_metric, _jacobi_transform))


def test_a_registered_preconditioner_serves_the_fit_and_the_solve(problem):
  """A Jacobi preconditioner added through `lqf.preconditioners.register` (this file): its diagonal is
  the dense one, the exact solve it preconditions lands on the dense optimum, and the fit with the exact
  step along it (= Jacobi-PCG) decreases the objective monotonically towards it."""
  lin, variables, features, labels, jac, _ = problem
  z = (SCALE * np.eye(3)[np.asarray(labels)] - np.asarray(features.f0, np.float64)).reshape(-1)
  optimum = np.linalg.solve(jac.T @ jac / N + LAM * np.eye(jac.shape[1]), jac.T @ z / N)
  jacobi = options(preconditioner="jacobi", steps=40)
  curvature = fit.curvature_of(jacobi, lin, variables, features.h)
  dense_diagonal = np.sum(jac ** 2, axis=0) / N
  np.testing.assert_allclose(ravel_pytree(curvature.diagonal)[0], dense_diagonal, rtol=1e-5,
                             atol=1e-6 * dense_diagonal.max())
  delta, info = solve.solve_linearized(lin, variables, features, plain(labels), weight_decay=LAM,
                                       method="parameter", curvature=curvature, tol=1e-6, maxiter=500)
  hess, rhs = jac.T @ jac / N + LAM * np.eye(jac.shape[1]), jac.T @ z / N
  x = np.asarray(ravel_pytree(delta)[0], np.float64)
  true_residual = np.linalg.norm(rhs - hess @ x) / np.linalg.norm(rhs)
  assert info.relative_residual < 1e-5 and true_residual < 2e-5  # 1e-5 + float32 rounding of H·δ
  assert np.linalg.norm(x - optimum) <= true_residual * np.linalg.norm(rhs) / LAM  # H ⪰ λI
  best, start = (dense_objective(jac, features, labels, d) for d in (optimum, 0 * optimum))
  delta, history = fit.fit_linearized(lin, variables, features, plain(labels), jacobi)
  got = dense_objective(jac, features, labels, np.asarray(ravel_pytree(delta)[0], np.float64))
  assert got - best <= 1e-2 * (start - best)
  assert np.all(np.diff(history["loss"]) <= 1e-6 * start)
  with pytest.raises(ValueError, match="preconditioner name 'kfac' is taken"):
    preconditioners.register("kfac", preconditioners.get("jacobi"))


def test_second_fit_reuses_the_compiled_step(problem):
  lin, variables, features, labels, _, _ = problem
  fit.fit_linearized(lin, variables, features, plain(labels), options(steps=2))
  compiled = fit.full_batch_step._cache_size()
  fit.fit_linearized(lin, variables, features, plain(labels), options(steps=2))
  assert fit.full_batch_step._cache_size() == compiled


def test_sqrt_curvature_squares_to_the_hessian(problem):
  lin, variables, features, _, jac, unravel = problem
  _, jvp = lin_lib.jit_tangent(lin, variables, features.h)
  v = np.random.default_rng(0).normal(size=jac.shape[1])
  s_v = fit.sqrt_curvature(jvp, LAM)(unravel(jnp.asarray(v, jnp.float32)))
  hessian = jac.T @ jac / N + LAM * np.eye(jac.shape[1])
  np.testing.assert_allclose(sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(s_v)), v @ hessian @ v,
                             rtol=1e-4)


def random_targets(seed=9):
  """`WeightedTargets` with random t (N, 3) and c (N,) in [0.5, 6]."""
  rng = np.random.default_rng(seed)
  return losses.WeightedTargets(jnp.asarray(rng.normal(size=(N, 3)) * 5, jnp.float32),
                                jnp.asarray(rng.uniform(0.5, 6.0, N), jnp.float32))


def test_weighted_sqrt_curvature_squares_to_the_weighted_hessian(problem):
  lin, variables, features, _, jac, unravel = problem
  _, jvp = lin_lib.jit_tangent(lin, variables, features.h)
  weights = random_targets().weights
  v = np.random.default_rng(0).normal(size=jac.shape[1])
  s_v = fit.sqrt_curvature(jvp, LAM, weights)(unravel(jnp.asarray(v, jnp.float32)))
  c = np.repeat(np.asarray(weights, np.float64), 3)
  hessian = jac.T @ (c[:, None] * jac) / N + LAM * np.eye(jac.shape[1])
  np.testing.assert_allclose(sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(s_v)), v @ hessian @ v,
                             rtol=1e-4)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unit_weights_step_like_the_plain_problem(problem, loss):
  """c = 1 given explicitly (the weighted code path) takes the step of weights=None (no weighting)."""
  lin, variables, features, labels, _, _ = problem
  ones = plain(labels)._replace(weights=jnp.ones(N, jnp.float32))
  deltas = [ravel_pytree(fit.fit_linearized(
      lin, variables, features, t, options(loss=loss, preconditioner="none", optimizer="sgd",
                                           learning_rate=0.1, steps=1))[0])[0] for t in (plain(labels), ones)]
  np.testing.assert_allclose(deltas[1], deltas[0], rtol=1e-5, atol=1e-7 * np.abs(deltas[0]).max())


@pytest.mark.parametrize("batch_size", [None, 4])
def test_first_weighted_sgd_step_is_the_dense_gradient(problem, batch_size):
  """∇ of 1/(2B) Σ_i c_i ‖f0_i + J_iδ − t_i‖² at δ = 0 is Jᵀ C (f0 − T)/B, over the step's batch."""
  lin, variables, features, _, jac, _ = problem
  targets = random_targets()
  idx = np.arange(N) if batch_size is None else np.random.default_rng(3).permutation(N)[:batch_size]
  cotangent = (np.asarray(targets.weights, np.float64)[idx, None]
               * (np.asarray(features.f0, np.float64) - np.asarray(targets.targets, np.float64))[idx])
  rows = (idx[:, None] * 3 + np.arange(3)).reshape(-1)
  grad = jac[rows].T @ cotangent.reshape(-1) / len(idx)
  delta, _ = fit.fit_linearized(lin, variables, features, targets,
                                options(preconditioner="none", optimizer="sgd", learning_rate=0.1, steps=1,
                                        batch_size=batch_size), seed=3)
  np.testing.assert_allclose(ravel_pytree(delta)[0], -0.1 * grad, rtol=1e-4,
                             atol=1e-6 * np.abs(grad).max())


@pytest.mark.parametrize("loss, batch_size, weighted", [("mse", None, False), ("ce", None, False),
                                                       ("mse", 4, False), ("ce", None, True)])
def test_first_sgd_step_is_the_dense_gradient(problem, loss, batch_size, weighted):
  """MSE: cotangent f0 − s·e_y; CE: c_i·(softmax(f0) − e_y) with the class of each target."""
  lin, variables, features, labels, jac, _ = problem
  idx = np.arange(N) if batch_size is None else np.random.default_rng(3).permutation(N)[:batch_size]
  f0 = np.asarray(features.f0, np.float64)[idx]
  one_hot = np.eye(3)[np.asarray(labels)[idx]]
  targets = plain(labels)
  if weighted:
    targets = targets._replace(weights=random_targets().weights)
  c = np.asarray(losses.example_weights(targets), np.float64)[idx, None]
  if loss == "mse":
    cotangent = c * (f0 - SCALE * one_hot)
  else:
    cotangent = c * (np.exp(f0) / np.exp(f0).sum(-1, keepdims=True) - one_hot)
  rows = (idx[:, None] * 3 + np.arange(3)).reshape(-1)
  grad = jac[rows].T @ cotangent.reshape(-1) / len(idx)                    # δ = 0: no decay term
  delta, history = fit.fit_linearized(
      lin, variables, features, targets,
      options(loss=loss, preconditioner="none", optimizer="sgd", learning_rate=0.1, momentum=0.9, steps=1,
              batch_size=batch_size), seed=3)
  np.testing.assert_allclose(ravel_pytree(delta)[0], -0.1 * grad, rtol=1e-4,
                             atol=1e-6 * np.abs(grad).max())
  assert history["loss"].shape == (1,)


def test_image_batches_step_like_cached_features(problem):
  """The augmentation path (trunk inside the step) gives the update of the cached-feature path."""
  lin, variables, features, labels, _, _ = problem
  images = small_problem(n=N)[2]
  tx = fit.make_optimizer(options(preconditioner="none", optimizer="sgd", learning_rate=0.1, batch_size=4))
  steps = []
  for inputs, from_images in ((features.h[:4], False), (images[:4], True)):
    state = guard.init(fit.FitState(lin.init_delta(variables), tx.init(lin.init_delta(variables))))
    for _ in range(2):
      state, _ = fit.batch_step(state, (inputs, plain(labels[:4])), variables, LAM, lin=lin, tx=tx,
                                loss="mse", from_images=from_images)
    steps.append(ravel_pytree(state.state.delta)[0])
  np.testing.assert_allclose(steps[1], steps[0], rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(steps[0]).max()) > 0


def test_evaluate_is_argmax_accuracy(problem):
  lin, variables, features, labels, jac, unravel = problem
  d = np.random.default_rng(4).normal(size=jac.shape[1]) * 0.05
  logits = np.asarray(features.f0, np.float64) + (jac @ d).reshape(N, 3)
  expected = np.mean(logits.argmax(-1) == np.asarray(labels))
  assert fit.evaluate(lin, variables, unravel(jnp.asarray(d, jnp.float32)), features,
                      labels) == pytest.approx(expected)
  np.testing.assert_allclose(fit.predict(lin, variables, unravel(jnp.asarray(d, jnp.float32)), features.h,
                                         batch_size=4), logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="ce", optimizer="quadratic"), "optimizer='quadratic' needs the exact quadratic"),
    (dict(optimizer="quadratic", batch_size=4), "optimizer='quadratic' needs the exact quadratic"),
    (dict(optimizer="lbfgs"), "optimizer='lbfgs' is unknown"),
    (dict(preconditioner="shampoo"), "preconditioner='shampoo' is unknown"),
    (dict(loss="hinge"), "loss='hinge' is unknown"),
    (dict(optimizer="adam", learning_rate="auto"), "learning_rate='auto' is the stable step of SGD"),
    (dict(loss="ce", optimizer="sgd", learning_rate="auto"), "learning_rate='auto' is the stable step"),
    (dict(preconditioner="nystrom", optimizer="sgd", batch_size=4, learning_rate="auto"),
     "learning_rate='auto' with preconditioner='nystrom' and minibatches"),
    (dict(optimizer="sgd", learning_rate=0.0), r"learning_rate=0.0 must be a positive number \(e.g. 0.002 or 'auto'\)"),
])
def test_bad_options_are_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    options(**kwargs)


def test_a_preconditioner_needs_its_own_curvature(problem):
  lin, variables, features, _, _, _ = problem
  factors = fit.curvature_of(options(preconditioner="kfac"), lin, variables, features.h)
  with pytest.raises(ValueError, match=r"^preconditioner='nystrom' needs NystromSketch .*got KFACFactors"):
    fit.make_optimizer(options(preconditioner="nystrom", optimizer="sgd"), curvature=factors)


def test_batch_larger_than_the_training_set_is_an_error(problem):
  lin, variables, features, labels, _, _ = problem
  with pytest.raises(ValueError, match="batch_size=99 exceeds the 6 training examples"):
    fit.fit_linearized(lin, variables, features, plain(labels),
                       options(preconditioner="none", optimizer="sgd", batch_size=99))


def test_bad_targets_are_errors(problem):
  lin, variables, features, _, _, _ = problem
  targets = random_targets()
  short = losses.WeightedTargets(targets.targets[:5], targets.weights[:5])
  with pytest.raises(ValueError, match=r"targets must hold t \(6, 3\) and weights \(6,\)"):
    fit.fit_linearized(lin, variables, features, short, options(preconditioner="none"))
  with pytest.raises(ValueError, match="targets.weights must be positive"):
    fit.fit_linearized(lin, variables, features, targets._replace(weights=-targets.weights),
                       options(preconditioner="none"))


def test_a_diverging_fit_stops_and_names_the_learning_rate(problem):
  """The divergence guard (`lqf.guard`) stops a fit whose objective overflows and names the fix."""
  lin, variables, features, labels, _, _ = problem
  with pytest.raises(FloatingPointError, match=r"loss or gradient is NaN or Inf at step \d+: .*lower the "
                                               r"learning rate \(now 1e\+30\)"):
    fit.fit_linearized(lin, variables, features, plain(labels),
                       options(preconditioner="none", optimizer="sgd", learning_rate=1e30, steps=5))
