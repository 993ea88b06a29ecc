"""The linear-vs-nonlinear comparison: targets × shots per class × methods × seeds.

  python -m experiments.compare --config configs/compare_mnist.py --workdir /tmp/lqf_demo

For every target dataset and shot count, each seed draws its own k-shot training set (``shot_seed``),
sets the new head once (shared by all methods), and runs every method on it (`lqf.runtime.task.run_method`);
the methods of a cell share its features and K-FAC factors (`lqf.runtime.task.Task`). A row's ``seconds``
therefore charges shared work to the first method that needs it (the sweep order). Missing source
checkpoints are pretrained first. Rows are appended to ``results.jsonl`` as they finish, so an interrupted
sweep resumes where it stopped. At the end the workdir holds ``results.json`` (all rows), ``results.md``
(mean [95 % CI] accuracy per method and shot count, per target, and each method's paired difference to
LQF) and ``accuracy_vs_shots.png``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import matplotlib
import matplotlib.ticker
import ml_collections
import numpy as np
from absl import logging

from experiments import common, stats
from experiments import finetune as finetune_experiment
from lqf import data as data_lib
from lqf import methods
from lqf import train
from lqf.models import create_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, config_util
from lqf.runtime import task as task_lib
from lqf.runtime.metric_writer import MetricWriter

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top


def _shots_label(shots: int) -> str:
  return "all" if not shots else str(shots)


def _on_relu(method: str) -> bool:
  """Whether ``method`` fine-tunes the ReLU source (`lqf.methods.Method.relu_source`), else the main one."""
  return methods.get(method).relu_source


def check(config: ml_collections.ConfigDict, workdir: str) -> tuple[methods.LQFSettings,
                                                                    methods.NonlinearSettings]:
  """Every value the sweep reads, before any data is read or any model is trained."""
  if not config.methods:
    raise ValueError("config.methods is empty: name at least one method, e.g. ('lqf', 'nonlinear').")
  for method in config.methods:
    methods.get(method, "config.methods")
  lqf, nonlinear = finetune_experiment.settings(config)
  if not config.shots or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                 for s in config.shots):
    raise ValueError(f"config.shots={tuple(config.shots)} must be shot counts >= 1 (0: the whole "
                     "training split), e.g. (1, 5, 10, 25).")
  if not config.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in config.seeds):
    raise ValueError(f"config.seeds={tuple(config.seeds)} must be integers, at least one, e.g. (0, 1, 2).")
  for section in ["pretrain"] + ["pretrain_relu"] * any(map(_on_relu, config.methods)):
    train.check_config(config[section], f"config.{section}")
  for name, target in config.targets.items():
    try:
      data_lib.check(target)
    except ValueError as e:
      raise config_util.within(f"config.targets.{name}", e, root="data") from None
    for method in config.methods:
      source = config.pretrain_relu if _on_relu(method) else config.pretrain
      finetune_experiment.check_source(method, source.model, lqf, target, f"config.{name} source")
  ckpt_lib.check_workdir(workdir, config)
  return lqf, nonlinear


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) the sweep in ``workdir`` and writes the results; returns all rows."""
  lqf, nonlinear = check(config, workdir)
  ckpt_lib.claim_workdir(workdir, config)
  sources = {"leaky": os.path.join(workdir, "source_leaky"), "relu": os.path.join(workdir, "source_relu")}
  loaded = {"leaky": common.ensure_source(config.pretrain, sources["leaky"])}
  if any(map(_on_relu, config.methods)):
    loaded["relu"] = common.ensure_source(config.pretrain_relu, sources["relu"])

  rows = common.Rows(workdir, overwrite=config.get("overwrite", False))
  done = rows.keys("target", "shots", "method", "seed")
  cells = [(t, shots, seed) for t in config.targets for shots in config.shots for seed in config.seeds]
  todo_cells = sum(any((t, s, m, seed) not in done for m in config.methods) for t, s, seed in cells)
  countdown = common.Countdown(todo_cells, "cell")
  writer = MetricWriter(workdir, resume_step=len(rows.rows))
  for target_name, target in config.targets.items():
    test = data_lib.load_arrays(target, target.test_split)
    test_trunk = {kind: {} for kind in loaded}  # the test images' trunk features, shared by all cells
    for shots in config.shots:
      for seed in config.seeds:
        todo = [m for m in config.methods if (target_name, shots, m, seed) not in done]
        if not todo:
          continue
        cell = f"{target_name} shots={_shots_label(shots)} seed={seed}"
        logging.info("%s: %s", countdown.start(cell), ", ".join(todo))
        data = ml_collections.ConfigDict(target.to_dict())
        data.shots, data.shot_seed = (shots or None), seed
        x, y = data_lib.load_arrays(data, data.train_split)
        num_classes = data_lib.num_classes(data)
        kind_of = {m: "relu" if _on_relu(m) else "leaky" for m in todo}
        tasks = {}
        for kind in set(kind_of.values()):  # only the sources this cell's methods still need
          model_config, variables = loaded[kind]
          emb = task_lib.embed(create_model(model_config, num_classes), variables, x)
          model, variables = task_lib.with_new_head(
              model_config, variables, emb, y, num_classes, head_init=lqf.head_init,
              target_scale=lqf.target_scale, head_ridge=lqf.head_ridge, seed=seed)
          tasks[kind] = task_lib.Task(model, variables, (x, y), test, test_trunk[kind])
        for method in todo:
          t0, cpu0 = time.perf_counter(), time.process_time()
          metrics = task_lib.run_method(method, tasks[kind_of[method]], lqf, nonlinear, seed)
          row = dict(target=target_name, shots=shots, method=method, seed=seed,
                     num_train=int(len(y)), seconds=time.perf_counter() - t0,
                     cpu_seconds=time.process_time() - cpu0, **metrics)
          logging.info("%s shots=%s %s seed=%d: accuracy %.4f (%.1fs)", target_name,
                       _shots_label(shots), method, seed, row["accuracy"], row["seconds"])
          rows.append(row)
          writer.write(len(rows.rows), accuracy=row["accuracy"], seconds=row["seconds"])
        countdown.finish(cell, detail=", ".join(
            f"{r['method']} {100 * r['accuracy']:.1f} %" for r in rows.rows[-len(todo):]))
  writer.close()
  results = {"rows": rows.rows, "config": json.loads(config.to_json_best_effort())}
  table = common.write_results(workdir, results, lambda r: report(r["rows"], config))
  plot_path = os.path.join(workdir, "accuracy_vs_shots.png")
  if jax.process_index() == 0:
    plot(rows.rows, config, plot_path)
  logging.info("results:\n%s\nwrote %s, %s, %s and metrics.jsonl (one row per fit)", table,
               os.path.join(workdir, "results.md"), os.path.join(workdir, "results.json"), plot_path)
  return rows.rows


