"""Regression-free linear fine-tuning: an LQF data update with positive-congruent training (FD-LM).

  python -m experiments.update_lqf --config configs/update_lqf_mnist.py --workdir /tmp/update_lqf

LQF fits the linearized model f(x; δ) = f0(x) + J(x)δ by least squares. Focal distillation by logit
matching (Yan et al., CVPR 2021) against an old model's logits φ_i keeps it an exact convex quadratic:
`compat.fd_lm_targets` folds it into the weighted least-squares targets of `lqf.fit.fit_linearized`, so
K-FAC, the exact step and the exact solver (`lqf.solve.certify`) apply unchanged.

The study is a data update: the source is the demo's leaky ResNet-8 pretrained on `mnist5k` digits 0–4
(into ``<workdir>/source`` if missing); per target (digits 5–9 of `mnist5k` / `uci_digits`) and seed s,
the old model is LQF fine-tuned on ``old_shots`` images per class (``data.shot_seed = s``), then the new
model on ``new_shots`` per class — a superset of the old set (`lqf.data.k_shot_indices` draws nested
sets) — plainly (row ``none``) and with each entry of ``config.methods`` (α, β, λ) against the old
model's logits on the new training set. Every model has its own ridge head fitted on its training set
(`lqf.runtime.task.with_new_head`) and predicts with f_lin. Flip metrics on the test split
(`compat.flip_summary`) per row, mean [95 % CI] over seeds, and the paper's target (NFR −40 %, error
≤ +0.5 point) against ``none``, paired by seed (`experiments.common.paper_target`). One FD-LM fit is
certified by the exact solver: relative residual of its normal equations and the K-FAC iterate's
distance to that optimum.
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
from absl import logging

import compat
from experiments import common, stats
from lqf import data as data_lib
from lqf import methods
from lqf import solve as solve_lib
from lqf import train
from lqf.losses import WeightedTargets, one_hot_targets
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util
from lqf.runtime import task as task_lib

PREDICTIONS_FILE = "predictions.npz"
# Rows of the table besides config.methods: the plain new model (the baseline of the targets).
BASELINE = "none"
DISTILL_FIELDS = ("alpha", "beta", "lam")


def targets_of(labels: np.ndarray, num_classes: int, lqf: methods.LQFSettings,
               old_logits: np.ndarray | None = None,
               distill: Mapping[str, float] | None = None) -> WeightedTargets:
  """s·e_y with c = 1, or `compat.fd_lm_targets` against ``old_logits`` with ``distill``'s α, β, λ."""
  if (old_logits is None) != (distill is None):
    raise ValueError("old_logits and distill go together: pass both (FD-LM against the old model) "
                     "or neither (plain LQF).")
  labels = jnp.asarray(labels)
  if old_logits is None:
    return one_hot_targets(labels, num_classes, lqf.target_scale)
  return compat.fd_lm_targets(labels, old_logits, target_scale=lqf.target_scale,
                              **{k: float(distill[k]) for k in DISTILL_FIELDS})


