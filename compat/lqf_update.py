"""Regression-free linear fine-tuning: positive-congruent training (FD-LM) as an LQF objective.

LQF fits the linearized model f(x; δ) = f0(x) + J(x)δ by least squares. Focal distillation by logit
matching (Yan et al., CVPR 2021) adds, per training example, λ·w_i·½‖f(x_i) − φ_i‖² with the old
model's logits φ_i and the focal weight w_i = α + β·1[argmax φ_i = y_i] (`compat.focal_weights`).
For fixed φ the sum of the two quadratics in f is one weighted least-squares term:

  ½‖f − s·e_y‖² + λw_i·½‖f − φ_i‖² = ½c_i‖f − t_i‖² + const,
  c_i = 1 + λw_i,  t_i = (s·e_y + λw_i·φ_i) / c_i,

so the regression-constrained LQF objective 1/(2N) Σ_i c_i ‖f(x_i; δ) − t_i‖² + (λ_δ/2)‖δ‖² is still
an exact convex quadratic in δ with constant curvature (1/N) Σ_i c_i J_iᵀJ_i + λ_δI: K-FAC factors
(with the output side weighted by c_i), the exact quadratic step and the exact solver
(`lqf.solve.solve_linearized`) apply unchanged. β = 0 is knowledge distillation by logit matching
(KD-LM).

API: `fd_lm_targets` (the weighted problem), `fit_regression_free` (fit a linearized model against
old logits), `finetune_lqf` (from the source network: new head, linearization, plain or
regression-constrained fit; `new_task` + `fit_task` when several fits share one training set)
returning a `LinearizedClassifier`, and `certify` (the exact optimum of
a fit's problem and how far the fit is from it).

The study ``config.study='lqf_pct'`` (`run_study`, ``experiments/update.py``) is a data update: the
source is the demo's leaky ResNet-8 pretrained on `mnist5k` digits 0–4 (`lqf.compare.ensure_source`,
into ``<workdir>/source``); per target (digits 5–9 of `mnist5k` / `uci_digits`) and seed s, the old
model is LQF fine-tuned on ``old_shots`` images per class (``data.shot_seed = s``), then the new model
on ``new_shots`` per class — a superset of the old set (`lqf.data.k_shot_indices` draws nested sets)
— plainly (row ``none``) and with each entry of ``config.methods`` (α, β, λ) against the old model's
logits on the new training set. Every model has its own ridge head fitted on its training set
(`lqf.finetune.with_new_head`) and predicts with f_lin. Flip metrics on the test split
(`compat.flip_summary`) per row, mean ± std over seeds, and the paper's target (NFR −40 %, error
≤ +0.5 point) against ``none``. One FD-LM fit is certified by the exact solver: relative residual
of its normal equations and the K-FAC iterate's distance to that optimum.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import compat
from compat import update as update_lib
from lqf import checkpoint as ckpt_lib
from lqf import compare as compare_lib
from lqf import data as data_lib
from lqf import finetune
from lqf import fit as fit_lib
from lqf import linearize as lin_lib
from lqf import solve as solve_lib
from lqf.losses import WeightedTargets, one_hot_targets

PREDICTIONS_FILE = "predictions.npz"
# Rows of the table besides config.methods: the plain new model (the baseline of the targets).
BASELINE = "none"
DISTILL_FIELDS = ("alpha", "beta", "lam")


def fd_lm_targets(labels: jnp.ndarray, old_logits: jnp.ndarray, *, target_scale: float,
                  alpha: float, beta: float, lam: float) -> WeightedTargets:
  """Least squares + FD-LM as one weighted least-squares problem (module docstring).

    ½‖f − s·e_{y_i}‖² + λ·w_i·½‖f − φ_i‖² = ½·c_i·‖f − t_i‖² + const,
    w_i = α + β·1[argmax_k φ_ik = y_i],  c_i = 1 + λ·w_i,  t_i = (s·e_{y_i} + λ·w_i·φ_i) / c_i.

  Args:
    labels: (N,) integer labels.
    old_logits: (N, C) logits φ of the frozen old model on the same examples (same label space).
    target_scale: s.
    alpha: focal weight of every example (α = 1, β = 0: KD by logit matching).
    beta: extra weight of the examples the old model classifies correctly.
    lam: λ, the weight of the distillation term.

  Returns:
    `lqf.losses.WeightedTargets` t (N, C), c (N,).
  """
  old_logits = jnp.asarray(old_logits, jnp.float32)
  if old_logits.ndim != 2 or old_logits.shape[:1] != jnp.shape(labels):
    raise ValueError(f"old_logits must be (N, C) for the N={jnp.shape(labels)[0]} labels: got "
                     f"{old_logits.shape}.")
  if min(alpha, beta, lam) < 0:
    raise ValueError(f"alpha={alpha}, beta={beta}, lam={lam}: FD-LM weights must be >= 0.")
  focal = compat.focal_weights(old_logits, labels, alpha=alpha, beta=beta)
  distill = lam * focal
  one_hot = target_scale * jax.nn.one_hot(labels, old_logits.shape[-1], dtype=jnp.float32)
  weights = 1.0 + distill
  return WeightedTargets((one_hot + distill[:, None] * old_logits) / weights[:, None], weights)


def fit_regression_free(lin: lin_lib.Linearized, variables: dict, features: lin_lib.Features,
                        labels: jnp.ndarray, old_logits: jnp.ndarray, *, alpha: float = 1.0,
                        beta: float = 5.0, lam: float = 1.0, target_scale: float = 15.0,
                        **fit_kwargs: Any) -> tuple[Any, dict[str, np.ndarray]]:
  """LQF fine-tuning constrained against an old model: least squares + λ·FD-LM, K-FAC, exact steps.

  Minimises 1/(2N) Σ_i [‖f_lin(x_i; δ) − s·e_{y_i}‖² + λ(α + β·1[old right])‖f_lin(x_i; δ) − φ_i‖²]
  + (λ_δ/2)‖δ‖² (`fd_lm_targets`, `lqf.fit.fit_linearized` with ``targets``).

  Args:
    lin, variables, features: the new model linearized around its w0 and its training set's cached
      `Features` (`lqf.linearize`).
    labels: (N,) integer labels of the training set.
    old_logits: (N, C) the old model's logits on the same images.
    alpha, beta, lam: FD-LM's α, β and λ (β = 0: KD-LM).
    target_scale: s.
    **fit_kwargs: further `lqf.fit.fit_linearized` arguments (weight_decay, steps, ...).

  Returns:
    (δ, history) as `lqf.fit.fit_linearized`.
  """
  targets = fd_lm_targets(labels, old_logits, target_scale=target_scale, alpha=alpha, beta=beta,
                          lam=lam)
  return fit_lib.fit_linearized(lin, variables, features, None, targets=targets,
                                target_scale=target_scale, **fit_kwargs)


@dataclasses.dataclass(frozen=True)
class LinearizedClassifier:
  """An LQF-fine-tuned classifier: f_lin(x; δ) = f(x; w0) + J(x)δ.

  Attributes:
    lin: the network linearized in its trainable tail.
    variables: w0 (the source trunk with this model's head).
    delta: δ.
  """
  lin: lin_lib.Linearized
  variables: dict
  delta: Any

  def trunk(self, images: np.ndarray) -> jax.Array:
    """Trunk features h (N, ...) of images (N, H, W, C): the same for every classifier fine-tuned
    from one source with one trainable set (the head is in the tail)."""
    return finetune.trunk_features(self.lin, self.variables, images)

  def logits_from_trunk(self, h: jax.Array) -> np.ndarray:
    """f_lin(x; δ) (N, C) from trunk features h (N, ...)."""
    return np.asarray(fit_lib.predict(self.lin, self.variables, self.delta, h, 256))

  def logits(self, images: np.ndarray) -> np.ndarray:
    """f_lin(x; δ) (N, C) of images (N, H, W, C)."""
    return self.logits_from_trunk(self.trunk(images))


def finetune_lqf(model_config: ml_collections.ConfigDict, source_variables: dict, images: np.ndarray,
                 labels: np.ndarray, num_classes: int, lqf: ml_collections.ConfigDict, *, seed: int,
                 old_logits: np.ndarray | None = None,
                 distill: Mapping[str, float] | None = None) -> LinearizedClassifier:
  """LQF fine-tuning of the source network, optionally regression-constrained against an old model.

  Sets a new head (``lqf.head_init``, `lqf.finetune.with_new_head`), linearizes the ``lqf.trainable``
  tail and fits δ with K-FAC and exact steps (``lqf.steps``, ``lqf.weight_decay``,
  ``lqf.target_scale``): plain least squares (`lqf.losses.one_hot_targets`), or with ``old_logits``
  and ``distill`` = {alpha, beta, lam} least squares + λ·FD-LM against the old model's logits
  (`fd_lm_targets`). Both go through one weighted least-squares code path (one compilation).

  Args:
    model_config: the source model's config section.
    source_variables: the pretrained variables.
    images: (N, H, W, C) training images.
    labels: (N,) integer labels in [0, num_classes).
    num_classes: classes of the new head.
    lqf: the ``config.lqf`` section (`configs/finetune_mnist.py`).
    seed: head initialization seed (``head_init='random'``).
    old_logits: (N, C) the old model's logits on ``images`` (same label space, e.g.
      ``old.logits(images)``), or None for plain LQF.
    distill: FD-LM's α, β, λ; required with ``old_logits``.
  """
  return fit_task(new_task(model_config, source_variables, images, labels, num_classes, lqf, seed=seed),
                  lqf, old_logits=old_logits, distill=distill)


def new_task(model_config: ml_collections.ConfigDict, source_variables: dict, images: np.ndarray,
             labels: np.ndarray, num_classes: int, lqf: ml_collections.ConfigDict, *,
             seed: int) -> finetune.Task:
  """The source network with a new head for (images, labels) (`lqf.finetune.with_new_head`), as a
  `lqf.finetune.Task` that caches the training features, so several fits on one training set (plain
  and regression-constrained) compute the head and the features once."""
  model, variables = finetune.with_new_head(model_config, source_variables, images, labels,
                                            num_classes, lqf, seed)
  return finetune.Task(model, variables, (images, labels))


def fit_task(task: finetune.Task, lqf: ml_collections.ConfigDict, *,
             old_logits: np.ndarray | None = None,
             distill: Mapping[str, float] | None = None) -> LinearizedClassifier:
  """`finetune_lqf` on a prepared `new_task` (its training set, head and cached features)."""
  if (old_logits is None) != (distill is None):
    raise ValueError("old_logits and distill go together: pass both (FD-LM against the old model) "
                     "or neither (plain LQF).")
  lin = task.linearized(lqf.trainable)
  features = task.features(lqf.trainable, "train")
  targets = _targets(jnp.asarray(task.train[1]), task.model.num_classes, lqf.target_scale, old_logits,
                     distill)
  delta, _ = fit_lib.fit_linearized(lin, task.variables, features, None, targets=targets,
                                    weight_decay=lqf.weight_decay, steps=lqf.steps)
  return LinearizedClassifier(lin, task.variables, delta)


def _targets(labels: jnp.ndarray, num_classes: int, target_scale: float,
             old_logits: np.ndarray | None, distill: Mapping[str, float] | None) -> WeightedTargets:
  """s·e_y with c = 1, or `fd_lm_targets` against ``old_logits`` with ``distill``'s α, β, λ."""
  if old_logits is None:
    return one_hot_targets(labels, num_classes, target_scale)
  return fd_lm_targets(labels, old_logits, target_scale=target_scale,
                       **{k: float(distill[k]) for k in DISTILL_FIELDS})


