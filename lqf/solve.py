"""The exact LQF optimum by preconditioned conjugate gradient, with a residual certificate.

The LQF objective L(δ) = 1/(2N) Σ_i ‖f0_i + J_i δ − s·e_{y_i}‖² + (λ/2)‖δ‖² is minimised where

  (JᵀJ/N + λI) δ = Jᵀ(sY − f0)/N;

its weighted form 1/(2N) Σ_i c_i ‖f0_i + J_i δ − t_i‖² + (λ/2)‖δ‖² (``targets``,
`lqf.losses.WeightedTargets`, e.g. FD-LM against an old model) where (JᵀCJ/N + λI) δ = JᵀC(T − f0)/N,
C = diag(c_i) (each c_i repeated over the C outputs). Every function here takes the problem's
`lqf.losses.WeightedTargets` (`lqf.losses.one_hot_targets` for the plain one: T = sY, c = 1).

`solve_linearized` runs preconditioned CG with matrix-free Jacobian products (a tangent pass through
the linearized tail and its transpose, over the cached features) in one of two equivalent forms:

* parameter space: v ↦ Jᵀ(Jv)/N + λv, preconditioned with a Nyström sketch of JᵀJ/N
  (`lqf.nystrom`, the default for large problems) or the damped K-FAC inverse (`lqf.kfac`);
* kernel space (few examples): (K + NλI)α = sY − f0 with K = JJᵀ, δ = Jᵀα, preconditioned with a
  K-FAC-structured approximation of the empirical NTK (`kernel_solve`).

Every function here also solves the generalized objective whose penalty is (λ/2)δᵀMδ, M ⪰ μI a
curvature metric (``metric``, `lqf.metric`): (JᵀCJ/N + λM)δ = JᵀC(T − f0)/N in parameter space
(preconditioned by M⁻¹ unless a curvature is given), and in kernel form with K_M = J M⁻¹ Jᵀ,
δ* = M⁻¹JᵀC^½α. ``metric=None`` is M = I.

The returned `CGInfo` carries the relative residual ‖b − Hδ‖/‖b‖ recomputed with an explicit product
of the normal equations (not the CG recursion): the certificate that δ is the optimum to that accuracy.

Precision: every matrix product and convolution here — the iterations, the preconditioners and the
certificate's product — runs at ``Precision.HIGHEST`` whatever the platform's default (`lqf.precision`):
a residual of 1e-4 computed with TensorFloat-32 (GPU) or bfloat16 (TPU) products measures their rounding
(README, "Accelerators").
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqf import losses, ntk, nystrom, preconditioners
from lqf import metric as metric_lib
from lqf.linearize import Features, Linearized, jit_tangent, split_batches
from lqf.losses import WeightedTargets, check_targets, example_weights
from lqf.precision import exact

Params = Any
METHODS = ("auto", "kernel", "parameter")
# Below this relative residual the kernel form's float32 iterate α no longer represents the optimum:
# the residual Jᵀ(z − Aα) amplifies α's rounding by K (the exact α rounded to float32 can already sit
# above 1e-4). `solve_linearized` finishes with CG in parameter space from there (a few iterations).
KERNEL_FLOAT32_TOL = 1e-3
KERNEL_LIMIT = 8192  # N·C up to which "auto" solves in kernel form (memory (N·C)² floats)
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
  """p ← z + (⟨r, z⟩_new/⟨r, z⟩_old) p; also returns ⟨r, z⟩_new."""
  rz_new = tree.tree_vdot(r, z)
  return tree.tree_add_scale(z, rz_new / rz, p), rz_new


@exact
def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, *,
                       precondition: Callable[[Params], Params] | None = None, x0: Params | None = None,
                       tol: float = 1e-4, maxiter: int = 100,
                       norm: Callable[[Params], jnp.ndarray] | None = None) -> tuple[Params, CGInfo]:
  """Preconditioned CG for H x = b (H symmetric positive definite) on pytrees.

  Stops when the recursive residual ‖r_k‖ ≤ tol·‖b‖ or after ``maxiter`` iterations; then recomputes
  ‖b − Hx‖ explicitly. ``norm`` (default: Euclidean) measures residuals, e.g. ‖Jᵀr‖ for the kernel
  form of a least-squares problem. The loop runs in Python over jitted updates (pass jitted
  ``matvec`` and ``precondition``): on CPU, XLA runs the weight-gradient convolutions of a Jacobian-transpose product
  ~30× slower inside a while-loop (jax-ml/jax#12868). ``jax.scipy.sparse.linalg.cg`` also reports
  neither iterations nor residuals. ``matvec`` and ``precondition`` are traced at ``Precision.HIGHEST``
  (`lqf.precision.exact`), like the recomputed residual.

  Args:
    matvec: v ↦ H v.
    b: right-hand side.
    precondition: v ↦ M v with M ≈ H⁻¹ (symmetric positive definite); identity if None.
    x0: initial guess (zeros if None).
    tol: relative residual to reach.
    maxiter: iteration cap.
    norm: residual norm (a jitted callable), Euclidean if None.
  """
  precondition = precondition or (lambda v: v)
  norm = norm or tree.tree_norm
  x = tree.tree_zeros_like(b) if x0 is None else x0
  r = b if x0 is None else tree.tree_sub(b, matvec(x0))
  b_norm = float(norm(b))
  z = precondition(r)
  p, rz = z, tree.tree_vdot(r, z)
  history = [float(norm(r)) / b_norm]
  while len(history) <= maxiter and history[-1] > tol:
    x, r = _cg_move(x, r, p, matvec(p), rz)
    p, rz = _cg_direction(r, precondition(r), p, rz)
    history.append(float(norm(r)) / b_norm)
  residual = float(norm(tree.tree_sub(b, matvec(x)))) / b_norm
  return x, CGInfo(len(history) - 1, residual, np.array(history))


@jax.jit
def _transpose_product(jvp: Callable, w0: Params, cotangent: jnp.ndarray) -> Params:
  """Jᵀ·cotangent for the linear map ``jvp`` (a ``jax.tree_util.Partial``) at parameters like w0."""
  return jax.linear_transpose(jvp, w0)(cotangent)[0]


@jax.jit
def _gram_product(jvp: Callable, w0: Params, v: Params, weights: jnp.ndarray) -> Params:
  """Jᵀ(c·Jv): one Gauss-Newton product over the examples of ``jvp``, weighted per example by c (B,)
  (the example weights times the padding mask)."""
  return jax.linear_transpose(jvp, w0)(weights[:, None] * jvp(v))[0]


@jax.jit
def _regularized(mv: Params, gram_v: Params, n: int, weight_decay: float) -> Params:
  """Gram product / N + λMv."""
  return tree.tree_add_scale(tree.tree_scale(1.0 / n, gram_v), weight_decay, mv)


@exact
def preconditioner(curvature: Any, damping: float) -> Callable[[Params], Params]:
  """v ↦ Mv, M ≈ (H₀ + μI)⁻¹ with μ = ``damping``: the damped inverse of ``curvature`` (K-FAC factors,
  a Nyström sketch, or any registered preconditioner's, `lqf.preconditioners.of`), inverted once here and
  applied at ``Precision.HIGHEST``."""
  return exact(preconditioners.of(curvature).inverse(curvature, damping))


@exact
def normal_equations(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
                     *, weight_decay: float, batch_size: int | None = None,
                     metric: metric_lib.Metric | None = None
                     ) -> tuple[Callable[[Params], Params], Params]:
  """The LQF optimality system: (v ↦ JᵀC(Jv)/N + λMv, b = JᵀC(T − f0)/N) for ``targets`` (T, c) and
  the penalty's ``metric`` M (`lqf.metric`; None: M = I).

  With ``batch_size=None`` the tail is linearized once over all N examples (`Linearized.tangent`) and a
  product costs a tangent pass and its transpose; otherwise the residuals of one batch at a time are
  recomputed in each product (a forward, a tangent and a transposed pass per batch). The products, the
  returned ``matvec``'s included, run at ``Precision.HIGHEST`` (module docstring).
  """
  check_targets(targets, features.f0.shape)
  weights = example_weights(targets)
  n = features.f0.shape[0]
  weighted_residual = weights[:, None] * (targets.targets - features.f0)
  w0 = lin.init_delta(variables)
  tangent = functools.partial(jit_tangent, lin)
  if batch_size is None:
    _, jvp = tangent(variables, features.h)
    rhs = _transpose_product(jvp, w0, weighted_residual)
    gram = lambda v: _gram_product(jvp, w0, v, weights)  # noqa: E731
  else:
    (hs, rs, cs), masks = split_batches((features.h, weighted_residual, weights), batch_size)
    jvps = lambda: (tangent(variables, h)[1] for h in hs)  # noqa: E731
    rhs = functools.reduce(tree.tree_add, (_transpose_product(j, w0, m[:, None] * r)
                                           for j, m, r in zip(jvps(), masks, rs)))
    gram = lambda v: functools.reduce(  # noqa: E731
        tree.tree_add, (_gram_product(j, w0, v, m * c) for j, m, c in zip(jvps(), masks, cs)))
  return (exact(lambda v: _regularized(metric_lib.product(metric, v), gram(v), n, weight_decay)),
          tree.tree_scale(1.0 / n, rhs))


@jax.jit
def _kernel_product(jvp: Callable, w0: Params, root_weights: jnp.ndarray, alpha: jnp.ndarray,
                    ridge: float) -> jnp.ndarray:
  """(C^½KC^½ + NλI)α = √c ⊙ J(Jᵀ(√c ⊙ α)) + Nλα for α (N, C), √c (N, 1)."""
  return root_weights * jvp(_transpose_product(jvp, w0, root_weights * alpha)) + ridge * alpha


@jax.jit
def _dense_precondition(inverse: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
  return (inverse @ r.reshape(-1)).reshape(r.shape)


def _metric_kernel_product(jvp: Callable, w0: Params, root_weights: jnp.ndarray, metric: metric_lib.Metric,
                           alpha: jnp.ndarray, ridge: float) -> jnp.ndarray:
  """(C^½K_MC^½ + NλI)α with K_M = J M⁻¹ Jᵀ (`lqf.metric`)."""
  pulled = metric.inverse(_transpose_product(jvp, w0, root_weights * alpha))
  return _pushed(jvp, pulled, root_weights, alpha, ridge)


@jax.jit
def _pushed(jvp: Callable, v: Params, root_weights: jnp.ndarray, alpha: jnp.ndarray,
            ridge: float) -> jnp.ndarray:
  return root_weights * jvp(v) + ridge * alpha


@exact
def kernel_solve(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
                 weight_decay: float, tol: float = 1e-4, maxiter: int = 100, precondition: bool = True,
                 batch_size: int = 128, metric: metric_lib.Metric | None = None) -> tuple[Params, CGInfo]:
  """The LQF optimum in kernel form: δ* = JᵀC^½α with (C^½KC^½ + NλI)α = C^½(T − f0), K = JJᵀ.

  (N·C × N·C; for the plain problem C = I, T = sY: (K + NλI)α = sY − f0, δ* = Jᵀα.) CG on α with
  matrix-free products (a transpose then a tangent pass over all N examples) and the preconditioner
  (C^½K̃C^½ + NλI)⁻¹, K̃ = `lqf.ntk.ntk_approximation` (inverted once, in float64). Residuals are
  measured as ‖JᵀC^½r‖/‖JᵀC(T − f0)‖, which for δ = JᵀC^½α is exactly the relative residual
  ‖b − Hδ‖/‖b‖ of the normal equations. The problem lives in the N·C-dimensional range of Jᵀ, where
  K-FAC's parameter-space preconditioner cannot follow it (see `solve_linearized`). Products at
  ``Precision.HIGHEST`` (module docstring).

  With a ``metric`` M (`lqf.metric`) the kernel is K_M = J M⁻¹ Jᵀ and δ* = M⁻¹JᵀC^½α; the residual norm
  is the same (b − Hδ = JᵀC^½r/N again). It runs without the NTK preconditioner, which approximates
  K, not K_M: M⁻¹ ≈ (H₀ + μI)⁻¹ already whitens K_M/N towards eigenvalues ≤ 1.
  """
  check_targets(targets, features.f0.shape)
  weights = example_weights(targets)
  n = features.f0.shape[0]
  f0, jvp = jit_tangent(lin, variables, features.h)
  w0 = lin.init_delta(variables)
  root_weights = jnp.sqrt(weights)[:, None]
  z = root_weights * (targets.targets - f0)
  ridge = n * weight_decay
  inverse = None
  if precondition and metric is None:
    approx = np.asarray(ntk.ntk_approximation(lin.tail, variables, features.h, lin.trainable_paths,
                                               batch_size=batch_size), np.float64)
    scale = np.repeat(np.sqrt(np.asarray(weights, np.float64)), f0.shape[-1])
    approx = scale[:, None] * approx * scale[None, :]
    inverse = jnp.asarray(np.linalg.inv(approx + ridge * np.eye(len(approx))), jnp.float32)
  product = (functools.partial(_kernel_product, jvp, w0, root_weights, ridge=ridge) if metric is None else
             functools.partial(_metric_kernel_product, jvp, w0, root_weights, metric, ridge=ridge))
  alpha, info = conjugate_gradient(
      product, z, tol=tol, maxiter=maxiter,
      precondition=None if inverse is None else functools.partial(_dense_precondition, inverse),
      norm=lambda r: tree.tree_norm(_transpose_product(jvp, w0, root_weights * r)))
  return metric_lib.inverse(metric, _transpose_product(jvp, w0, root_weights * alpha)), info


@exact
def solve_linearized(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
                     weight_decay: float = 1e-3, method: str = "auto",
                     curvature: Any = None,
                     extra_damping: float = 0.0, tol: float = 1e-4, maxiter: int = 100,
                     batch_size: int | None = None, metric: metric_lib.Metric | None = None,
                     x0: Params | None = None) -> tuple[Params, CGInfo]:
  """The LQF optimum δ* by preconditioned CG, with the relative residual ‖b − Hδ‖/‖b‖ as certificate.

  The system is the weighted one of ``targets`` (module docstring; written below for the plain one,
  `lqf.losses.one_hot_targets`); the methods are the same. With a ``metric`` M (`lqf.metric`) the
  penalty is (λ/2)δᵀMδ: H = JᵀJ/N + λM, the kernel form uses K_M = J M⁻¹ Jᵀ (no NTK preconditioner),
  and CG in parameter space is preconditioned by M⁻¹ (CG on the equivalent ordinary ridge problem in
  u = M^½δ) unless a ``curvature`` is given; "auto" builds no Nyström sketch then.

  Methods:
    ``"parameter"``: PCG on (JᵀJ/N + λI)δ = Jᵀ(sY − f0)/N, preconditioned with ``curvature``: a
      Nyström sketch (`nystrom.sketch`) or K-FAC factors (`lqf.kfac.curvature_factors`); plain CG when
      None. Memory: a few copies of δ (and the sketch's P × ℓ basis).
    ``"kernel"``: `kernel_solve`, CG on the N·C-dimensional dual (K + NλI)α = sY − f0, δ = Jᵀα,
      preconditioned with the K-FAC-structured NTK approximation, to relative residual
      max(tol, `KERNEL_FLOAT32_TOL`); then plain CG in parameter space from that δ down to ``tol``
      (it removes the float32 rounding that the kernel form amplifies, in a few iterations: the
      error left lies along the largest curvatures). Iterations count both. Memory: (N·C)² floats.
    ``"auto"``: ``"kernel"`` when N·C ≤ `KERNEL_LIMIT` and neither ``curvature`` nor ``batch_size`` is given;
      else ``"parameter"``, with a rank-128 Nyström sketch (chunks of ``batch_size`` or 128 examples)
      when no ``curvature`` is given.

  Why the preconditioners differ: with few examples the problem is heavily over-parameterized (P ≫ N·C).
  H is λI outside the N·C-dimensional range of Jᵀ. A Kronecker-factored block preconditioner, whose
  factors have rank ≫ N·C, spreads CG's iterates over directions where H = λI and slows the final digits;
  the kernel form and the Nyström sketch (whose basis lies in the range of Jᵀ) stay in that range
  (iteration counts on the demo's problem: `bench/RESULTS.md`).

  Args:
    lin: the linearized model.
    variables: w0.
    features: cached `Features` (h, f0) of the N training examples.
    targets: `WeightedTargets` t (N, C), c (N,) (s·e_y and 1 for plain LQF; e.g.
      `compat.fd_lm_targets`); ``curvature`` must be computed with the same weights.
    weight_decay: λ (> 0).
    method: see above.
    curvature: for ``"parameter"``: a Nyström sketch, K-FAC factors or any registered preconditioner's
      curvature at w0 (`lqf.preconditioners`), or None.
    extra_damping: added to λ in the preconditioner only (the system keeps λ).
    metric: the penalty's metric M, or None for M = I.
    x0: ``"parameter"``: the start of CG (e.g. δ from a dense kernel fit, `lqf.influence.KernelFit.delta`),
      zeros if None; "auto" then chooses "parameter".
    tol: relative residual to reach.
    maxiter: iteration cap.
    batch_size: ``"parameter"``: examples per Jacobian product, or None for one linearization of
      all N; ``"kernel"`` always linearizes all N at once.

  Returns:
    (δ*, `CGInfo`); ``info.relative_residual`` is recomputed with the normal equations' product, at
    ``Precision.HIGHEST`` like every product of the solve (module docstring).
  """
  if weight_decay <= 0:
    raise ValueError(f"weight_decay={weight_decay} must be > 0 for a unique optimum: use e.g. 1e-3.")
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown: use one of {METHODS}.")
  if method == "auto":
    if (features.f0.shape[0] * features.f0.shape[-1] <= KERNEL_LIMIT and curvature is None
        and batch_size is None and x0 is None):
      method = "kernel"
    else:
      method = "parameter"
      if curvature is None and metric is None:
        curvature = nystrom.sketch(lin.tail, variables, features.h, lin.trainable_paths,
                                   batch_size=batch_size or 128, weights=targets.weights)
  matvec, rhs = normal_equations(lin, variables, features, targets, weight_decay=weight_decay,
                                 batch_size=batch_size, metric=metric)
  in_metric = metric_lib.preconditioner(metric)
  if method == "parameter":
    precondition = (in_metric if curvature is None else
                    preconditioner(curvature, weight_decay + extra_damping))
    return conjugate_gradient(matvec, rhs, precondition=precondition, x0=x0, tol=tol, maxiter=maxiter)
  if curvature is not None or batch_size is not None or x0 is not None:
    raise ValueError("method='kernel' uses its own preconditioner, start and all examples at once: pass "
                     "curvature=None, batch_size=None and x0=None, or use method='parameter'.")
  delta, first = kernel_solve(lin, variables, features, targets, weight_decay=weight_decay,
                              tol=max(tol, KERNEL_FLOAT32_TOL), maxiter=maxiter, metric=metric)
  delta, polish = conjugate_gradient(matvec, rhs, x0=delta, tol=tol, precondition=in_metric,
                                     maxiter=max(maxiter - first.iterations, 0))
  return delta, CGInfo(first.iterations + polish.iterations, polish.relative_residual,
                       np.concatenate([first.residual_history, polish.residual_history[1:]]))


@exact
def objective(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
              weight_decay: float, metric: metric_lib.Metric | None = None) -> Callable[[Params], float]:
  """δ ↦ L(δ) = 1/(2N) Σ_i c_i ‖f0_i + J_iδ − t_i‖² + (λ/2)δᵀMδ over the cached ``features`` (full batch,
  one linearization; M = I for ``metric=None``), evaluated with ``Precision.HIGHEST`` products."""
  _, jvp = jit_tangent(lin, variables, features.h)
  return exact(lambda d: float(losses.weighted_squared_error(features.f0 + jvp(d), targets)
                               + metric_lib.penalty(d, weight_decay, metric)))


class Certificate(NamedTuple):
  """How far a fitted δ is from the exact optimum δ* of its problem (`certify`).

  Attributes:
    optimum: δ*, solved to ``relative_residual``.
    relative_residual: ‖b − Hδ*‖/‖b‖ of δ* (recomputed with the normal equations' product).
    iterations: CG iterations of the solve.
    relative_distance: ‖δ − δ*‖/‖δ*‖.
    relative_suboptimality: (L(δ) − L(δ*))/(L(0) − L(δ*)).
  """
  optimum: Params
  relative_residual: float
  iterations: int
  relative_distance: float
  relative_suboptimality: float


@exact
def certify(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
            delta: Params, *, weight_decay: float, tol: float = 1e-4, maxiter: int = 200,
            metric: metric_lib.Metric | None = None) -> Certificate:
  """Solves ``targets``' problem exactly (`solve_linearized`) and measures the fitted ``delta`` against δ*.

  L(δ) = 1/(2N) Σ_i c_i ‖f0_i + J_iδ − t_i‖² + (λ/2)δᵀMδ over the cached ``features`` (full batch; M = I
  for ``metric=None``, else `lqf.metric`), evaluated, like the solve, with ``Precision.HIGHEST`` products
  (module docstring).
  """
  optimum, info = solve_linearized(lin, variables, features, targets, weight_decay=weight_decay,
                                   tol=tol, maxiter=maxiter, metric=metric)
  loss = objective(lin, variables, features, targets, weight_decay=weight_decay, metric=metric)
  best, start = loss(optimum), loss(tree.tree_zeros_like(optimum))
  distance = float(tree.tree_norm(tree.tree_sub(delta, optimum))) / float(tree.tree_norm(optimum))
  return Certificate(optimum, info.relative_residual, info.iterations, distance,
                     (loss(delta) - best) / (start - best))
