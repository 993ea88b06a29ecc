"""The studies' PC-training objective: each config entry is the composition written out by hand."""

import numpy as np
import pytest

import compat
from experiments import pc_objective

B, K = 6, 5


def _batch(seed):
  rng = np.random.default_rng(seed)
  new, old = (3.0 * rng.normal(size=(2, B, K))).astype(np.float32)
  labels = rng.integers(0, K, B)
  labels[:2] = np.argmax(old[:2], axis=1)  # the old model is right on two examples
  return new, old, labels


def _np_cross_entropy(z, y):
  z = z.astype(np.float64)
  log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
  return -np.mean(log_p[np.arange(len(y)), y])


@pytest.mark.parametrize("method, kwargs, term", [
    ("fd_kl", dict(temperature=7.0), lambda z, o, y: compat.focal_distillation_kl(z, o, y, temperature=7.0)),
    ("fd_lm", dict(reduction="mean"), lambda z, o, y: compat.focal_distillation_lm(z, o, y, reduction="mean")),
    ("kd", dict(temperature=7.0), lambda z, o, y: compat.knowledge_distillation(z, o, temperature=7.0)),
    ("ldi", dict(xi=0.1, exclude_gt=True),
     lambda z, o, y: compat.logit_difference_inhibition(z, o, xi=0.1, labels=y, exclude_gt=True))])
def test_each_entry_is_cross_entropy_plus_its_term(method, kwargs, term):
  new, old, labels = _batch(1)
  ce, d = _np_cross_entropy(new, labels), float(term(new, old, labels))
  summed = pc_objective.objective(dict(method=method, lam=0.3, **kwargs))
  np.testing.assert_allclose(summed(new, old, labels), ce + 0.3 * d, rtol=1e-5)
  reference = pc_objective.objective(dict(method=method, weighting="reference", kd_alpha=0.9, **kwargs))
  np.testing.assert_allclose(reference(new, old, labels), 0.1 * ce + 0.9 * d, rtol=1e-5)
  # 'sum' with λ = a/(1 − a) is 'reference' with a, up to the factor 1/(1 − a) = 1 + λ.
  nine = pc_objective.objective(dict(method=method, lam=9.0, **kwargs))
  np.testing.assert_allclose(0.1 * nine(new, old, labels), reference(new, old, labels), rtol=1e-4)


def test_none_is_plain_cross_entropy():
  new, _, labels = _batch(2)
  np.testing.assert_allclose(pc_objective.objective({"method": "none"})(new, None, labels),
                             _np_cross_entropy(new, labels), rtol=0,
                             atol=8 * np.finfo(np.float32).eps * np.abs(new).max())  # float32 log-sum-exp


@pytest.mark.parametrize("spec, message", [
    (dict(method="fd"), r"^config\.methods\.x\.method='fd' is unknown"),
    (dict(method="kd", weighting="convex"), r"^config\.methods\.x\.weighting='convex' is unknown"),
    (dict(method="kd", weighting="reference"), r"^config\.methods\.x\.kd_alpha=None: .* needs kd_alpha in"),
    (dict(method="kd", weighting="reference", kd_alpha=1.5), r"needs kd_alpha in \[0, 1\]"),
    (dict(method="kd", kd_alpha=0.9), r"kd_alpha=0.9 is only used with weighting='reference'"),
    (dict(method="kd", beta=5.0), r"^config\.methods\.x\.beta is not an argument of method='kd'")])
def test_a_bad_entry_is_one_line_naming_its_field(spec, message):
  with pytest.raises(ValueError, match=message):
    pc_objective.objective(spec, "config.methods.x")
