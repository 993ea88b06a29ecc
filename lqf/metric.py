"""Ridge in a curvature metric: the penalty (λ/2)·δᵀMδ of the LQF objective, M from a preconditioner.

The generalized LQF objective (`lqf.losses`; plain LQF: t_i = s·e_{y_i}, c_i = 1)

  L_M(δ) = 1/(2N) Σ_i c_i ‖f0_i + J_iδ − t_i‖² + (λ/2) δᵀMδ,    (JᵀCJ/N + λM) δ* = JᵀC(T − f0)/N,

with M symmetric and M ⪰ μI (μ > 0). ``metric=None`` everywhere means M = I (Euclidean ridge, the plain
objective). A registered preconditioner (`lqf.preconditioners`) models H₀ = JᵀCJ/N at w0 by a curvature
H̃₀ and applies (H̃₀ + μI)⁻¹ in closed form; its metric is that damped curvature, M = H̃₀ + μI, in the same
closed form — K-FAC: (A + π√μI) ⊗ (G + √μ/π I) per layer and d + μ per diagonal leaf (`lqf.kfac`);
Nyström: U(Λ̂ + μ)Uᵀ + (ρ + μ)(I − UUᵀ) (`lqf.nystrom`) — so M and M⁻¹ each cost one preconditioner
application, and M ⪰ μI (every eigenvalue of H̃₀ is ≥ 0).

Why this penalty: gradient descent on the data term preconditioned by M⁻¹, δ ← δ − ηM⁻¹∇, from δ = 0,
passes the least-squares solution along each generalized eigenvector (H₀v = σMv) through the filter
1 − (1 − ησ)^t after t steps; ridge in the metric M with penalty γ passes it through σ/(σ + γ). Both keep
σ ≫ 1/(ηt) and damp σ ≪ 1/(ηt) in proportion to σ, so early-stopped preconditioned descent behaves like
ridge in its preconditioner's metric with γ ≈ 1/(ηt) — not like Euclidean ridge, whose optimum lies in the
range of Jᵀ (δ* = Jᵀα). Ridge in K-FAC's metric leaves that range as K-FAC's steps do: δ* = M⁻¹JᵀC^½α.
Measured (README, "Which model is certified"): its optimum matches or beats the 40-step K-FAC fit.

Kernel form: with δ = M^-½u the objective is ordinary ridge in u with Jacobian J M^-½, so everything of the
Euclidean problem holds with the kernel

  K_M = J M⁻¹ Jᵀ:   (C^½K_MC^½ + NλI)α = C^½(T − f0),   δ* = M⁻¹JᵀC^½α,

and the leave-one-out, influence, forgetting and mislabel formulas of `lqf.influence`, `lqf.forget` and
`lqf.mislabel` apply to K_M unchanged. Since JᵀCJ/N + λM ⪰ λμI, a residual r = b − Hδ bounds the distance
to the optimum: ‖δ − δ*‖ ≤ ‖r‖/(λμ) (`floor`).

M is computed from the training inputs (K-FAC's A and G, the sketch's Jacobians; never from the labels):
forgetting a set S from the optimum of the retained examples under the same M (`lqf.forget`) leaves S's
inputs in M. To forget them too, compute M from the retained inputs and solve again.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import optax

from lqf import losses, preconditioners

Params = Any


class Metric(NamedTuple):
  """M of the penalty (λ/2)δᵀMδ (module docstring).

  Attributes:
    product: v ↦ Mv on pytrees like δ.
    inverse: v ↦ M⁻¹v.
    floor: μ > 0 with M ⪰ μI.
  """
  product: Callable[[Params], Params]
  inverse: Callable[[Params], Params]
  floor: float


def of(curvature: Any, damping: float) -> Metric:
  """The metric M = H̃₀ + μI of a registered preconditioner's ``curvature`` (K-FAC factors, a Nyström
  sketch, …, computed at w0: `lqf.fit.curvature_of`), μ = ``damping`` > 0."""
  if not damping > 0:
    raise ValueError(f"metric damping={damping!r} must be > 0 (M ⪰ damping·I): use e.g. 1e-3.")
  preconditioner = preconditioners.of(curvature)
  return Metric(preconditioner.metric(curvature, damping), preconditioner.inverse(curvature, damping),
                float(damping))


def penalty(delta: Params, weight_decay: float, metric: Metric | None = None) -> jnp.ndarray:
  """(λ/2)·δᵀMδ (M = I for ``metric=None``: `lqf.losses.weight_decay`, (λ/2)‖δ‖²)."""
  if metric is None:
    return losses.weight_decay(delta, weight_decay)
  return 0.5 * weight_decay * optax.tree_utils.tree_vdot(delta, metric.product(delta))


def product(metric: Metric | None, v: Params) -> Params:
  """Mv (v for ``metric=None``)."""
  return v if metric is None else metric.product(v)


def inverse(metric: Metric | None, v: Params) -> Params:
  """M⁻¹v (v for ``metric=None``)."""
  return v if metric is None else metric.inverse(v)


def preconditioner(metric: Metric | None) -> Callable[[Params], Params] | None:
  """v ↦ M⁻¹v, the preconditioner that makes CG on (H₀ + λM)δ = b plain CG on the ordinary ridge problem
  in u = M^½δ; None (plain CG) for M = I."""
  return None if metric is None else metric.inverse


def floor(metric: Metric | None) -> float:
  """μ with M ⪰ μI (1 for ``metric=None``)."""
  return 1.0 if metric is None else metric.floor
