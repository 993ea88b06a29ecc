"""Every certifying computation multiplies at Precision.HIGHEST, whatever the global default.

Each check runs a library call under ``jax.default_matmul_precision('bfloat16')`` — a TPU's default
(a GPU's TensorFloat-32 is the same kind of shortcut) — with JAX's IR dump on, and reads every
``stablehlo.dot_general`` and ``stablehlo.convolution`` that was lowered while it ran, eager operations
included: each must carry HIGHEST. The caches are cleared first, so everything the call uses is lowered
anew. On a CPU these precisions change no number, so this is what catches a certificate that would be
computed with TF32 or bfloat16 products on an accelerator. The control check shows that the detector sees
the global default where the library keeps it (the trunk features, a fast path).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import fit, forget, influence, kfac, mislabel, ntk, nystrom, solve, stability, task_arithmetic
from support import plain

PRODUCT = re.compile(r"= stablehlo\.(dot_general|convolution)\b")


def lowered_products(fn, dump_dir) -> list[str]:
  """The dot_general / convolution lines of every module lowered while ``fn()`` runs under a global
  bfloat16 matmul precision."""
  jax.clear_caches()
  jax.config.update("jax_dump_ir_to", str(dump_dir))
  try:
    with jax.default_matmul_precision("bfloat16"):
      jax.block_until_ready(fn())
  finally:
    jax.config.update("jax_dump_ir_to", "")
  return [line.strip() for path in sorted(dump_dir.glob("*.mlir"))
          for line in path.read_text().splitlines() if PRODUCT.search(line)]


def operand_precisions(line: str) -> tuple[str, ...]:
  """The operand precisions a lowered product names (('none',) if it names none)."""
  return tuple(re.findall(r"(?:precision = \[|, |precision )(HIGHEST|HIGH|DEFAULT)\b", line)) or ("none",)


def inexact(lines: list[str]) -> list[str]:
  """The products not at HIGHEST. One exception: ``jax.lax.conv_general_dilated_patches`` (K-FAC's
  im2col) convolves its HIGHEST input with a 0/1 selection filter at DEFAULT, a grouped convolution
  exact in any precision."""
  def patches(line):
    return "feature_group_count = 1 " not in line and operand_precisions(line) == ("HIGHEST", "DEFAULT")
  return [l for l in lines if set(operand_precisions(l)) != {"HIGHEST"} and not patches(l)]


def precisions(lines: list[str]) -> set[str]:
  return {p for line in lines for p in operand_precisions(line)}


@pytest.fixture(scope="module")
def problem(six_examples):
  """The 6-example linearized ResNet-8 of conftest.py (features at the default precision) and its
  s·one-hot targets."""
  lin, variables, features, labels, _, _ = six_examples
  return lin, variables, features, plain(labels)


def _solve_kernel(lin, variables, features, targets):
  return solve.solve_linearized(lin, variables, features, targets, weight_decay=1e-2, method="kernel",
                                tol=1e-5)[0]


def _solve_kfac(lin, variables, features, targets):
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths)
  return solve.solve_linearized(lin, variables, features, targets, weight_decay=1e-2,
                                method="parameter", curvature=factors, tol=1e-5, batch_size=4)[0]


def _solve_nystrom(lin, variables, features, targets):
  sketch = nystrom.sketch(lin.tail, variables, features.h, lin.trainable_paths, rank=8)
  return solve.solve_linearized(lin, variables, features, targets, weight_decay=1e-2,
                                method="parameter", curvature=sketch, tol=1e-5)[0]


def _certify(lin, variables, features, targets):
  return solve.certify(lin, variables, features, targets, lin.init_delta(variables),
                       weight_decay=1e-2).optimum


def _forget_parameter(lin, variables, features, targets):
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths)
  return forget.forget_by_cg(lin, variables, features, targets, np.array([1]), weight_decay=1e-2,
                             delta=lin.init_delta(variables), curvature=factors, tol=1e-5).delta


def _forget_kernel(lin, variables, features, targets):
  fitted = influence.kernel_fit(lin, variables, features, targets, weight_decay=1e-2)
  return forget.forget_by_downdate(lin, variables, features, targets, np.array([1]), kernel=fitted,
                                   tol=1e-5).delta


def _leave_one_out(lin, variables, features, targets):
  fitted = influence.kernel_fit(lin, variables, features, targets, weight_decay=1e-2)
  scores = mislabel.label_scores(fitted, targets)
  loo = influence.loo_predictions(lin, variables, features, targets, weight_decay=1e-2)
  test = influence.influence_on_test(lin, variables, features, targets, features, weight_decay=1e-2)
  return jnp.asarray(scores.loo_loss), jnp.asarray(loo), jnp.asarray(test)


def _ntk_approximation(lin, variables, features, targets):
  return ntk.ntk_approximation(lin.tail, variables, features.h, lin.trainable_paths)


def _kfac_inverse(lin, variables, features, targets):
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths, weight_sharing="reduce")
  return kfac.kfac_inverse(factors, 1e-2)


def _largest_eigenvalue(lin, variables, features, targets):
  matvec, _ = solve.normal_equations(lin, variables, features, targets, weight_decay=1e-2)
  factors = kfac.curvature_factors(lin.tail, variables, features.h, lin.trainable_paths)
  return jnp.float32(stability.largest_eigenvalue(matvec, solve.preconditioner(factors, 1e-2),
                                                  lin.init_delta(variables), iterations=3))


def _tangent_path(lin, variables, features, targets):
  deltas = [jax.tree.map(lambda a, s=s: jnp.full_like(a, s), lin.init_delta(variables)) for s in (1e-3, 2e-3)]
  return jnp.asarray(task_arithmetic.tangent_path(lin, variables, features, deltas).logits(0.5))


CERTIFYING = [_solve_kernel, _solve_kfac, _solve_nystrom, _certify, _forget_parameter, _forget_kernel,
              _leave_one_out, _ntk_approximation, _kfac_inverse, _largest_eigenvalue, _tangent_path]


@pytest.mark.parametrize("computation", CERTIFYING, ids=lambda f: f.__name__.strip("_"))
def test_certifying_products_are_highest_under_a_bfloat16_default(problem, computation, tmp_path):
  lines = lowered_products(lambda: computation(*problem), tmp_path)
  assert lines, "no matrix product was lowered: the check saw nothing"
  assert not inexact(lines), inexact(lines)[:2]


def test_the_fast_paths_keep_the_global_default(problem, tmp_path):
  """The control: trunk features and the early-stopped fit's steps are traced at the global bfloat16
  default (DEFAULT on the ops), so the check above would see a product that escaped `exact`."""
  lin, variables, features, targets = problem
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 12, 1)), jnp.float32)
  assert precisions(lowered_products(lambda: lin.features(variables, x).f0, tmp_path / "f")) == {"DEFAULT"}
  options = fit.FitOptions(preconditioner="none", steps=2)
  fitted = lambda: jax.tree.leaves(fit.fit_linearized(lin, variables, features, targets, options)[0])[0]
  assert "DEFAULT" in precisions(lowered_products(fitted, tmp_path / "fit"))
