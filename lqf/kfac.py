"""K-FAC for the linearized network: curvature factors computed once at w0, an optax preconditioner.

The curvature of the LQF objective is constant, H = (1/N) Σ_i J_iᵀJ_i + λI (J_i = ∂f(x_i)/∂w, C × P),
so its Kronecker factors are computed **once** by a pass over the training set (`curvature_factors`)
and inverted once (`kfac_inverse`); a step then costs two small matmuls per layer
(`kfac_precondition`, an ``optax.GradientTransformation``).

Factors. For an ``nn.Dense``/``nn.DenseGeneral``/``nn.Conv`` layer with input a and pre-activation output
s = Wᵀa (+ b), at T output positions t (T = 1 for a Dense on (B, d) inputs; the tokens of a sequence; the
spatial positions of a convolution, a_t the im2col patch of position t in the row order of the flattened
HWIO kernel; `lqf.layers`), and
g_{c,t} = ∂f_c/∂s_t (back-propagated with C output directions, or estimated, see below):

  A = (1/N) Σ_i Σ_t a_{i,t} a_{i,t}ᵀ,        G = 1/(N·T) Σ_i Σ_c Σ_t g_{c,i,t} g_{c,i,t}ᵀ.

A gets a trailing constant-1 input when the bias is trainable (a bias-only layer has a = 1). With the
kernel W (in, out) flattened row-major, A ⊗ G (``np.kron(A, G)``) approximates the layer's block of
(1/N) Σ_i J_iᵀJ_i — exactly the KFC convention of Grosse & Martens (2016): independence of a and g,
spatially uncorrelated g, spatial homogeneity (the block is Σ_t E[a_t a_tᵀ] ⊗ E[Σ_c g_t g_tᵀ]).
For a weighted objective 1/(2N) Σ_i c_i ‖f_i − t_i‖² (`lqf.losses.WeightedTargets`) the output-side
sums (G and the diagonal blocks) carry the weight c_i of each example (`curvature_factors`).
With ``estimator="rademacher"`` the C backward passes are replaced by ``num_vectors`` random ±1
output directions v, g = J_sᵀv, an unbiased estimate of G (E[v vᵀ] = I).

``weight_sharing="reduce"`` (Eschenhagen et al. 2023, K-FAC-reduce) sums over positions first:
A = (1/N) Σ_i ā_i ā_iᵀ with ā = mean_t a_t, G = (1/N) Σ_i Σ_c ĝ ĝᵀ with ĝ = Σ_t g_t — exact when g_t
does not depend on t (a conv followed by linear global pooling). Before global pooling its blocks match
the true Gauss-Newton blocks much better than "expand"'s, whose spatially-uncorrelated-g assumption fails
there, yet as a block-diagonal preconditioner it can take more steps (`bench/RESULTS.md`,
`bench/bench_curvature.py`).

BatchNorm scale/bias are diagonal blocks: the exact Gauss-Newton diagonal (1/N) Σ_i Σ_c (∂f_c/∂θ)²
(per-sample gradients). So is any trainable parameter of no Dense / DenseGeneral / Conv layer (LayerNorm,
embeddings, a plain function's or an NNX module's parameters; `lqf.layers`), named in one warning.

Preconditioning. For a kernel W (in, out) (bias row appended) with gradient ∇W:
  (A + π√λ I)⁻¹ ∇W (G + (√λ/π) I)⁻¹,  π = sqrt((tr A / dim A) / (tr G / dim G)),
the factored Tikhonov damping of Martens & Grosse (2015, §6.3), whose Kronecker product approximates
A ⊗ G + λI; λ is the weight decay (the objective's own Tikhonov term) plus any extra damping.
Diagonal blocks: ∇θ / (d + λ).

Step size: compose with `lqf.step_rules.quadratic_model_step` (the exact quadratic's step size and
momentum) or an optax optimizer.

Precision. The factors and their inverses are computed with ``Precision.HIGHEST``
products (`lqf.precision`): they precondition the certified solve (`lqf.solve`), and a factor A = E[aaᵀ]
summed from bfloat16 products carries a relative error of ~4e-3 into every eigenvalue the damping is
compared with. Applying the inverse inside a fit's step (`kfac_precondition`) keeps the platform default.

The layers and their per-example quantities (a_t, g_ct) come from `lqf.layers`; `lqf.ntk` reuses them
to approximate the empirical NTK J Jᵀ.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lqf.layers import find_layers, num_outputs, per_example_quantities
from lqf.linearize import split_batches
from lqf.precision import exact

ESTIMATORS = ("exact", "rademacher")
WEIGHT_SHARING = ("expand", "reduce")
Params = Any


class KFACFactors(NamedTuple):
  """Curvature factors at w0.

  Attributes:
    kronecker: layer path (e.g. ``stage3/block1/conv1``) -> (A, G), A (d_in[+1], d_in[+1]) over the
      flattened kernel rows (+ bias), G (out, out).
    diagonal: parameter path (e.g. ``stage3/block1/bn1/scale``) -> Gauss-Newton diagonal (its shape).
  """
  kronecker: dict[str, tuple[jnp.ndarray, jnp.ndarray]]
  diagonal: dict[str, jnp.ndarray]


class KFACInverse(NamedTuple):
  """Damped factors raised to a power p: layer path -> ((A + π√λI)^p, (G + √λ/π I)^p); path -> (d + λ)^p.

  p = −1 (`kfac_inverse`, hence the name) is the preconditioner; p = 1 (`kfac_power`) is the damped
  curvature itself, the metric of `lqf.metric`. `apply_inverse` applies either.
  """
  kronecker: dict[str, tuple[jnp.ndarray, jnp.ndarray]]
  diagonal: dict[str, jnp.ndarray]


def _check_weights(weights: jnp.ndarray | None, n: int) -> jnp.ndarray:
  """The (n,) float32 per-example weights (ones for None); an error unless they are (n,) and > 0."""
  if weights is None:
    return jnp.ones((n,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (n,) or not bool(jnp.all(weights > 0)):
    raise ValueError(f"weights must be {n} positive per-example weights, shape ({n},): got shape "
                     f"{weights.shape} with minimum {float(jnp.min(weights, initial=jnp.inf))}.")
  return weights


@functools.partial(jax.jit, static_argnames=("apply_fn", "layers", "batch_size", "estimator",
                                             "num_vectors", "weight_sharing"))
def _factor_sums(variables, inputs, weights, key, *, apply_fn, layers, batch_size, estimator,
                 num_vectors, weight_sharing):
  """Σ_i Σ_t a aᵀ, Σ_i c_i Σ_v Σ_t g gᵀ and Σ_i c_i Σ_v (∂f_v/∂θ)² over the dataset, in batches."""
  num_classes = num_outputs(apply_fn, variables, inputs)

  def per_example(x, k):
    if estimator == "exact":
      directions = jnp.eye(num_classes, dtype=jnp.float32)
    else:
      directions = jax.random.rademacher(k, (num_vectors, num_classes), jnp.float32)
    a, g, g_diag = per_example_quantities(apply_fn, variables, layers, x, directions)
    if weight_sharing == "reduce":
      a = {n: v.mean(axis=0, keepdims=True) for n, v in a.items()}
      g = {n: v.sum(axis=1, keepdims=True) for n, v in g.items()}
    return a, g, g_diag

  def batch_sums(carry, batch):
    (xb, cb), mb, kb = batch
    a, g, g_diag = jax.vmap(per_example)(xb, kb)
    sums = ({n: (jnp.einsum("ntd,nte,n->de", a[n], a[n], mb),
                 jnp.einsum("nvtd,nvte,n->de", g[n], g[n], mb * cb)) for n in a},
            {p: jnp.einsum("nv...,n->...", d ** 2, mb * cb) for p, d in g_diag.items()})
    return jax.tree.map(jnp.add, carry, sums), None

  flat_params = traverse_util.flatten_dict(variables["params"], sep="/")
  zeros = ({l.name: (jnp.zeros((l.in_dim, l.in_dim)), jnp.zeros((l.out_dim,) * 2))
            for l in layers if l.kind == "kronecker"},
           {path: jnp.zeros(flat_params[path].shape)
            for l in layers if l.kind == "diagonal" for path in l.paths()})
  xs, mask = split_batches((inputs, weights), min(batch_size, inputs.shape[0]))
  keys = jax.random.split(key, mask.shape)
  sums, _ = jax.lax.scan(batch_sums, zeros, (xs, mask, keys))
  return sums


@exact
def curvature_factors(apply_fn: Callable[[dict, jnp.ndarray], jnp.ndarray], variables: dict,
                      inputs: jnp.ndarray, trainable: Collection[str], *, batch_size: int = 128,
                      estimator: str = "exact", num_vectors: int = 1, rng: jax.Array | None = None,
                      weight_sharing: str = "expand",
                      weights: jnp.ndarray | None = None) -> KFACFactors:
  """Computes the K-FAC factors of the trainable layers at w0 by one pass over the data.

  With per-example weights c (the objective 1/(2N) Σ_i c_i ‖f_i − t_i‖², curvature
  (1/N) Σ_i c_i J_iᵀJ_i) the output-side quantities are weighted: G = 1/(N·T) Σ_i c_i Σ_c Σ_t g gᵀ
  and the diagonal blocks (1/N) Σ_i c_i Σ_c (∂f_c/∂θ)² (the loss's output Hessian c_i·I enters where
  the output gradients do); A stays (1/N) Σ_i Σ_t a aᵀ.

  Args:
    apply_fn: (variables, inputs (B, ...)) -> logits (B, C), a Flax ``apply`` in inference mode
      without batch coupling (e.g. ``Linearized.tail``); hashable (it is a static jit argument).
    variables: w0.
    inputs: (N, ...) inputs of ``apply_fn`` (e.g. the cached trunk features h).
    trainable: '/'-joined paths of the trainable parameters (e.g. ``Linearized.trainable_paths``).
    batch_size: examples per pass.
    estimator: ``"exact"`` (G with C backward passes) or ``"rademacher"`` (``num_vectors`` random ±1
      output directions per example; unbiased).
    num_vectors: directions per example for ``"rademacher"``.
    rng: key for ``"rademacher"``.
    weight_sharing: ``"expand"`` or ``"reduce"`` (module docstring).
    weights: (N,) positive per-example weights c, or None for c = 1.

  Returns:
    `KFACFactors` normalized as in the module docstring (A ⊗ G ≈ the block of
    (1/N) Σ_i c_i J_iᵀJ_i).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r} is unknown: use one of {ESTIMATORS}.")
  if estimator == "rademacher" and rng is None:
    raise ValueError("estimator='rademacher' needs rng: pass a jax.random.key.")
  if weight_sharing not in WEIGHT_SHARING:
    raise ValueError(f"weight_sharing={weight_sharing!r} is unknown: use one of {WEIGHT_SHARING}.")
  n = inputs.shape[0]
  weights = _check_weights(weights, n)
  layers = find_layers(apply_fn, variables, inputs[:1], frozenset(trainable))
  kron_sums, diag_sums = _factor_sums(
      variables, inputs, weights, jax.random.key(0) if rng is None else rng, apply_fn=apply_fn,
      layers=layers,
      batch_size=batch_size, estimator=estimator, num_vectors=num_vectors,
      weight_sharing=weight_sharing)
  per_direction = 1 if estimator == "exact" else num_vectors
  positions = {l.name: l.positions if weight_sharing == "expand" else 1
               for l in layers if l.kind == "kronecker"}
  return KFACFactors(
      kronecker={k: (a / n, g / (n * positions[k] * per_direction)) for k, (a, g) in kron_sums.items()},
      diagonal={p: d / (n * per_direction) for p, d in diag_sums.items()})


