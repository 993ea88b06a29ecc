"""End to end: the comparison sweep on real digits, checked against a closed-form linear probe."""

import json
import os

import numpy as np
from scipy import stats as scipy_stats
import pytest

from experiments import compare
from lqf import data as data_lib
from lqf.models import create_model
from lqf.runtime import config_util
from lqf.runtime import task as task_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sweep():
  config = config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "compare_mnist", "quick")
  for pre in (config.pretrain, config.pretrain_relu):
    pre.num_steps, pre.model.width, pre.batch_size, pre.eval_batch_size = 20, 4, 32, 32
    pre.checkpoint_every = 20
  del config.targets["uci_digits_5-9"]
  config.shots, config.seeds = (3,), (0, 1)
  config.methods = ("lqf", "linear_probe", "nonlinear")
  config.nonlinear.steps = 10
  return config


def _closed_form_probe(workdir, source, target, shots, seed, config, weight_decay, split):
  """The probe's accuracy on ``split`` recomputed with numpy: ridge regression toward the initial head W0,
  W = (XᵀX/N + λI)⁻¹ (Xᵀ sY / N + λ W0), X = [embedding, 1]."""
  model_config, variables = task_lib.load_source(os.path.join(workdir, source), "")
  data = config_util.data_config(target.name, image_size=28, classes=target.classes, shots=shots)
  data.shot_seed, data.validation_per_class = seed, target.get("validation_per_class")
  x, y = data_lib.load_arrays(data, "train")
  xe, ye = data_lib.load_arrays(data, split)
  model, v = task_lib.with_new_head(
      model_config, variables, task_lib.embed(create_model(model_config, 5), variables, x), y, 5,
      head_init="ridge", target_scale=config.lqf.target_scale, head_ridge=config.lqf.head_ridge, seed=seed)
  emb = lambda im: np.asarray(task_lib.embed(model, v, im), np.float64)
  ones = lambda e: np.concatenate([e, np.ones((len(e), 1))], axis=1)
  xtr, xev = ones(emb(x)), ones(emb(xe))
  w0 = np.concatenate([v["params"]["head"]["kernel"], v["params"]["head"]["bias"][None]], axis=0)
  s, n = config.lqf.target_scale, len(y)
  w = np.linalg.solve(xtr.T @ xtr / n + weight_decay * np.eye(xtr.shape[1]),
                      xtr.T @ (s * np.eye(5)[y]) / n + weight_decay * w0)
  return np.mean((xev @ w).argmax(1) == ye), len(ye)


@pytest.mark.slow
def test_tuned_sweep_over_sources_chooses_on_validation(tmp_path):
  """Two sources × one draw, probe and nonlinear fine-tuning with two settings each: every probe row's
  validation and test accuracy is the closed-form ridge optimum of its source, draw and λ; the reported
  setting is the validation argmax; the table's interval is the t-interval over the two source means."""
  workdir = str(tmp_path)
  config = tiny_sweep()
  config.shots, config.seeds, config.sources = (2,), (0,), 2
  config.methods = ("linear_probe", "nonlinear")
  config.targets["mnist5k_5-9"].validation_per_class = 20
  config.tuning = {"linear_probe": {"weight_decay": (1e-3, 1.0)},
                   "nonlinear": {"learning_rate": (1e-3, 1e-2)}}
  rows = compare.run(config, workdir)
  assert len(rows) == 2 * 2 * 2 and {r["source"] for r in rows} == {0, 1}
  sources = [task_lib.load_source(os.path.join(workdir, d), "")[1]["params"]["head"]["kernel"]
             for d in ("source_leaky", "source_leaky_1")]
  assert not np.allclose(*sources)  # pretrained from seeds 0 and 1
  target = config.targets["mnist5k_5-9"]
  for r in (r for r in rows if r["method"] == "linear_probe"):
    for split, key in ((data_lib.VALIDATION_SPLIT, "validation_accuracy"), ("test", "accuracy")):
      expected, n = _closed_form_probe(workdir, ["source_leaky", "source_leaky_1"][r["source"]], target, 2,
                                       1000 * r["source"], config, r["setting"]["weight_decay"], split)
      assert r[key] == pytest.approx(expected, abs=1.5 / n)  # ≤ 1 borderline image
  table = open(os.path.join(workdir, "results.md")).read()
  for method in config.methods:
    best = []
    for source in (0, 1):
      runs = [r for r in rows if r["method"] == method and r["source"] == source]
      best.append(max(runs, key=lambda r: (r["validation_accuracy"], -runs.index(r)))["accuracy"])
    half = 12.706204736174698 * np.std(best, ddof=1) / np.sqrt(2)  # t_{0.975, 1} over 2 source means
    mean = np.mean(best)
    assert f"| {method} | {100 * mean:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}] |" in table
  assert "S = 2 independently pretrained sources" in table and "### Settings chosen" in table


