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

Several sources and tuning (``configs/compare_mnist.py:tuned``). ``config.sources = S`` pretrains S
source networks per activation with seeds ``pretrain.seed + s`` (source 0 is the single-source study's);
source s's k-shot draws and heads use seed 1000·s + seed, so draws are nested in sources and the
report's intervals are two-level: draws averaged per source, then a t-interval over the S source means
(`experiments.stats.clustered_interval`). ``config.tuning = {method: {field: values}}`` runs every
method at every combination of its values (its ``lqf`` or ``nonlinear`` section; every method must get
the same number of settings: the same tuning budget) and scores each fit on the targets' validation split
(``data.validation_per_class``, carved out of the training data before any draw); the report takes, per
source and draw, the setting with the best validation accuracy (`chosen`), corrects each comparison with
LQF for its many cells (Holm), and lists what tuning bought over the default setting and which settings won.
"""

from __future__ import annotations

import itertools
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


SOURCE_STRIDE = 1000  # the k-shot draw and head of (source s, seed d) use seed 1000·s + d
HEAD_FIELDS = ("head_init", "target_scale", "head_ridge")  # the new head of a cell, shared by its methods


def _shots_label(shots: int) -> str:
  return "all" if not shots else str(shots)


def _on_relu(method: str) -> bool:
  """Whether ``method`` fine-tunes the ReLU source (`lqf.methods.Method.relu_source`), else the main one."""
  return methods.get(method).relu_source


def _source_dir(workdir: str, kind: str, source: int) -> str:
  """Where source network ``source`` of activation ``kind`` lives (source 0: ``source_<kind>``)."""
  return os.path.join(workdir, f"source_{kind}" + (f"_{source}" if source else ""))


def _pretrain_config(config: ml_collections.ConfigDict, kind: str, source: int) -> ml_collections.ConfigDict:
  """Source ``source``'s pretraining: the study's recipe with ``seed`` + ``source`` (same data, new init
  and batch order)."""
  section = ml_collections.ConfigDict((config.pretrain_relu if kind == "relu" else config.pretrain).to_dict())
  section.seed += source
  return section


def _setting_key(setting: dict | None) -> str:
  return json.dumps(setting or {}, sort_keys=True)


def _row_key(row: dict) -> tuple:
  """What identifies a row: target, shots, method, source, seed, tuning setting."""
  return (row["target"], row["shots"], row["method"], row.get("source", 0), row["seed"],
          _setting_key(row.get("setting")))


def settings_grid(config: ml_collections.ConfigDict) -> dict[str, list[tuple[dict, methods.LQFSettings,
                                                                                 methods.NonlinearSettings]]]:
  """``{method: [(setting, lqf settings, nonlinear settings)]}``: without ``config.tuning`` one entry per
  method (setting {}); with it, every combination of ``config.tuning.<method>``'s field values (in field
  order, the last varying fastest), each applied to the config's ``lqf`` (a linearized method) or
  ``nonlinear`` section. Every compared method must get a grid of the same size (the same tuning budget),
  and the fields of the shared head (`HEAD_FIELDS`) cannot be tuned."""
  tuning = config.get("tuning") or {}
  for method in tuning:
    if method not in config.methods:
      raise ValueError(f"config.tuning.{method} tunes a method that is not in config.methods="
                       f"{tuple(config.methods)}: add it there or remove the grid.")
  grids = {}
  for method in config.methods:
    if tuning and method not in tuning:
      raise ValueError(f"config.tuning has no grid for config.methods entry {method!r}: every compared "
                       f"method gets the same tuning budget, so add config.tuning.{method}.")
    spec = tuning.get(method, {})
    section = "lqf" if methods.get(method).linearized else "nonlinear"
    for field, values in spec.items():
      if field in HEAD_FIELDS and section == "lqf":
        raise ValueError(f"config.tuning.{method}.{field}: the new head ({', '.join(HEAD_FIELDS)}) is "
                         "shared by every method and setting of a cell; tune fit fields only.")
      if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"config.tuning.{method}.{field}={values!r} must be a non-empty tuple of values, "
                         "e.g. (1e-4, 1e-3, 1e-2).")
    grid = []
    for combination in itertools.product(*spec.values()):
      setting = dict(zip(spec, combination))
      tuned = ml_collections.ConfigDict(config.to_dict())
      tuned[section].update(setting)
      try:
        grid.append((setting, *finetune_experiment.settings(tuned)))
      except ValueError as e:
        raise ValueError(str(e).replace(f"config.{section}.", f"config.tuning.{method}.", 1)) from None
    grids[method] = grid
  sizes = {m: len(g) for m, g in grids.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"config.tuning gives the methods different numbers of settings {sizes}: give every "
                     "method the same number (the same tuning budget).")
  return grids


def check(config: ml_collections.ConfigDict, workdir: str) -> tuple[methods.LQFSettings, dict]:
  """Every value the sweep reads, before any data is read or any model is trained; returns the ``lqf``
  settings (the new heads read them) and `settings_grid`."""
  if not config.methods:
    raise ValueError("config.methods is empty: name at least one method, e.g. ('lqf', 'nonlinear').")
  for method in config.methods:
    methods.get(method, "config.methods")
  lqf, _ = finetune_experiment.settings(config)
  if not config.shots or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                 for s in config.shots):
    raise ValueError(f"config.shots={tuple(config.shots)} must be shot counts >= 1 (0: the whole "
                     "training split), e.g. (1, 5, 10, 25).")
  if not config.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in config.seeds):
    raise ValueError(f"config.seeds={tuple(config.seeds)} must be integers, at least one, e.g. (0, 1, 2).")
  sources = config.get("sources", 1)
  if not isinstance(sources, int) or isinstance(sources, bool) or sources < 1:
    raise ValueError(f"config.sources={sources!r} must be a positive integer (independently pretrained "
                     "source networks per activation), e.g. 5.")
  for section in ["pretrain"] + ["pretrain_relu"] * any(map(_on_relu, config.methods)):
    train.check_config(config[section], f"config.{section}")
  grids = settings_grid(config)
  for name, target in config.targets.items():
    try:
      data_lib.check(target)
    except ValueError as e:
      raise config_util.within(f"config.targets.{name}", e, root="data") from None
    if config.get("tuning") and not target.get("validation_per_class"):
      raise ValueError(f"config.targets.{name}.validation_per_class is not set: tuning chooses each "
                       "setting on a validation split of the training data, e.g. 50 per class.")
    for method in config.methods:
      source = config.pretrain_relu if _on_relu(method) else config.pretrain
      finetune_experiment.check_source(method, source.model, lqf, target, f"config.{name} source")
  ckpt_lib.check_workdir(workdir, config)
  return lqf, grids


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) the sweep in ``workdir`` and writes the results; returns all rows."""
  base, grids = check(config, workdir)
  ckpt_lib.claim_workdir(workdir, config)
  num_sources = config.get("sources", 1)
  kinds = ["leaky"] + ["relu"] * any(map(_on_relu, config.methods))
  loaded = {(kind, source): common.ensure_source(_pretrain_config(config, kind, source),
                                                 _source_dir(workdir, kind, source))
            for kind in kinds for source in range(num_sources)}

  rows = common.Rows(workdir, overwrite=config.get("overwrite", False))
  done = {_row_key(r) for r in rows.rows}
  runs = [(m, setting, lqf, nonlinear) for m in config.methods for setting, lqf, nonlinear in grids[m]]

  def todo_of(target, shots, source, seed):
    return [r for r in runs if (target, shots, r[0], source, seed, _setting_key(r[1])) not in done]
  cells = [(t, shots, source, seed) for t in config.targets for shots in config.shots
           for source in range(num_sources) for seed in config.seeds]
  countdown = common.Countdown(sum(bool(todo_of(*cell)) for cell in cells), "cell")
  writer = MetricWriter(workdir, resume_step=len(rows.rows))
  for target_name, target in config.targets.items():
    test = data_lib.load_arrays(target, target.test_split)
    validation = (data_lib.load_arrays(target, data_lib.VALIDATION_SPLIT)
                  if target.get("validation_per_class") else None)
    eval_trunk = {key: {} for key in loaded}  # evaluation images' trunk features, shared by all cells
    for shots in config.shots:
      for source in range(num_sources):
        for seed in config.seeds:
          todo = todo_of(target_name, shots, source, seed)
          if not todo:
            continue
          cell = f"{target_name} shots={_shots_label(shots)}" + (f" source={source}" if num_sources > 1
                                                                  else "") + f" seed={seed}"
          logging.info("%s: %s", countdown.start(cell), ", ".join(sorted({r[0] for r in todo})))
          draw = SOURCE_STRIDE * source + seed  # draws nested in sources
          data = ml_collections.ConfigDict(target.to_dict())
          data.shots, data.shot_seed = (shots or None), draw
          x, y = data_lib.load_arrays(data, data.train_split)
          num_classes = data_lib.num_classes(data)
          kind_of = {m: "relu" if _on_relu(m) else "leaky" for m, *_ in todo}
          tasks = {}
          for kind in set(kind_of.values()):  # only the sources this cell's methods still need
            model_config, variables = loaded[(kind, source)]
            emb = task_lib.embed(create_model(model_config, num_classes), variables, x)
            model, variables = task_lib.with_new_head(
                model_config, variables, emb, y, num_classes, head_init=base.head_init,
                target_scale=base.target_scale, head_ridge=base.head_ridge, seed=draw)
            tasks[kind] = task_lib.Task(model, variables, (x, y), test, eval_trunk[(kind, source)],
                                        validation=validation)
          for method, setting, lqf, nonlinear in todo:
            t0, cpu0 = time.perf_counter(), time.process_time()
            metrics = task_lib.run_method(method, tasks[kind_of[method]], lqf, nonlinear, draw)
            row = dict(target=target_name, shots=shots, method=method,
                       **({"source": source} if num_sources > 1 else {}), seed=seed,
                       **({"setting": setting} if setting else {}), num_train=int(len(y)),
                       seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0, **metrics)
            logging.info("%s shots=%s %s%s seed=%d: accuracy %.4f (%.1fs)", target_name,
                         _shots_label(shots), method, f" {setting}" if setting else "", seed,
                         row["accuracy"], row["seconds"])
            rows.append(row)
            writer.write(len(rows.rows), accuracy=row["accuracy"], seconds=row["seconds"])
          countdown.finish(cell, detail=", ".join(
              f"{r['method']} {100 * r['accuracy']:.1f} %" for r in rows.rows[-len(todo):]))
  writer.close()
  results = {"rows": rows.rows, "config": json.loads(config.to_json_best_effort())}
  table = common.write_results(workdir, results, lambda r: report(r["rows"], config))
  plot_path = os.path.join(workdir, "accuracy_vs_shots.png")
  if jax.process_index() == 0:
    plot(chosen(rows.rows, config), config, plot_path)
  logging.info("results:\n%s\nwrote %s, %s, %s and metrics.jsonl (one row per fit)", table,
               os.path.join(workdir, "results.md"), os.path.join(workdir, "results.json"), plot_path)
  return rows.rows


