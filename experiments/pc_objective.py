"""The positive-congruent training objective a study's config names, composed from `compat.losses`.

A config's ``methods.<name>`` entry is ``{method, weighting, lam | kd_alpha, <the term's arguments>}``:

* ``method``: the distillation term D (`TERMS`: fd_kl, fd_lm, kd, ldi) or ``none`` (plain cross-entropy);
* ``weighting='sum'``: L = CE + λ·D with λ = ``lam`` (default 1); ``weighting='reference'``:
  L = (1 − a)·CE + a·D with a = ``kd_alpha`` ∈ [0, 1] (the reference implementation's recipe, see
  `compat.losses`);
* every other key is a keyword argument of the term's function (e.g. ``temperature``, ``alpha``,
  ``beta``, ``reduction``, ``xi``, ``p``, ``exclude_gt``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax

import compat

Objective = Callable[[jax.Array, jax.Array | None, jax.Array], jax.Array]  # (z_new, z_old, y) -> loss
NONE = "none"
WEIGHTINGS = ("sum", "reference")


# D(z_new, z_old, **arguments) of each method name (with labels=y where the function takes them).
TERMS = {"fd_kl": compat.focal_distillation_kl, "fd_lm": compat.focal_distillation_lm,
         "kd": compat.knowledge_distillation, "ldi": compat.logit_difference_inhibition}
_DATA = ("new_logits", "old_logits", "ref_logits", "labels", "old_class_mask", "class_mask", "weights")


def objective(spec: Mapping[str, Any], field: str = "loss") -> Objective:
  """The objective of the config entry ``spec`` (module docstring); a bad entry is one line naming
  ``field`` (e.g. ``config.methods.fd_kl``) before anything is traced."""
  spec = dict(spec)
  method, weighting = spec.pop("method", None), spec.pop("weighting", "sum")
  lam, kd_alpha = spec.pop("lam", None), spec.pop("kd_alpha", None)
  if method != NONE and method not in TERMS:
    raise ValueError(f"{field}.method={method!r} is unknown: use one of {(*TERMS, NONE)}.")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"{field}.weighting={weighting!r} is unknown: use one of {WEIGHTINGS}.")
  if weighting == "reference" and (kd_alpha is None or not 0.0 <= kd_alpha <= 1.0):
    raise ValueError(f"{field}.kd_alpha={kd_alpha!r}: weighting='reference' needs kd_alpha in [0, 1] "
                     "(the reference recipe: 0.9 for FD-KL, 0.8 for ELODI).")
  if weighting == "sum" and kd_alpha is not None:
    raise ValueError(f"{field}.kd_alpha={kd_alpha} is only used with weighting='reference': "
                     "weighting='sum' takes lam (L = CE + lam·D).")
  if method == NONE:
    return lambda new, old, labels: compat.cross_entropy(new, labels)
  parameters = inspect.signature(TERMS[method]).parameters
  known = sorted(set(parameters) - set(_DATA))
  unknown = sorted(set(spec) - set(known))
  if unknown:
    raise ValueError(f"{field}.{unknown[0]} is not an argument of method={method!r}: use some of {known}.")
  fn, with_labels = TERMS[method], "labels" in parameters

  def term(new, old, labels):
    return fn(new, old, **spec, **({"labels": labels} if with_labels else {}))
  if weighting == "reference":
    return lambda new, old, labels: ((1.0 - kd_alpha) * compat.cross_entropy(new, labels)
                                     + kd_alpha * term(new, old, labels))
  lam = 1.0 if lam is None else lam
  return lambda new, old, labels: compat.cross_entropy(new, labels) + lam * term(new, old, labels)
