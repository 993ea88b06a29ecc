"""The exact LQF optimum by preconditioned conjugate gradient, with a residual certificate.

The LQF objective L(δ) = 1/(2N) Σ_i ‖f0_i + J_i δ − s·e_{y_i}‖² + (λ/2)‖δ‖² is minimised where

  (JᵀJ/N + λI) δ = Jᵀ(sY − f0)/N.

`solve_linearized` runs PCG on it with matrix-free products v ↦ Jᵀ(Jv)/N + λv (a jvp through the
linearized tail, then its transpose, over the cached features, in batches if asked) and the damped
K-FAC inverse as preconditioner. The returned `CGInfo` carries the relative residual
‖b − Hδ‖/‖b‖ recomputed with an explicit product (not the CG recursion): the certificate that δ is the
optimum to that accuracy.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqf import kfac
from lqf.linearize import Features, Linearized, jit_tangent, split_batches
from lqf.losses import regression_targets

Params = Any
tree = optax.tree_utils


class CGInfo(NamedTuple):
  """Certificate of a CG solve.

  Attributes:
    iterations: iterations run.
    relative_residual: ‖b − Hx‖/‖b‖ for the returned x, recomputed with an explicit product.
    residual_history: (iterations + 1,) the CG recursion's ‖r_k‖/‖b‖ for k = 0..iterations.
  """
  iterations: int
  relative_residual: float
  residual_history: np.ndarray


@jax.jit
def _cg_move(x, r, p, hp, rz):
  """x += αp, r −= αHp with α = ⟨r, z⟩/⟨p, Hp⟩."""
  alpha = rz / tree.tree_vdot(p, hp)
  return tree.tree_add_scale(x, alpha, p), tree.tree_add_scale(r, -alpha, hp)


@jax.jit
def _cg_direction(r, z, p, rz):
  """p ← z + (⟨r, z⟩_new/⟨r, z⟩_old) p; also returns ⟨r, z⟩_new and ‖r‖."""
  rz_new = tree.tree_vdot(r, z)
  return tree.tree_add_scale(z, rz_new / rz, p), rz_new, tree.tree_norm(r)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, *,
                       precondition: Callable[[Params], Params] | None = None, x0: Params | None = None,
                       tol: float = 1e-4, maxiter: int = 100) -> tuple[Params, CGInfo]:
  """Preconditioned CG for H x = b (H symmetric positive definite) on pytrees.

  Stops when the recursive residual ‖r_k‖ ≤ tol·‖b‖ or after ``maxiter`` iterations; then recomputes
  ‖b − Hx‖ explicitly. The loop runs in Python over jitted updates (pass jitted ``matvec`` and
  ``precondition``): on CPU, XLA runs the weight-gradient convolutions of a Jacobian-transpose product
  ~30× slower inside a while-loop (jax-ml/jax#12868). ``jax.scipy.sparse.linalg.cg`` also reports
  neither iterations nor residuals.

  Args:
    matvec: v ↦ H v.
    b: right-hand side.
    precondition: v ↦ M v with M ≈ H⁻¹ (symmetric positive definite); identity if None.
    x0: initial guess (zeros if None).
    tol: relative residual to reach.
    maxiter: iteration cap.
  """
  precondition = precondition or (lambda v: v)
  x = tree.tree_zeros_like(b) if x0 is None else x0
  r = b if x0 is None else tree.tree_sub(b, matvec(x0))
  b_norm = float(tree.tree_norm(b))
  z = precondition(r)
  p, rz = z, tree.tree_vdot(r, z)
  history = [float(tree.tree_norm(r)) / b_norm]
  while len(history) <= maxiter and history[-1] > tol:
    x, r = _cg_move(x, r, p, matvec(p), rz)
    p, rz, r_norm = _cg_direction(r, precondition(r), p, rz)
    history.append(float(r_norm) / b_norm)
  residual = float(tree.tree_norm(tree.tree_sub(b, matvec(x)))) / b_norm
  return x, CGInfo(len(history) - 1, residual, np.array(history))


@jax.jit
def _transpose_product(jvp: Callable, w0: Params, cotangent: jnp.ndarray) -> Params:
  """Jᵀ·cotangent for the linear map ``jvp`` (a ``jax.tree_util.Partial``) at parameters like w0."""
  return jax.linear_transpose(jvp, w0)(cotangent)[0]


@jax.jit
def _gram_product(jvp: Callable, w0: Params, v: Params, mask: jnp.ndarray) -> Params:
  """Jᵀ(mask·Jv): one Gauss-Newton product over the examples of ``jvp``."""
  return jax.linear_transpose(jvp, w0)(mask[:, None] * jvp(v))[0]


@jax.jit
def _regularized(v: Params, gram_v: Params, n: int, weight_decay: float) -> Params:
  """Gram product / N + λv."""
  return tree.tree_add_scale(tree.tree_scale(1.0 / n, gram_v), weight_decay, v)


_apply_inverse = jax.jit(kfac.apply_inverse)


def normal_equations(lin: Linearized, variables: dict, features: Features, labels: jnp.ndarray, *,
                     target_scale: float, weight_decay: float, batch_size: int | None = None
                     ) -> tuple[Callable[[Params], Params], Params]:
  """The LQF optimality system: (v ↦ Jᵀ(Jv)/N + λv, b = Jᵀ(sY − f0)/N).

  With ``batch_size=None`` the tail is linearized once over all N examples (`Linearized.tangent`) and
  a product costs a tangent pass and its transpose; otherwise the residuals of one batch at a time
  are recomputed in each product (a forward, a tangent and a transposed pass per batch).
  """
  n = labels.shape[0]
  residual = regression_targets(labels, features.f0.shape[-1], target_scale) - features.f0
  w0 = lin.init_delta(variables)
  tangent = functools.partial(jit_tangent, lin)
  if batch_size is None:
    _, jvp = tangent(variables, features.h)
    rhs = _transpose_product(jvp, w0, residual)
    gram = lambda v: _gram_product(jvp, w0, v, jnp.ones((n,)))  # noqa: E731
  else:
    (hs, rs), masks = split_batches((features.h, residual), batch_size)
    jvps = lambda: (tangent(variables, h)[1] for h in hs)  # noqa: E731
    rhs = functools.reduce(tree.tree_add, (_transpose_product(j, w0, m[:, None] * r)
                                           for j, m, r in zip(jvps(), masks, rs)))
    gram = lambda v: functools.reduce(  # noqa: E731
        tree.tree_add, (_gram_product(j, w0, v, m) for j, m in zip(jvps(), masks)))
  return (lambda v: _regularized(v, gram(v), n, weight_decay)), tree.tree_scale(1.0 / n, rhs)


def solve_linearized(lin: Linearized, variables: dict, features: Features, labels: jnp.ndarray, *,
                     target_scale: float = 15.0, weight_decay: float = 1e-3,
                     factors: kfac.KFACFactors | None = None, extra_damping: float = 0.0,
                     tol: float = 1e-4, maxiter: int = 100, batch_size: int | None = None
                     ) -> tuple[Params, CGInfo]:
  """The LQF optimum δ* by PCG, preconditioned with K-FAC when ``factors`` are given.

  Args:
    lin: the linearized model.
    variables: w0.
    features: cached `Features` (h, f0) of the N training examples.
    labels: (N,) integer labels.
    target_scale: s.
    weight_decay: λ (> 0).
    factors: K-FAC factors at w0 (`kfac.curvature_factors`), or None for plain CG.
    extra_damping: added to λ in the preconditioner only (the system keeps λ).
    tol: relative residual to reach.
    maxiter: iteration cap.
    batch_size: examples per Jacobian product, or None for one linearization of all N.

  Returns:
    (δ*, `CGInfo`) — check ``info.relative_residual``.
  """
  if weight_decay <= 0:
    raise ValueError(f"weight_decay={weight_decay} must be > 0 for a unique optimum: use e.g. 1e-3.")
  matvec, rhs = normal_equations(lin, variables, features, labels, target_scale=target_scale,
                                 weight_decay=weight_decay, batch_size=batch_size)
  precondition = None
  if factors is not None:
    inverse = kfac.kfac_inverse(factors, weight_decay + extra_damping)
    precondition = functools.partial(_apply_inverse, inverse)
  return conjugate_gradient(matvec, rhs, precondition=precondition, tol=tol, maxiter=maxiter)
