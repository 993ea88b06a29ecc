r"""Are the certificates true on this backend? The exact solve, forgetting and leave-one-out vs float64.

  python bench/bench_precision.py                       # ~1 min on 2 CPU cores; the same on a GPU or TPU

Real data, a random network: the first 24 UCI digits of the training split (8×8, `lqf.data.bundled`),
a leaky ResNet-8 of width 8 with random weights, trainable stage3 + head (λ = 1e-3, s = 15). The Jacobian
J (240 × P) is computed once with full float32 products and everything reference runs on it in float64:
δ* = H⁻¹b with H = JᵀJ/N + λI, b = Jᵀ(sY − f0)/N; the refit without 5 examples; the leave-one-out logits by
refitting the kernel ridge problem without each example (23·C unknowns, no closed-form LOO formula).

For each global ``jax_default_matmul_precision`` in ``--precisions`` (``default`` = the platform's: TF32
on NVIDIA GPUs, one bfloat16 pass on TPUs, float32 on CPUs), the library's calls run under it and are
compared with the references: the solve's distance ‖δ − δ*‖/‖δ*‖, the residual its certificate claims
and the true one ‖b − Hδ‖/‖b‖ (float64), forgetting by the kernel downdate and by warm CG against the
dense refit, and the largest leave-one-out logit error. The library sets Precision.HIGHEST itself for all
of these (`lqf.precision`), so every row should read like the CPU's. Prints a markdown table and writes
``--out`` (JSON).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from lqf import forget, influence, solve
from lqf import linearize as lin_lib
from lqf.data import bundled
from lqf.losses import one_hot_targets
from lqf.models import ResNet8
from lqf.precision import exact

flags.DEFINE_list("precisions", ["default", "highest", "bfloat16"], "Global matmul precisions to run under.")
flags.DEFINE_string("out", None, "Where to write the rows as JSON (None: print only).")
FLAGS = flags.FLAGS
N, NUM_CLASSES, LAM, SCALE, TAIL = 24, 10, 1e-3, 15.0, "^(stage3|head)/"
FORGET = np.array([0, 5, 11, 17, 23])


def problem():
  """(lin, variables, features, targets, labels, J float64 (N·C, P))."""
  records = bundled.load_split("uci_digits", "train", 8)
  images = jnp.asarray(records.images[:N, ..., None] if records.images.ndim == 3 else records.images[:N],
                       jnp.float32) / 255.0
  labels = np.asarray(records.labels[:N])
  model = ResNet8(num_classes=NUM_CLASSES, width=8, negative_slope=0.1)
  variables = model.init(jax.random.key(0), images[:1])
  lin = lin_lib.linearize(model, variables, TAIL)
  features = exact(lin.features)(variables, images)
  w0, unravel = ravel_pytree(lin.init_delta(variables))
  jac = exact(jax.jacfwd(lambda d: lin.apply(unravel(d), variables, features.h).reshape(-1)))(w0)
  targets = one_hot_targets(jnp.asarray(labels), NUM_CLASSES, SCALE)
  return lin, variables, features, targets, labels, np.asarray(jac, np.float64)


def ridge(jac: np.ndarray, z: np.ndarray, n: int) -> np.ndarray:
  """argmin ½‖Jδ − z‖²/n + (λ/2)‖δ‖² in float64, through the kernel: δ = Jᵀ(JJᵀ + nλI)⁻¹z."""
  return jac.T @ np.linalg.solve(jac @ jac.T + n * LAM * np.eye(len(z)), z)


def references(features, labels, jac):
  """δ*, H (as a product), b, the refit without `FORGET`, and the leave-one-out logits (N, C)."""
  f0 = np.asarray(features.f0, np.float64)
  z = (SCALE * np.eye(NUM_CLASSES)[labels] - f0).reshape(-1)
  optimum = ridge(jac, z, N)
  hess = lambda v: jac.T @ (jac @ v) / N + LAM * v  # noqa: E731
  rows = lambda keep: (keep[:, None] * NUM_CLASSES + np.arange(NUM_CLASSES)).reshape(-1)  # noqa: E731
  kept = np.setdiff1d(np.arange(N), FORGET)
  refit = ridge(jac[rows(kept)], z[rows(kept)], len(kept))
  others = [rows(np.setdiff1d(np.arange(N), [i])) for i in range(N)]
  loo = np.stack([f0[i] + jac[rows(np.array([i]))] @ ridge(jac[r], z[r], N) for i, r in enumerate(others)])
  return optimum, hess, jac.T @ z / N, refit, loo


def measure(precision: str, lin, variables, features, targets, refs) -> dict:
  optimum, hess, b, refit, loo = refs
  flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)  # noqa: E731
  distance = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))  # noqa: E731
  jax.clear_caches()
  with jax.default_matmul_precision(None if precision == "default" else precision):
    delta, info = solve.solve_linearized(lin, variables, features, targets, weight_decay=LAM,
                                         method="kernel", tol=1e-5, maxiter=300)
    kernel = influence.kernel_fit(lin, variables, features, targets, weight_decay=LAM)
    by_kernel = forget.forget_by_downdate(lin, variables, features, targets, FORGET, kernel=kernel,
                                          tol=1e-5)
    by_cg = forget.forget_by_cg(lin, variables, features, targets, FORGET, weight_decay=LAM, delta=delta,
                                tol=1e-5)
    loo_logits = influence.loo_predictions(lin, variables, features, targets, weight_decay=LAM)
  x = flat(delta)
  return dict(precision=precision, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
              jax=jax.__version__, solve_distance=distance(x, optimum),
              claimed_residual=info.relative_residual,
              true_residual=float(np.linalg.norm(b - hess(x)) / np.linalg.norm(b)),
              forget_kernel_distance=distance(flat(by_kernel.delta), refit),
              forget_cg_distance=distance(flat(by_cg.delta), refit),
              loo_max_error=float(np.abs(np.asarray(loo_logits) - refs[4]).max() / np.abs(refs[4]).max()))


def main(argv):
  del argv
  lin, variables, features, targets, labels, jac = problem()
  refs = references(features, labels, jac)
  rows = [measure(p, lin, variables, features, targets, refs) for p in FLAGS.precisions]
  print(f"{rows[0]['device']} ({rows[0]['backend']}), jax {rows[0]['jax']}, {jac.shape[1]:,} parameters, "
        f"N = {N}")
  print("| global precision | ‖δ − δ*‖/‖δ*‖ | claimed residual | true residual | forget (kernel) | "
        "forget (CG) | LOO max rel. error |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['precision']} | {r['solve_distance']:.2e} | {r['claimed_residual']:.2e} | "
          f"{r['true_residual']:.2e} | {r['forget_kernel_distance']:.2e} | {r['forget_cg_distance']:.2e} | "
          f"{r['loo_max_error']:.2e} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