def _damped_power(m: jnp.ndarray, damping: jnp.ndarray, power: int) -> jnp.ndarray:
  """(m + damping·I)^power of a symmetric PSD m, through its eigendecomposition."""
  eigenvalues, vectors = jnp.linalg.eigh(m)
  damped = jnp.maximum(eigenvalues, 0.0) + damping
  return (vectors / damped if power == -1 else vectors * damped ** power) @ vectors.T


@exact
def kfac_inverse(factors: KFACFactors, damping: float) -> KFACInverse:
  """Inverts the damped factors once: ((A + π√λI)⁻¹, (G + √λ/π I)⁻¹) per layer, 1/(d + λ) per leaf.

  Args:
    factors: from `curvature_factors`.
    damping: λ > 0, the weight decay of the objective plus any extra damping.
  """
  return kfac_power(factors, damping, -1)


@exact
def kfac_power(factors: KFACFactors, damping: float, power: int) -> KFACInverse:
  """The damped factors raised to ``power`` (−1: `kfac_inverse`; 1: the metric M = (A + π√λI) ⊗
  (G + √λ/π I) per layer, d + λ per diagonal leaf, which `apply_inverse` then multiplies by)."""
  if damping <= 0:
    raise ValueError(f"damping={damping} must be > 0: use the weight decay (plus extra damping).")
  return _damped_powers(factors, jnp.float32(damping), power)


