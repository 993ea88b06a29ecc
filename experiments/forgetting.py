"""Certified forgetting: remove 1, 10 and 25 % of a few-shot training set from the exact LQF optimum.

  python -m experiments.forgetting --config configs/forgetting_mnist.py --workdir /tmp/forgetting

Source: the demo's leaky ResNet-8 pretrained on `mnist5k` digits 0–4 (``<workdir>/source`` if missing).
Per seed s, the target's ``shots``-per-class pool (digits 5–9, ``data.shot_seed = s``) is cut into the
training set (what may be forgotten) and a held-out part that fits the new ridge head, so the
linearization point w0 does not depend on the training set and forgetting it from δ forgets it from the
model. The exact optimum δ* of LQF's objective on the training set — ``lqf.fit``'s penalty: ridge in
K-FAC's metric M by default (`lqf.metric`, M from the training inputs), so δ* is the deployed model — is
solved (`lqf.solve`, kernel form) and its `lqf.influence.KernelFit` (on K_M) built once. For each
fraction a random set S is forgotten (`lqf.forget`, with the same M):

* ``kernel``: the exact dual downdate of the KernelFit, then CG in parameter space to ``tol``;
* ``parameter``: plain CG on the new normal equations warm-started at δ*;

against retraining: the exact optimum solved from scratch on the retained examples (same M, solver and
``tol``: what forgetting certifies), and the deployed fit retrained from scratch (`lqf.fit.fit_linearized`
with ``lqf.fit``: M recomputed from the retained inputs, so S's inputs leave M too; its distance to δ'
measures what S's inputs contribute through M). Reported: the relative distance of each forgotten δ' to
the retrained optimum, the certificate (relative residual of the new normal equations, distance bound
ρ‖b'‖/(λμ)), iterations and wall-clock (each shape
compiled before timing), and a membership check: accuracy and loss on S under δ* (S seen), under δ'
(forgotten) and under the retrained optimum, against the never-seen test images. A second variant
fits the head on the training set itself (the usual LQF pipeline): forgetting δ then leaves S's share
of w0's head, and the membership check shows what remains.

Writes ``results.json``, ``results.md``, ``forgetting.png`` and ``predictions.npz`` (the logits the
membership numbers are computed from).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import optax
from absl import logging
from sklearn import metrics

from experiments import common, stats
from lqf import data as data_lib
from lqf import fit as fit_lib
from lqf import forget as forget_lib
from lqf import influence, solve
from lqf import metric as metric_lib
from lqf import methods
from lqf.losses import one_hot_targets
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util
from lqf.runtime import task as task_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

PREDICTIONS_FILE = "predictions.npz"
# The ways of forgetting: kernel form and parameter space to ``config.tol``, kernel form to
# ``config.tight_tol`` (a tighter certificate).
FORMS = ("kernel", "parameter", "kernel_tight")
# Timed per cell (seconds): the ways of forgetting and the two ways of retraining.
TIMED = tuple(f"forget_{form}" for form in FORMS) + ("retrain_exact", "retrain_deployed")
tree = optax.tree_utils


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """(fn(), wall-clock seconds until its arrays are ready)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _distance(a: Any, b: Any) -> float:
  return float(tree.tree_norm(tree.tree_sub(a, b))) / float(tree.tree_norm(b))


def _forgotten_sets(n: int, fractions, seed: int) -> list[np.ndarray]:
  """One random S per fraction, max(1, round(fraction·n)) positions, sorted."""
  rng = np.random.default_rng(seed)
  return [np.sort(rng.choice(n, max(1, round(f * n)), replace=False)) for f in fractions]


def example_losses(logits: np.ndarray, labels: np.ndarray, target_scale: float) -> np.ndarray:
  """(N,) ½‖f − s·e_y‖² of logits (N, C) against labels (N,)."""
  return 0.5 * np.sum((logits - target_scale * np.eye(logits.shape[1])[labels]) ** 2, -1)


def membership(logits: np.ndarray, labels: np.ndarray, target_scale: float) -> dict[str, float]:
  """Accuracy and mean loss ½‖f − s·e_y‖² of logits (N, C) against labels (N,)."""
  return {"accuracy": float(np.mean(logits.argmax(-1) == labels)),
          "loss": float(np.mean(example_losses(logits, labels, target_scale)))}


def attack_auc(member_losses: np.ndarray, test_losses: np.ndarray) -> float:
  """A loss-threshold membership attack: the AUC of telling the examples of ``member_losses`` from the
  never-seen ``test_losses`` by a lower loss (0.5: indistinguishable; 1: every member is found)."""
  truth = np.r_[np.ones(len(member_losses)), np.zeros(len(test_losses))]
  return float(metrics.roc_auc_score(truth, -np.r_[member_losses, test_losses]))


