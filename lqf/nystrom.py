"""A randomized Nyström preconditioner for the constant LQF curvature, sketched once from the range of Jᵀ.

The curvature of the LQF objective is H = H₀ + λI with

  H₀ = (1/N) Σ_i c_i J_iᵀJ_i = J̃ᵀJ̃,   J̃ (N·C × P): row (i, k) = √(c_i/N) ∂f_k(x_i)/∂δ,

constant in δ, so one sketch of H₀ serves a whole fit (and every solve of the same problem).

Sketch (`sketch`; Frangella, Tropp & Udell 2021, randomized Nyström PCG, with the test matrix taken
from the range of J̃ᵀ). With Ψ (N·C × ℓ) standard Gaussian, ℓ = min(rank, N·C):

  Ω = J̃ᵀΨ,   Q = Ω T (T: ΩᵀΩ = T⁻ᵀT⁻¹, columns of Q orthonormal),   Y = H₀Q,
  Ĥ₀ = Y (QᵀY)⁺ Yᵀ = U Λ̂ Uᵀ     (U: P × ℓ orthonormal, Λ̂ = diag(λ̂_1 ≥ … ≥ λ̂_ℓ ≥ 0)).

H₀ vanishes outside the range of J̃ᵀ; Ω lies in it (Ω = J̃ᵀΨ is a Gaussian sketch of H₀^½ up to a
rotation, i.e. one half-step of power iteration), so the sketch is exact once ℓ ≥ rank J̃ — every
few-shot problem with N·C ≤ ℓ. The Gaussian test matrix in parameter space of their Algorithm 2.1
spends its columns on the null space when P ≫ N·C (both compared in `bench/RESULTS.md`). Products with J̃ come from per-example Jacobians (C reverse passes per example,
a chunk of ``batch_size`` examples at a time: two passes over the data, one when it fits in a chunk);
all P × ℓ algebra is matrix products and ℓ × ℓ eigendecompositions (float32, like the products, which
run at ``Precision.HIGHEST`` whatever the platform default, `lqf.precision`: the sketch preconditions the
certified solve and is exact for few-shot problems only if its products are).

Preconditioner (`nystrom_inverse`, `nystrom_precondition`), an approximate H⁻¹:

  M = U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ) / (ρ + μ),   μ = λ (the weight decay) + any extra damping,

exact on span U and a scalar on the rest: ρ = λ̂_ℓ (Frangella et al.; their P⁻¹ is (ρ + μ)·M: the
scale does not change PCG, and M ≈ H⁻¹ gives learning rates the meaning they have with K-FAC), or
ρ = 0 when the sketch spans the whole range of J̃ᵀ (ℓ = N·C, or fewer directions above the float32
noise than ℓ): then Ĥ₀ = H₀, H = μI off span U and M = H⁻¹. The eigenvalues of MH lie in about
[μ/(ρ + μ), 1], so PCG needs about √((ρ + μ)/μ) iterations per digit. M covers every trainable
parameter jointly (no block structure, so no layer it cannot handle; a Jacobian of any differentiable
parameter will do); the parameters it covers are the sketch's ``parameters``, and applying it to other
ones is a one-line error naming the parameter.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from lqf.linearize import replace, select, split_batches
from lqf.precision import exact

Params = Any
# Eigenvalues of a float32 Gram matrix below this fraction of the largest are rounding noise.
_RELATIVE_CUTOFF = 1e-6
Parameters = tuple[tuple[str, tuple[int, ...]], ...]  # ('/'-joined path, shape) of each covered leaf


@flax.struct.dataclass
class NystromSketch:
  """Ĥ₀ = U Λ̂ Uᵀ, the rank-ℓ Nyström approximation of H₀ = J̃ᵀJ̃ (module docstring).

  Attributes:
    basis: U (P, ℓ), orthonormal columns over the covered parameters flattened in the order of
      ``jax.flatten_util.ravel_pytree`` of their sub-tree (`lqf.linearize.select`); columns beyond
      the sketch's numerical rank are zero (with λ̂ = 0), so ℓ = min(rank, N·C) always.
    eigenvalues: λ̂ (ℓ,), descending, ≥ 0.
    residual: ρ, H₀'s scale off span U: λ̂_ℓ, or 0 when the sketch spans the range of J̃ᵀ.
    parameters: the covered parameters, (path, shape) in that order (static).
  """
  basis: jnp.ndarray
  eigenvalues: jnp.ndarray
  residual: jnp.ndarray
  parameters: Parameters = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class NystromInverse:
  """M = v ↦ v/(ρ + μ) + U (coefficients ⊙ Uᵀv), coefficients = 1/(λ̂ + μ) − 1/(ρ + μ) ≤ 0 (or another
  power of the damped curvature, `nystrom_power`: complement (ρ + μ)^p, coefficients (λ̂ + μ)^p − (ρ + μ)^p)."""
  basis: jnp.ndarray
  coefficients: jnp.ndarray
  complement: jnp.ndarray
  parameters: Parameters = flax.struct.field(pytree_node=False)


@functools.partial(jax.jit, static_argnames=("apply_fn", "paths"))
def _jacobian_rows(variables: dict, inputs: jnp.ndarray, scale: jnp.ndarray, *, apply_fn: Callable,
                   paths: tuple[str, ...]) -> jnp.ndarray:
  """√s_i ∂f_k(x_i)/∂w (B·C, P) for a chunk of inputs (B, ...) and row scales s (B,)."""
  params = variables["params"]
  w0 = select(params, paths)

  def per_example(x):
    f = lambda w: apply_fn({**variables, "params": replace(params, w)}, x[None])[0]  # noqa: E731
    jac = jax.jacrev(lambda w: f(w).astype(jnp.float32))(w0)      # leaves (C, *leaf)
    return jnp.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)

  rows = jax.vmap(per_example)(inputs) * jnp.sqrt(scale)[:, None, None]
  return rows.reshape(-1, rows.shape[-1])


@jax.jit
def _transpose_times(rows: jnp.ndarray, m: jnp.ndarray) -> jnp.ndarray:
  return rows.T @ m


@jax.jit
def _gram_times(rows: jnp.ndarray, m: jnp.ndarray) -> jnp.ndarray:
  """J̃_bᵀ(J̃_b m)."""
  return rows.T @ (rows @ m)


def _inverse_root(values: jnp.ndarray) -> jnp.ndarray:
  """1/√d for the eigenvalues d of a float32 Gram matrix above its rounding noise, 0 below."""
  keep = values > _RELATIVE_CUTOFF * jnp.max(values)
  return jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, values, 1.0)), 0.0)


def _eigh(gram: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Eigenvalues (descending) and eigenvectors of the symmetrized ``gram``."""
  values, vectors = jnp.linalg.eigh((gram + gram.T) / 2)
  return values[::-1], vectors[:, ::-1]


