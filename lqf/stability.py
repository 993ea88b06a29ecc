"""The stable step size of preconditioned SGD with momentum on the LQF quadratic, from λmax(MH).

On the quadratic L(δ) = ½δᵀHδ − bᵀδ with constant curvature H, SGD with heavy-ball momentum β after a
fixed SPD preconditioner M (``optax.chain(precondition, optax.sgd(η, β))``)

  m ← Mg + βm,   δ ← δ − ηm

moves each eigen-direction of MH (eigenvalue λ; MH is similar to the SPD M^½HM^½, so λ > 0) by the
recursion e_{k+1} = (1 + β − ηλ)e_k − βe_{k−1}, which contracts iff 0 < ηλ < 2(1 + β) (Polyak 1964).
The largest stable step is therefore

  η_max = 2(1 + β) / λmax(MH),

and ``learning_rate='auto'`` (`lqf.fit.FitOptions`) takes `AUTO_FRACTION` of it (`auto_learning_rate`),
with λmax measured once by power iteration (`largest_eigenvalue`; H is constant) on the fit's first
minibatch B (λmax(MH_B) ≥ λmax(MH) in expectation).

η_max is exact for full batches. With minibatches each step sees another H_B, and switching between
them with momentum 0.9 shrinks the stable range (Kidambi et al. 2018). `AUTO_FRACTION` = 0.2 is a
margin measured for that (tests/test_stability.py checks it on its problem; the stable window on the
demo's training set is in bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqf.precision import exact

Params = Any
# The share of η_max that learning_rate='auto' takes (module docstring: minibatch noise with momentum).
AUTO_FRACTION = 0.2
tree = optax.tree_utils


@jax.jit
def _normalized(v: Params) -> Params:
  return tree.tree_scale(1.0 / tree.tree_norm(v), v)


@exact
def largest_eigenvalue(curvature_product: Callable[[Params], Params],
                       precondition: Callable[[Params], Params], like: Params, *, iterations: int = 30,
                       rng: jax.Array | None = None) -> float:
  """λmax(MH) by power iteration: v ← MHv/‖MHv‖ from a Gaussian start, ``iterations`` products.

  Products at ``Precision.HIGHEST`` (`lqf.precision`): λmax sets the step size that must not diverge.
  The estimate ⟨Hv, MHv⟩/⟨Hv, v⟩ equals ‖By‖²/⟨y, By⟩ with B = M^½HM^½ and y = M^{-½}v: a lower bound
  on λmax that increases with every iteration and converges to it (for a start not orthogonal to its
  eigenvector).

  Args:
    curvature_product: v ↦ Hv (H symmetric positive definite), on pytrees like ``like``.
    precondition: v ↦ Mv (M symmetric positive definite; the identity for plain SGD).
    like: a pytree shaped like the parameters.
    iterations: products with H (and M).
    rng: key of the start (default ``jax.random.key(0)``).
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, len(leaves))
  v = _normalized(treedef.unflatten([jax.random.normal(k, jnp.shape(x), jnp.float32)
                                     for k, x in zip(keys, leaves)]))
  estimate = 0.0
  for _ in range(iterations):
    hv = curvature_product(v)
    mhv = precondition(hv)
    estimate = float(tree.tree_vdot(hv, mhv)) / float(tree.tree_vdot(hv, v))
    v = _normalized(mhv)
  return estimate


def stability_limit(max_eigenvalue: float, momentum: float) -> float:
  """η_max = 2(1 + β)/λmax(MH), the largest step of heavy-ball SGD that does not diverge."""
  if not np.isfinite(max_eigenvalue) or max_eigenvalue <= 0:
    raise ValueError(f"λmax(MH)={max_eigenvalue} must be finite and > 0 (M and H positive definite).")
  return 2.0 * (1.0 + momentum) / max_eigenvalue


def auto_learning_rate(max_eigenvalue: float, momentum: float) -> float:
  """`AUTO_FRACTION` · η_max: the step ``learning_rate='auto'`` takes."""
  return AUTO_FRACTION * stability_limit(max_eigenvalue, momentum)
