"""The preconditioners of the linearized fit and of the exact solve: one protocol, one registry.

A preconditioner models the constant curvature of the LQF objective, H₀ = (1/N) Σ_i c_i J_iᵀJ_i, once at
w0, and applies its damped inverse M ≈ (H₀ + μI)⁻¹ (μ = λ + any extra damping):

  compute(lin, variables, h, weights, options) -> curvature      once, from the cached trunk features h
                                                                  (N, ...), weights c (N,) or None and
                                                                  the fit's `lqf.fit.FitOptions`;
  inverse(curvature, damping) -> (v ↦ Mv)                        for the exact solve and λmax (`lqf.solve`);
  metric(curvature, damping) -> (v ↦ M⁻¹v)                       the damped curvature itself, H̃₀ + μI in
                                                                  the same closed form (`lqf.metric`);
  transform(curvature, damping) -> optax.GradientTransformation  g ↦ Mg, chained with a step rule (`lqf.fit`).

A config or `FitOptions` names one by its registered name (``preconditioner='kfac'``); the code inside
passes the objects. Built in: ``'kfac'`` (`lqf.kfac`: Kronecker factors per layer) and ``'nystrom'``
(`lqf.nystrom`: a rank-ℓ sketch of H₀). Adding one is one file that builds a `Preconditioner` and one line
that registers it (here, or ``lqf.preconditioners.register('name', P)`` from your code; tests/test_fit.py
adds a Jacobi preconditioner that way).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax

from lqf import kfac, nystrom

Params = Any
NONE = "none"  # the name of no preconditioner (plain gradient steps)


@dataclasses.dataclass(frozen=True)
class Preconditioner:
  """A curvature model and its damped inverse (module docstring).

  Attributes:
    curvature_type: the type ``compute`` returns (the solve finds the preconditioner of a curvature by it).
    compute: (lin, variables, h, weights, options) -> curvature at w0.
    inverse: (curvature, damping) -> v ↦ Mv on pytrees like δ (jittable).
    metric: (curvature, damping) -> v ↦ M⁻¹v, the damped curvature model (symmetric, ⪰ damping·I).
    transform: (curvature, damping) -> the optax transform g ↦ Mg.
  """
  curvature_type: type
  compute: Callable[..., Any]
  inverse: Callable[[Any, float], Callable[[Params], Params]]
  metric: Callable[[Any, float], Callable[[Params], Params]]
  transform: Callable[[Any, float], optax.GradientTransformation]


_apply_kfac_inverse = jax.jit(kfac.apply_inverse)

_REGISTRY: dict[str, Preconditioner] = {
    "nystrom": Preconditioner(
        nystrom.NystromSketch,
        lambda lin, variables, h, weights, options: nystrom.sketch(
            lin.tail, variables, h, lin.trainable_paths, rank=options.nystrom_rank,
            batch_size=options.curvature_batch_size, weights=weights),
        lambda sketch, damping: functools.partial(nystrom.apply_inverse,
                                                  nystrom.nystrom_inverse(sketch, damping)),
        lambda sketch, damping: functools.partial(nystrom.apply_inverse,
                                                  nystrom.nystrom_power(sketch, damping, 1)),
        nystrom.nystrom_precondition),
    "kfac": Preconditioner(
        kfac.KFACFactors,
        lambda lin, variables, h, weights, options: kfac.curvature_factors(
            lin.tail, variables, h, lin.trainable_paths, batch_size=options.curvature_batch_size,
            weights=weights),
        lambda factors, damping: functools.partial(_apply_kfac_inverse, kfac.kfac_inverse(factors, damping)),
        lambda factors, damping: functools.partial(_apply_kfac_inverse, kfac.kfac_power(factors, damping, 1)),
        kfac.kfac_precondition),
}


def register(name: str, preconditioner: Preconditioner) -> None:
  """Makes ``preconditioner`` available as ``FitOptions(preconditioner=name)`` (a new name only)."""
  if name == NONE or name in _REGISTRY:
    raise ValueError(f"preconditioner name {name!r} is taken: choose another than {(*names(), NONE)}.")
  _REGISTRY[name] = preconditioner


def names() -> tuple[str, ...]:
  """The registered names (`NONE` aside)."""
  return tuple(_REGISTRY)


def get(name: str) -> Preconditioner:
  """The preconditioner registered as ``name``; a one-line error listing the names otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"preconditioner={name!r} is unknown: use one of {(*names(), NONE)}.")
  return _REGISTRY[name]


def of(curvature: Any) -> Preconditioner:
  """The registered preconditioner whose ``compute`` returns curvatures of ``curvature``'s type."""
  for preconditioner in _REGISTRY.values():
    if isinstance(curvature, preconditioner.curvature_type):
      return preconditioner
  raise ValueError(f"curvature of type {type(curvature).__name__} belongs to no registered preconditioner "
                   f"({', '.join(p.curvature_type.__name__ for p in _REGISTRY.values())}).")
