"""Adding fine-tuned models: task arithmetic with LQF (linearized) vs nonlinear fine-tuning.

  python -m experiments.task_arithmetic --config configs/task_arithmetic_mnist.py --workdir /tmp/arith

Source: the demo's leaky ResNet-8 pretrained on `mnist5k` digits 0–4 (``<workdir>/source`` if missing).
Two tasks from it (``config.tasks``, default: digits 5–9 of `mnist5k` and of `uci_digits`), each with its
own ridge head fitted on its training set and then frozen; the shared layers ``lqf.trainable`` (the last
stage) are fine-tuned per task and seed, by LQF (40 K-FAC steps on the linearized model) and by
nonlinear fine-tuning (cross-entropy, Adam). The task vectors δ_A, δ_B (shared-layer offsets) are added,
w0 + α(δ_A + δ_B), and each task is evaluated with its own head on the merged layers: for LQF with the
linearized model, exactly f0 + αJδ_A + αJδ_B (`lqf.task_arithmetic.TangentPath`, one tangent pass per
vector for the whole α grid); for nonlinear fine-tuning with the network at the merged weights. α is
chosen on each task's held-out part (the task-averaged held-out accuracy, `choose_scale`), never on the
test split.

Reported per task and method: accuracy with no task vector (α = 0: the frozen head on the pretrained
layers), with its own vector alone, with the sum at the chosen α and at α = 1; the normalized accuracy
(sum / alone); and the interference on the task's test inputs, mean ‖f(δ_u + δ_other) − f(δ_u)‖ /
‖f(δ_u) − f(0)‖ (for LQF ‖Jδ_other‖/‖Jδ_u‖). Ortiz-Jimenez et al. (NeurIPS 2023) report that linearized
fine-tuning composes better (higher normalized accuracy). Writes ``results.json``, ``results.md``,
``task_arithmetic.png`` and ``predictions.npz`` (predictions per α, from which the tables are recomputed).
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
import optax
from absl import logging

from experiments import common, stats
from lqf import data as data_lib
from lqf import linearize as lin_lib
from lqf import methods
from lqf import task_arithmetic as arithmetic
from lqf.losses import one_hot_targets
from lqf.nonlinear import finetune_nonlinear
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util
from lqf.runtime import task as task_lib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

PREDICTIONS_FILE = "predictions.npz"
METHODS = ("lqf", "nonlinear")
SETS = ("heldout", "test")


def _tuned_vector(task: task_lib.Task, trainable: str, nonlinear: methods.NonlinearSettings,
                  seed: int) -> Any:
  """Δ = w_tuned − w0 of the shared layers after nonlinear fine-tuning of ``task``."""
  lin = task.linearized(trainable)
  images, labels = task.train
  tuned = finetune_nonlinear(task.model, task.variables, images, labels, trainable=trainable,
                             settings=nonlinear, seed=seed)
  return optax.tree_utils.tree_sub(lin_lib.select(tuned["params"], lin.trainable_paths),
                                   lin_lib.select(task.variables["params"], lin.trainable_paths))


def _relative_change(change: np.ndarray, own: np.ndarray) -> float:
  """mean_x ‖change(x)‖ / ‖own(x)‖ over logits (N, C)."""
  return float(np.mean(np.linalg.norm(change, axis=-1) / np.linalg.norm(own, axis=-1)))


def _logits_grid(method: str, task: task_lib.Task, trainable: str, features: lin_lib.Features,
                 own: Any, other: Any, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
  """(logits with the sum at every α (A, N, C), logits with ``own`` alone (N, C), interference)."""
  lin = task.linearized(trainable)
  if method == "lqf":
    path = arithmetic.tangent_path(lin, task.variables, features, [own, other])
    grid = np.stack([path.logits(a) for a in scales])
    alone = path.logits((1.0, 0.0))
    return grid, alone, _relative_change(path.effects[1], path.effects[0])

  def at(delta):
    return np.asarray(lin_lib.jit_tail(lin, lin.merge(task.variables, delta), features.h))
  grid = np.stack([at(arithmetic.add_task_vectors([own, other], a)) for a in scales])
  alone = at(own)
  both = at(arithmetic.add_task_vectors([own, other], 1.0))
  return grid, alone, _relative_change(both - alone, alone - np.asarray(features.f0))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The task-arithmetic study (module docstring); writes ``predictions.npz``, returns the results.

  Config fields: pretrain, tasks.<name> (two data sections with ``shots`` and ``heldout_fraction``),
  seeds, scales (the α grid), lqf (its ``trainable`` = the shared layers; heads frozen), nonlinear,
  overwrite.
  """
  if len(config.tasks) != 2 or not config.seeds:
    raise ValueError(f"config.tasks has {len(config.tasks)} tasks and config.seeds="
                     f"{tuple(config.seeds)}: give two tasks and at least one seed.")
  if "head" in config.lqf.trainable:
    raise ValueError(f"config.lqf.trainable={config.lqf.trainable!r} trains the heads: task vectors "
                     "must live in shared layers, e.g. '^stage3/' (each task keeps its frozen head).")
  lqf = config_util.settings(methods.LQFSettings, config.lqf, "lqf")
  nonlinear = config_util.settings(methods.NonlinearSettings, config.nonlinear, "nonlinear")
  scales = np.asarray(config.scales, np.float64)
  ckpt_lib.claim_workdir(workdir, config)
  model_config, source = common.ensure_source(config.pretrain, os.path.join(workdir, "source"))
  names = list(config.tasks)
  arrays = {"scales": scales}
  interference = []
  for i, seed in enumerate(config.seeds):
    t0 = time.perf_counter()
    tasks, features, vectors = {}, {}, {m: {} for m in METHODS}
    for name, data in config.tasks.items():
      data = copy.deepcopy(data)
      data.shot_seed = data.heldout_seed = seed
      train = data_lib.load_arrays(data, data.train_split)
      num_classes = data_lib.num_classes(data)
      task = common.new_task(model_config, source, train, num_classes, lqf, seed=seed)
      lin = task.linearized(lqf.trainable)
      tasks[name] = task
      sets = {"heldout": data_lib.load_arrays(data, data_lib.HELDOUT_SPLIT),
              "test": data_lib.load_arrays(data, data.test_split)}
      features[name] = {s: lin.features(task.variables, x) for s, (x, _) in sets.items()}
      for s, (_, y) in sets.items():
        arrays[f"seed{seed}/{name}/{s}/labels"] = y
      vectors["lqf"][name] = common.fit_task(
          task, lqf, one_hot_targets(jnp.asarray(train[1]), num_classes, lqf.target_scale)).delta
      vectors["nonlinear"][name] = _tuned_vector(task, lqf.trainable, nonlinear, seed)
    for method in METHODS:
      for name in names:
        other = names[1 - names.index(name)]
        for s in SETS:
          grid, alone, ratio = _logits_grid(method, tasks[name], lqf.trainable, features[name][s],
                                            vectors[method][name], vectors[method][other], scales)
          prefix = f"seed{seed}/{name}/{s}/{method}"
          arrays[f"{prefix}/sum"] = grid.argmax(-1).astype(np.int8)
          arrays[f"{prefix}/alone"] = alone.argmax(-1).astype(np.int8)
          if s == "test":
            interference.append({"seed": seed, "task": name, "method": method, "interference": ratio})
    logging.info("cell %d/%d: seed %d, 2 tasks × 2 fine-tunings, %d scales in %.1fs", i + 1,
                 len(config.seeds), seed, len(scales), time.perf_counter() - t0)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, PREDICTIONS_FILE), **arrays)
  results = {"study": "task_arithmetic", "seeds": list(config.seeds), "tasks": names,
             "scales": scales.tolist(), "lqf": config.lqf.to_dict(),
             "nonlinear": config.nonlinear.to_dict(),
             "results": evaluate(arrays, names, list(config.seeds), interference)}
  if jax.process_index() == 0:
    plot(results, os.path.join(workdir, "task_arithmetic.png"))
  return results


