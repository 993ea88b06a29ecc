"""The fine-tuning methods compared in this project, one registry, and the settings they read.

A method is a `Method`: which parameters it trains (a regex built from LQF's tail regex), which source
network it needs (its activations), and — for a linearized method — how it fits δ (`lqf.fit.FitOptions`
built from the `LQFSettings`). The built-in ones:

=====================  ===============================================================================
``lqf``                linearize the ``trainable`` subset around w0; the exact optimum δ* (certified,
                       `lqf.solve`) of least squares against s·one-hot + ridge in K-FAC's metric,
                       (λ/2)δᵀMδ (`lqf.metric`; the config's ``optimizer`` / ``regularizer``)
``lqf_relu``           the same on the ReLU-pretrained source network
``lqf_loo``            ``lqf`` with λ chosen by exact leave-one-out (`lqf.influence.RidgePath`)
``lqf_steps``          ``steps`` K-FAC-preconditioned steps on the Euclidean objective (λ/2)‖δ‖², stopped
                       early: exact-quadratic ones, or ``lqf``'s step rule if it takes steps
                       (`lqf.fit.fit_linearized`; ``lqf`` until this round)
``lqf_euclidean``      δ* of the Euclidean objective (certified)
``lqf_euclidean_loo``  the same with λ by leave-one-out
``lqf_ce``             cross-entropy on the linearized model (K-FAC, SGD with momentum; Euclidean decay)
``lqf_no_kfac``        ``lqf_steps`` without preconditioner (same step rule and steps)
``linear_probe``       the head only, ``lqf``'s fit with the Euclidean penalty: ridge regression on the
                       frozen embedding (δ* with ``lqf``'s default ``optimizer='exact'``)
``nonlinear``          cross-entropy fine-tuning of the same ``trainable`` subset of the real network
                       (Adam, `lqf.nonlinear`)
``nonlinear_all``      cross-entropy fine-tuning of every parameter (Adam)
=====================  ===============================================================================

Adding one is one `register` call (here, or ``lqf.methods.register(Method(...))`` from your code); the
runners (`lqf.runtime.task.run_method`, the studies) ask the registry, never compare names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from lqf import checks, heads
from lqf import fit as fit_lib
from lqf import preconditioners
from lqf.models import DTYPES

HEAD = "^head/"  # the head alone
ALL = "all"  # every parameter (`lqf.linearize.trainable_mask`)
CACHE_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class LQFSettings:
  """How the linearized methods fit and what they cache (a config's ``lqf`` section, flat: its
  `lqf.fit.FitOptions` fields form ``fit``, `lqf.runtime.config_util.settings`).

  Attributes:
    fit: how ``lqf`` fits δ (`lqf.fit.FitOptions`; default: ``optimizer='exact'``,
      ``regularizer='kfac'``: the certified optimum of ridge in K-FAC's metric at λ = ``weight_decay``).
      The other linearized methods derive theirs from it (`Method.fit_options`): the step-fitted ones
      read ``steps``, ``preconditioner``, ``learning_rate``, … (λ also their preconditioner's damping).
    trainable: regex of the trainable parameters (`lqf.linearize.trainable_mask`).
    target_scale: s of the targets s·e_y.
    ce_learning_rate, ce_steps: lqf_ce (the preconditioner + SGD with momentum 0.9 on cross-entropy).
    kfac_examples: the K-FAC pass reads the first N training images (None: all).
    cache_features: 'auto' | 'always' | 'never' (`lqf.runtime.memory.cache_plan`).
    cache_gib: the 'auto' budget for cached images + trunk features.
    head_init: 'ridge' | 'random' | 'zero' (`lqf.heads`).
    head_ridge: the ridge penalty α = head_ridge · N.
  """
  fit: fit_lib.FitOptions = fit_lib.FitOptions(optimizer="exact", regularizer="kfac")
  trainable: str = "^(stage3|head)/"
  target_scale: float = 15.0
  ce_learning_rate: float = 0.1
  ce_steps: int = 100
  kfac_examples: int | None = None
  cache_features: str = "auto"
  cache_gib: float = 4.0
  head_init: str = "ridge"
  head_ridge: float = 1.0

  def __post_init__(self):
    if self.fit.weight_decay == fit_lib.LOO:
      raise ValueError("lqf.weight_decay='loo' would leave the step-fitted methods (lqf_steps, lqf_ce, "
                       "lqf_no_kfac) without a λ: give a number (e.g. 1e-3) and run method lqf_loo.")
    try:
      re.compile(self.trainable)
    except (re.error, TypeError) as e:
      raise ValueError(f"trainable={self.trainable!r} is not a regex ({e}): use e.g. '^(stage3|head)/' "
                       "or 'all'.") from None
    checks.check_positive("target_scale", self.target_scale, 15.0)
    for field, example in (("ce_learning_rate", 0.1), ("cache_gib", 4.0), ("head_ridge", 1.0)):
      checks.check_positive(field, getattr(self, field), example)
    checks.check_count("ce_steps", self.ce_steps)
    checks.check_count("kfac_examples", self.kfac_examples, optional=True)
    checks.check_choice("cache_features", self.cache_features, CACHE_MODES)
    checks.check_choice("head_init", self.head_init, heads.HEAD_INITS)
    for method in _REGISTRY.values():
      method.fit_options(self)  # FitOptions checks each derived fit (e.g. lqf_ce's learning rate)


@dataclasses.dataclass(frozen=True)
class NonlinearSettings:
  """Cross-entropy fine-tuning of the real network with AdamW (a config's ``nonlinear`` section).

  ``dtype``: the network's compute dtype, 'float32' or 'bfloat16' (faster on GPUs and TPUs; the
  parameters, gradients and Adam's state stay float32). Nothing of it is certified, so it may round; the
  linearized methods always compute in float32.
  """
  steps: int = 100
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 128
  dtype: str = "float32"

  def __post_init__(self):
    checks.check_choice("dtype", self.dtype, tuple(DTYPES))
    checks.check_count("steps", self.steps)
    checks.check_positive("learning_rate", self.learning_rate, 1e-3)
    checks.check_nonnegative("weight_decay", self.weight_decay, 0.0)
    checks.check_count("batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class Method:
  """A fine-tuning method (module docstring).

  Attributes:
    name: its name in configs and result tables.
    trains: LQF's tail regex -> the regex of the parameters this method trains.
    activations: the activations of the source networks it may fine-tune, or None for any. LQF and its
      ablations take a leaky-ReLU (or GELU, e.g. the ViT's) source; ``lqf_relu`` takes the ReLU twin of
      the ablation (`relu_source`).
    fit: for a linearized method, `LQFSettings` -> its `lqf.fit.FitOptions`; None for a method that
      fine-tunes the real network (`lqf.nonlinear`).
    learning_rate_field: the `LQFSettings` field holding its learning rate (named when it diverges).
  """
  name: str
  trains: Callable[[str], str] = lambda trainable: trainable
  activations: tuple[str, ...] | None = None
  fit: Callable[[LQFSettings], fit_lib.FitOptions] | None = None
  learning_rate_field: str = "learning_rate"

  @property
  def relu_source(self) -> bool:
    """Whether it fine-tunes the ReLU source of the leaky-vs-ReLU ablation (a study's ``relu_workdir`` /
    ``pretrain_relu``), not the main one."""
    return self.activations == ("relu",)

  @property
  def linearized(self) -> bool:
    """Whether it fits δ of the linearized model (else it fine-tunes the network itself)."""
    return self.fit is not None

  def fit_options(self, settings: LQFSettings) -> fit_lib.FitOptions | None:
    return None if self.fit is None else self.fit(settings)

  def trainable(self, settings: LQFSettings) -> str:
    """The regex of the parameters it trains."""
    return self.trains(settings.trainable)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` under its name (a new name; returns it)."""
  if method.name in _REGISTRY:
    raise ValueError(f"method {method.name!r} is already registered.")
  _REGISTRY[method.name] = method
  return method


def get(name: str, field: str = "method") -> Method:
  """The registered method ``name``; an unknown one is one line naming ``field`` and the choices."""
  if name not in _REGISTRY:
    raise ValueError(f"{field}={name!r} is unknown: use one of {names()}.")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _lqf(settings: LQFSettings) -> fit_lib.FitOptions:
  return settings.fit


def _steps(settings: LQFSettings, **changes) -> fit_lib.FitOptions:
  """``lqf``'s Euclidean objective fitted by ``steps`` preconditioned steps, stopped early: ``lqf``'s step
  rule, or the exact-quadratic one ('quadratic') when ``lqf`` solves exactly."""
  optimizer = "quadratic" if settings.fit.optimizer == "exact" else settings.fit.optimizer
  return dataclasses.replace(settings.fit, optimizer=optimizer, regularizer=fit_lib.EUCLIDEAN, **changes)


def _lqf_ce(settings: LQFSettings) -> fit_lib.FitOptions:
  """No exact step size for a non-quadratic loss: the preconditioner with SGD and momentum 0.9."""
  return dataclasses.replace(settings.fit, loss="ce", optimizer="sgd", regularizer=fit_lib.EUCLIDEAN,
                             learning_rate=settings.ce_learning_rate, momentum=0.9, steps=settings.ce_steps)


def _exact(regularizer: str | None, weight_decay: str | None = None
           ) -> Callable[[LQFSettings], fit_lib.FitOptions]:
  """``lqf``'s objective solved exactly (optimizer 'exact') with ``regularizer`` (None: ``lqf``'s) and
  λ = ``weight_decay`` ('loo') or ``lqf``'s."""
  return lambda settings: dataclasses.replace(
      settings.fit, optimizer="exact", loss="mse", batch_size=None,
      regularizer=regularizer or settings.fit.regularizer, weight_decay=weight_decay or settings.fit.weight_decay)


SMOOTH_OR_LEAKY = ("leaky_relu", "gelu")  # sources whose units have gradient everywhere
register(Method("lqf", activations=SMOOTH_OR_LEAKY, fit=_lqf))
register(Method("lqf_relu", activations=("relu",), fit=_lqf))
register(Method("lqf_loo", activations=SMOOTH_OR_LEAKY, fit=_exact(None, fit_lib.LOO)))
register(Method("lqf_steps", activations=SMOOTH_OR_LEAKY, fit=_steps))
register(Method("lqf_euclidean", activations=SMOOTH_OR_LEAKY, fit=_exact(fit_lib.EUCLIDEAN)))
register(Method("lqf_euclidean_loo", activations=SMOOTH_OR_LEAKY, fit=_exact(fit_lib.EUCLIDEAN, fit_lib.LOO)))
register(Method("lqf_ce", activations=SMOOTH_OR_LEAKY, fit=_lqf_ce, learning_rate_field="ce_learning_rate"))
register(Method("lqf_no_kfac", activations=SMOOTH_OR_LEAKY, fit=lambda s: _steps(
    s, preconditioner=preconditioners.NONE)))
register(Method("linear_probe", trains=lambda trainable: HEAD, fit=lambda s: dataclasses.replace(
    s.fit, regularizer=fit_lib.EUCLIDEAN)))
register(Method("nonlinear"))
register(Method("nonlinear_all", trains=lambda trainable: ALL))
