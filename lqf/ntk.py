"""A Kronecker-structured approximation of the empirical NTK, the preconditioner of the kernel-form solve.

The empirical NTK K = J Jᵀ (N·C × N·C) of the trainable tail costs N·C Jacobian rows; `ntk_approximation`
builds K̃ ≈ K from the per-layer quantities K-FAC uses (`lqf.layers`: inputs a_t and output gradients
g_ct), at the cost of one pass. `lqf.solve` inverts it once, (C^½K̃C^½ + NλI)⁻¹, to precondition the
conjugate gradient of the kernel form. Computed with ``Precision.HIGHEST`` products (`lqf.precision`): it
preconditions a certified solve.
"""

from __future__ import annotations

import functools
from typing import Callable, Collection

import jax
import jax.numpy as jnp

from lqf.layers import find_layers, num_outputs, per_example_quantities
from lqf.precision import exact


@functools.partial(jax.jit, static_argnames=("apply_fn", "layers", "batch_size"))
def _kernel_parts(variables, inputs, *, apply_fn, layers, batch_size):
  """Per example: spatial means ā (d_in,), sums ĝ (C, out) per Kronecker layer, BatchNorm gradients
  (C, *leaf), and the C×C Gram of the spatial fluctuations Σ_layers ⟨Σ_t ã_t g̃_ctᵀ, Σ_s ã_s g̃_ksᵀ⟩."""
  eye = jnp.eye(num_outputs(apply_fn, variables, inputs), dtype=jnp.float32)

  def per_example(x):
    a, g, g_diag = per_example_quantities(apply_fn, variables, layers, x, eye)
    fluctuation = jnp.zeros_like(eye)  # (C, C); stays 0 without Kronecker layers
    for n in a:
      a_dev = a[n] - a[n].mean(axis=0)
      g_dev = g[n] - g[n].mean(axis=1, keepdims=True)
      fluctuation += jnp.einsum("ts,cte,kse->ck", a_dev @ a_dev.T, g_dev, g_dev)
    return ({n: v.mean(axis=0) for n, v in a.items()}, {n: v.sum(axis=1) for n, v in g.items()},
            g_diag, fluctuation)

  return jax.lax.map(per_example, inputs, batch_size=min(batch_size, inputs.shape[0]))


@jax.jit
def _assemble_kernel(mean_a, sum_g, g_diag, fluctuation):
  n, c = fluctuation.shape[:2]
  k = sum(jnp.einsum("nd,md->nm", mean_a[l], mean_a[l])[:, None, :, None]
          * jnp.einsum("nce,mke->ncmk", sum_g[l], sum_g[l]) for l in mean_a)
  k = k + sum(jnp.einsum("nc...,mk...->ncmk", d, d) for d in g_diag.values())
  k = k + jnp.eye(n)[:, None, :, None] * fluctuation[:, :, None, :]
  return k.reshape(n * c, n * c)


@exact
def ntk_approximation(apply_fn: Callable[[dict, jnp.ndarray], jnp.ndarray], variables: dict,
                      inputs: jnp.ndarray, trainable: Collection[str], *,
                      batch_size: int = 128) -> jnp.ndarray:
  """K̃ ≈ K = J Jᵀ, the empirical NTK (N·C × N·C, row (n, c) = n·C + c), from K-FAC's quantities.

  For a layer with inputs a_t and output gradients g_ct at T positions, the per-example Jacobian
  splits exactly into a spatial-mean part and a fluctuation part (ã, g̃: deviations from the means):

    J_nc = Σ_t a_t g_ctᵀ = ā ĝ_cᵀ + Σ_t ã_t g̃_ctᵀ,    ā = mean_t a_t,  ĝ_c = Σ_t g_ct.

  K̃ keeps the kernel of the first part exactly — it is rank one per (n, c), so
  ⟨ā_n ĝ_ncᵀ, ā_m ĝ_mkᵀ⟩ = (ā_n·ā_m)(ĝ_nc·ĝ_mk), the K-FAC-"reduce" structure (Eschenhagen et al.
  2023) kept per example — plus, for the same example only, the C×C Gram of the fluctuation part
  (cross-example fluctuation products and part-cross terms are dropped); BatchNorm parameters enter
  exactly. Every term is PSD. Used as the preconditioner (K̃ + NλI)⁻¹ of the kernel-form CG in
  `lqf.solve` (few examples: memory (N·C)²). A Dense layer on (B, d) inputs (T = 1) is exact.
  """
  layers = find_layers(apply_fn, variables, inputs[:1], frozenset(trainable))
  return _assemble_kernel(*_kernel_parts(variables, inputs, apply_fn=apply_fn, layers=layers,
                                         batch_size=batch_size))