def chosen(rows: list[dict], config: ml_collections.ConfigDict) -> list[dict]:
  """Each method at its tuned setting: per (target, shots, method, source, seed), the row with the highest
  ``validation_accuracy`` (ties: the first setting of the grid). Untuned rows are returned as they are."""
  if not config.get("tuning"):
    return rows
  order = {(m, _setting_key(setting)): i for m, grid in settings_grid(config).items()
           for i, (setting, *_) in enumerate(grid)}
  best: dict = {}
  for r in rows:
    unit = _row_key(r)[:5]
    rank = (-r["validation_accuracy"], order[(r["method"], _setting_key(r.get("setting")))])
    if unit not in best or rank < best[unit][0]:
      best[unit] = (rank, r)
  return [r for _, r in best.values()]


def _interval(values: list[float], sources: list[int]) -> dict:
  """`experiments.stats.mean_interval` over the runs of one source; over several, the two-level interval
  over sources (`experiments.stats.clustered_interval`)."""
  return stats.clustered_interval(values, sources) if len(set(sources)) > 1 else stats.mean_interval(values)


def summarize(rows: list[dict]) -> dict:
  """``{target: {method: {shots: summary}}}`` of the test accuracy: mean and 95 % CI over the seeds
  (`_interval`: two-level when the rows come from several sources)."""
  out: dict = {}
  for r in rows:
    out.setdefault(r["target"], {}).setdefault(r["method"], {}).setdefault(r["shots"], []).append(r)
  return {t: {m: {s: _interval([r["accuracy"] for r in runs], [r.get("source", 0) for r in runs])
                  for s, runs in by_s.items()}
              for m, by_s in by_m.items()} for t, by_m in out.items()}


