"""The README's "Your own model" snippet, run as printed on its Mixer (no split points), and its LQF part on
an NNX module and on the ViT (split points, K-FAC on attention): the exact solve and the leave-one-out
predictions against dense float64 refits; LQF on the Transformer text classifier."""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lqf
from lqf.models import ViT
from lqf.models.text import TransformerClassifier
from support import ROOT

SCALE = 15.0


def snippet() -> tuple[str, str]:
  """(the whole snippet, its part after ``# LQF on it:``) from README.md."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  code = re.search(r"## Your own model\n.*?```python\n(.*?)```", text, re.S).group(1)
  return code, code.split("# LQF on it:\n")[1]


def run(code: str, namespace: dict) -> dict:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # K-FAC's fallback warning (tests/test_layer_kinds.py checks it)
    exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def check_against_dense(ns: dict, dense_jacobian) -> None:
  """δ* of the certificate solves the normal equations (float64 residual ≤ the solve's tolerance 1e-4,
  objective gap ≤ ½‖r‖²/λ, the quadratic's bound), and each leave-one-out prediction equals the dense
  refit without that example, argmin ½Σ_{j≠i}‖J_jδ − z_j‖² + (Nλ/2)‖δ‖² (z = s·e_y − f0)."""
  lin, variables, feats, y = ns["lin"], ns["variables"], ns["feats"], np.asarray(ns["y"])
  lam = ns["options"].weight_decay
  jac, unravel = dense_jacobian(lin, variables, feats.h)
  n, c = len(y), 3
  z = (SCALE * np.eye(c)[y] - np.asarray(feats.f0, np.float64)).reshape(-1)
  hessian = jac.T @ jac / n + lam * np.eye(jac.shape[1])
  b = jac.T @ z / n
  optimum = np.asarray(jax.flatten_util.ravel_pytree(ns["certificate"].optimum)[0], np.float64)
  residual = np.linalg.norm(hessian @ optimum - b) / np.linalg.norm(b)
  assert residual <= 1e-4 * 1.05 and ns["certificate"].relative_residual <= 1e-4
  exact = np.linalg.solve(hessian, b)
  objective = lambda d: 0.5 * np.sum((jac @ d - z) ** 2) / n + 0.5 * lam * d @ d  # noqa: E731
  assert objective(optimum) - objective(exact) <= 0.5 * (residual * np.linalg.norm(b)) ** 2 / lam * 1.01 + 1e-9
  loo = np.asarray(lqf.loo_predictions(lin, variables, feats, ns["targets"],
                                       weight_decay=lam), np.float64)
  for i in range(n):
    keep = np.repeat(np.arange(n) != i, c)
    j = jac[keep]
    delta = j.T @ np.linalg.solve(j @ j.T + n * lam * np.eye(len(j)), z[keep])
    expected = np.asarray(feats.f0[i], np.float64) + (jac @ delta).reshape(n, c)[i]
    np.testing.assert_allclose(loo[i], expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def test_the_readme_snippet_runs_as_printed(dense_jacobian):
  ns = run(snippet()[0], {})
  assert ns["lin"].split is None  # no split points: the whole network is the tail
  assert ns["certificate"].relative_distance < 1  # the 40-step fit is near δ*, if not on it
  check_against_dense(ns, dense_jacobian)


class NNXModel(nnx.Module):
  """A user's NNX module: Linear -> BatchNorm -> GELU -> Dropout -> Linear on (B, 6) features."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.gelu(self.norm(self.hidden(x)))))


def test_the_snippet_on_an_nnx_module(dense_jacobian):
  module = NNXModel(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (9, 6))
  model, variables = lqf.network.from_nnx(module)
  module.eval()
  logits = np.asarray(module(x))  # dropout off: the same network, up to float32 rounding
  np.testing.assert_allclose(model.apply(variables, x), logits, rtol=0,
                             atol=64 * np.finfo(np.float32).eps * np.abs(logits).max())
  ns = run(snippet()[1], {"lqf": lqf, "model": model, "variables": variables, "x": x,
                          "y": jnp.arange(9) % 3, "trainable": "^(norm|out)/"})
  assert set(ns["lin"].trainable_paths) == {"norm/scale", "norm/bias", "out/kernel", "out/bias"}
  check_against_dense(ns, dense_jacobian)


def test_the_snippet_on_the_vit(dense_jacobian):
  """A tiny ViT (7×7 patches: 16 tokens) with its last block, final LayerNorm and head linearized: the
  tail starts at ``block2`` (the trunk is cached), K-FAC factors its attention projections."""
  model = ViT(3, patch_size=7, width=8, depth=2, num_heads=2, mlp_dim=16, activation="leaky_relu")
  x = jax.random.normal(jax.random.key(3), (9, 28, 28, 1))
  variables = model.init(jax.random.key(4), x[:1])
  code = snippet()[1].replace('preconditioner="nystrom"', 'preconditioner="kfac"')
  ns = run(code, {"lqf": lqf, "model": model, "variables": variables, "x": x, "y": jnp.arange(9) % 3,
                  "trainable": "^(block2|norm|head)/"})
  assert ns["lin"].split == "block2" and ns["feats"].h.shape == (9, 16, 8)
  check_against_dense(ns, dense_jacobian)


def test_lqf_fits_a_text_classifier_given_as_a_function(dense_jacobian):
  """The project's Transformer text classifier as a plain function (`lqf.network.from_function`, its
  inference-mode argument given; no split points: the token ids are h), its block, final LayerNorm and head
  linearized (the LayerNorm on the diagonal fallback): the 40-step K-FAC fit gets within 1 % of the dense
  float64 optimum, (L(δ) − L*)/(L(0) − L*) < 1e-2 (1.1e-3 measured)."""
  model = TransformerClassifier(vocab_size=12, num_classes=3, max_len=5, width=8, depth=1, num_heads=2,
                                mlp_dim=8, dropout=0.5)
  tokens = jax.random.randint(jax.random.key(5), (9, 5), 1, 12).at[:, 4:].set(0)  # the last one padding
  variables = model.init(jax.random.key(6), tokens[:1])
  apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  lin = lqf.linearize.linearize(lqf.network.from_function(apply), variables, "^(block1|ln_final|head)/")
  feats, y = lin.features(variables, tokens), np.arange(9) % 3
  assert lin.split is None and feats.h.dtype == tokens.dtype
  logits = np.asarray(apply(variables, tokens))  # dropout off: the same logits, up to float32 rounding
  np.testing.assert_allclose(feats.f0, logits, rtol=0, atol=64 * np.finfo(np.float32).eps * np.abs(logits).max())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    delta, _ = lqf.fit_linearized(lin, variables, feats, lqf.one_hot_targets(jnp.asarray(y), 3, SCALE),
                                  lqf.FitOptions(preconditioner="kfac"))
  jac, _ = dense_jacobian(lin, variables, feats.h)
  z = (SCALE * np.eye(3)[y] - np.asarray(feats.f0, np.float64)).reshape(-1)
  lam, n = 1e-3, len(y)
  objective = lambda d: 0.5 * np.sum((jac @ d - z) ** 2) / n + 0.5 * lam * d @ d  # noqa: E731
  best = objective(np.linalg.solve(jac.T @ jac / n + lam * np.eye(jac.shape[1]), jac.T @ z / n))
  fitted = np.asarray(jax.flatten_util.ravel_pytree(delta)[0], np.float64)
  assert (objective(fitted) - best) / (objective(np.zeros_like(fitted)) - best) < 1e-2
