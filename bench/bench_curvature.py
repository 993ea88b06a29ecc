r"""Which curvature model preconditions LQF best: the candidates of `lqf.nystrom`'s choice, measured densely.

  python bench/bench_curvature.py --checkpoint /tmp/pretrain_mnist    # ~30 min on 2 CPU cores

The demo problem of `bench_lqf.py` (25 shots of `mnist5k` digits 5–9, stage3 + head of a leaky ResNet-8,
58,053 parameters, λ = 1e-3, s = 15, ridge head). The Jacobian J (625 × 58,053) is computed explicitly
and everything below runs in float64 on it, so the numbers are properties of the preconditioners, not of
float32 rounding: H = JᵀJ/N + λI, b = Jᵀ(sY − f0)/N. For each preconditioner M (an approximate H⁻¹):
PCG iterations to 99 % of the optimal objective decrease (= steps of `lqf.step_rules.quadratic_model_step`
with that preconditioner) and to relative residual 1e-4 (cap 400), and λmax(MH) by 60 power
iterations. Candidates:

* none; K-FAC (`lqf.kfac`, KFC "expand" and "reduce" conventions);
* K-FAC with each layer's G rescaled by tr(H_ll)/(tr A · tr G) (the trace of its true Gauss-Newton block,
  from J): the per-layer scalar correction of the spatial-correlation error before global pooling;
* eigenvalue-corrected K-FAC (George et al. 2018): the Kronecker eigenbases U_A ⊗ U_G of each K-FAC block
  with the diagonal refitted from the per-example Jacobians, D = (1/N) Σ_{n,c} (U_Aᵀ J_nc U_G)²;
* randomized Nyström (Frangella, Tropp & Udell 2021) of JᵀJ/N at ranks ``--ranks``, with a Gaussian test
  matrix in parameter space (their Algorithm 2.1) or in the range of Jᵀ (Ω = JᵀΨ, `lqf.nystrom`);
* the range sketch on its span and the rescaled K-FAC on the rest.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from bench_lqf import NUM_CLASSES, SCALE, TAIL, source_model, target_data, with_head
from lqf import data, kfac
from lqf import linearize as lin_lib
from lqf.runtime import parallel

flags.DEFINE_string("checkpoint", None, "Pretraining workdir of the demo's source (configs/pretrain_mnist.py).")
flags.DEFINE_list("ranks", ["32", "64", "128", "256", "400"], "Nyström ranks.")
FLAGS = flags.FLAGS
LAM = 1e-3


class Problem:
  """H = JᵀJ/N + λI, b, the objective and the optimum of the demo problem in float64."""

  def __init__(self, jac: np.ndarray, z: np.ndarray, n: int):
    self.jac, self.n = jac, n
    self.b = jac.T @ z / n
    kernel = jac @ jac.T
    self.optimum = jac.T @ np.linalg.solve(kernel + n * LAM * np.eye(len(kernel)), z)
    self.objective = lambda x: 0.5 * np.sum((jac @ x - z) ** 2) / n + 0.5 * LAM * x @ x  # noqa: E731
    self.start, self.best = self.objective(0 * self.optimum), self.objective(self.optimum)

  def hess(self, v: np.ndarray) -> np.ndarray:
    return self.jac.T @ (self.jac @ v) / self.n + LAM * v

  def pcg(self, precondition, maxiter: int = 400, tol: float = 1e-4) -> tuple[int | None, int | None]:
    """(iterations to 99 % of the optimal decrease, iterations to relative residual ``tol``)."""
    x, r = np.zeros_like(self.b), self.b.copy()
    z = precondition(r)
    p, rz, reached = z.copy(), r @ z, None
    for k in range(1, maxiter + 1):
      hp = self.hess(p)
      alpha = rz / (p @ hp)
      x, r = x + alpha * p, r - alpha * hp
      if reached is None and self.objective(x) - self.best <= 0.01 * (self.start - self.best):
        reached = k
      if np.linalg.norm(r) <= tol * np.linalg.norm(self.b):
        return reached, k
      z = precondition(r)
      rz_new = r @ z
      p, rz = z + rz_new / rz * p, rz_new
    return reached, None

  def largest_eigenvalue(self, precondition, iterations: int = 60) -> float:
    v = np.random.default_rng(0).normal(size=len(self.b))
    estimate = 0.0
    for _ in range(iterations):
      hv = self.hess(v)
      mhv = precondition(hv)
      estimate = (hv @ mhv) / (hv @ v)
      v = mhv / np.linalg.norm(mhv)
    return estimate


class Layout:
  """Slices of the flat parameter vector (ravel_pytree order) per leaf, and Kronecker rows per layer."""

  def __init__(self, delta):
    flat = jax.tree_util.tree_flatten_with_path(delta)[0]
    self.shapes = {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in self.shapes.values()])
    self.slices = {p: slice(offsets[i], offsets[i + 1]) for i, p in enumerate(self.shapes)}

  def leaves(self, layer: str) -> list[str]:
    return [f"{layer}/{leaf}" for leaf in ("kernel", "bias") if f"{layer}/{leaf}" in self.slices]

  def rows(self, layer: str, m: np.ndarray) -> np.ndarray:
    """m (..., P) -> the layer's (..., kernel rows [+ bias row], out)."""
    out = self.shapes[f"{layer}/kernel"][-1]
    return np.concatenate([m[..., self.slices[p]].reshape(*m.shape[:-1], -1, out)
                           for p in self.leaves(layer)], axis=-2)

  def write(self, layer: str, rows: np.ndarray, out: np.ndarray) -> None:
    start = 0
    for p in self.leaves(layer):
      count = self.slices[p].stop - self.slices[p].start
      out[self.slices[p]] = rows.reshape(-1)[start:start + count]
      start += count