def evaluate(arrays: Mapping[str, np.ndarray], names: list[str], seeds: list[int],
             interference: list[dict]) -> dict:
  """Per method: per seed the held-out choice of α and every task's accuracies; their summaries."""
  scales = arrays["scales"]
  out = {}
  for method in METHODS:
    runs, curves = [], []
    for seed in seeds:
      def accuracy(name, s, kind, seed=seed):
        labels = arrays[f"seed{seed}/{name}/{s}/labels"]
        return np.mean(arrays[f"seed{seed}/{name}/{s}/{method}/{kind}"] == labels, axis=-1)
      heldout = np.mean([accuracy(name, "heldout", "sum") for name in names], axis=0)
      chosen = arithmetic.choose_scale(scales, heldout)
      k, one = int(np.flatnonzero(scales == chosen)[0]), int(np.argmin(np.abs(scales - 1.0)))
      row = {"seed": seed, "scale": chosen}
      for name in names:
        test = accuracy(name, "test", "sum")
        alone = float(accuracy(name, "test", "alone"))
        row.update({f"{name}/zero": float(test[0]), f"{name}/alone": alone, f"{name}/sum": float(test[k]),
                    f"{name}/sum_at_1": float(test[one]), f"{name}/normalized": float(test[k]) / alone})
        ratio = [r["interference"] for r in interference
                 if (r["seed"], r["task"], r["method"]) == (seed, name, method)]
        row[f"{name}/interference"] = ratio[0] if ratio else float("nan")
      row["mean/normalized"] = float(np.mean([row[f"{name}/normalized"] for name in names]))
      runs.append(row)
      curves.append(np.mean([accuracy(name, "test", "sum") / row[f"{name}/alone"] for name in names],
                            axis=0))
    curves = np.asarray(curves)
    out[method] = {"runs": runs, "summary": common.summarize(runs, [k for k in runs[0] if k != "seed"]),
                   "normalized_curve": {"mean": curves.mean(0).tolist(),
                                        "std": (curves.std(0, ddof=1) if len(curves) > 1
                                                else 0 * curves[0]).tolist()}}
  return out


