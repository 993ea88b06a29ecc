"""End to end: the comparison sweep on real digits, checked against a closed-form linear probe."""

import json
import os

import numpy as np
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