def kfac_candidate(factors, unravel):
  inverse = jax.jit(kfac.apply_inverse)
  damped = kfac.kfac_inverse(factors, LAM)
  return lambda v: np.asarray(ravel_pytree(inverse(damped, unravel(jnp.asarray(v, jnp.float32))))[0],
                              np.float64)


def ekfac_candidate(factors, layout: Layout, jac: np.ndarray, n: int):
  """(U_A ⊗ U_G)(D + λ)⁻¹(U_A ⊗ U_G)ᵀ per layer, D refitted from J; 1/(diag + λ) on BatchNorm leaves."""
  blocks = {}
  for layer, (a, g) in factors.kronecker.items():
    _, ua = np.linalg.eigh(np.asarray(a, np.float64))
    _, ug = np.linalg.eigh(np.asarray(g, np.float64))
    rotated = np.einsum("ri,nro,oj->nij", ua, layout.rows(layer, jac), ug)
    blocks[layer] = (ua, ug, np.sum(rotated ** 2, axis=0) / n)
  diagonal = {p: np.sum(jac[:, layout.slices[p]] ** 2, axis=0) / n for p in factors.diagonal}

  def precondition(v):
    out = np.zeros_like(v)
    for layer, (ua, ug, d) in blocks.items():
      m = layout.rows(layer, v[None])[0]
      layout.write(layer, ua @ ((ua.T @ m @ ug) / (d + LAM)) @ ug.T, out)
    for p, d in diagonal.items():
      out[layout.slices[p]] = v[layout.slices[p]] / (d + LAM)
    return out
  return precondition


def nystrom_candidate(jac: np.ndarray, n: int, omega: np.ndarray, spans_range: bool, rest=None):
  """Frangella et al.'s Nyström of JᵀJ/N from the test matrix Ω (float64, Algorithm 2.1 with SVD);
  M = U(Λ̂ + λ)⁻¹Uᵀ + the complement scaled by 1/(λ̂_ℓ + λ) (or ``rest`` projected onto it)."""
  q, _ = np.linalg.qr(omega)
  y = jac.T @ (jac @ q) / n
  nu = np.sqrt(len(q)) * np.finfo(np.float64).eps * np.linalg.norm(y, 2)
  shifted = y + nu * q
  chol = np.linalg.cholesky(q.T @ shifted)
  u, sigma, _ = np.linalg.svd(np.linalg.solve(chol, shifted.T).T, full_matrices=False)
  values = np.maximum(sigma ** 2 - nu, 0.0)
  complement = 1.0 / ((0.0 if spans_range else values[-1]) + LAM)

  def precondition(v):
    coefficients = u.T @ v
    other = v - u @ coefficients
    if rest is not None:
      other = rest(other)
      other = other - u @ (u.T @ other)
    else:
      other = complement * other
    return u @ (coefficients / (values + LAM)) + other
  return precondition