def certify(new: LinearizedClassifier, train: tuple[np.ndarray, np.ndarray],
            old_logits: np.ndarray, distill: Mapping[str, float], lqf: ml_collections.ConfigDict,
            test: tuple[jax.Array, np.ndarray], *, tol: float, maxiter: int) -> dict[str, float]:
  """The exact optimum δ* of ``new``'s FD-LM problem, and how the K-FAC fit ``new.delta`` compares.

  Args:
    new: the K-FAC fit (`finetune_lqf` with ``old_logits`` and ``distill``).
    train: its training images and labels.
    old_logits: the old model's logits on them.
    distill: α, β, λ of the fit.
    lqf: the ``config.lqf`` section of the fit.
    test: trunk features h and labels of test images.
    tol, maxiter: of the exact solve (`lqf.solve.solve_linearized`).

  Returns:
    ``relative_residual`` ‖b − Hδ*‖/‖b‖ and ``iterations`` of the exact solve; of the K-FAC fit
    ``relative_distance`` ‖δ − δ*‖/‖δ*‖ and ``relative_suboptimality`` (L(δ) − L*)/(L(0) − L*);
    ``test_error_fit``, ``test_error_optimum`` and ``test_agreement`` (fraction of equal test
    predictions).
  """
  images, labels = train
  features = lin_lib.jit_features(new.lin, new.variables, jnp.asarray(images), 256)
  targets = _targets(jnp.asarray(labels), features.f0.shape[-1], lqf.target_scale, old_logits,
                     distill)
  optimum, info = solve_lib.solve_linearized(new.lin, new.variables, features, None, targets=targets,
                                             weight_decay=lqf.weight_decay, tol=tol, maxiter=maxiter)
  _, jvp = lin_lib.jit_tangent(new.lin, new.variables, features.h)
  loss = lambda d: float(fit_lib.objective(d, features.f0, jvp, None, loss="mse",  # noqa: E731
                                           target_scale=lqf.target_scale,
                                           weight_decay=lqf.weight_decay, targets=targets))
  best, start = loss(optimum), loss(jax.tree.map(jnp.zeros_like, optimum))
  norm = lambda t: float(optax.tree_utils.tree_norm(t))  # noqa: E731
  test_h, test_y = test
  fit_pred = new.logits_from_trunk(test_h).argmax(-1)
  optimum_pred = dataclasses.replace(new, delta=optimum).logits_from_trunk(test_h).argmax(-1)
  return {"relative_residual": info.relative_residual, "iterations": info.iterations,
          "relative_distance": norm(optax.tree_utils.tree_sub(new.delta, optimum)) / norm(optimum),
          "relative_suboptimality": (loss(new.delta) - best) / (start - best),
          "test_error_fit": compat.error_rate(test_y, fit_pred),
          "test_error_optimum": compat.error_rate(test_y, optimum_pred),
          "test_agreement": float(np.mean(fit_pred == optimum_pred))}


