"""Leave-one-out predictions and training-sample influence for the LQF optimum, in closed form.

The LQF optimum is ridge regression on the Jacobian features: with z = sY − f0 (N·C targets, row
(i, c) = i·C + c), J (N·C × P) and A = K + NλI, K = J Jᵀ the empirical NTK (N·C × N·C),

  δ* = Jᵀα,  α = A⁻¹ z,   fitted residuals e = z − Kα = Nλ·α.

Removing training sample i — dropping its C rows from the sum ½Σ_j‖f0_j + J_jδ − sY_j‖² while keeping
the penalty (Nλ/2)‖δ‖², i.e. the objective's 1/N normalization — changes δ* by
δ^(−i) − δ* = −(JᵀJ + NλI)⁻¹ J_iᵀ (I − H_ii)⁻¹ e_i (Sherman-Morrison-Woodbury on the C×C block,
H = K A⁻¹ the hat matrix). Since I − H = Nλ A⁻¹, the C×C blocks give

  LOO residual   z_i − J_i δ^(−i) = [A⁻¹]_ii⁻¹ α_i,
  test influence f^(−i)(x_t) − f(x_t) = −[K_t A⁻¹]_{:,i} [A⁻¹]_ii⁻¹ α_i,   K_t = J_t Jᵀ (C × N·C).

Weighted problems (`lqf.losses.WeightedTargets` (T, c), e.g. FD-LM) reduce to the plain one with
J̃_i = √c_i J_i and z̃_i = √c_i z_i, z = T − f0: A = C^½KC^½ + NλI, α = A⁻¹C^½z, δ* = J̃ᵀα, and the LOO
residual is z_i − J_iδ^(−i) = [A⁻¹]_ii⁻¹ α_i / √c_i, the test influence −[K_tC^½A⁻¹]_{:,i}[A⁻¹]_ii⁻¹ α_i.

The penalty may be (λ/2)δᵀMδ in a curvature metric M (``metric``, `lqf.metric`): every formula above
holds with K_M = J M⁻¹ Jᵀ in place of K (and δ* = M⁻¹J̃ᵀα), since δ = M^-½u makes it ordinary ridge in u.

λ by leave-one-out (`RidgePath`): one eigendecomposition C^½KC^½ = V diag(s) Vᵀ gives A⁻¹ = V diag(1/(s +
Nλ)) Vᵀ for every λ, and its C×C diagonal blocks [A⁻¹]_ii = V_i diag(1/(s + Nλ)) V_iᵀ (V_i the C rows of
example i): the exact leave-one-out error of a whole grid of λ costs one O((N·C)³) decomposition and
O((N·C)²·C) per λ (`loo_curve`, no held-out split).

K is built from per-example Jacobians (``jax.jacrev``, i.e. C vjps per example), so this is for few
samples: memory N·C·P floats for the Jacobians and (N·C)² for K. The Jacobians and K are computed with
``Precision.HIGHEST`` products (`lqf.precision`) and the dense algebra runs in float64 (NumPy): A is as
ill-conditioned as the LQF problem itself, so TensorFloat-32 or bfloat16 rounding of K would reach the
leave-one-out residuals amplified by its condition number.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lqf import metric as metric_lib
from lqf.linearize import Features, Linearized, select
from lqf.losses import WeightedTargets, check_targets, example_weights
from lqf.precision import exact

Params = Any


@exact
@functools.partial(jax.jit, static_argnames=("lin", "batch_size"))
def jacobian(lin: Linearized, variables: dict, h: jnp.ndarray, batch_size: int | None = None) -> Params:
  """Per-example Jacobians ∂f(x_i)/∂w_train at w0: a pytree like δ with leaves (N, C, *leaf_shape)."""
  w0 = select(variables["params"], lin.trainable_paths)
  one = lambda hi: jax.jacrev(lambda w: lin.tail_fn(variables, hi[None])(w)[0])(w0)  # noqa: E731
  return jax.lax.map(one, h, batch_size=min(batch_size or h.shape[0], h.shape[0]))


@jax.jit
def _kernel(jac1: Params, jac2: Params) -> jnp.ndarray:
  """Σ_leaves ⟨J1_(i,c), J2_(j,d)⟩ -> (N1·C, N2·C)."""
  def leaf(a, b):
    return jnp.einsum("icp,jdp->icjd", a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1))
  k = sum(jax.tree.leaves(jax.tree.map(leaf, jac1, jac2)))
  return k.reshape(k.shape[0] * k.shape[1], -1)


def _in_metric(jac: Params, metric: metric_lib.Metric | None) -> Params:
  """M⁻¹ applied to every Jacobian row (leaves (N, C, *leaf)); ``jac`` itself for M = I."""
  if metric is None:
    return jac
  n, c = jax.tree.leaves(jac)[0].shape[:2]
  rows = jax.vmap(metric.inverse)(jax.tree.map(lambda a: a.reshape(n * c, *a.shape[2:]), jac))
  return jax.tree.map(lambda a: a.reshape(n, c, *a.shape[1:]), rows)


@exact
def empirical_ntk(lin: Linearized, variables: dict, h1: jnp.ndarray, h2: jnp.ndarray | None = None,
                  batch_size: int | None = None, metric: metric_lib.Metric | None = None) -> np.ndarray:
  """K = J(x1) M⁻¹ J(x2)ᵀ (N1·C × N2·C), rows/columns (i, c) -> i·C + c, from trunk features h1, h2
  (M = I for ``metric=None``: the empirical NTK; else `lqf.metric`)."""
  jac1 = jacobian(lin, variables, h1, batch_size)
  jac2 = jac1 if h2 is None else jacobian(lin, variables, h2, batch_size)
  return np.asarray(_kernel(jac1, _in_metric(jac2, metric)), np.float64)


@dataclasses.dataclass(frozen=True)
class KernelFit:
  """The LQF optimum in kernel form on N training examples (see the module docstring).

  Build it with `kernel_fit` (or `KernelFit.from_kernel`); `without` removes training examples
  exactly, from the stored inverse (`lqf.forget`).

  Attributes:
    alpha: (N, C) dual coefficients α = A⁻¹C^½z.
    a_inv: (N·C, N·C) A⁻¹ = (C^½KC^½ + NλI)⁻¹.
    root_weights: (N·C,) √c_i repeated over the C outputs.
    scaled_targets: (N·C,) C^½z, z = T − f0.
    weight_decay: λ.
  """
  alpha: np.ndarray
  a_inv: np.ndarray
  root_weights: np.ndarray
  scaled_targets: np.ndarray
  weight_decay: float

  @classmethod
  def from_kernel(cls, kernel: np.ndarray, residual_targets: np.ndarray, weights: np.ndarray,
                  weight_decay: float) -> KernelFit:
    """From K (N·C × N·C), z = T − f0 (N, C), the weights c (N,) and λ (inverts A in float64)."""
    n, c = residual_targets.shape
    scaled, root_weights, scaled_targets = _scaled_problem(kernel, residual_targets, weights)
    a_inv = np.linalg.inv(scaled + n * weight_decay * np.eye(n * c))
    return cls((a_inv @ scaled_targets).reshape(n, c), a_inv, root_weights, scaled_targets,
               weight_decay)

  def without(self, indices: np.ndarray) -> KernelFit:
    """The kernel fit on the N' = N − |S| examples not in S = ``indices``, without new Jacobians.

    The retained problem (the same objective on N' examples, weight decay λ: what refitting from
    scratch gives) has the dual matrix A' = C_R^½K_RRC_R^½ + N'λI = A_RR − |S|λI. The Schur complement
    of the stored inverse is (A_RR)⁻¹ (Woodbury: a rank-|S|·C downdate),

      B = [A⁻¹]_RR − [A⁻¹]_RS ([A⁻¹]_SS)⁻¹ [A⁻¹]_SR = (A_RR)⁻¹,

    and A'⁻¹ = (I − |S|λB)⁻¹ B, a solve whose matrix has its eigenvalues in [N'/N, 1) (A_RR ⪰ NλI);
    α' = A'⁻¹ C_R^½z_R. Cost O((N·C)²·|S|·C + (N'·C)³) in float64, no pass over the network.
    (The leave-one-out formulas of this module keep the penalty at Nλ instead: there A' = A_RR.)

    Args:
      indices: (|S|,) distinct positions in 0..N−1 of the examples to remove.

    Returns:
      The `KernelFit` of the N' retained examples, in their original order.
    """
    n, c = self.alpha.shape
    keep = retained_indices(n, indices)
    rows = lambda idx: (idx[:, None] * c + np.arange(c)).reshape(-1)  # noqa: E731
    r, s = rows(keep), rows(np.setdiff1d(np.arange(n), keep))
    a = self.a_inv
    downdated = a[np.ix_(r, r)] - a[np.ix_(r, s)] @ np.linalg.solve(a[np.ix_(s, s)], a[np.ix_(s, r)])
    shift = (n - len(keep)) * self.weight_decay
    a_inv = np.linalg.solve(np.eye(len(r)) - shift * downdated, downdated)
    a_inv = 0.5 * (a_inv + a_inv.T)
    return KernelFit((a_inv @ self.scaled_targets[r]).reshape(len(keep), c), a_inv,
                     self.root_weights[r], self.scaled_targets[r], self.weight_decay)

  @exact
  def delta(self, lin: Linearized, variables: dict, h: jnp.ndarray,
            metric: metric_lib.Metric | None = None) -> Params:
    """δ = M⁻¹J̃ᵀα = M⁻¹JᵀC^½α (M = I for ``metric=None``) by one transposed pass over the training
    examples' trunk features h (float32: `lqf.solve` polishes it to a certificate)."""
    cotangent = jnp.asarray((self.root_weights * self.alpha.reshape(-1)).reshape(self.alpha.shape),
                            jnp.float32)
    return metric_lib.inverse(metric, _pullback(lin, variables, h, cotangent))

  def _loo_dual(self) -> np.ndarray:
    """(N, C) [A⁻¹]_ii⁻¹ α_i."""
    n, c = self.alpha.shape
    blocks = np.stack([self.a_inv[i * c:(i + 1) * c, i * c:(i + 1) * c] for i in range(n)])
    return np.linalg.solve(blocks, self.alpha[..., None])[..., 0]

  def loo_residuals(self) -> np.ndarray:
    """(N, C) z_i − J_i δ^(−i) = [A⁻¹]_ii⁻¹ α_i / √c_i."""
    return self._loo_dual() / self.root_weights.reshape(self.alpha.shape)

  def influence(self, test_kernel: np.ndarray) -> np.ndarray:
    """(N_test, N, C): f^(−i)(x_t) − f(x_t) for K_t = test_kernel (N_test·C × N·C)."""
    n, c = self.alpha.shape
    kt_a_inv = ((test_kernel * self.root_weights[None, :]) @ self.a_inv).reshape(-1, c, n, c)
    return -np.einsum("tdic,ic->tid", kt_a_inv, self._loo_dual())


@functools.partial(jax.jit, static_argnums=0)
def _pullback(lin: Linearized, variables: dict, h: jnp.ndarray, cotangent: jnp.ndarray) -> Params:
  """Jᵀ·cotangent (a pytree like δ) over the examples with trunk features h, cotangent (B, C)."""
  _, vjp = jax.vjp(lin.tail_fn(variables, h), select(variables["params"], lin.trainable_paths))
  return vjp(cotangent)[0]


def _scaled_problem(kernel: np.ndarray, residual_targets: np.ndarray,
                    weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(C^½KC^½, √c repeated over the C outputs (N·C,), C^½z (N·C,)) in float64."""
  c = residual_targets.shape[1]
  root_weights = np.repeat(np.sqrt(np.asarray(weights, np.float64)), c)
  scaled = root_weights[:, None] * np.asarray(kernel, np.float64) * root_weights[None, :]
  return scaled, root_weights, root_weights * np.asarray(residual_targets, np.float64).reshape(-1)


class LOOCurve(NamedTuple):
  """The exact leave-one-out error of the kernel fit for each λ of a grid (`RidgePath.loo_curve`).

  Attributes:
    weight_decays: the grid (L,), ascending.
    loss: (L,) mean over examples of ½c_i‖t_i − f^(−i)(x_i)‖².
    accuracy: (L,) share of examples with argmax f^(−i)(x_i) = argmax t_i.
  """
  weight_decays: np.ndarray
  loss: np.ndarray
  accuracy: np.ndarray

  @property
  def best(self) -> float:
    """The λ of the grid with the smallest leave-one-out loss (the first on ties)."""
    return float(self.weight_decays[int(np.argmin(self.loss))])


# The λ searched by leave-one-out: 4 per decade over 1e-6 … 1e2 (wide enough for the Euclidean penalty
# and for curvature metrics, whose scale is the data curvature's).
LOO_GRID = tuple(float(v) for v in np.logspace(-6, 2, 33))


@dataclasses.dataclass(frozen=True)
class RidgePath:
  """The kernel fits of one problem for every λ, from one eigendecomposition (module docstring).

  C^½KC^½ = V diag(s) Vᵀ; for a λ, A⁻¹ = V diag(1/(s + Nλ)) Vᵀ, α = A⁻¹C^½z and the blocks
  [A⁻¹]_ii = V_i diag(1/(s + Nλ)) V_iᵀ give the leave-one-out residuals [A⁻¹]_ii⁻¹α_i/√c_i.

  Attributes:
    values: s (N·C,), clipped at 0 (float64 rounding).
    vectors: V (N·C, N·C).
    root_weights: (N·C,) √c_i repeated over the C outputs.
    scaled_targets: (N·C,) C^½z, z = T − f0.
    num_classes: C.
  """
  values: np.ndarray
  vectors: np.ndarray
  root_weights: np.ndarray
  scaled_targets: np.ndarray
  num_classes: int

  @classmethod
  def from_kernel(cls, kernel: np.ndarray, residual_targets: np.ndarray, weights: np.ndarray) -> RidgePath:
    """From K (N·C × N·C; K_M for a metric), z = T − f0 (N, C) and the weights c (N,)."""
    scaled, root_weights, scaled_targets = _scaled_problem(kernel, residual_targets, weights)
    values, vectors = np.linalg.eigh(0.5 * (scaled + scaled.T))
    return cls(np.maximum(values, 0.0), vectors, root_weights, scaled_targets, residual_targets.shape[1])

  def _filter(self, weight_decay: float) -> np.ndarray:
    """1/(s + Nλ)."""
    n = len(self.values) // self.num_classes
    return 1.0 / (self.values + n * weight_decay)

  def fit(self, weight_decay: float) -> KernelFit:
    """The `KernelFit` at λ = ``weight_decay`` (A⁻¹ assembled from the eigendecomposition)."""
    a_inv = (self.vectors * self._filter(weight_decay)) @ self.vectors.T
    return KernelFit((a_inv @ self.scaled_targets).reshape(-1, self.num_classes), a_inv, self.root_weights,
                     self.scaled_targets, weight_decay)

  def loo_residuals(self, weight_decay: float) -> np.ndarray:
    """(N, C) z_i − J_iδ^(−i) at λ = ``weight_decay`` (= `KernelFit.loo_residuals` of `fit`)."""
    c, d = self.num_classes, self._filter(weight_decay)
    v = self.vectors.reshape(-1, c, len(self.values))
    alpha = (self.vectors @ (d * (self.vectors.T @ self.scaled_targets))).reshape(-1, c)
    blocks = np.einsum("icr,r,idr->icd", v, d, v)
    return np.linalg.solve(blocks, alpha[..., None])[..., 0] / self.root_weights.reshape(-1, c)

  def loo_curve(self, targets: WeightedTargets, weight_decays: Sequence[float] = LOO_GRID) -> LOOCurve:
    """The leave-one-out loss and accuracy for each λ of ``weight_decays`` (``targets``: the problem's)."""
    t = np.asarray(targets.targets, np.float64)
    weights = np.asarray(example_weights(targets), np.float64)
    grid = np.sort(np.asarray(weight_decays, np.float64))
    loss, accuracy = [], []
    for weight_decay in grid:
      residual = self.loo_residuals(weight_decay)
      loss.append(np.mean(0.5 * weights * np.sum(residual ** 2, axis=-1)))
      accuracy.append(np.mean(np.argmax(t - residual, -1) == np.argmax(t, -1)))
    return LOOCurve(grid, np.array(loss), np.array(accuracy))


def _residual_targets(features: Features, targets: WeightedTargets) -> np.ndarray:
  """z = T − f0 (N, C) in float64."""
  check_targets(targets, features.f0.shape)
  return np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)


@exact
def kernel_fit(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
               weight_decay: float = 1e-3, batch_size: int | None = None,
               metric: metric_lib.Metric | None = None) -> KernelFit:
  """Builds the kernel K (K_M = J M⁻¹ Jᵀ for a ``metric``) of the training set and inverts
  A = C^½KC^½ + NλI."""
  return KernelFit.from_kernel(empirical_ntk(lin, variables, features.h, batch_size=batch_size,
                                             metric=metric),
                               _residual_targets(features, targets), example_weights(targets),
                               weight_decay)


@exact
def ridge_path(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
               batch_size: int | None = None, metric: metric_lib.Metric | None = None) -> RidgePath:
  """The `RidgePath` of the problem (its kernel, K_M for a ``metric``, decomposed once)."""
  return RidgePath.from_kernel(empirical_ntk(lin, variables, features.h, batch_size=batch_size,
                                             metric=metric),
                               _residual_targets(features, targets), example_weights(targets))


@exact
def loo_predictions(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
                    weight_decay: float = 1e-3, batch_size: int | None = None,
                    metric: metric_lib.Metric | None = None) -> np.ndarray:
  """(N, C) leave-one-out logits f^(−i)(x_i) = t_i − (z_i − J_iδ^(−i)) of the LQF optimum."""
  fit = kernel_fit(lin, variables, features, targets, weight_decay=weight_decay, batch_size=batch_size,
                   metric=metric)
  return np.asarray(targets.targets, np.float64) - fit.loo_residuals()


@exact
def influence_on_test(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
                      test_features: Features, *, weight_decay: float = 1e-3,
                      batch_size: int | None = None,
                      metric: metric_lib.Metric | None = None) -> np.ndarray:
  """(N_test, N, C): the change of each test logit when training sample i is removed and LQF refit."""
  jac = jacobian(lin, variables, features.h, batch_size)
  jac_test = jacobian(lin, variables, test_features.h, batch_size)
  jac_m = _in_metric(jac, metric)
  fit = KernelFit.from_kernel(np.asarray(_kernel(jac, jac_m), np.float64),
                              _residual_targets(features, targets), example_weights(targets),
                              weight_decay)
  return fit.influence(np.asarray(_kernel(jac_test, jac_m), np.float64))


def retained_indices(n: int, indices: np.ndarray) -> np.ndarray:
  """The sorted positions in 0..n−1 not in ``indices`` (distinct, in range, not all of them)."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  if len(np.unique(indices)) != len(indices) or np.any((indices < 0) | (indices >= n)):
    raise ValueError(f"the examples to remove must be distinct positions in 0..{n - 1}: got "
                     f"{indices.tolist()[:10]}.")
  keep = np.setdiff1d(np.arange(n), indices)
  if not len(keep):
    raise ValueError(f"removing all {n} training examples leaves no problem: keep at least one.")
  return keep
