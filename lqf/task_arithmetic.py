"""Adding fine-tuned models (task arithmetic), exact for the linearized model.

A task vector is the offset a fine-tuning moved the shared parameters by, δ_t = w_t − w0. Task addition
(Ilharco et al., ICLR 2023) merges T tasks fine-tuned from one w0 into

  w(α) = w0 + α Σ_t δ_t                                   (`add_task_vectors`),

with α chosen on held-out data (`choose_scale`). For the network itself, f(x; w(α)) takes a forward pass
per α, and task u's outputs depend on the other δ_t through every nonlinearity. The linearized model
(`lqf.linearize`; "tangent task arithmetic", Ortiz-Jimenez et al., NeurIPS 2023) is linear in δ:

  f_lin(x; α Σ_t δ_t) = f(x; w0) + α Σ_t J(x)δ_t    exactly,

so each task vector's effect J(x)δ_t on a set of inputs is computed once (one tangent pass) and every α,
or per-task coefficients α_t, costs a sum (`TangentPath`). What the sum does to task u is f0 + J_u δ_u
(task u alone) plus the interference Σ_{t≠u} J_u δ_t, which is small where the tasks' tangent features
are disentangled (Ortiz-Jimenez et al.).

Heads: task vectors live in the parameters the tasks share. Each task keeps its own head, part of its w0
(the pretrained trunk with that head); when the heads stay frozen at their initialisation (only shared
layers trainable, e.g. ``trainable='^stage3/'``) every δ_t is an offset of the same parameters, and the
merged model for task u is task u's head on the shared layers w0 + αΣ_tδ_t. (Trained heads would be
task-specific offsets that the sum leaves to their own task.)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import optax

from lqf import fit
from lqf.linearize import Features, Linearized
from lqf.precision import exact

Params = Any


def add_task_vectors(deltas: Sequence[Params], scale: float) -> Params:
  """α Σ_t δ_t of task vectors (pytrees of one structure, e.g. δ of `lqf.fit.fit_linearized` or the
  difference of fine-tuned and pretrained shared parameters)."""
  if not deltas:
    raise ValueError("add_task_vectors needs at least one task vector.")
  total = deltas[0]
  for delta in deltas[1:]:
    total = optax.tree_utils.tree_add(total, delta)
  return optax.tree_utils.tree_scale(scale, total)


class TangentPath(NamedTuple):
  """The linearized model's logits along task-vector sums on one set of inputs.

  Attributes:
    f0: (N, C) f(x; w0).
    effects: (T, N, C) J(x)δ_t of each task vector.
  """
  f0: np.ndarray
  effects: np.ndarray

  def logits(self, scales: float | Sequence[float]) -> np.ndarray:
    """(N, C) f0 + Σ_t α_t J(x)δ_t; one ``scales`` α for all tasks or one per task vector."""
    scales = np.broadcast_to(np.asarray(scales, np.float64), (len(self.effects),))
    return self.f0 + np.einsum("t,tnc->nc", scales, self.effects)


@exact
def tangent_path(lin: Linearized, variables: dict, features: Features,
                 deltas: Sequence[Params]) -> TangentPath:
  """The effects J(x)δ_t of the task vectors ``deltas`` on the inputs of ``features`` (cached h, f0
  of one task's linearization ``lin`` around ``variables``): one tangent pass per task vector, at
  ``Precision.HIGHEST`` (`lqf.precision`: the sums are exact only if each effect is)."""
  f0 = np.asarray(features.f0, np.float64)
  effects = [np.asarray(fit.predict(lin, variables, delta, features.h), np.float64) - f0
             for delta in deltas]
  return TangentPath(f0, np.stack(effects))


def choose_scale(scales: Sequence[float], heldout_scores: Sequence[float]) -> float:
  """The α of ``scales`` with the highest held-out score (the smallest such α on ties); never choose
  it on the test split."""
  scales, heldout_scores = np.asarray(scales, np.float64), np.asarray(heldout_scores, np.float64)
  if scales.shape != heldout_scores.shape or not len(scales):
    raise ValueError(f"one held-out score per scale: got {len(heldout_scores)} scores for "
                     f"{len(scales)} scales.")
  best = heldout_scores.max()
  return float(scales[heldout_scores == best].min())
