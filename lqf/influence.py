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

K is built from per-example Jacobians (``jax.jacrev``, i.e. C vjps per example), so this is for few
samples: memory N·C·P floats for the Jacobians and (N·C)² for K. The dense algebra runs in float64
(NumPy): A is as ill-conditioned as the LQF problem itself.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqf.linearize import Features, Linearized, select
from lqf.losses import WeightedTargets, check_targets, example_weights

Params = Any


@functools.partial(jax.jit, static_argnames=("lin", "batch_size"))
def jacobian(lin: Linearized, variables: dict, h: jnp.ndarray, batch_size: int | None = None) -> Params:
  """Per-example Jacobians ∂f(x_i)/∂w_train at w0: a pytree like δ with leaves (N, C, *leaf_shape)."""
  w0 = select(variables["params"], lin.trainable)
  one = lambda hi: jax.jacrev(lambda w: lin.tail_fn(variables, hi[None])(w)[0])(w0)  # noqa: E731
  return jax.lax.map(one, h, batch_size=min(batch_size or h.shape[0], h.shape[0]))


@jax.jit
def _kernel(jac1: Params, jac2: Params) -> jnp.ndarray:
  """Σ_leaves ⟨J1_(i,c), J2_(j,d)⟩ -> (N1·C, N2·C)."""
  def leaf(a, b):
    return jnp.einsum("icp,jdp->icjd", a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1))
  k = sum(jax.tree.leaves(jax.tree.map(leaf, jac1, jac2)))
  return k.reshape(k.shape[0] * k.shape[1], -1)


def empirical_ntk(lin: Linearized, variables: dict, h1: jnp.ndarray, h2: jnp.ndarray | None = None,
                  batch_size: int | None = None) -> np.ndarray:
  """K = J(x1) J(x2)ᵀ (N1·C × N2·C), rows/columns (i, c) -> i·C + c, from trunk features h1, h2."""
  jac1 = jacobian(lin, variables, h1, batch_size)
  jac2 = jac1 if h2 is None else jacobian(lin, variables, h2, batch_size)
  return np.asarray(_kernel(jac1, jac2), np.float64)


class KernelFit:
  """The LQF optimum in kernel form on N training examples (see the module docstring).

  Attributes:
    alpha: (N, C) dual coefficients α = A⁻¹C^½z.
    a_inv: (N·C, N·C) A⁻¹ = (C^½KC^½ + NλI)⁻¹.
    root_weights: (N·C,) √c_i repeated over the C outputs.
  """

  def __init__(self, kernel: np.ndarray, residual_targets: np.ndarray, weights: np.ndarray,
               weight_decay: float):
    """K (N·C × N·C), z = T − f0 (N, C), the weights c (N,) and λ."""
    n, c = residual_targets.shape
    self.root_weights = np.repeat(np.sqrt(np.asarray(weights, np.float64)), c)
    scaled = self.root_weights[:, None] * kernel * self.root_weights[None, :]
    self.a_inv = np.linalg.inv(scaled + n * weight_decay * np.eye(n * c))
    self.alpha = (self.a_inv @ (self.root_weights * residual_targets.reshape(-1))).reshape(n, c)

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


def _residual_targets(features: Features, targets: WeightedTargets) -> np.ndarray:
  """z = T − f0 (N, C) in float64."""
  check_targets(targets, features.f0.shape)
  return np.asarray(targets.targets, np.float64) - np.asarray(features.f0, np.float64)


def kernel_fit(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
               weight_decay: float = 1e-3, batch_size: int | None = None) -> KernelFit:
  """Builds the empirical NTK of the training set and inverts A = C^½KC^½ + NλI."""
  return KernelFit(empirical_ntk(lin, variables, features.h, batch_size=batch_size),
                   _residual_targets(features, targets), example_weights(targets), weight_decay)


def loo_predictions(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets, *,
                    weight_decay: float = 1e-3, batch_size: int | None = None) -> np.ndarray:
  """(N, C) leave-one-out logits f^(−i)(x_i) = t_i − (z_i − J_iδ^(−i)) of the LQF optimum."""
  fit = kernel_fit(lin, variables, features, targets, weight_decay=weight_decay, batch_size=batch_size)
  return np.asarray(targets.targets, np.float64) - fit.loo_residuals()


def influence_on_test(lin: Linearized, variables: dict, features: Features, targets: WeightedTargets,
                      test_features: Features, *, weight_decay: float = 1e-3,
                      batch_size: int | None = None) -> np.ndarray:
  """(N_test, N, C): the change of each test logit when training sample i is removed and LQF refit."""
  jac = jacobian(lin, variables, features.h, batch_size)
  jac_test = jacobian(lin, variables, test_features.h, batch_size)
  fit = KernelFit(np.asarray(_kernel(jac, jac), np.float64), _residual_targets(features, targets),
                  example_weights(targets), weight_decay)
  return fit.influence(np.asarray(_kernel(jac_test, jac), np.float64))