def _check_config(config: ml_collections.ConfigDict) -> None:
  if not 0 < config.old_shots < config.new_shots:
    raise ValueError(f"config.old_shots={config.old_shots} and config.new_shots={config.new_shots}: "
                     "a data update needs 0 < old_shots < new_shots.")
  if not config.seeds:
    raise ValueError("config.seeds is empty: give at least one seed, e.g. (0, 1, 2).")
  for name, method in config.methods.items():
    if name in (BASELINE, "old"):
      raise ValueError(f"config.methods.{name} clashes with a built-in row: rename it.")
    missing = [k for k in DISTILL_FIELDS if k not in method]
    if missing:
      raise ValueError(f"config.methods.{name} lacks {missing}: give alpha, beta and lam.")
  if config.certify is not None and config.certify.method not in config.methods:
    raise ValueError(f"config.certify.method={config.certify.method!r} is not in config.methods "
                     f"({list(config.methods)}): name the fit to certify.")


def _with_shots(data: ml_collections.ConfigDict, shots: int, seed: int) -> ml_collections.ConfigDict:
  data = copy.deepcopy(data)
  data.shots, data.shot_seed = shots, seed
  return data


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The ``lqf_pct`` study (module docstring); writes ``predictions.npz``, returns the results.

  Config fields: pretrain (the source's `lqf.train` config), targets.<name> (data sections),
  old_shots, new_shots, seeds, lqf (`configs/finetune_mnist.py`), methods.<name>.{alpha, beta, lam},
  certify.{method, tol, maxiter} (or None), overwrite.
  """
  _check_config(config)
  ckpt_lib.claim_workdir(workdir, config)
  model_config, source = compare_lib.ensure_source(config.pretrain, os.path.join(workdir, "source"))
  predictions, results = {}, {}
  certificate = None
  for target_name, target in config.targets.items():
    test_x, test_y = data_lib.load_arrays(target, target.test_split)
    num_classes = data_lib.num_classes(target)
    predictions[f"{target_name}/labels"] = test_y
    runs = {"old": [], BASELINE: [], **{name: [] for name in config.methods}}
    test_h = None  # the trunk features of the test images: one source trunk for every model
    for seed in config.seeds:
      t0 = time.perf_counter()
      train = {}
      for role, shots in (("old", config.old_shots), ("new", config.new_shots)):
        train[role] = data_lib.load_arrays(_with_shots(target, shots, seed), target.train_split)
      old = finetune_lqf(model_config, source, *train["old"], num_classes, config.lqf, seed=seed)
      test_h = old.trunk(test_x) if test_h is None else test_h
      old_pred = old.logits_from_trunk(test_h).argmax(-1)
      task = new_task(model_config, source, *train["new"], num_classes, config.lqf, seed=seed)
      # The old model's logits on the new training set: the trunk is shared, so from the task's h.
      old_logits = old.logits_from_trunk(task.features(config.lqf.trainable, "train").h)
      models = {BASELINE: fit_task(task, config.lqf)}
      for name, method in config.methods.items():
        models[name] = fit_task(task, config.lqf, old_logits=old_logits, distill=method)
      predictions[f"{target_name}/seed{seed}/old"] = old_pred
      runs["old"].append({"seed": seed, **compat.flip_summary(test_y, old_pred, old_pred)})
      for name, model in models.items():
        pred = model.logits_from_trunk(test_h).argmax(-1)
        predictions[f"{target_name}/seed{seed}/{name}"] = pred
        runs[name].append({"seed": seed, **compat.flip_summary(test_y, old_pred, pred)})
      if config.certify is not None and certificate is None:
        name = config.certify.method
        certificate = {"target": target_name, "seed": seed, "method": name,
                       **certify(models[name], train["new"], old_logits, config.methods[name],
                                 config.lqf, (test_h, test_y), tol=config.certify.tol,
                                 maxiter=config.certify.maxiter)}
      logging.info("%s seed %d: old + %d new models in %.1fs", target_name, seed, len(models),
                   time.perf_counter() - t0)
    summary = {name: update_lib.summarize(r, update_lib.FLIP_KEYS) for name, r in runs.items()}
    results[target_name] = {
        "num_test": int(len(test_y)), "runs": runs, "summary": summary,
        "targets": {name: update_lib.paper_target(summary[name], summary[BASELINE])
                    for name in config.methods}}
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, PREDICTIONS_FILE), **predictions)
  return {"study": "lqf_pct", "old_shots": config.old_shots, "new_shots": config.new_shots,
          "seeds": list(config.seeds), "methods": {k: v.to_dict() for k, v in config.methods.items()},
          "lqf": config.lqf.to_dict(), "results": results, "certificate": certificate}


ROW_NAMES = {"old": "old model (LQF, old shots)", BASELINE: "none (plain LQF, new shots)"}


def _method_name(name: str, methods: Mapping[str, Mapping[str, float]]) -> str:
  if name in ROW_NAMES:
    return ROW_NAMES[name]
  m = methods[name]
  kind = "KD-LM" if m["beta"] == 0 else "FD-LM"
  return f"{name}: {kind} α={m['alpha']:g} β={m['beta']:g} λ={m['lam']:g}"


def markdown(results: Mapping[str, Any]) -> str:
  """Per target: error, NFR, NFI, relative NFR, PFR (mean ± std over seeds), the change of NFR and
  error against ``none`` and whether the paper's target is met; the exact-solver certificate."""
  methods = results["methods"]
  n = len(results["seeds"])
  lines = [f"LQF data update: old model fine-tuned on {results['old_shots']} images per class, new "
           f"model on {results['new_shots']} (a superset); mean ± std over {n} seeds (each: its own "
           "shot draw); predictions are f_lin's argmax on the test split.", ""]
  for target, r in results["results"].items():
    lines += [f"### {target} ({r['num_test']} test images)", "",
              "| method | error (%) | NFR (%) | NFI (%) | relative NFR | PFR (%) | NFR change vs "
              "none | error change (points) | target met |", "|---" * 9 + "|"]
    for name, s in r["summary"].items():
      cells = [update_lib.format_pm(s["error_rate_new"]), update_lib.format_pm(s["nfr"]),
               update_lib.format_pm(s["nfi"], digits=1),
               update_lib.format_pm(s["relative_nfr"], scale=1.0), update_lib.format_pm(s["pfr"])]
      if name in r["targets"]:
        t = r["targets"][name]
        change = "n/a" if t["nfr_reduction"] is None else f"{-100 * t['nfr_reduction']:+.1f} %"
        cells += [change, f"{100 * t['error_increase']:+.2f}", "yes" if t["met"] else "no"]
      else:
        cells += ["–"] * 3
      lines.append(f"| {_method_name(name, methods)} | " + " | ".join(cells) + " |")
    lines.append("")
  lines.append(f"Target (Yan et al.): NFR at least {100 * update_lib.TARGET_NFR_REDUCTION:.0f} % "
               f"lower than 'none' with the error at most "
               f"{100 * update_lib.TARGET_ERROR_INCREASE:.1f} point higher (means over seeds). "
               "The old model's row has NFR 0 by definition.")
  c = results["certificate"]
  if c is not None:
    lines += ["", f"Exact-solver certificate ({c['target']}, seed {c['seed']}, {c['method']}): the "
              f"exact optimum δ* of the weighted problem has relative residual "
              f"{c['relative_residual']:.1e} ({c['iterations']} CG iterations). The K-FAC fit "
              f"({results['lqf']['steps']} steps) is at relative suboptimality "
              f"{c['relative_suboptimality']:.1e} and relative distance "
              f"{c['relative_distance']:.2f} from δ*; test error {100 * c['test_error_fit']:.2f} % "
              f"(fit) vs {100 * c['test_error_optimum']:.2f} % (δ*), "
              f"{100 * c['test_agreement']:.1f} % of the test predictions equal."]
  return "\n".join(lines) + "\n"