def paired_differences(rows: list[dict], reference: str = "lqf") -> dict:
  """``{target: {method: {shots: interval}}}``: accuracy(method) − accuracy(``reference``) paired by source
  and seed (same k-shot draw; `experiments.stats.paired_difference`, or `clustered_paired_difference` over
  several sources), for the runs both have; each interval also holds its two-sided t-test's ``p`` (None
  for one run)."""
  accuracy = {(r["target"], r["method"], r["shots"], r.get("source", 0), r["seed"]): r["accuracy"]
              for r in rows}
  out: dict = {}
  for (target, method, shots, source, seed) in sorted(accuracy):
    if method != reference and (target, reference, shots, source, seed) in accuracy:
      out.setdefault(target, {}).setdefault(method, {}).setdefault(shots, []).append(
          (accuracy[(target, method, shots, source, seed)], accuracy[(target, reference, shots, source, seed)],
           source))
  return {t: {m: {s: _paired_interval(pairs) for s, pairs in by_s.items()} for m, by_s in by_m.items()}
          for t, by_m in out.items()}


def _paired_interval(pairs: list[tuple[float, float, int]]) -> dict:
  """The paired difference of (a, b, source) runs with its t-test's ``p`` (two-level over several
  sources)."""
  a, b, sources = map(list, zip(*pairs))
  if len(set(sources)) > 1:
    return {**stats.clustered_paired_difference(a, b, sources), "p": stats.clustered_p_value(a, b, sources)}
  return {**stats.paired_difference(a, b), "p": stats.paired_p_value(a, b) if len(a) > 1 else None}