def _predict(task: task_lib.Task, lqf: methods.LQFSettings, delta: Any, h: jax.Array) -> np.ndarray:
  return np.asarray(fit_lib.predict(task.linearized(lqf.trainable), task.variables, delta, h))


def _problem(task: task_lib.Task, lqf: methods.LQFSettings):
  """(lin, training features, s·e_y targets) of ``task``."""
  labels = jnp.asarray(task.train[1])
  return (task.linearized(lqf.trainable), task.features(lqf.trainable, "train"),
          one_hot_targets(labels, task.model.num_classes, lqf.target_scale))


def _cell(task: task_lib.Task, lqf: methods.LQFSettings, config: ml_collections.ConfigDict,
          removed: np.ndarray, optimum: Any, kernel: influence.KernelFit, metric: metric_lib.Metric | None,
          *, warm_up: bool) -> tuple[dict, dict]:
  """Forgets ``removed`` both ways and retrains both ways (timed); (row, logits to save)."""
  lin, features, targets = _problem(task, lqf)
  _, kept, kept_targets = forget_lib.retain(features, targets, removed)
  lam, tol, maxiter = lqf.fit.weight_decay, config.tol, config.maxiter
  runs = {
      "forget_kernel": lambda: forget_lib.forget_by_downdate(lin, task.variables, features, targets,
                                                             removed, kernel=kernel, tol=tol,
                                                             maxiter=maxiter, metric=metric),
      "forget_parameter": lambda: forget_lib.forget_by_cg(lin, task.variables, features, targets, removed,
                                                          weight_decay=lam, delta=optimum, tol=tol,
                                                          maxiter=maxiter, metric=metric),
      "forget_kernel_tight": lambda: forget_lib.forget_by_downdate(lin, task.variables, features, targets,
                                                                   removed, kernel=kernel, metric=metric,
                                                                   tol=config.tight_tol, maxiter=maxiter),
      "retrain_exact": lambda: solve.solve_linearized(lin, task.variables, kept, kept_targets,
                                                      weight_decay=lam, tol=tol, maxiter=maxiter,
                                                      metric=metric),
      "retrain_deployed": lambda: fit_lib.fit_linearized(lin, task.variables, kept, kept_targets,
                                                         lqf.fit)}
  out, seconds = {}, {}
  for name, fn in runs.items():
    if warm_up:  # compile this shape's functions first: the timings below exclude compilation
      fn()
    out[name], seconds[name] = timed(fn)
  retrained, retrain_info = out["retrain_exact"]
  row = {"removed": int(len(removed)), "seconds": seconds,
         "retrain_iterations": retrain_info.iterations,
         "retrain_relative_residual": retrain_info.relative_residual,
         "deployed_relative_distance": _distance(out["forget_kernel"].delta, out["retrain_deployed"][0])}
  for form in FORMS:
    result = out[f"forget_{form}"]
    row[form] = {"iterations": result.iterations, "relative_residual": result.relative_residual,
                   "distance_bound": result.distance_bound,
                   "relative_distance": _distance(result.delta, retrained),
                   "bound_over_norm": result.distance_bound / float(tree.tree_norm(retrained))}
  forgotten = out["forget_kernel"].delta
  h = features.h[removed]
  return row, {"seen": _predict(task, lqf, optimum, h), "forgotten": _predict(task, lqf, forgotten, h),
               "retrained": _predict(task, lqf, retrained, h),
               "test_forgotten": _predict(task, lqf, forgotten, task.features(lqf.trainable, "test").h)}


