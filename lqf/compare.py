"""The linear-vs-nonlinear comparison: targets × shots per class × methods × seeds.

For every target dataset and shot count, each seed draws its own k-shot training set (``shot_seed``),
sets the new head once (shared by all methods), and runs every method on it (`lqf.finetune.run_method`);
the methods of a cell share its features and K-FAC factors (`lqf.finetune.Task`). A row's ``seconds``
therefore charges shared work to the first method that needs it (the sweep order).
Rows are appended to ``results.jsonl`` as they finish, so an interrupted sweep resumes where it stopped.
At the end the workdir holds ``results.json`` (all rows), ``results.md`` (mean ± std accuracy per method and
shot count, per target) and ``accuracy_vs_shots.png``. Missing source checkpoints are pretrained first.
"""

from __future__ import annotations

import json
import os
import time

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import logging

from lqf import checkpoint as ckpt_lib
from lqf import data as data_lib
from lqf import finetune, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top


def ensure_source(pretrain_config: ml_collections.ConfigDict,
                  workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The source model's config and variables, pretrained into ``workdir`` first if not there yet."""
  try:
    return finetune.load_source(workdir, "")
  except FileNotFoundError:
    pass
  logging.info("pretraining the source model into %s", workdir)
  train.train(pretrain_config, workdir)
  return finetune.load_source(workdir, "")


def _shots_label(shots: int) -> str:
  return "all" if not shots else str(shots)


def _read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) the sweep in ``workdir`` and writes the results; returns all rows."""
  for method in config.methods:
    finetune.check_method(method)
  ckpt_lib.claim_workdir(workdir, config)
  sources = {"leaky": os.path.join(workdir, "source_leaky"), "relu": os.path.join(workdir, "source_relu")}
  loaded = {"leaky": ensure_source(config.pretrain, sources["leaky"])}
  if "lqf_relu" in config.methods:
    loaded["relu"] = ensure_source(config.pretrain_relu, sources["relu"])

  rows_path = os.path.join(workdir, "results.jsonl")
  if config.get("overwrite", False) and os.path.exists(rows_path):
    os.remove(rows_path)
  rows = _read_rows(rows_path)
  done = {(r["target"], r["shots"], r["method"], r["seed"]) for r in rows}
  for target_name, target in config.targets.items():
    test = data_lib.load_arrays(target, target.test_split)
    test_trunk = {kind: {} for kind in loaded}  # the test images' trunk features, shared by all cells
    for shots in config.shots:
      for seed in config.seeds:
        todo = [m for m in config.methods if (target_name, shots, m, seed) not in done]
        if not todo:
          continue
        data = ml_collections.ConfigDict(target.to_dict())
        data.shots, data.shot_seed = (shots or None), seed
        x, y = data_lib.load_arrays(data, data.train_split)
        num_classes = data_lib.num_classes(data)
        kind_of = {m: "relu" if m == "lqf_relu" else "leaky" for m in todo}
        tasks = {kind: finetune.Task(*finetune.with_new_head(*loaded[kind], x, y, num_classes, config.lqf,
                                                             seed), (x, y), test, test_trunk[kind])
                 for kind in set(kind_of.values())}  # only the sources this cell's methods still need
        for method in todo:
          t0 = time.perf_counter()
          metrics = finetune.run_method(method, tasks[kind_of[method]], config, seed)
          row = dict(target=target_name, shots=shots, method=method, seed=seed,
                     num_train=int(len(y)), seconds=time.perf_counter() - t0, **metrics)
          logging.info("%s shots=%s %s seed=%d: accuracy %.4f (%.1fs)", target_name,
                       _shots_label(shots), method, seed, row["accuracy"], row["seconds"])
          rows.append(row)
          if jax.process_index() == 0:
            with open(rows_path, "a") as f:
              f.write(json.dumps(row) + "\n")
  if jax.process_index() == 0:
    write_reports(rows, config, workdir)
  return rows


def summarize(rows: list[dict]) -> dict:
  """``{target: {method: {shots: (mean, std, n)}}}`` of the test accuracy (std with ddof=0)."""
  out: dict = {}
  for r in rows:
    out.setdefault(r["target"], {}).setdefault(r["method"], {}).setdefault(r["shots"], []).append(
        r["accuracy"])
  return {t: {m: {s: (float(np.mean(a)), float(np.std(a)), len(a)) for s, a in by_s.items()}
              for m, by_s in by_m.items()} for t, by_m in out.items()}


def markdown_table(summary: dict, shots: list[int], methods: list[str]) -> str:
  """One table per target: rows = methods, columns = shots per class, cells = mean ± std accuracy (%)."""
  lines = []
  for target, by_method in summary.items():
    lines += [f"### {target}", "",
              "| method | " + " | ".join(f"{_shots_label(s)} shots" for s in shots) + " |",
              "|---|" + "---|" * len(shots)]
    for m in methods:
      cells = []
      for s in shots:
        if s in by_method.get(m, {}):
          mean, std, n = by_method[m][s]
          cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
        else:
          cells.append("–")
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def write_reports(rows: list[dict], config: ml_collections.ConfigDict, workdir: str) -> None:
  """``results.json``, ``results.md`` and ``accuracy_vs_shots.png``."""
  summary = summarize(rows)
  shots, methods = list(config.shots), list(config.methods)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"rows": rows, "config": json.loads(config.to_json_best_effort())}, f, indent=1)
  n_seeds = len(config.seeds)
  header = (f"Test accuracy (%), mean ± std over {n_seeds} seeds (each seed: its own k-shot draw and "
            "head); `all` = the whole training split.\n\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(header + markdown_table(summary, shots, methods))
  fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4), squeeze=False)
  for ax, (target, by_method) in zip(axes[0], summary.items()):
    xs = [s if s else max(x for x in shots if x) * 2 for s in shots]
    for m in methods:
      if m not in by_method:
        continue
      pts = [(x, *by_method[m][s][:2]) for x, s in zip(xs, shots) if s in by_method[m]]
      x, mean, std = (np.array(v) for v in zip(*pts))
      ax.errorbar(x, 100 * mean, yerr=100 * std, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xticks(xs, [_shots_label(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(target)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_shots.png"), dpi=120)
  plt.close(fig)
