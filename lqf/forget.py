"""Certified forgetting: the LQF optimum without a set S of its training examples, from the fitted one.

The LQF objective on N examples (`lqf.losses`; plain LQF: t_i = s·e_{y_i}, c_i = 1)

  L(δ) = 1/(2N) Σ_i c_i ‖f0_i + J_iδ − t_i‖² + (λ/2)‖δ‖²

has the unique optimum δ* with Hδ* = b, H = JᵀCJ/N + λI, b = JᵀC(T − f0)/N. Forgetting S returns the
optimum δ'* of the same objective on the N' = N − |S| retained examples R — what refitting from scratch
with the same λ gives:

  H'δ'* = b',   H' = J_RᵀC_RJ_R/N' + λI,   b' = J_RᵀC_R(T_R − f0_R)/N',

from the fitted optimum instead of from scratch, by one of two algorithms:

* `forget_by_cg`: preconditioned CG on H'δ = b' started at the current δ (a warm start; K-FAC
  factors of the N examples, `lqf.kfac.curvature_factors`, may precondition it: the curvature of the
  retained problem differs from theirs by S's share, and a preconditioner only has to be SPD);
* `forget_by_downdate` (few examples, the `lqf.influence.KernelFit` of the N-example problem): its dual
  is downdated exactly in float64 (`lqf.influence.KernelFit.without`: a Woodbury/Schur-complement
  downdate of the stored A⁻¹ plus the ridge shift N λ → N'λ, no pass over the network), δ'* = J_RᵀC_R^½α'
  (one transposed pass), then plain CG in parameter space from there removes the float32 rounding of
  that product (`lqf.solve.KERNEL_FLOAT32_TOL`).

The certificate is the relative residual ρ = ‖b' − H'δ'‖/‖b'‖ of the NEW normal equations,
recomputed with an explicit product (`lqf.solve.conjugate_gradient`). Since H' ⪰ λI,

  ‖δ' − δ'*‖ ≤ ‖b' − H'δ'‖/λ = ρ‖b'‖/λ     (``distance_bound``),

and δ'* is a function of the retained examples only: the returned δ' is within that distance of a model
that never saw S, and the logits of any input x within ‖J(x)‖ times it.

Every product here runs at ``Precision.HIGHEST`` (`lqf.precision`): the certificate ρ is a float32
residual of order 1e-4, below the rounding of TensorFloat-32 (GPU) or bfloat16 (TPU) products.

With a penalty (λ/2)δᵀMδ in a curvature metric (``metric``, `lqf.metric`) everything above holds with
H' = J_RᵀC_RJ_R/N' + λM, the kernel K_M = J M⁻¹ Jᵀ (δ'* = M⁻¹J_RᵀC_R^½α') and the bound ρ‖b'‖/(λμ)
(H' ⪰ λμI). M stays the one given: computed from all N training inputs, it keeps S's inputs (not their
labels); compute it from the retained inputs and use `forget_by_cg` to remove those as well.

What it does not cover: the early-stopped K-FAC fit (`lqf.fit`, e.g. 40 steps) is not δ*; its iterate
depends on the path through every example, so forgetting S there means rerunning those steps on the
retained set, which is retraining. Forgetting is certified for the exact optimum. For the weighted
FD-LM problem (`compat.fd_lm_targets`) S's terms leave the problem, but the targets of the retained
examples hold an old model's logits, which S may have shaped when that old model was trained.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from lqf import metric as metric_lib
from lqf import solve
from lqf.influence import KernelFit, retained_indices
from lqf.linearize import Features, Linearized
from lqf.losses import WeightedTargets, check_targets
from lqf.precision import exact

Params = Any


class Forgotten(NamedTuple):
  """The optimum without S and its certificate.

  Attributes:
    delta: δ', the optimum of the retained problem to ``relative_residual``.
    retained: (N',) the positions of the retained examples, sorted.
    iterations: CG iterations run.
    relative_residual: ρ = ‖b' − H'δ'‖/‖b'‖ of the retained problem's normal equations.
    distance_bound: ρ‖b'‖/(λμ) ≥ ‖δ' − δ'*‖ (μ = 1 without a metric, `lqf.metric.floor`).
  """
  delta: Params
  retained: np.ndarray
  iterations: int
  relative_residual: float
  distance_bound: float


def retain(features: Features, targets: WeightedTargets,
           indices: np.ndarray) -> tuple[np.ndarray, Features, WeightedTargets]:
  """(retained positions R, the features and targets of R) without the examples at ``indices``."""
  check_targets(targets, features.f0.shape)
  keep = retained_indices(features.f0.shape[0], indices)
  return keep, jax.tree.map(lambda a: a[keep], features), jax.tree.map(lambda a: a[keep], targets)


def _retained_system(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
                     indices: np.ndarray, weight_decay: float, batch_size: int | None,
                     metric: metric_lib.Metric | None):
  """(R, the retained features, v ↦ H'v, b') of the problem without the examples at ``indices``."""
  if weight_decay <= 0:
    raise ValueError(f"weight_decay={weight_decay} must be > 0 for a unique optimum: use e.g. 1e-3.")
  keep, kept, kept_targets = retain(features, targets, indices)
  matvec, rhs = solve.normal_equations(lin, variables, kept, kept_targets, weight_decay=weight_decay,
                                       batch_size=batch_size, metric=metric)
  return keep, kept, matvec, rhs


def _certified(matvec, rhs, keep: np.ndarray, start: Params, precondition, weight_decay: float, tol: float,
               maxiter: int, metric: metric_lib.Metric | None) -> Forgotten:
  """CG on H'δ = b' from ``start``, with the certificate ρ and the bound ρ‖b'‖/(λμ) (module docstring)."""
  delta, info = solve.conjugate_gradient(matvec, rhs, precondition=precondition, x0=start, tol=tol,
                                         maxiter=maxiter)
  bound = (info.relative_residual * float(optax.tree_utils.tree_norm(rhs))
           / (weight_decay * metric_lib.floor(metric)))
  return Forgotten(delta, keep, info.iterations, info.relative_residual, bound)


@exact
def forget_by_cg(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
                 indices: np.ndarray, *, weight_decay: float, delta: Params, curvature: Any = None,
                 tol: float = 1e-4, maxiter: int = 500, batch_size: int | None = None,
                 metric: metric_lib.Metric | None = None) -> Forgotten:
  """The LQF optimum on the training examples not in ``indices``: (preconditioned) CG on the retained
  problem's normal equations, warm-started at the fitted ``delta`` (module docstring).

  Args:
    lin: the linearized model.
    variables: w0.
    features: cached `Features` (h, f0) of the N training examples the optimum was fitted on.
    targets: their `lqf.losses.WeightedTargets` t (N, C), c (N,).
    indices: positions in 0..N−1 of the examples to forget (distinct; not all).
    weight_decay: λ of the problem (also of the retained one).
    delta: the fitted δ on all N (any δ works as a start; the closer to δ*, the fewer iterations).
    curvature: a preconditioner's curvature of the N examples (e.g. K-FAC factors,
      `lqf.preconditioners`), or None: plain CG (preconditioned by M⁻¹ with a ``metric``).
    tol: relative residual ρ to reach.
    maxiter: CG iteration cap.
    batch_size: examples per Jacobian product (None: one linearization of the N' retained examples).
    metric: the penalty's metric M (`lqf.metric`), or None for M = I.

  Returns:
    `Forgotten`: δ', the retained positions, iterations, ρ and the distance bound.
  """
  keep, _, matvec, rhs = _retained_system(lin, variables, features, targets, indices, weight_decay,
                                          batch_size, metric)
  precondition = (metric_lib.preconditioner(metric) if curvature is None else
                  solve.preconditioner(curvature, weight_decay))
  return _certified(matvec, rhs, keep, delta, precondition, weight_decay, tol, maxiter, metric)



@exact
def forget_by_downdate(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
                       indices: np.ndarray, *, kernel: KernelFit, tol: float = 1e-4,
                       maxiter: int = 500, metric: metric_lib.Metric | None = None) -> Forgotten:
  """The LQF optimum on the training examples not in ``indices``, from the problem's ``kernel``
  (`lqf.influence.KernelFit`, whose λ it keeps; built with the same ``metric``): its dual downdated
  exactly in float64, δ' = M⁻¹J_RᵀC_R^½α' by one transposed pass, then CG from that δ' to ``tol``
  (plain, or preconditioned by M⁻¹; module docstring). Arguments and result as `forget_by_cg`."""
  if kernel.alpha.shape != features.f0.shape:
    raise ValueError(f"kernel holds a fit of {kernel.alpha.shape[0]} examples, not of these "
                     f"{features.f0.shape[0]}: pass the KernelFit of this problem.")
  keep, kept, matvec, rhs = _retained_system(lin, variables, features, targets, indices,
                                             kernel.weight_decay, None, metric)
  start = kernel.without(indices).delta(lin, variables, kept.h, metric)
  return _certified(matvec, rhs, keep, start, metric_lib.preconditioner(metric), kernel.weight_decay, tol, maxiter,
                    metric)