def _train_head_cell(task: task_lib.Task, lqf: methods.LQFSettings, config: ml_collections.ConfigDict,
                     removed: np.ndarray, optimum: Any, kernel: influence.KernelFit,
                     metric: metric_lib.Metric | None, retrained_task: task_lib.Task) -> dict:
  """The head fitted on the training set: forget ``removed`` from δ only (kernel form), against the
  full retraining (``retrained_task``: a new head on the retained examples; then their exact
  optimum, its metric from the retained inputs); the logits to save."""
  lin, features, targets = _problem(task, lqf)
  forgotten = forget_lib.forget_by_downdate(lin, task.variables, features, targets, removed, metric=metric,
                                            kernel=kernel, tol=config.tol, maxiter=config.maxiter).delta
  new_lin, new_features, new_targets = _problem(retrained_task, lqf)
  retrained, _ = solve.solve_linearized(
      new_lin, retrained_task.variables, new_features, new_targets, weight_decay=lqf.fit.weight_decay,
      tol=config.tol, maxiter=config.maxiter,
      metric=fit_lib.penalty_metric(lqf.fit, new_lin, retrained_task.variables, new_features.h))
  h = features.h[removed]  # the trunk, and so h, is the source's in both tasks
  return {"seen": _predict(task, lqf, optimum, h), "forgotten": _predict(task, lqf, forgotten, h),
          "retrained": _predict(retrained_task, lqf, retrained, h),
          "test_forgotten": _predict(task, lqf, forgotten, task.features(lqf.trainable, "test").h)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The forgetting study (module docstring); writes ``predictions.npz``, returns the results.

  Config fields: pretrain (the source's `lqf.train` config), data (the target with ``shots`` and
  ``heldout_fraction``: the pool per class and the head's share of it), fractions, seeds, lqf
  (`configs/finetune_mnist.py`), tol, maxiter, kernel_batch_size, overwrite.
  """
  if not config.seeds or not all(0 < f < 1 for f in config.fractions):
    raise ValueError(f"config.seeds={tuple(config.seeds)} and config.fractions="
                     f"{tuple(config.fractions)}: give at least one seed and fractions in (0, 1).")
  lqf = config_util.settings(methods.LQFSettings, config.lqf, "lqf")
  ckpt_lib.claim_workdir(workdir, config)
  model_config, source = common.ensure_source(config.pretrain, os.path.join(workdir, "source"))
  num_classes = data_lib.num_classes(config.data)
  test = data_lib.load_arrays(config.data, config.data.test_split)
  rows, arrays, setup = [], {"test_labels": test[1]}, []
  cells = len(config.seeds) * len(config.fractions)
  for seed in config.seeds:
    data = copy.deepcopy(config.data)
    data.shot_seed = data.heldout_seed = seed
    train = data_lib.load_arrays(data, data.train_split)
    heldout = data_lib.load_arrays(data, data_lib.HELDOUT_SPLIT)

    def task_of(examples, head_data):
      return common.new_task(model_config, source, examples, num_classes, lqf, seed=seed, head_data=head_data,
                             test=test)

    for variant, task in (("heldout_head", task_of(train, heldout)), ("train_head", task_of(train, train))):
      lin, features, targets = _problem(task, lqf)
      metric = fit_lib.penalty_metric(lqf.fit, lin, task.variables, features.h)
      (optimum, info), solve_seconds = timed(lambda: solve.solve_linearized(
          lin, task.variables, features, targets, weight_decay=lqf.fit.weight_decay, tol=config.tol,
          maxiter=config.maxiter, metric=metric))
      kernel, kernel_seconds = timed(lambda: influence.kernel_fit(
          lin, task.variables, features, targets, weight_decay=lqf.fit.weight_decay,
          batch_size=config.kernel_batch_size, metric=metric))
      arrays[f"{variant}/seed{seed}/test_seen"] = _predict(task, lqf, optimum,
                                                           task.features(lqf.trainable, "test").h)
      setup.append({"variant": variant, "seed": seed, "num_train": int(len(train[1])),
                    "num_head": int(len((heldout if variant == "heldout_head" else train)[1])),
                    "solve_seconds": solve_seconds, "solve_iterations": info.iterations,
                    "kernel_fit_seconds": kernel_seconds})
      for fraction, removed in zip(config.fractions,
                                   _forgotten_sets(len(train[1]), config.fractions, seed)):
        t0 = time.perf_counter()
        cell = f"{variant}/seed{seed}/f{fraction}"
        arrays[f"{cell}/removed"], arrays[f"{cell}/labels"] = removed, train[1][removed]
        if variant == "heldout_head":
          row, logits = _cell(task, lqf, config, removed, optimum, kernel, metric,
                              warm_up=seed == config.seeds[0])
          rows.append({"seed": seed, "fraction": fraction, **row})
        else:
          kept = influence.retained_indices(len(train[1]), removed)
          retained = (train[0][kept], train[1][kept])
          logits = _train_head_cell(task, lqf, config, removed, optimum, kernel, metric,
                                    task_of(retained, retained))
        arrays.update({f"{cell}/{k}": v for k, v in logits.items()})
        logging.info("cell %d/%d %s: seed %d, forgot %d of %d in %.1fs", len(rows), cells, variant,
                     seed, len(removed), len(train[1]), time.perf_counter() - t0)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, PREDICTIONS_FILE), **arrays)
  results = {"study": "forgetting", "seeds": list(config.seeds), "fractions": list(config.fractions),
             "lqf": config.lqf.to_dict(), "tol": config.tol, "tight_tol": config.tight_tol,
             "rows": rows, "setup": setup,
             "membership": membership_summary(arrays, config, lqf.target_scale),
             "summary": summarize(rows)}
  if jax.process_index() == 0:
    plot(results, os.path.join(workdir, "forgetting.png"))
  return results


def membership_summary(arrays: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                       target_scale: float) -> dict:
  """{variant: {fraction: {set: summarize(accuracy, loss)}, 'attack': summarize(seen, forgotten)}}
  over seeds, from the saved logits: on S under δ* (``seen``), under the forgotten δ' (``forgotten``)
  and the retrained optimum (``retrained``); on the test images under δ* (``test_seen``) and δ'
  (``test_forgotten``); the loss-threshold attack's AUC of S against the test images under δ* and δ'."""
  labels = arrays["test_labels"]
  out: dict = {}
  for variant in ("heldout_head", "train_head"):
    for fraction in config.fractions:
      runs: dict = {}
      for seed in config.seeds:
        cell = f"{variant}/seed{seed}/f{fraction}"
        logits = {name: (arrays[f"{cell}/{name}"], arrays[f"{cell}/labels"])
                  for name in ("seen", "forgotten", "retrained")}
        logits["test_seen"] = arrays[f"{variant}/seed{seed}/test_seen"], labels
        logits["test_forgotten"] = arrays[f"{cell}/test_forgotten"], labels
        for name, (f, y) in logits.items():
          runs.setdefault(name, []).append(membership(f, y, target_scale))
        loss = {name: example_losses(f, y, target_scale) for name, (f, y) in logits.items()}
        runs.setdefault("attack", []).append({
            "seen": attack_auc(loss["seen"], loss["test_seen"]),
            "forgotten": attack_auc(loss["forgotten"], loss["test_forgotten"])})
      out.setdefault(variant, {})[str(fraction)] = {
          name: common.summarize(r, list(r[0])) for name, r in runs.items()}
  return out


def summarize(rows: list[dict]) -> dict:
  """{fraction: {quantity: summarize}} over seeds of |S|, the certificates, distances, iterations and
  seconds (the held-out-head variant)."""
  out: dict = {}
  for r in rows:
    out.setdefault(str(r["fraction"]), []).append(
        {"removed": r["removed"], "retrain_iterations": r["retrain_iterations"],
         "deployed_relative_distance": r["deployed_relative_distance"],
         **{f"seconds_{k}": v for k, v in r["seconds"].items()},
         **{f"{m}_{k}": v for m in FORMS for k, v in r[m].items()}})
  return {f: common.summarize(runs, list(runs[0])) for f, runs in out.items()}


def _sci(stat: Mapping[str, float]) -> str:
  bound = lambda v: "–" if v is None else f"{v:.1e}"  # noqa: E731
  return f"{stat['mean']:.1e} [{bound(stat['low'])}, {bound(stat['high'])}]"


FORM_NAMES = {"kernel": "forget, kernel form (ρ ≤ {tol:g})",
              "parameter": "forget, parameter space (ρ ≤ {tol:g})",
              "kernel_tight": "forget, kernel form (ρ ≤ {tight_tol:g})"}


def markdown(results: Mapping[str, Any]) -> str:
  """The certificate/distance/time table and the membership table (mean [95 % t-interval] over seeds)."""
  n = len(results["seeds"])
  s = results["summary"]
  setup = [r for r in results["setup"] if r["variant"] == "heldout_head"]
  penalty = ("(λ/2)‖δ‖²" if results["lqf"].get("regularizer", "euclidean") == "euclidean" else
             f"(λ/2)δᵀMδ, M = {results['lqf']['regularizer']} curvature + {results['lqf']['metric_damping']:g}·I")
  lines = [f"Forgetting from the exact LQF optimum (penalty {penalty}, λ = {results['lqf']['weight_decay']:g}, "
           f"CG to relative residual {results['tol']:g}); {setup[0]['num_train']} training examples, the head fitted on "
           f"{setup[0]['num_head']} held-out ones; mean [95 % t-interval] over n = {n} seeds (each: its own "
           "shot draw and forgotten set S). Distances are ‖δ' − δ'_retrained‖/‖δ'_retrained‖.", "",
           "### Certificate, distance to the retrained optimum, cost", ""]
  header = ["forgotten (|S|)", "form", "relative residual ρ", "bound ρ‖b'‖/(λμ) / ‖δ'‖",
            "distance to retrained", "CG iterations", "seconds"]
  table = []
  for f, stat in s.items():
    size = f"{100 * float(f):g} % ({stat['removed']['mean']:.0f})"
    for m in FORMS:
      table.append([size, FORM_NAMES[m].format(**results), _sci(stat[f"{m}_relative_residual"]),
                    _sci(stat[f"{m}_bound_over_norm"]), _sci(stat[f"{m}_relative_distance"]),
                    stats.format_interval(stat[f"{m}_iterations"], scale=1, digits=0),
                    stats.format_interval(stat[f"seconds_forget_{m}"], scale=1)])
    table.append([size, "retrain, exact optimum (kernel CG)", "–", "–", "–",
                  stats.format_interval(stat["retrain_iterations"], scale=1, digits=0),
                  stats.format_interval(stat["seconds_retrain_exact"], scale=1)])
    table.append([size, "retrain the deployed fit (lqf.fit; its own M)", "–", "–",
                  _sci(stat["deployed_relative_distance"]), "–",
                  stats.format_interval(stat["seconds_retrain_deployed"], scale=1)])
  lines += common.markdown_table(header, table)
  once = common.summarize(setup, ["kernel_fit_seconds", "solve_seconds"])
  lines += ["", f"One-time costs on all examples: the KernelFit (dense empirical NTK, float64 inverse) "
            f"{stats.format_interval(once['kernel_fit_seconds'], scale=1)} s, the exact optimum δ* "
            f"{stats.format_interval(once['solve_seconds'], scale=1)} s (the first seed includes compiling).",
            "", "### Membership check: do the forgotten examples look unseen?", "",
            "Accuracy (%) and mean loss ½‖f − s·e_y‖² on the forgotten examples S and on the never-seen "
            "test images. 'seen' = δ* (S in the training set), 'forgotten' = δ' (kernel form), "
            "'retrained' = the optimum retrained without S (with the head fitted on the training set: "
            "a new head on the retained examples, then their optimum). Attack AUC: telling S from the "
            "test images by a lower loss (0.5 = indistinguishable, 1 = every member found).", ""]
  header = ["head fitted on", "forgotten", "S seen", "S forgotten", "S retrained", "test, δ*",
            "test, δ'", "loss S seen", "loss S forgotten", "loss test, δ'", "attack AUC, δ*",
            "attack AUC, δ'"]
  table = []
  for variant, label in (("heldout_head", "held-out part"), ("train_head", "training set (with S)")):
    for f, stat in results["membership"][variant].items():
      table.append([label, f"{100 * float(f):g} %"]
                   + [stats.format_interval(stat[k]["accuracy"], digits=1)
                      for k in ("seen", "forgotten", "retrained", "test_seen", "test_forgotten")]
                   + [stats.format_interval(stat[k]["loss"], scale=1, digits=1)
                      for k in ("seen", "forgotten", "test_forgotten")]
                   + [stats.format_interval(stat["attack"][k], scale=1) for k in ("seen", "forgotten")])
  lines += common.markdown_table(header, table)
  return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: str) -> None:
  """Seconds per way of forgetting / retraining, and accuracy on S before/after vs the test set."""
  s = results["summary"]
  member = results["membership"]["heldout_head"]
  fractions = list(s)
  x = np.arange(len(fractions))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(TIMED)
  for i, name in enumerate(TIMED):
    stat = [s[f][f"seconds_{name}"] for f in fractions]
    axes[0].bar(x + (i - (len(TIMED) - 1) / 2) * width, [v["mean"] for v in stat], width,
                yerr=[stats.half_width(v) for v in stat], capsize=3, label=name.replace("_", " "))
  axes[0].set_ylabel("seconds (2-core CPU)")
  axes[0].set_title("forgetting vs retraining")
  for i, name in enumerate(("seen", "forgotten", "retrained", "test_forgotten")):
    stat = [member[f][name]["accuracy"] for f in fractions]
    axes[1].bar(x + (i - 1.5) * 0.2, [100 * v["mean"] for v in stat], 0.2,
                yerr=[100 * stats.half_width(v) for v in stat], capsize=3,
                label={"test_forgotten": "test (never seen), δ'"}.get(name, f"S {name}"))
  axes[1].set_ylabel("accuracy (%)")
  axes[1].set_title("membership: forgotten examples vs never seen")
  for ax in axes:
    ax.set_xticks(x, [f"{100 * float(f):g} % forgotten" for f in fractions])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
  common.save_figure(fig, path, f"error bars: 95 % t-intervals over n = {len(results['seeds'])} seeds")
  plt.close(fig)


if __name__ == "__main__":
  cli.launch(lambda c, w: common.run_study(run, markdown, c, w))