def adjusted_p_values(differences: dict, correction=stats.holm) -> dict:
  """``{method: {(target, shots): adjusted p}}``: each comparison with LQF is one family over all its
  cells (targets × shots), adjusted by ``correction`` (`experiments.stats.holm` or
  `experiments.stats.benjamini_hochberg`)."""
  family: dict = {}
  for target, by_method in differences.items():
    for method, by_shots in by_method.items():
      for shots, d in by_shots.items():
        if d["p"] is not None:
          family.setdefault(method, {})[(target, shots)] = d["p"]
  return {m: dict(zip(cells, correction(list(cells.values())))) for m, cells in family.items()}


def mean_over_shots(rows: list[dict], method: str, target: str, reference: str = "lqf") -> dict | None:
  """accuracy(``method``) − accuracy(``reference``) averaged over all shot counts and draws of each
  source, then the interval over sources (`_paired_interval`): one summary per target. With one source the
  seed is the unit (a seed's k-shot sets are nested across shot counts, so they are not independent)."""
  accuracy = {(r["method"], r["shots"], r.get("source", 0), r["seed"]): r["accuracy"] for r in rows
              if r["target"] == target}
  several = len({unit[2] for unit in accuracy}) > 1
  pairs = [(a, accuracy[(reference, *unit)], unit[1] if several else unit[2])
           for (m, *unit), a in sorted(accuracy.items()) if m == method and (reference, *unit) in accuracy]
  return _paired_interval(pairs) if pairs else None


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
  """``results.md``: the caption (what the brackets mean, n) and the tables (`report_tuned` for a study
  with tuning or several sources)."""
  if config.get("tuning") or config.get("sources", 1) > 1:
    return report_tuned(rows, config)
  header = (f"Test accuracy (%), mean [95 % t-interval] over n = {len(config.seeds)} seeds (each seed: "
            "its own k-shot draw and head, shared by all methods); `all` = the whole training split. "
            "Below each table: accuracy of each method minus LQF's on the same seed, mean [paired 95 % "
            "t-interval] in points.\n\n")
  return header + markdown_tables(summarize(rows), list(config.shots), list(config.methods),
                                  paired_differences(rows))


def _setting_label(setting: dict) -> str:
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "–"