@functools.partial(jax.jit, static_argnames="power")
def _damped_powers(factors: KFACFactors, damping: jnp.ndarray, power: int) -> KFACInverse:
  """The jitted body of `kfac_power` (one compiled program for all layers; eager eigh is slow)."""
  root = jnp.sqrt(damping)
  kron = {}
  for name, (a, g) in factors.kronecker.items():
    mean_a, mean_g = jnp.trace(a) / a.shape[0], jnp.trace(g) / g.shape[0]
    pi = jnp.where((mean_a > 0) & (mean_g > 0), jnp.sqrt(mean_a / jnp.where(mean_g > 0, mean_g, 1.0)),
                   1.0)
    kron[name] = (_damped_power(a, pi * root, power), _damped_power(g, root / pi, power))
  diag = {p: 1.0 / (d + damping) if power == -1 else (d + damping) ** power
          for p, d in factors.diagonal.items()}
  return KFACInverse(kron, diag)


def apply_inverse(inverse: KFACInverse, tree: Params) -> Params:
  """Preconditions a pytree shaped like the trainable parameters (see the module docstring).

  A layer's kernel is flattened row-major to the matrix (rows, out) with out = dim G (a DenseGeneral's
  features flattened), its bias (…, out) appended as a last row;
  the matrix M becomes A⁻¹ M G⁻¹ with the damped inverse factors.
  """
  flat = traverse_util.flatten_dict(tree, sep="/")
  _check_covered(inverse, flat)
  out = dict(flat)
  for name, (a_inv, g_inv) in inverse.kronecker.items():
    leaves = [leaf for leaf in ("kernel", "bias") if f"{name}/{leaf}" in flat]
    rows = [flat[f"{name}/{leaf}"].reshape(-1, g_inv.shape[0]) for leaf in leaves]
    m = a_inv @ jnp.concatenate(rows, axis=0) @ g_inv
    start = 0
    for leaf, r in zip(leaves, rows):
      out[f"{name}/{leaf}"] = m[start:start + r.shape[0]].reshape(flat[f"{name}/{leaf}"].shape)
      start += r.shape[0]
  for path, d_inv in inverse.diagonal.items():
    out[path] = flat[path] * d_inv
  return traverse_util.unflatten_dict(out, sep="/")