def summarize(rows: list[dict]) -> dict:
  """``{target: {method: {shots: summary}}}`` of the test accuracy (`common.summarize`: mean, 95 % CI)."""
  out: dict = {}
  for r in rows:
    out.setdefault(r["target"], {}).setdefault(r["method"], {}).setdefault(r["shots"], []).append(r)
  return {t: {m: {s: common.summarize(runs, ["accuracy"])["accuracy"] for s, runs in by_s.items()}
              for m, by_s in by_m.items()} for t, by_m in out.items()}


def paired_differences(rows: list[dict], reference: str = "lqf") -> dict:
  """``{target: {method: {shots: interval}}}``: accuracy(method) − accuracy(``reference``) paired by seed
  (same k-shot draw and head; `experiments.stats.paired_difference`), for the seeds both have."""
  accuracy = {(r["target"], r["method"], r["shots"], r["seed"]): r["accuracy"] for r in rows}
  out: dict = {}
  for (target, method, shots, seed) in sorted(accuracy):
    if method != reference and (target, reference, shots, seed) in accuracy:
      out.setdefault(target, {}).setdefault(method, {}).setdefault(shots, []).append(
          (accuracy[(target, method, shots, seed)], accuracy[(target, reference, shots, seed)]))
  return {t: {m: {s: stats.paired_difference(*zip(*pairs)) for s, pairs in by_s.items()}
              for m, by_s in by_m.items()} for t, by_m in out.items()}


def markdown_tables(summary: dict, shots: list[int], methods: list[str],
                    differences: dict | None = None) -> str:
  """One table per target: rows = methods, columns = shots per class, cells = mean [95 % CI] accuracy (%);
  then, with ``differences``, the paired differences to LQF in points."""
  lines = []
  for target, by_method in summary.items():
    cells = [[m] + [stats.format_interval(by_method[m][s], digits=1) if s in by_method.get(m, {})
                    else "–" for s in shots] for m in methods]
    lines += [f"### {target}", "",
              *common.markdown_table(["method"] + [f"{_shots_label(s)} shots" for s in shots], cells), ""]
    paired = (differences or {}).get(target)
    if paired:
      cells = [[f"{m} − lqf"] + [stats.format_interval(paired[m][s], digits=1, signed=True)
                                  if s in paired.get(m, {}) else "–" for s in shots]
               for m in methods if m in paired]
      lines += common.markdown_table(["paired difference (points)"]
                                     + [f"{_shots_label(s)} shots" for s in shots], cells) + [""]
  return "\n".join(lines)


def report(rows: list[dict], config: ml_collections.ConfigDict) -> str:
  """``results.md``: the caption (what the brackets mean, n) and the tables."""
  header = (f"Test accuracy (%), mean [95 % t-interval] over n = {len(config.seeds)} seeds (each seed: "
            "its own k-shot draw and head, shared by all methods); `all` = the whole training split. "
            "Below each table: accuracy of each method minus LQF's on the same seed, mean [paired 95 % "
            "t-interval] in points.\n\n")
  return header + markdown_tables(summarize(rows), list(config.shots), list(config.methods),
                                  paired_differences(rows))


def plot(rows: list[dict], config: ml_collections.ConfigDict, path: str) -> None:
  """Accuracy vs shots per class, one panel per target; one legend for all panels below them, and the
  error bars named in the figure (95 % t-intervals over the seeds)."""
  summary = summarize(rows)
  shots, methods = list(config.shots), list(config.methods)
  fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.4), squeeze=False)
  for ax, (target, by_method) in zip(axes[0], summary.items()):
    xs = [s if s else max(x for x in shots if x) * 2 for s in shots]
    for m in methods:
      if m not in by_method:
        continue
      pts = [(x, by_method[m][s]["mean"], by_method[m][s]["high"]) for x, s in zip(xs, shots)
             if s in by_method[m]]
      x, mean, high = (np.array(v, dtype=float) for v in zip(*pts))
      half = np.nan_to_num(high - mean)  # one seed: no interval
      ax.errorbar(x, 100 * mean, yerr=100 * half, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no stray ticks between the shots
    ax.set_xticks(xs, [_shots_label(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(target)
    ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9, frameon=False)
  fig.text(0.99, 0.995, f"mean over n = {len(config.seeds)} seeds; error bars: 95 % t-intervals",
           ha="right", va="top", fontsize=8, color="0.3")
  fig.tight_layout(rect=(0, 0.08, 1, 0.97))
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  cli.launch(run)
