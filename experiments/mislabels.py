"""Finding mislabelled training examples with the exact leave-one-out of LQF, and training without them.

  python -m experiments.mislabels --config configs/mislabels_mnist.py --workdir /tmp/mislabels

Source: the demo's leaky ResNet-8 pretrained on `mnist5k` digits 0–4 (``<workdir>/source`` if missing).
Per target (digits 5–9) and seed s: a ``shots``-per-class training set (``shot_seed = s``), of which a
``noise_fraction`` share gets a wrong label (another class, uniformly). Everything below sees only the
noisy labels: the ridge head, the LQF fits and the scores. Each score ranks the training examples
(higher = more suspicious):

* exact leave-one-out of the LQF optimum (`lqf.mislabel.label_scores` over `lqf.influence.kernel_fit`):
  ``loo_loss``, ``self_influence``, ``loo_margin``, and the optimum's own ``fitted_loss``;
* what a user would try without it: the training loss ½‖f − s·e_y‖² and the margin max_{k≠y} f_k − f_y
  of the fitted LQF model (`lqf.fit.fit_linearized` with ``lqf.fit``: the deployed fit, by default the
  certified optimum of ridge in K-FAC's metric; ``train_loss``, ``margin``), and the cross-entropy of the
  nonlinearly fine-tuned model (same layers, Adam, `lqf.nonlinear.finetune_nonlinear`,
  ``nonlinear_loss``).

Metrics against the flipped set F (|F| = m): precision among the m top-ranked (= recall at m) and
average precision (area under the precision–recall curve, `sklearn.metrics.average_precision_score`;
a random ranking scores |F|/N). Then the loop a user would run: drop the m top-ranked examples and refit
— the whole LQF pipeline (a new head on the rest, then ``lqf.fit``) and the exact optimum forgotten
without them (`lqf.forget`, kernel form) — and compare the test accuracy with the noisy set, the oracle
(dropping exactly F) and the clean set (every true label).

Writes ``results.json``, ``results.md``, ``mislabels.png`` and ``predictions.npz`` (flips, scores and test
logits: the tables are recomputed from it in the tests).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from absl import logging
from sklearn import metrics

from experiments import common, stats
from lqf import data as data_lib
from lqf import forget as forget_lib
from lqf import fit as fit_lib
from lqf import influence, mislabel, solve
from lqf import linearize as lin_lib
from lqf import methods
from lqf.losses import one_hot_targets
from lqf.models import create_model
from lqf.nonlinear import finetune_nonlinear
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

PREDICTIONS_FILE = "predictions.npz"
LOO_SCORES = ("loo_loss", "self_influence", "loo_margin", "fitted_loss")
BASELINE_SCORES = ("train_loss", "margin", "nonlinear_loss")
SCORES = LOO_SCORES + BASELINE_SCORES
# The rankings whose top m are dropped before refitting, besides the oracle (the flipped set itself).
DROP_BY = ("loo_loss", "self_influence", "train_loss", "margin", "nonlinear_loss", "oracle")


def flip_labels(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> tuple[np.ndarray,
                                                                                          np.ndarray]:
  """(noisy labels, flipped mask): round(fraction·N) random examples get another class, uniformly."""
  rng = np.random.default_rng(seed)
  flipped = np.zeros(len(labels), bool)
  flipped[rng.choice(len(labels), round(fraction * len(labels)), replace=False)] = True
  noisy = labels.copy()
  noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, flipped.sum())) % num_classes
  return noisy, flipped


def precision_at(scores: np.ndarray, flipped: np.ndarray, k: int) -> float:
  """The share of flipped examples among the k highest scores."""
  return float(np.mean(flipped[top(scores, k)]))


def top(scores: np.ndarray, k: int) -> np.ndarray:
  """Positions of the k highest scores (stable order on ties)."""
  return np.argsort(-scores, kind="stable")[:k]


def fitted_scores(logits: np.ndarray, labels: np.ndarray, target_scale: float) -> dict[str, np.ndarray]:
  """The fitted model's ``train_loss`` ½‖f − s·e_y‖² and ``margin`` max_{k≠y} f_k − f_y (N,)."""
  n, c = logits.shape
  loss = 0.5 * np.sum((logits - target_scale * np.eye(c)[labels]) ** 2, -1)
  others = np.where(np.eye(c, dtype=bool)[labels], -np.inf, logits)
  return {"train_loss": loss, "margin": others.max(-1) - logits[np.arange(n), labels]}


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(N,) −log softmax(f)_y."""
  return -np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))[np.arange(len(labels)), labels]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(logits).argmax(-1) == labels))


def _seed_cell(config: ml_collections.ConfigDict, target: ml_collections.ConfigDict, seed: int,
               model_config: ml_collections.ConfigDict, source: dict, lqf: methods.LQFSettings,
               nonlinear: methods.NonlinearSettings, test_h: jax.Array) -> dict[str, np.ndarray]:
  """One target and seed: flips, every score, and the test logits of every fit."""
  data = copy.deepcopy(target)
  data.shot_seed = seed
  images, labels = data_lib.load_arrays(data, data.train_split)
  num_classes = data_lib.num_classes(data)
  noisy, flipped = flip_labels(labels, num_classes, config.noise_fraction, seed)

  def lqf_fit(keep: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Test logits of the whole LQF pipeline (head + ``lqf.fit``) on the examples ``keep``."""
    task = common.new_task(model_config, source, (images[keep], y[keep]), num_classes, lqf, seed=seed)
    return common.fit_task(task, lqf, one_hot_targets(jnp.asarray(y[keep]), num_classes, lqf.target_scale)
                               ).logits_from_trunk(test_h)

  task = common.new_task(model_config, source, (images, noisy), num_classes, lqf, seed=seed)
  lin = task.linearized(lqf.trainable)
  features = task.features(lqf.trainable, "train")
  targets = one_hot_targets(jnp.asarray(noisy), num_classes, lqf.target_scale)
  fitted = common.fit_task(task, lqf, targets)
  metric = fit_lib.penalty_metric(lqf.fit, lin, task.variables, features.h)
  kernel = influence.kernel_fit(lin, task.variables, features, targets, weight_decay=lqf.fit.weight_decay,
                                batch_size=config.kernel_batch_size, metric=metric)
  tuned = finetune_nonlinear(task.model, task.variables, images, noisy, trainable=lqf.trainable,
                             settings=nonlinear, seed=seed)
  scores = {**mislabel.label_scores(kernel, targets)._asdict(),
            **fitted_scores(fitted.logits_from_trunk(features.h), noisy, lqf.target_scale),
            "nonlinear_loss": cross_entropy(np.asarray(lin_lib.jit_tail(lin, tuned, features.h)), noisy)}
  exact = lambda delta: np.asarray(common.LinearizedClassifier(  # noqa: E731
      lin, task.variables, delta).logits_from_trunk(test_h))
  optimum, _ = solve.solve_linearized(lin, task.variables, features, targets,
                                      weight_decay=lqf.fit.weight_decay, tol=config.tol, maxiter=config.maxiter,
                                      metric=metric)
  everything = np.arange(len(labels))
  out = {"labels": labels, "noisy": noisy, "flipped": flipped,
         **{f"score/{k}": np.asarray(v) for k, v in scores.items()},
         "test/noisy/refit": fitted.logits_from_trunk(test_h), "test/noisy/exact": exact(optimum),
         "test/noisy/nonlinear": np.asarray(lin_lib.jit_tail(lin, tuned, test_h)),
         "test/clean/refit": lqf_fit(everything, labels)}
  m = int(flipped.sum())
  for name in DROP_BY:
    dropped = np.flatnonzero(flipped) if name == "oracle" else top(scores[name], m)
    out[f"dropped/{name}"] = dropped
    out[f"test/drop_{name}/refit"] = lqf_fit(influence.retained_indices(len(labels), dropped), noisy)
    forgotten = forget_lib.forget_by_downdate(lin, task.variables, features, targets, dropped,
                                              kernel=kernel, tol=config.tol, maxiter=config.maxiter,
                                              metric=metric)
    out[f"test/drop_{name}/exact"] = exact(forgotten.delta)
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The mislabel study (module docstring); writes ``predictions.npz``, returns the results.

  Config fields: pretrain, targets.<name> (data sections with ``shots``), noise_fraction, seeds, lqf,
  nonlinear (`configs/finetune_mnist.py`), tol, maxiter, kernel_batch_size, overwrite.
  """
  if not config.seeds or not 0 < config.noise_fraction < 1:
    raise ValueError(f"config.seeds={tuple(config.seeds)} and config.noise_fraction="
                     f"{config.noise_fraction}: give at least one seed and a fraction in (0, 1).")
  lqf = config_util.settings(methods.LQFSettings, config.lqf, "lqf")
  nonlinear = config_util.settings(methods.NonlinearSettings, config.nonlinear, "nonlinear")
  ckpt_lib.claim_workdir(workdir, config)
  model_config, source = common.ensure_source(config.pretrain, os.path.join(workdir, "source"))
  arrays, cells = {}, len(config.targets) * len(config.seeds)
  for target_name, target in config.targets.items():
    test_x, test_y = data_lib.load_arrays(target, target.test_split)
    arrays[f"{target_name}/test_labels"] = test_y
    trunk = lin_lib.linearize(create_model(model_config, data_lib.num_classes(target)), source,
                              lqf.trainable)
    test_h = trunk.trunk_features(source, test_x)  # one source trunk for every fit
    for seed in config.seeds:
      t0 = time.perf_counter()
      cell = _seed_cell(config, target, seed, model_config, source, lqf, nonlinear, test_h)
      arrays.update({f"{target_name}/seed{seed}/{k}": v for k, v in cell.items()})
      logging.info("cell %d/%d: %s seed %d: AP loo_loss %.2f, train_loss %.2f (%.1fs)",
                   len([k for k in arrays if k.endswith("/flipped")]), cells, target_name, seed,
                   metrics.average_precision_score(cell["flipped"], cell["score/loo_loss"]),
                   metrics.average_precision_score(cell["flipped"], cell["score/train_loss"]),
                   time.perf_counter() - t0)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, PREDICTIONS_FILE), **arrays)
  results = {"study": "mislabels", "seeds": list(config.seeds), "noise_fraction": config.noise_fraction,
             "shots": {k: v.shots for k, v in config.targets.items()}, "lqf": config.lqf.to_dict(),
             "results": evaluate(arrays, list(config.targets), list(config.seeds))}
  if jax.process_index() == 0:
    plot(results, os.path.join(workdir, "mislabels.png"))
  return results


def evaluate(arrays: Mapping[str, np.ndarray], targets: list[str], seeds: list[int]) -> dict:
  """Per target: per-seed detection metrics of every score and test accuracies of every fit, and their
  summaries (mean [95 % t-interval] over seeds), from the saved arrays."""
  out = {}
  for target in targets:
    test_y = arrays[f"{target}/test_labels"]
    detection, accuracy = [], []
    for seed in seeds:
      cell = {k.split("/", 2)[2]: v for k, v in arrays.items() if k.startswith(f"{target}/seed{seed}/")}
      flipped = cell["flipped"]
      m = int(flipped.sum())
      detection.append({"seed": seed, "num_train": int(len(flipped)), "num_flipped": m,
                        **{f"precision_at_m/{s}": precision_at(cell[f"score/{s}"], flipped, m)
                           for s in SCORES},
                        **{f"average_precision/{s}": float(metrics.average_precision_score(
                            flipped, cell[f"score/{s}"])) for s in SCORES}})
      accuracy.append({"seed": seed, **{k[len("test/"):]: _accuracy(v, test_y) for k, v in cell.items()
                                        if k.startswith("test/")}})
    out[target] = {"num_test": int(len(test_y)), "detection": detection, "accuracy": accuracy,
                   "detection_summary": common.summarize(detection, [k for k in detection[0]
                                                                      if "/" in k]),
                   "accuracy_summary": common.summarize(accuracy, [k for k in accuracy[0] if k != "seed"])}
  return out


SCORE_NAMES = {
    "loo_loss": "LQF exact leave-one-out loss", "self_influence": "LQF self-influence (LOO − fitted loss)",
    "loo_margin": "LQF leave-one-out margin", "fitted_loss": "LQF optimum's training loss",
    "train_loss": "training loss of the fitted model (lqf.fit)",
    "margin": "margin of the fitted model (lqf.fit)",
    "nonlinear_loss": "cross-entropy of the nonlinear fine-tuned model"}


def markdown(results: Mapping[str, Any]) -> str:
  """Detection table (precision at m, average precision) and the test accuracy of each fit."""
  n = len(results["seeds"])
  lines = [f"Mislabelled training examples: {100 * results['noise_fraction']:g} % of each k-shot training "
           f"set relabelled to another class; mean [95 % t-interval] over n = {n} seeds (each: its own shot "
           "draw and flips).", ""]
  for target, r in results["results"].items():
    d, a = r["detection_summary"], r["accuracy_summary"]
    first = r["detection"][0]
    lines += [f"### {target}: {first['num_train']} training examples, {first['num_flipped']} flipped "
              f"(m), {r['num_test']} test images", "",
              "Finding them (a random ranking has average precision "
              f"{first['num_flipped'] / first['num_train']:.2f}):", ""]
    lines += common.markdown_table(
        ["score (higher = more suspicious)", "precision at m (%)", "average precision (%)"],
        [[SCORE_NAMES[s], stats.format_interval(d[f"precision_at_m/{s}"], digits=1),
          stats.format_interval(d[f"average_precision/{s}"], digits=1)] for s in SCORES])
    lines += ["", "Training without them (test accuracy, %): the whole LQF pipeline refit (new head, "
              "lqf.fit) and the exact optimum (for the drops: forgotten from the noisy optimum, "
              "`lqf.forget`):", ""]
    rows = [["noisy labels (no cleaning)", stats.format_interval(a["noisy/refit"], digits=1),
             stats.format_interval(a["noisy/exact"], digits=1)]]
    rows += [[f"drop the top m by {SCORE_NAMES[s]}", stats.format_interval(a[f"drop_{s}/refit"], digits=1),
              stats.format_interval(a[f"drop_{s}/exact"], digits=1)] for s in DROP_BY if s != "oracle"]
    rows += [["drop exactly the flipped ones (oracle)", stats.format_interval(a["drop_oracle/refit"], digits=1),
              stats.format_interval(a["drop_oracle/exact"], digits=1)],
             ["clean labels (all N)", stats.format_interval(a["clean/refit"], digits=1), "–"],
             ["nonlinear fine-tuning on the noisy labels", stats.format_interval(a["noisy/nonlinear"], digits=1),
              "–"]]
    lines += common.markdown_table(["training set", "LQF refit (new head + lqf.fit)", "exact optimum"], rows)
    lines.append("")
  return "\n".join(lines)


def plot(results: Mapping[str, Any], path: str) -> None:
  """Average precision per score, and test accuracy per way of cleaning (first target)."""
  target, r = next(iter(results["results"].items()))
  d, a = r["detection_summary"], r["accuracy_summary"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  ap = [d[f"average_precision/{s}"] for s in SCORES]
  axes[0].barh(range(len(SCORES)), [100 * v["mean"] for v in ap], xerr=[100 * stats.half_width(v) for v in ap],
               capsize=3, color=["C0"] * len(LOO_SCORES) + ["C7"] * len(BASELINE_SCORES))
  axes[0].set_yticks(range(len(SCORES)), [SCORE_NAMES[s] for s in SCORES], fontsize=7)
  first = r["detection"][0]
  axes[0].axvline(100 * first["num_flipped"] / first["num_train"], color="k", ls=":", label="random")
  axes[0].set_xlabel("average precision (%)")
  axes[0].set_title(f"finding flipped labels ({target})")
  axes[0].legend(fontsize=8)
  names = ["noisy"] + [f"drop_{s}" for s in DROP_BY] + ["clean"]
  accuracy = [a[f"{name}/refit"] for name in names]
  axes[1].barh(range(len(names)), [100 * v["mean"] for v in accuracy],
               xerr=[100 * stats.half_width(v) for v in accuracy], capsize=3)
  axes[1].set_yticks(range(len(names)), [n.replace("drop_", "drop by ") for n in names], fontsize=7)
  axes[1].set_xlim(100 * min(v["mean"] for v in accuracy) - 5, 100)
  axes[1].set_xlabel("test accuracy (%), LQF refit")
  axes[1].set_title("training without the top-ranked examples")
  for ax in axes:
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
  common.save_figure(fig, path, f"error bars: 95 % t-intervals over n = {len(results['seeds'])} seeds")
  plt.close(fig)


if __name__ == "__main__":
  cli.launch(lambda c, w: common.run_study(run, markdown, c, w))