def _check_covered(inverse: KFACInverse, flat: dict[str, Any]) -> None:
  """Raises for a leaf of ``flat`` without a block, or a block without its leaves."""
  covered = {f"{name}/{leaf}" for name in inverse.kronecker for leaf in ("kernel", "bias")}
  covered |= set(inverse.diagonal)
  for path in flat:
    if path not in covered:
      raise ValueError(f"parameter {path!r} has no K-FAC block: compute the factors with the same "
                       f"trainable set as the parameters being updated.")
  for name, (a_inv, g_inv) in inverse.kronecker.items():
    rows = sum(int(np.prod(flat[f"{name}/{leaf}"].shape)) // g_inv.shape[0] if leaf == "kernel" else 1
               for leaf in ("kernel", "bias") if f"{name}/{leaf}" in flat)
    if rows != a_inv.shape[0]:
      raise ValueError(f"layer {name!r}: the updates have {rows} rows (kernel + bias) but its factor A "
                       f"has {a_inv.shape[0]}: compute the factors with the same trainable set.")


class KFACState(NamedTuple):
  """State of `kfac_precondition`: the damped inverse factors (arrays passed through jit, not closed)."""
  inverse: KFACInverse


def kfac_precondition(factors: KFACFactors, damping: float) -> optax.GradientTransformation:
  """An optax transform that maps gradients g to the K-FAC preconditioned direction (Ã ⊗ G̃)⁻¹ g.

  Compose it with a step rule, e.g. ``optax.chain(kfac_precondition(f, λ), optax.sgd(lr, momentum))``
  or ``optax.chain(kfac_precondition(f, λ), lqf.step_rules.quadratic_model_step(...))``. The damped
  factors are inverted
  here, once; the inverses live in the state so jitted steps receive them as arguments.

  Args:
    factors: from `curvature_factors` (computed at w0 with the same trainable set).
    damping: λ, the objective's weight decay (its Tikhonov term) plus any extra damping.
  """
  inverse = kfac_inverse(factors, damping)

  def init_fn(params):
    _check_covered(inverse, traverse_util.flatten_dict(params, sep="/"))
    return KFACState(inverse)

  def update_fn(updates, state, params=None):
    del params
    return apply_inverse(state.inverse, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def stream_factors(lin: Any, variables: dict, batches: Iterable[dict], *, batch_size: int = 128,
                   max_examples: int | None = None) -> KFACFactors:
  """The K-FAC factors at w0 of the first ``max_examples`` (None: all) images of ``batches``.

  One pass, one batch of images at a time ({'image', 'mask'} as `lqf.data.eval_batches` yields
  them): h = trunk(x) of the batch, its factors F_b = `curvature_factors` (``batch_size``
  examples per K-FAC chunk), and F = Σ_b n_b F_b / Σ_b n_b. Every factor is a mean over examples, so F
  equals `curvature_factors` on the concatenated h of those examples. The curvature is constant, so
  this pass is never repeated.
  """
  total, n = None, 0
  for batch in batches:
    images = np.asarray(batch["image"])[np.asarray(batch["mask"]) > 0]
    if max_examples is not None:
      images = images[:max_examples - n]
    if not len(images):
      break
    h = lin.trunk_features(variables, images, batch_size=len(images))
    factors = curvature_factors(lin.tail, variables, h, lin.trainable_paths, batch_size=batch_size)
    weighted = jax.tree.map(lambda f: len(images) * f, factors)
    total = weighted if total is None else jax.tree.map(jnp.add, total, weighted)
    n += len(images)
  if total is None:
    raise ValueError(f"max_examples={max_examples!r}: the batches hold no example for the K-FAC factors: "
                     "pass batches with examples and max_examples >= 1 (or None for all).")
  return jax.tree.map(lambda f: f / n, total)
