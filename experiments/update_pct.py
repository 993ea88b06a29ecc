"""PC training (Yan et al., CVPR 2021; Xie et al., ACL 2021): can an image-classifier update avoid
negative flips (old right, new wrong)?

  python -m experiments.update_pct --config configs/update_pct_mnist.py --workdir /tmp/update_pct

Old and new classifiers share one label space and train on train∖held-out: ``config.data.heldout_fraction``
makes `lqf.data.get_source` (hence `lqf.train.train`) return the training split minus a held-out part, and
the split ``'heldout'`` that part; the test split is only ever used for reporting. Every trained model (a
member, `experiments.common.Member`) has its own sub-workdir and is reused by a rerun; a member's
identity holds the fingerprints of the members it learns from, so changing the old model retrains its
students (or, without ``config.overwrite``, stops with a one-line error) instead of silently reusing them.

Seeds. The old model trains with ``config.seed``; new models with ``config.seed + 1 + s``, so two models
compared across roles never share an initialization (Flax initializes same-named, same-shaped layers
identically for one seed). Models of one role that differ only in their loss share seed s (paired).

Rows:

* ``none``: plain new models (cross-entropy), the first S of a pool of S·G plain models, cut into
  S groups of G = max(ensemble_size, selection.candidates) consecutive seeds; ``none_all``: the
  whole pool (the targets compare each row with both);
* one row per entry of ``config.methods``: L = CE + λ·D(z_new, z_ref) (`compat.pc_training_loss`),
  z_ref the old model's logits, or for ``ldi`` the mean logits of the first ``ensemble_size``
  models of group (⌊s/G⌋ + 1) mod S (ELODI; it does not hold the student's seed when S > 1);
* ``ensemble``: the logit average of the first ``ensemble_size`` models of each group (paragon);
* ``selection``: per group, the first ``selection.candidates`` models; the one with the lowest
  held-out NFR (`compat.select_seed`) is evaluated on the test split.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import ml_collections
import numpy as np

import compat
from experiments import common
from lqf import cli
from lqf import data as data_lib
from lqf import train as train_lib
from lqf.models import create_model

# Rows the targets compare against: plain models of the S paired seeds, and all S·G of them.
BASELINES = ("none", "none_all")
ROW_NAMES = {"none": "none (plain new model, paired seeds)",
             "none_all": "none (all plain new models)", "kd": "KD", "fd_kl": "FD-KL",
             "fd_lm": "FD-LM", "ldi": "LDI (ensemble reference)",
             "ensemble": "ensemble paragon", "selection": "seed selection (held-out NFR)"}


def pc_loss_fn(reference_model: nn.Module, loss: Mapping[str, Any]) -> train_lib.LossFn:
  """PC-training objective for `lqf.train.train`: `compat.pc_training_loss` with kwargs ``loss``.

  L = CE(z_new, y) + λ·D(z_new, z_ref) with z_ref = (1/M) Σ_m reference_model(aux[m], x) in
  inference mode, computed inside the step: ``aux`` is a tuple of M variable dicts (the old model,
  M = 1, or an ensemble of new models for ``ldi``), or None for ``method='none'``.

  Args:
    reference_model: the network of the reference members (static).
    loss: keyword arguments of `compat.pc_training_loss` (method, lam, alpha, beta, ...).
  """
  loss = dict(loss)

  def loss_fn(logits, embedding, batch, aux):
    del embedding
    reference = None if aux is None else compat.ensemble_logits(
        [reference_model.apply(v, batch["image"], train=False) for v in aux])
    return compat.pc_training_loss(logits, reference, batch["label"], **loss), {}
  return loss_fn


def _flip_row(old: common.Member, new_pred: np.ndarray, labels: np.ndarray, **extra: Any) -> dict:
  return {**extra, **compat.flip_summary(labels, old.predicted("test"), new_pred)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The PC-training study (module docstring); returns the results dict.

  Config fields: seed, num_seeds (S), data (with heldout_fraction, heldout_seed), old.{model,
  num_steps}, new.{model, num_steps}, ensemble_size, selection.{candidates, criterion},
  methods.<name>.{method, lam, ...} (`compat.pc_training_loss` kwargs), and
  `experiments.common.TRAINING_FIELDS`.
  """
  common.check_positive(config, "num_seeds", "ensemble_size", "selection.candidates")
  for name, loss in config.methods.items():
    if loss.method not in compat.PC_METHODS or loss.method == "none":
      raise ValueError(f"config.methods.{name}.method={loss.method!r} is unknown: use one of "
                       f"{[m for m in compat.PC_METHODS if m != 'none']} (plain CE is row 'none').")
    if name in ("none", "ensemble", "selection"):
      raise ValueError(f"config.methods.{name} clashes with a built-in row: rename it.")
  common.check_members(config, workdir, ("old", "new"))
  data = config.data
  train = data_lib.get_source(data, data.get("train_split", "train"))
  heldout = data_lib.get_source(data, data_lib.HELDOUT_SPLIT)
  # Positions of the held-out records in the pool that `compat.split_heldout` cut (train ∪ held-out,
  # both sorted subsets of one sorted pool).
  heldout_positions = np.searchsorted(np.union1d(train.indices, heldout.indices), heldout.indices)
  eval_sources = {"test": data_lib.get_source(data, data.get("test_split", "test")),
                  "heldout": heldout}
  num_classes = data_lib.num_classes(data)
  num_seeds, group = config.num_seeds, max(config.ensemble_size, config.selection.candidates)
  countdown = common.Countdown(1 + num_seeds * group + num_seeds * len(config.methods), "model")

  def member(name: str, section, seed: int, **kw) -> common.Member:  # seed: offset to config.seed
    identity = {"loss": kw.pop("loss", {"method": "none"}), "teachers": kw.pop("teachers", [])}
    return common.train_image_member(
        common.member_config(config, data=data, section=section, seed=config.seed + seed, **identity),
        os.path.join(workdir, name), model=create_model(section.model, num_classes),
        eval_sources=eval_sources, countdown=countdown, name=name, **kw)

  old = member("old", config.old, 0)
  labels = old.predictions["test"]["label"]
  pool = [member(f"plain/seed{s}", config.new, 1 + s) for s in range(num_seeds * group)]
  groups = [pool[r * group:(r + 1) * group] for r in range(num_seeds)]
  rel = lambda m: os.path.relpath(m.workdir, workdir)  # noqa: E731
  rows = {"none": [_flip_row(old, m.predicted("test"), labels, seed=s, workdir=rel(m))
                   for s, m in enumerate(pool[:num_seeds])]}
  rows["none_all"] = [_flip_row(old, m.predicted("test"), labels, seed=s, workdir=rel(m))
                      for s, m in enumerate(pool)]
  for name, loss in config.methods.items():
    rows[name] = []
    for s in range(num_seeds):
      teachers = (groups[(s // group + 1) % num_seeds][:config.ensemble_size]
                  if loss.method == "ldi" else [old])
      student = member(f"{name}/seed{s}", config.new, 1 + s, loss=loss.to_dict(),
                       teachers=[t.fingerprint for t in teachers],
                       loss_fn=pc_loss_fn(teachers[0].model, loss.to_dict()),
                       aux=lambda teachers=teachers: tuple(t.variables for t in teachers))
      rows[name].append(_flip_row(old, student.predicted("test"), labels, seed=s,
                                  workdir=rel(student), teachers=[rel(t) for t in teachers]))
  rows["ensemble"] = []
  for r, members in enumerate(groups):
    members = members[:config.ensemble_size]
    pred = np.asarray(compat.ensemble_predict([m.logits("test") for m in members]))
    rows["ensemble"].append(_flip_row(old, pred, labels, seed=r, members=[rel(m) for m in members]))
  rows["selection"] = []
  heldout_labels = old.predictions["heldout"]["label"]
  for r, members in enumerate(groups):
    candidates = members[:config.selection.candidates]
    chosen = compat.select_seed(heldout_labels, old.predicted("heldout"),
                                [m.predicted("heldout") for m in candidates],
                                criterion=config.selection.criterion)
    heldout_nfr = [compat.negative_flip_rate(heldout_labels, old.predicted("heldout"),
                                             m.predicted("heldout")) for m in candidates]
    rows["selection"].append(_flip_row(old, candidates[chosen].predicted("test"), labels, seed=r,
                                       candidates=[rel(m) for m in candidates],
                                       heldout_nfr=heldout_nfr, selected=chosen))
  summary = {name: common.summarize(runs, common.FLIP_KEYS) for name, runs in rows.items()}
  targets = {name: {base: common.paper_target(summary[name], summary[base]) for base in BASELINES}
             for name in rows if name not in BASELINES}
  return {"study": "pct", "dataset": data.name, "num_seeds": num_seeds,
          "old": {"workdir": rel(old),
                  "error_rate": compat.error_rate(labels, old.predicted("test"))},
          "split": {"train": len(train), "heldout": len(heldout), "test": int(len(labels)),
                    "heldout_indices": heldout_positions.tolist()},
          "runs": rows, "summary": summary, "targets": targets,
          "methods": {name: loss.to_dict() for name, loss in config.methods.items()}}


def markdown(results: Mapping[str, Any]) -> str:
  """The PC-training table: error, NFR, NFI, relative NFR, PFR, mean ± sample std over seeds."""
  n, runs = results["num_seeds"], results["runs"]
  pm = common.format_pm
  lines = [f"PC training on {results['dataset']} — test split of {results['split']['test']} "
           f"images; train {results['split']['train']} / held-out {results['split']['heldout']}; "
           f"mean ± sample std over the runs of each row (n = {n} seeds; {len(runs['none_all'])} for all "
           f"plain models). Old model error: {100 * results['old']['error_rate']:.2f} %.", ""]
  lines += common.markdown_table(
      ["method", "runs", "error (%)", "NFR (%)", "NFI (%)", "relative NFR", "PFR (%)"],
      [[ROW_NAMES.get(name, name), len(runs[name]), pm(s["error_rate_new"]), pm(s["nfr"]),
        pm(s["nfi"], digits=1), pm(s["relative_nfr"], scale=1.0), pm(s["pfr"])]
       for name, s in results["summary"].items()])
  lines += ["", f"Target (paper): NFR at least {100 * common.TARGET_NFR_REDUCTION:.0f} % lower than "
            f"'none' with the error at most {100 * common.TARGET_ERROR_INCREASE:.1f} point higher; "
            "against the paired plain models and against all plain models.", ""]
  cells = []
  for name, target in results["targets"].items():
    row = [ROW_NAMES.get(name, name)]
    for base in BASELINES:
      t = target[base]
      reduction = "n/a" if t["nfr_reduction"] is None else f"{-100 * t['nfr_reduction']:+.1f} %"
      row += [reduction, f"{100 * t['error_increase']:+.2f}", "yes" if t["met"] else "no"]
    cells.append(row)
  lines += common.markdown_table(["method", "NFR change vs paired", "error change (points)", "met",
                                  "NFR change vs all plain", "error change (points)", "met"], cells)
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.launch(lambda config, workdir: common.run_study(run, markdown, config, workdir))