def certify(new: common.LinearizedClassifier, task: task_lib.Task, targets: WeightedTargets,
            lqf: methods.LQFSettings, test: tuple[jax.Array, np.ndarray], *, tol: float,
            maxiter: int) -> dict[str, float]:
  """The exact optimum δ* of ``new``'s problem (`lqf.solve.certify`) and how the K-FAC fit compares,
  also on test images (trunk features h, labels): errors of both and the share of equal predictions."""
  features = task.features(lqf.trainable, "train")
  certificate = solve_lib.certify(new.lin, new.variables, features, targets, new.delta,
                                  weight_decay=lqf.fit.weight_decay, tol=tol, maxiter=maxiter)
  test_h, test_y = test
  fit_pred = new.logits_from_trunk(test_h).argmax(-1)
  optimum_pred = dataclasses.replace(new, delta=certificate.optimum).logits_from_trunk(test_h).argmax(-1)
  return {"relative_residual": certificate.relative_residual, "iterations": certificate.iterations,
          "relative_distance": certificate.relative_distance,
          "relative_suboptimality": certificate.relative_suboptimality,
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The ``lqf_pct`` study (module docstring); writes ``predictions.npz``, returns the results.

  Config fields: pretrain (the source's `lqf.train` config), targets.<name> (data sections),
  old_shots, new_shots, seeds, lqf (`configs/finetune_mnist.py`), methods.<name>.{alpha, beta, lam},
  certify.{method, tol, maxiter} (or None), overwrite.
  """
  _check_config(config)
  lqf = config_util.settings(methods.LQFSettings, config.lqf, "lqf")
  train.check_config(config.pretrain, "config.pretrain")
  for name, target in config.targets.items():
    try:
      data_lib.check(target)
    except ValueError as e:
      raise config_util.within(f"config.targets.{name}", e, root="data") from None
  ckpt_lib.claim_workdir(workdir, config)
  model_config, source = common.ensure_source(config.pretrain, os.path.join(workdir, "source"))
  predictions, results = {}, {}
  certificate = None
  cells = len(config.targets) * len(config.seeds)
  for target_name, target in config.targets.items():
    test_x, test_y = data_lib.load_arrays(target, target.test_split)
    num_classes = data_lib.num_classes(target)
    predictions[f"{target_name}/labels"] = test_y
    runs = {"old": [], BASELINE: [], **{name: [] for name in config.methods}}
    test_h = None  # the trunk features of the test images: one source trunk for every model
    for seed in config.seeds:
      t0 = time.perf_counter()
      arrays = {}
      for role, shots in (("old", config.old_shots), ("new", config.new_shots)):
        arrays[role] = data_lib.load_arrays(_with_shots(target, shots, seed), target.train_split)
      old_task = common.new_task(model_config, source, arrays["old"], num_classes, lqf, seed=seed)
      old = common.fit_task(old_task, lqf, targets_of(arrays["old"][1], num_classes, lqf))
      if test_h is None:
        test_h = old.lin.trunk_features(old.variables, test_x)
      old_pred = old.logits_from_trunk(test_h).argmax(-1)
      task = common.new_task(model_config, source, arrays["new"], num_classes, lqf, seed=seed)
      # The old model's logits on the new training set: the trunk is shared, so from the task's h.
      old_logits = old.logits_from_trunk(task.features(lqf.trainable, "train").h)
      problems = {BASELINE: targets_of(arrays["new"][1], num_classes, lqf)}
      for name, method in config.methods.items():
        problems[name] = targets_of(arrays["new"][1], num_classes, lqf, old_logits, method)
      models = {name: common.fit_task(task, lqf, targets) for name, targets in problems.items()}
      predictions[f"{target_name}/seed{seed}/old"] = old_pred
      runs["old"].append({"seed": seed, **compat.flip_summary(test_y, old_pred, old_pred)})
      for name, model in models.items():
        pred = model.logits_from_trunk(test_h).argmax(-1)
        predictions[f"{target_name}/seed{seed}/{name}"] = pred
        runs[name].append({"seed": seed, **compat.flip_summary(test_y, old_pred, pred)})
      if config.certify is not None and certificate is None:
        name = config.certify.method
        certificate = {"target": target_name, "seed": seed, "method": name,
                       **certify(models[name], task, problems[name], lqf, (test_h, test_y),
                                 tol=config.certify.tol, maxiter=config.certify.maxiter)}
      done = sum(len(r) for r in results.values()) + len(runs["old"])
      logging.info("cell %d/%d: %s seed %d: old + %d new models in %.1fs", done, cells, target_name,
                   seed, len(models), time.perf_counter() - t0)
    summary = {name: common.summarize(r, common.FLIP_KEYS) for name, r in runs.items()}
    results[target_name] = {
        "num_test": int(len(test_y)), "runs": runs, "summary": summary,
        "targets": {name: common.paper_target(runs[name], runs[BASELINE])
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
  """Per target: error, NFR, NFI, relative NFR, PFR (mean [95 % CI] over seeds); against ``none``
  (paired by seed) the relative NFR change, the error change, the detectable NFR change and the
  verdict on the paper's target; the exact-solver certificate."""
  methods = results["methods"]
  n = len(results["seeds"])
  ci = stats.format_interval
  lines = [f"LQF data update: old model fine-tuned on {results['old_shots']} images per class, new "
           f"model on {results['new_shots']} (a superset); mean [95 % t-interval] over n = {n} seeds "
           "(each: its own shot draw); predictions are f_lin's argmax on the test split. Against "
           "'none' (paired by seed): relative NFR change (Fieller's 95 % interval), error change "
           "(points, paired t-interval), the smallest relative NFR change the n pairs detect with "
           "80 % power, and the verdict on the paper's target.", ""]
  for target, r in results["results"].items():
    flips = r["summary"][BASELINE]["nfr"]["mean"] * r["num_test"]
    lines += [f"### {target} ({r['num_test']} test images; plain LQF makes {flips:.1f} negative "
              "flips on average)", "",
              "| method | error (%) | NFR (%) | NFI (%) | PFR (%) | NFR change (%) | error change "
              "(points) | detectable NFR change | target |", "|---" * 9 + "|"]
    for name, s in r["summary"].items():
      cells = [ci(s["error_rate_new"]), ci(s["nfr"]), ci(s["nfi"], digits=1), ci(s["pfr"])]
      if name in r["targets"]:
        t = r["targets"][name]
        detectable = t["detectable_nfr_change"]
        cells += [ci(t["nfr_change"], digits=0, signed=True), ci(t["error_change"], signed=True),
                  "n/a" if detectable is None else f"±{100 * detectable:.0f} %", t["verdict"]]
      else:
        cells += ["–"] * 4
      lines.append(f"| {_method_name(name, methods)} | " + " | ".join(cells) + " |")
    lines.append("")
  lines.append(f"Target (Yan et al.): NFR at least {100 * common.TARGET_NFR_REDUCTION:.0f} % "
               f"lower than 'none' with the error at most "
               f"{100 * common.TARGET_ERROR_INCREASE:.1f} point higher; 'holds' only when both "
               "intervals lie inside it. The old model's row has NFR 0 by definition.")
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


if __name__ == "__main__":
  cli.launch(lambda config, workdir: common.run_study(run, markdown, config, workdir))