def markdown(results: Mapping[str, Any]) -> str:
  """Per task and method: accuracy with no vector, alone, the sum at α* and at 1, normalized, interference."""
  n, names = len(results["seeds"]), results["tasks"]
  lines = [f"Task arithmetic: tasks {' and '.join(names)} fine-tuned from one source (shared layers "
           f"`{results['lqf']['trainable']}`, each task's ridge head frozen), task vectors added with α "
           f"chosen on held-out data (grid {results['scales'][0]:g}–{results['scales'][-1]:g}); test "
           f"accuracy (%), mean [95 % t-interval] over n = {n} seeds (each: its own shot draws).", ""]
  header = ["task", "fine-tuning", "no vector (α = 0)", "own vector alone", "sum, α* (held-out)",
            "sum, α = 1", "normalized (sum α* / alone)", "interference", "α*"]
  rows = []
  for name in names:
    for method in METHODS:
      s = results["results"][method]["summary"]
      rows.append([name, {"lqf": "LQF (linearized)", "nonlinear": "nonlinear"}[method],
                   *[stats.format_interval(s[f"{name}/{k}"], digits=1)
                     for k in ("zero", "alone", "sum", "sum_at_1", "normalized")],
                   stats.format_interval(s[f"{name}/interference"], scale=1),
                   stats.format_interval(s["scale"], scale=1)])
  lines += common.markdown_table(header, rows)
  means = {m: results["results"][m]["summary"]["mean/normalized"] for m in METHODS}
  lines += ["", "Task-averaged normalized accuracy: "
            + ", ".join(f"{m} {stats.format_interval(means[m], digits=1)} %" for m in METHODS)
            + ". Interference: mean over test inputs of ‖f(δ_u + δ_other) − f(δ_u)‖ / ‖f(δ_u) − f(0)‖ "
            "(LQF: ‖Jδ_other‖ / ‖Jδ_u‖), at α = 1."]
  return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: str) -> None:
  """Task-averaged normalized test accuracy vs α, both fine-tunings, with the chosen α's."""
  scales = np.asarray(results["scales"])
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, method in enumerate(METHODS):
    r = results["results"][method]
    mean, std = (100 * np.asarray(r["normalized_curve"][k]) for k in ("mean", "std"))
    ax.plot(scales, mean, marker="o", ms=3, color=f"C{i}",
            label={"lqf": "LQF (linearized)", "nonlinear": "nonlinear"}[method])
    ax.fill_between(scales, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    for run in r["runs"]:
      ax.axvline(run["scale"], color=f"C{i}", ls=":", alpha=0.5)
  ax.set_xlabel("α in w0 + α(δ_A + δ_B)")
  ax.set_ylabel("normalized test accuracy (%), task mean")
  ax.set_title("adding two task vectors (band: ± sample std over seeds;\ndotted: α chosen on held-out data)",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  cli.launch(lambda c, w: common.run_study(run, markdown, c, w))
