"""The Nyström sketch and preconditioner vs their definitions (explicit Jacobian, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from lqf import linearize as lin_lib
from lqf import nystrom
from support import TAIL, small_problem
LAM, N, C = 1e-2, 6, 3
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def problem(dense_jacobian):
  """A ResNet8 tail (3,732 parameters) on N = 6 examples and its Jacobian J (N·C, P) in float64."""
  model, variables, x = small_problem(n=N)
  lin = lin_lib.linearize(model, variables, TAIL)
  h = lin.features(variables, x).h
  jac, unravel = dense_jacobian(lin, variables, h)
  return lin, variables, h, jac, unravel


def gaussian_test_matrix(key, rank, batch_size):
  """Ψ (N·C, ℓ) as `nystrom.sketch` draws it: per chunk of ``batch_size`` examples (padded rows last)."""
  chunks = -(-N // batch_size)
  psi = jax.random.normal(key, (chunks, batch_size * C, rank), jnp.float32)
  return np.asarray(psi, np.float64).reshape(-1, rank)[:N * C]


def reference_preconditioner(jac_tilde, psi, damping):
  """The definition, in float64: Ĥ₀ = Y(ΩᵀY)⁺Yᵀ from Ω = J̃ᵀΨ, Y = J̃ᵀJ̃Ω, its top-ℓ eigenpairs (Λ̂, U), and
  M = U(Λ̂ + μ)⁻¹Uᵀ + (I − UUᵀ)/(ρ + μ) with ρ = λ̂_ℓ, or 0 when Ψ has as many columns as rows (Ω spans
  the range of J̃ᵀ): (v ↦ Mv, Λ̂). Ĥ₀ (P × P, rank ℓ) is never formed: with Y = QR, Ĥ₀ = Q·R(ΩᵀY)⁺Rᵀ·Qᵀ,
  so its eigenpairs are Q times those of the ℓ × ℓ core."""
  omega = jac_tilde.T @ psi
  y = jac_tilde.T @ (jac_tilde @ omega)
  q, r = np.linalg.qr(y)
  values, vectors = np.linalg.eigh(r @ np.linalg.pinv(omega.T @ y, rcond=1e-12, hermitian=True) @ r.T)
  values, u = np.maximum(values[::-1], 0.0), q @ vectors[:, ::-1]
  complement = 1.0 / ((values[-1] if psi.shape[1] < psi.shape[0] else 0.0) + damping)

  def m(v):
    coefficients = u.T @ v
    return u @ (coefficients / (values + damping)) + (v - u @ coefficients) * complement
  return m, values


def apply(transform, unravel, v):
  tree = unravel(jnp.asarray(v, jnp.float32))
  out, _ = transform.update(tree, transform.init(tree))
  return np.asarray(ravel_pytree(out)[0], np.float64)


@pytest.mark.parametrize("rank, batch_size, weighted", [(8, N, False), (8, 4, True), (40, N, False)])
def test_preconditioner_equals_its_definition(problem, rank, batch_size, weighted):
  """Rank 8 of the 18-dimensional range of Jᵀ (one chunk; two padded chunks with weights c), and rank
  40 ≥ N·C, capped at 18, where the sketch is exact and M = (H₀ + μI)⁻¹."""
  lin, variables, h, jac, unravel = problem
  c = np.random.default_rng(3).uniform(0.5, 4.0, N) if weighted else np.ones(N)
  jac_tilde = np.sqrt(np.repeat(c, C) / N)[:, None] * jac
  key = jax.random.key(7)
  sketch = nystrom.sketch(lin.tail, variables, h, lin.trainable_paths, rank=rank, batch_size=batch_size,
                          weights=jnp.asarray(c, jnp.float32) if weighted else None, rng=key)
  ell = min(rank, N * C)
  m, values = reference_preconditioner(jac_tilde, gaussian_test_matrix(key, ell, batch_size), LAM)
  assert sketch.basis.shape == (jac.shape[1], ell) and sketch.eigenvalues.shape == (ell,)
  # λ̂ are eigenvalues of a float32 Gram matrix: absolute rounding ε₃₂·λ̂₁ (times a few for the sums).
  np.testing.assert_allclose(sketch.eigenvalues, values, rtol=1e-4, atol=30 * EPS32 * values[0])
  basis = np.asarray(sketch.basis, np.float64)
  np.testing.assert_allclose(basis.T @ basis, np.eye(ell), atol=1e-5)
  transform = nystrom.nystrom_precondition(sketch, LAM)
  rng = np.random.default_rng(0)
  for v in (rng.normal(size=jac.shape[1]), jac_tilde.T @ rng.normal(size=N * C)):  # any / range of Jᵀ
    expected = m(v)
    # M·v sums terms up to ‖v‖/(λ̂_ℓ + μ) that cancel to ‖Mv‖: float32 rounding relative to that scale.
    scale = np.linalg.norm(v) / (float(sketch.residual) + LAM)
    np.testing.assert_allclose(apply(transform, unravel, v), expected, atol=300 * EPS32 * scale)
  if ell == N * C:  # M = (J̃ᵀJ̃ + μI)⁻¹ = (I − J̃ᵀ(J̃J̃ᵀ + μI)⁻¹J̃)/μ (Woodbury)
    v = rng.normal(size=jac.shape[1])
    inverse = (v - jac_tilde.T @ np.linalg.solve(jac_tilde @ jac_tilde.T + LAM * np.eye(N * C),
                                                 jac_tilde @ v)) / LAM
    np.testing.assert_allclose(apply(transform, unravel, v), inverse,
                               atol=300 * EPS32 * np.linalg.norm(v) / LAM)


def test_preconditioner_names_the_parameters_it_does_not_cover(problem):
  lin, variables, h, _, _ = problem
  sketch = nystrom.sketch(lin.tail, variables, h, lin.trainable_paths, rank=4)
  assert [path for path, _ in sketch.parameters] == sorted(lin.trainable_paths)
  delta = lin.init_delta(variables)
  updates, _ = optax.chain(nystrom.nystrom_precondition(sketch, LAM), optax.sgd(0.1)).update(
      delta, optax.chain(nystrom.nystrom_precondition(sketch, LAM), optax.sgd(0.1)).init(delta))
  assert jax.tree.structure(updates) == jax.tree.structure(delta)
  extra = {**delta, "scale": jnp.ones(())}
  with pytest.raises(ValueError, match=r"^parameter 'scale' \(\) is not in the Nyström sketch"):
    nystrom.nystrom_precondition(sketch, LAM).init(extra)
  fewer = {**delta, "head": {"kernel": delta["head"]["kernel"]}}
  with pytest.raises(ValueError, match=r"^parameter 'head/bias' of the Nyström sketch is missing"):
    nystrom.nystrom_precondition(sketch, LAM).init(fewer)
  with pytest.raises(ValueError, match="damping=0.0 must be > 0"):
    nystrom.nystrom_precondition(sketch, 0.0)