@pytest.mark.slow
def test_sweep_writes_reports_and_probe_is_the_closed_form_ridge_optimum(tmp_path):
  workdir = str(tmp_path)
  config = tiny_sweep()
  rows = compare.run(config, workdir)
  assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
      (m, s) for m in config.methods for s in (0, 1))
  saved = json.load(open(os.path.join(workdir, "results.json")))["rows"]
  assert saved == rows
  table = open(os.path.join(workdir, "results.md")).read()
  lqf = [r["accuracy"] for r in rows if r["method"] == "lqf"]
  half = 12.706204736174698 * np.std(lqf, ddof=1) / np.sqrt(2)  # t_{0.975, 1}
  mean = np.mean(lqf)
  assert (f"| lqf | {100 * mean:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}] |"
          in table)
  assert "mean [95 % t-interval] over n = 2 seeds" in table
  probe = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "linear_probe"}
  diffs = [probe[r["seed"]] - r["accuracy"] for r in rows if r["method"] == "lqf"]
  half = 12.706204736174698 * np.std(diffs, ddof=1) / np.sqrt(2)
  cell = (f"{100 * np.mean(diffs):+.1f} [{100 * (np.mean(diffs) - half):+.1f}, "
          f"{100 * (np.mean(diffs) + half):+.1f}]")
  assert f"| linear_probe − lqf | {cell} |" in table
  assert os.path.getsize(os.path.join(workdir, "accuracy_vs_shots.png")) > 1000

  # The probe (LQF of the head alone) is ridge regression toward the initial head W0:
  # W = (XᵀX/N + λI)⁻¹ (Xᵀ sY / N + λ W0), X = [embedding, 1]; recomputed here with numpy.
  model_config, variables = task_lib.load_source(os.path.join(workdir, "source_leaky"), "")
  target = config.targets["mnist5k_5-9"]
  for seed in (0, 1):
    data = config_util.data_config(target.name, image_size=28, classes=target.classes, shots=3)
    data.shot_seed = seed
    x, y = data_lib.load_arrays(data, "train")
    xt, yt = data_lib.load_arrays(data, "test")
    model, v = task_lib.with_new_head(
        model_config, variables, task_lib.embed(create_model(model_config, 5), variables, x), y, 5,
        head_init="ridge", target_scale=config.lqf.target_scale, head_ridge=config.lqf.head_ridge,
        seed=seed)
    emb = lambda im: np.asarray(task_lib.embed(model, v, im), np.float64)
    ones = lambda e: np.concatenate([e, np.ones((len(e), 1))], axis=1)
    xtr, xte = ones(emb(x)), ones(emb(xt))
    w0 = np.concatenate([v["params"]["head"]["kernel"], v["params"]["head"]["bias"][None]], axis=0)
    lam, s, n = config.lqf.weight_decay, config.lqf.target_scale, len(y)
    w = np.linalg.solve(xtr.T @ xtr / n + lam * np.eye(xtr.shape[1]),
                        xtr.T @ (s * np.eye(5)[y]) / n + lam * w0)
    expected = np.mean((xte @ w).argmax(1) == yt)
    probe = next(r for r in rows if r["method"] == "linear_probe" and r["seed"] == seed)
    assert probe["accuracy"] == pytest.approx(expected, abs=1.5 / len(yt))  # ≤ 1 borderline test image

  # A second run finds every row done and changes nothing.
  assert compare.run(config, workdir) == rows