@jax.jit
def _orthonormal(a: jnp.ndarray) -> jnp.ndarray:
  """An orthonormal basis of the columns of a (P, ℓ) by Cholesky-QR through the eigendecomposition of
  aᵀa (matrix products only), with zero columns for directions below the float32 noise."""
  values, vectors = _eigh(a.T @ a)
  return a @ (vectors * _inverse_root(values))


@jax.jit
def _nystrom(q: jnp.ndarray, y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(U, λ̂) of Ĥ₀ = Y (QᵀY)⁺ Yᵀ for Y = H₀Q: Ĥ₀ = BBᵀ with B = Y W, W the whitening of QᵀY, then
  B's singular vectors through BᵀB = V S Vᵀ: U = B V S^-½, λ̂ = S (0, with a zero column, below the
  float32 noise), U re-orthonormalized as U (UᵀU)^-½."""
  values, vectors = _eigh(q.T @ y)
  b = y @ (vectors * _inverse_root(values))
  values, vectors = _eigh(b.T @ b)
  root = _inverse_root(values)
  u = b @ (vectors * root)
  gram_values, gram_vectors = _eigh(u.T @ u)
  u = u @ ((gram_vectors * _inverse_root(gram_values)) @ gram_vectors.T)
  return u, jnp.where(root > 0, values, 0.0)


@exact
def sketch(apply_fn: Callable[[dict, jnp.ndarray], jnp.ndarray], variables: dict, inputs: jnp.ndarray,
           trainable: Collection[str], *, rank: int = 128, batch_size: int = 128,
           weights: jnp.ndarray | None = None, rng: jax.Array | None = None) -> NystromSketch:
  """The rank-ℓ Nyström sketch of H₀ = (1/N) Σ_i c_i J_iᵀJ_i at w0 (module docstring).

  Args:
    apply_fn: (variables, inputs (B, ...)) -> logits (B, C), a Flax ``apply`` in inference mode
      without batch coupling (e.g. ``Linearized.tail``); hashable (a static jit argument).
    variables: w0.
    inputs: (N, ...) inputs of ``apply_fn`` (e.g. the cached trunk features h).
    trainable: '/'-joined paths of the trainable parameters (e.g. ``Linearized.trainable_paths``).
    rank: ℓ, capped at N·C (where the sketch is exact).
    batch_size: examples per Jacobian chunk (memory: batch_size·C·P floats).
    weights: (N,) positive per-example weights c (`lqf.losses.WeightedTargets`), None for c = 1.
    rng: key of Ψ (default ``jax.random.key(0)``).

  Returns:
    `NystromSketch` of ℓ columns.
  """
  n = inputs.shape[0]
  paths = tuple(sorted(trainable))
  weights = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if weights.shape != (n,) or not bool(jnp.all(weights > 0)):
    raise ValueError(f"weights must be {n} positive per-example weights, shape ({n},): got shape "
                     f"{weights.shape}.")
  if rank < 1:
    raise ValueError(f"rank={rank} must be >= 1 (e.g. 128).")
  num_outputs = jax.eval_shape(lambda v, x: apply_fn(v, x), variables, inputs[:1]).shape[-1]
  ell = min(rank, n * num_outputs)
  (xs, scales), mask = split_batches((inputs, weights / n), min(batch_size, n))
  chunks = mask.shape[0]
  psi = jax.random.normal(jax.random.key(0) if rng is None else rng,
                          (chunks, mask.shape[1] * num_outputs, ell), jnp.float32)
  rows = lambda i: _jacobian_rows(variables, xs[i], scales[i] * mask[i], apply_fn=apply_fn,  # noqa: E731
                                  paths=paths)
  kept = [rows(0)] if chunks == 1 else None          # one chunk: its Jacobian serves both passes
  jacobians = lambda: kept or (rows(i) for i in range(chunks))  # noqa: E731
  omega = functools.reduce(jnp.add, (_transpose_times(j, p) for j, p in zip(jacobians(), psi)))
  q = _orthonormal(omega)
  u, values = _nystrom(q, functools.reduce(jnp.add, (_gram_times(j, q) for j in jacobians())))
  spans_range = ell == n * num_outputs or float(values[-1]) == 0.0   # then Ĥ₀ = H₀
  flat = traverse_util.flatten_dict(select(variables["params"], paths), sep="/")
  return NystromSketch(u, values, jnp.float32(0.0) if spans_range else values[-1],
                       tuple((path, tuple(np.shape(leaf))) for path, leaf in flat.items()))


def nystrom_inverse(nystrom: NystromSketch, damping: float) -> NystromInverse:
  """M ≈ (H₀ + μI)⁻¹ of the module docstring, μ = ``damping`` > 0 (the weight decay plus any extra)."""
  return nystrom_power(nystrom, damping, -1)


def nystrom_power(nystrom: NystromSketch, damping: float, power: int) -> NystromInverse:
  """(Ĥ₀ + ρ(I − UUᵀ) + μI)^p = U((Λ̂ + μ)^p − (ρ + μ)^p)Uᵀ + (ρ + μ)^p I for p = ``power``: −1 is the
  preconditioner M (`nystrom_inverse`), 1 the damped curvature it inverts (the metric of `lqf.metric`);
  `apply_inverse` multiplies by either."""
  if damping <= 0:
    raise ValueError(f"damping={damping} must be > 0: use the weight decay (plus extra damping).")
  raise_to = (lambda x: 1.0 / x) if power == -1 else (lambda x: x ** power)  # noqa: E731
  complement = raise_to(nystrom.residual + damping)
  return NystromInverse(nystrom.basis, raise_to(nystrom.eigenvalues + damping) - complement, complement,
                        nystrom.parameters)


@jax.jit
def apply_inverse(inverse: NystromInverse, tree: Params) -> Params:
  """M·v for a pytree v of the covered parameters (`check_covered`)."""
  check_covered(inverse.parameters, tree)
  v, unravel = ravel_pytree(tree)
  return unravel(inverse.complement * v + inverse.basis @ (inverse.coefficients * (v @ inverse.basis)))


def check_covered(parameters: Parameters, tree: Params) -> None:
  """Raises ValueError naming the first leaf of ``tree`` that is not a covered parameter of that shape,
  or the first covered parameter missing from it."""
  flat = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(tree, sep="/").items()}
  covered = dict(parameters)
  for path, shape in flat.items():
    if covered.get(path) != shape:
      raise ValueError(f"parameter {path!r} {shape} is not in the Nyström sketch (which covers "
                       f"{len(covered)} parameters from {parameters[0][0]!r}): sketch with the same "
                       f"trainable set as the parameters being updated.")
  missing = [path for path in covered if path not in flat]
  if missing:
    raise ValueError(f"parameter {missing[0]!r} of the Nyström sketch is missing from the updates: "
                     f"sketch with the same trainable set as the parameters being updated.")


class NystromState(NamedTuple):
  """State of `nystrom_precondition`: the inverse (arrays passed through jit, not closed over)."""
  inverse: NystromInverse


def nystrom_precondition(nystrom: NystromSketch, damping: float) -> optax.GradientTransformation:
  """An optax transform that maps gradients g to M g (module docstring).

  Compose it with a step rule, e.g. ``optax.chain(nystrom_precondition(s, λ), optax.sgd(lr, β))`` or
  ``optax.chain(nystrom_precondition(s, λ), lqf.step_rules.quadratic_model_step(...))`` (then PCG).

  Args:
    nystrom: from `sketch` (computed at w0 with the same trainable set).
    damping: μ, the objective's weight decay plus any extra damping.
  """
  inverse = nystrom_inverse(nystrom, damping)

  def init_fn(params):
    check_covered(nystrom.parameters, params)
    return NystromState(jax.tree.map(jnp.copy, inverse))  # its own buffers: a step may donate the state

  def update_fn(updates, state, params=None):
    del params
    return apply_inverse(state.inverse, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
