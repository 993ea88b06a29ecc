"""Step rules for the exact LQF quadratic, to chain after a preconditioner (`lqf.preconditioners`).

The LQF objective is an exact quadratic in δ with constant curvature H = SᵀS (for LQF S·v = (J v/√N, √λ v)),
so the step along a direction can be chosen by minimising the objective itself instead of a learning rate:
`quadratic_model_step` picks the step α and momentum β of each update by minimising L(δ + αu + βm) exactly
(Martens & Grosse 2015, §7); with a fixed preconditioner this is preconditioned conjugate gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


class QuadraticStepState(NamedTuple):
  """State of `quadratic_model_step`: the previous update m and S·m (S the curvature square root)."""
  previous: Params
  sqrt_curvature_previous: Any


def quadratic_model_step(sqrt_curvature_like: Any) -> optax.GradientTransformationExtraArgs:
  """Step size and momentum from the exact quadratic model (Martens & Grosse 2015, §7).

  For an objective that is exactly quadratic with Hessian H = SᵀS, given a direction u (the incoming
  updates, e.g. the K-FAC preconditioned gradient), the gradient g and the previous update m, the
  update is αu + βm with (α, β) minimising L(δ + αu + βm) exactly:

    [uᵀHu  uᵀHm] [α]     [gᵀu]
    [uᵀHm  mᵀHm] [β] = − [gᵀm]      (pseudo-inverse when m = 0 or m ∥ u).

  uᵀHu = ‖Su‖², uᵀHm = ⟨Su, Sm⟩, mᵀHm = ‖Sm‖², and S(αu + βm) = αSu + βSm is kept in the state, so a
  step costs one product S·u. For LQF S·v = (J v/√N, √λ v) — one jvp — and with a fixed
  preconditioner this is preconditioned conjugate gradient on the quadratic.

  Args:
    sqrt_curvature_like: a pytree of arrays or ``jax.ShapeDtypeStruct`` shaped like S·v (e.g.
      ``jax.eval_shape(sqrt_curvature, params)``), to initialise S·m = 0.

  Extra arguments of ``update``: ``grad`` (the gradient g, a pytree like the params) and
  ``sqrt_curvature`` (a callable v -> S·v).
  """
  def init_fn(params):
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sqrt_curvature_like)
    return QuadraticStepState(optax.tree_utils.tree_zeros_like(params), zeros)

  def update_fn(updates, state, params=None, *, grad, sqrt_curvature):
    del params
    vdot = optax.tree_utils.tree_vdot
    su, sm, m = sqrt_curvature(updates), state.sqrt_curvature_previous, state.previous
    quad = jnp.array([[vdot(su, su), vdot(su, sm)], [vdot(su, sm), vdot(sm, sm)]])
    lin = jnp.array([vdot(grad, updates), vdot(grad, m)])
    # Solve in the basis (u, m) scaled to unit curvature, so the pseudo-inverse's cutoff is relative to
    # O(1) values whatever the norms of u and m (m = 0 at the first step gives β = 0).
    diag = jnp.diagonal(quad)
    scale = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
    quad_scaled = quad * scale[:, None] * scale[None, :]
    alpha, beta = -scale * (jnp.linalg.pinv(quad_scaled, hermitian=True) @ (scale * lin))
    step = jax.tree.map(lambda u, p: alpha * u + beta * p, updates, m)
    s_step = jax.tree.map(lambda u, p: alpha * u + beta * p, su, sm)
    return step, QuadraticStepState(step, s_step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def quadratic_state(opt_state: Any) -> QuadraticStepState:
  """The `QuadraticStepState` inside a chained optimizer state, found by its type (one, anywhere)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, QuadraticStepState))
           if isinstance(s, QuadraticStepState)]
  if len(found) != 1:
    raise ValueError(f"the optimizer state holds {len(found)} quadratic_model_step states, not one.")
  return found[0]