@pytest.mark.parametrize("change, message", [
    (dict(tuning={"linear_probe": {"weight_decay": (1e-3, 1.0)}, "nonlinear": {"steps": (10,)}}),
     "config.tuning gives the methods different numbers of settings {'linear_probe': 2, 'nonlinear': 1}: give "
     "every method the same number (the same tuning budget)."),
    (dict(tuning={"linear_probe": {"weight_decay": (1e-3,)}}),
     "config.tuning has no grid for config.methods entry 'nonlinear': every compared method gets the same "
     "tuning budget, so add config.tuning.nonlinear."),
    (dict(tuning={"linear_probe": {"target_scale": (1.0,)}, "nonlinear": {"steps": (10,)}}),
     "config.tuning.linear_probe.target_scale: the new head (head_init, target_scale, head_ridge) is shared"),
    (dict(tuning={"linear_probe": {"weight_decay": (-1.0,)}, "nonlinear": {"steps": (10,)}}),
     "config.tuning.linear_probe.weight_decay=-1.0"),
    (dict(tuning={"linear_probe": {"weight_decay": ()}, "nonlinear": {"steps": (10,)}}),
     "config.tuning.linear_probe.weight_decay=() must be a non-empty tuple of values"),
    (dict(tuning={"linear_probe": {"weight_decay": (1.0,)}, "nonlinear": {"steps": (10,)}, "lqf": {}}),
     "config.tuning.lqf tunes a method that is not in config.methods=('linear_probe', 'nonlinear')"),
    (dict(tuning={"linear_probe": {"weight_decay": (1.0,)}, "nonlinear": {"steps": (10,)}}, validation=None),
     "config.targets.mnist5k_5-9.validation_per_class is not set: tuning chooses each setting on a "
     "validation split"),
    (dict(sources=0), "config.sources=0 must be a positive integer"),
])
def test_bad_tuning_is_one_line_before_any_data(tmp_path, change, message):
  config = tiny_sweep()
  config.methods = ("linear_probe", "nonlinear")
  config.targets["mnist5k_5-9"].validation_per_class = change.pop("validation", 20)
  for key, value in change.items():
    config[key] = value
  with pytest.raises(ValueError) as info:
    compare.check(config, str(tmp_path / "w"))
  assert message in str(info.value) and "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "w")


def test_tuned_report_corrects_each_comparison_over_its_cells():
  """Synthetic rows (no training): 3 sources × 2 draws, 2 targets × 2 shot counts, lqf and nonlinear with two
  settings each. The report's chosen rows, two-level differences and Holm / BH adjustments are recomputed here
  with scipy: per cell, the t-test of the 3 per-source mean differences; Holm and BH by hand over the 4 cells."""
  rng = np.random.default_rng(0)
  config = tiny_sweep()
  config.targets["uci_digits_5-9"] = config.targets["mnist5k_5-9"]
  config.shots, config.seeds, config.sources, config.methods = (1, 5), (0, 1), 3, ("lqf", "nonlinear")
  config.tuning = {"lqf": {"weight_decay": (1e-3, 1e-1)}, "nonlinear": {"steps": (10, 20)}}
  rows = []
  for target in config.targets:
    for shots in config.shots:
      for source in range(3):
        for seed in (0, 1):
          for method, field, values in (("lqf", "weight_decay", (1e-3, 1e-1)), ("nonlinear", "steps", (10, 20))):
            for value in values:
              rows.append(dict(target=target, shots=shots, method=method, source=source, seed=seed,
                               setting={field: value}, validation_accuracy=float(rng.integers(0, 5)) / 4,
                               accuracy=float(rng.uniform(0.5, 0.9)) - 0.1 * (method == "nonlinear")))
  table = compare.report(rows, config)
  best = {}
  for r in rows:  # first maximum in grid order = first in row order here
    unit = (r["target"], r["shots"], r["method"], r["source"], r["seed"])
    if unit not in best or r["validation_accuracy"] > best[unit]["validation_accuracy"]:
      best[unit] = r
  p, text = [], []
  for target in config.targets:
    for shots in config.shots:
      diffs = np.array([[best[(target, shots, "nonlinear", s, d)]["accuracy"] - best[(target, shots, "lqf", s, d)]
                         ["accuracy"] for d in (0, 1)] for s in range(3)]).mean(axis=1)
      p.append(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)
      half = scipy_stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
      mean = diffs.mean()
      text.append(f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]")
  order = np.argsort(p)
  holm = np.maximum.accumulate([min(1.0, (4 - i) * p[j]) for i, j in enumerate(order)])
  bh = np.minimum.accumulate([min(1.0, 4 * p[j] / (i + 1)) for i, j in enumerate(order)][::-1])[::-1]
  for rank, j in enumerate(order):
    star, dagger = "*" if holm[rank] <= 0.05 else "", "†" if bh[rank] <= 0.05 else ""
    assert f"{text[j]} p_Holm={holm[rank]:.2g}{star} q_BH={bh[rank]:.2g}{dagger}" in table