def report_tuned(rows: list[dict], config: ml_collections.ConfigDict) -> str:
  """``results.md`` of a tuned study over several sources: each method at its setting chosen on the
  validation split (`chosen`), two-level intervals over sources, Holm- and Benjamini–Hochberg-adjusted
  p-values per comparison, what tuning bought over each method's default setting, and which settings won."""
  best = chosen(rows, config)
  grids = settings_grid(config) if config.get("tuning") else {}
  shots, names = list(config.shots), list(config.methods)
  columns = [f"{_shots_label(s)} shots" for s in shots]
  num_sources, size = config.get("sources", 1), len(next(iter(grids.values()))) if grids else 1
  validation = {t.get("validation_per_class") for t in config.targets.values()}
  differences = paired_differences(best)
  holm = adjusted_p_values(differences)
  fdr = adjusted_p_values(differences, stats.benjamini_hochberg)
  lines = [
      f"Test accuracy (%) of each method at its setting chosen on the validation split "
      f"({'/'.join(map(str, sorted(v for v in validation if v)))} images per class carved out of each "
      "target's training data before any k-shot draw: disjoint from every draw and from the test split; "
      f"ties go to the first setting of the grid), out of {size} settings per method (`config.tuning`). "
      f"Mean [95 % two-level t-interval] over S = {num_sources} independently pretrained sources per "
      f"activation × m = {len(config.seeds)} k-shot draws per source (draws averaged per source, then a "
      "t-interval over the S source means: `experiments.stats.clustered_interval`). Below each table: the "
      "paired difference to LQF (same source index and draw) with its p-value adjusted for the many cells, "
      "one family per comparison over all its cells (targets × shots): Holm (family-wise error, `*` = "
      "resolved at 5 %) and Benjamini–Hochberg (false-discovery rate, `†` = resolved at 5 %); the last "
      "column averages each source's differences over all shot counts and draws (one summary per target, "
      "uncorrected).", ""]
  summary = summarize(best)
  for target, by_method in summary.items():
    cells = [[m] + [stats.format_interval(by_method[m][s], digits=1) if s in by_method.get(m, {}) else "–"
                    for s in shots] for m in names]
    lines += [f"### {target}", "", *common.markdown_table(["method"] + columns, cells), ""]
    paired = differences.get(target, {})
    def cell(m, s):
      if s not in paired.get(m, {}):
        return "–"
      interval = stats.format_interval(paired[m][s], digits=1, signed=True)
      if paired[m][s]["p"] is None:  # one run: no test
        return interval
      p_holm, q_bh = holm[m][(target, s)], fdr[m][(target, s)]
      return (f"{interval} p_Holm={p_holm:.2g}"
              + ("*" if p_holm <= 0.05 else "") + f" q_BH={q_bh:.2g}" + ("†" if q_bh <= 0.05 else ""))
    cells = [[f"{m} − lqf"] + [cell(m, s) for s in shots]
             + [stats.format_interval(mean_over_shots(best, m, target), digits=1, signed=True)]
             for m in names if m in paired]
    lines += common.markdown_table(["paired difference (points)"] + columns + ["mean over shots"], cells) + [""]
  if grids:
    lines += _tuning_tables(rows, best, config, grids, shots, columns)
  return "\n".join(lines)


def _tuning_tables(rows: list[dict], best: list[dict], config: ml_collections.ConfigDict, grids: dict,
                   shots: list[int], columns: list[str]) -> list[str]:
  """What tuning bought over each method's default setting, and which settings it chose."""
  lines = []
  defaults = {}
  for m, grid in grids.items():
    section = "lqf" if methods.get(m).linearized else "nonlinear"
    default = {field: config[section][field] for field in grid[0][0]}
    if any(_setting_key(setting) == _setting_key(default) for setting, *_ in grid):
      defaults[m] = default
  if defaults:
    lines += ["### Tuned minus default setting (points, paired; the default is the config's own setting)", ""]
    for target in config.targets:
      cells = []
      for m, default in defaults.items():
        plain = {_row_key(r)[:5]: r["accuracy"] for r in rows if r["method"] == m and r["target"] == target
                 and _setting_key(r.get("setting")) == _setting_key(default)}
        by_shots: dict = {}
        for r in best:
          if r["method"] == m and _row_key(r)[:5] in plain:
            by_shots.setdefault(r["shots"], []).append((r["accuracy"], plain[_row_key(r)[:5]], r.get("source", 0)))
        cells.append([f"{m} ({_setting_label(default)})"] + [
            stats.format_interval(_paired_interval(by_shots[s]), digits=1, signed=True) if s in by_shots
            else "–" for s in shots])
      lines += [f"{target}:", "", *common.markdown_table(["method (default)"] + columns, cells), ""]
  lines += ["### Settings chosen (most frequent setting, and in how many of the runs)", ""]
  for target in config.targets:
    cells = []
    for m in grids:
      row = [m]
      for s in shots:
        picks = [_setting_key(r.get("setting")) for r in best
                 if r["target"] == target and r["method"] == m and r["shots"] == s]
        if not picks:
          row.append("–")
          continue
        top = max(sorted(set(picks)), key=picks.count)
        row.append(f"{_setting_label(json.loads(top))} ({picks.count(top)}/{len(picks)})")
      cells.append(row)
    lines += [f"{target}:", "", *common.markdown_table(["method"] + columns, cells), ""]
  return lines


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
  sources = config.get("sources", 1)
  n = (f"{sources} sources × {len(config.seeds)} draws; error bars: 95 % two-level t-intervals over sources"
       if sources > 1 else f"{len(config.seeds)} seeds; error bars: 95 % t-intervals")
  fig.text(0.99, 0.995, f"mean over n = {n}" + (", each method at its tuned setting" * bool(config.get("tuning"))),
           ha="right", va="top", fontsize=8, color="0.3")
  fig.tight_layout(rect=(0, 0.08, 1, 0.97))
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  cli.launch(run)