def main(argv):
  del argv
  parallel.single_threaded_blas()
  model, source, _ = source_model(FLAGS.checkpoint)
  images, labels = data.load_arrays(target_data(25), "train")
  variables = with_head(model, source, jnp.asarray(images), labels, "ridge", 1.0)
  lin = lin_lib.linearize(model, variables, TAIL)
  features = lin.features(variables, jnp.asarray(images))
  delta = lin.init_delta(variables)
  _, unravel = ravel_pytree(delta)
  per_example = jax.jit(jax.vmap(lambda h: jax.jacrev(lambda d: lin.apply(d, variables, h[None])[0])(delta)))
  jac_tree = per_example(features.h)
  n = len(labels)
  jac = np.concatenate([np.asarray(j, np.float64).reshape(n, NUM_CLASSES, -1)
                        for j in jax.tree.leaves(jac_tree)], axis=2).reshape(n * NUM_CLASSES, -1)
  z = (SCALE * np.eye(NUM_CLASSES)[labels] - np.asarray(features.f0, np.float64)).reshape(-1)
  problem, layout = Problem(jac, z, n), Layout(delta)
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths)
  traces = {layer: np.sum(layout.rows(layer, jac) ** 2) / n / (float(jnp.trace(a)) * float(jnp.trace(g)))
            for layer, (a, g) in factors.kronecker.items()}
  rescaled = kfac.KFACFactors({k: (a, g * traces[k]) for k, (a, g) in factors.kronecker.items()},
                              factors.diagonal)
  candidates = {"none": lambda v: v, "K-FAC expand": kfac_candidate(factors, unravel),
                "K-FAC reduce": kfac_candidate(kfac.curvature_factors(lin.tail, variables, features.h,
                                                                      lin.trainable_paths, weight_sharing="reduce"),
                                               unravel),
                "K-FAC, G rescaled by tr(H_ll)": kfac_candidate(rescaled, unravel),
                "EK-FAC": ekfac_candidate(factors, layout, jac, n)}
  rng = np.random.default_rng(0)
  for rank in (int(r) for r in FLAGS.ranks):
    spans = rank >= len(z)
    candidates[f"Nyström {rank}, Gaussian Ω"] = nystrom_candidate(jac, n, rng.normal(size=(jac.shape[1], rank)),
                                                                 False)
    omega = jac.T @ rng.normal(size=(len(z), rank))
    candidates[f"Nyström {rank}, Ω = JᵀΨ"] = nystrom_candidate(jac, n, omega, spans)
    candidates[f"Nyström {rank}, Ω = JᵀΨ + rescaled K-FAC"] = nystrom_candidate(
        jac, n, omega, spans, rest=candidates["K-FAC, G rescaled by tr(H_ll)"])
  print(f"per-layer trace ratios tr(H_ll)/(tr A tr G): {({k: round(v, 2) for k, v in traces.items()})}")
  print(f"{'preconditioner':42s} {'99 %':>6s} {'CG 1e-4':>8s} {'λmax(MH)':>10s}")
  for name, precondition in candidates.items():
    start = time.perf_counter()
    reached, iterations = problem.pcg(precondition)
    top = problem.largest_eigenvalue(precondition)
    fmt = lambda k: ">400" if k is None else str(k)  # noqa: E731
    print(f"{name:42s} {fmt(reached):>6s} {fmt(iterations):>8s} {top:10.4g}   ({time.perf_counter() - start:.0f} s)",
          flush=True)


if __name__ == "__main__":
  app.run(main)
