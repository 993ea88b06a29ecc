"""PC training (Yan et al., CVPR 2021; Xie et al., ACL 2021): can an image-classifier update avoid
negative flips (old right, new wrong)?

  python -m experiments.update_pct --config configs/update_pct_mnist.py --workdir /tmp/update_pct

Old and new classifiers share one label space and train on train∖held-out: ``config.data.heldout_fraction``
makes `lqf.data.get_source` (hence `lqf.train.train`) return the training split minus a held-out part, and
the split ``'heldout'`` that part; the test split is only ever used for reporting. Every trained model (a
member, `experiments.common.Member`) has its own sub-workdir and is reused by a rerun; a member's
identity holds the fingerprints of the members it learns from, so changing the old model retrains its
students (or, without ``config.overwrite``, stops with a one-line error) instead of silently reusing them.

Seeds and pairing. One old model trains with ``config.seed``. Run s = 0..S−1 owns a group of
G = max(ensemble_size, selection.candidates) plain new models with seeds ``config.seed + 1 + s·G + j``
(j < G), so two models compared across roles never share an initialization (Flax initializes
same-named, same-shaped layers identically for one seed). The students of run s (one per entry of
``config.methods``) train with the seed of the group's first plain model, ``config.seed + 1 + s·G``:
same initialization and data order, only the loss differs. Every comparison is paired by run:

* ``none``: the plain model of run s (the group's first; cross-entropy) — the baseline of every row
  but selection;
* one row per ``config.methods`` entry: `experiments.pc_objective` (its ``weighting``: CE + λ·D or the
  reference's (1 − kd_alpha)·CE + kd_alpha·D) against z_ref, the old model's logits, or for ``ldi`` the
  mean logits of the first ``ensemble_size`` plain models of group (s + 1) mod S (ELODI; it never
  holds the student's own initialization);
* ``ensemble``: the logit average of the first ``ensemble_size`` models of group s (the paragon;
  the baseline model is one of them);
* ``selection``: of the first ``selection.candidates`` models of group s, the one with the lowest
  held-out NFR (`compat.select_seed`); its baseline is ``candidates_mean``, the mean NFR and error of
  the same candidates (what picking one at random gives on average).

Per row: flip metrics on the test split (mean [95 % t-interval] over the S runs), and against its
baseline the relative NFR change (Fieller's interval), the error change (paired t-interval), the
smallest relative NFR change the S pairs detect with 80 % power, and the verdict on the paper's target
(`experiments.common.paper_target`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import ml_collections
import numpy as np

import compat
from experiments import common, pc_objective, stats
from lqf import data as data_lib
from lqf import train as train_lib
from lqf.models import create_model
from lqf.runtime import cli

ROW_NAMES = {"none": "none (plain new model)", "kd": "KD", "fd_kl": "FD-KL", "fd_lm": "FD-LM",
             "ldi": "LDI (ensemble reference)", "ensemble": "ensemble paragon",
             "selection": "seed selection (held-out NFR)",
             "candidates_mean": "the candidates, on average"}
BUILTIN_ROWS = ("none", "ensemble", "selection", "candidates_mean")
# Each row's paired baseline (rows not listed: 'none').
BASELINE_OF = {"selection": "candidates_mean"}


def pc_loss_fn(reference_model: nn.Module, loss: Mapping[str, Any]) -> train_lib.LossFn:
  """PC-training objective for `lqf.train.train`: `experiments.pc_objective.objective` of ``loss``.

  L = CE(z_new, y) + λ·D(z_new, z_ref) or (1 − kd_alpha)·CE + kd_alpha·D (``loss['weighting']``)
  with z_ref = (1/M) Σ_m reference_model(aux[m], x) in inference mode, computed inside the step: ``aux`` is a tuple of M variable dicts (the old model,
  M = 1, or an ensemble of new models for ``ldi``), or None for ``method='none'``.

  Args:
    reference_model: the network of the reference members (static).
    loss: a config's methods entry (method, weighting, lam or kd_alpha, the term's arguments).
  """
  objective = pc_objective.objective(loss)

  def loss_fn(logits, embedding, batch, aux):
    del embedding
    reference = None if aux is None else compat.ensemble_logits(
        [reference_model.apply(v, batch["image"], train=False) for v in aux])
    return objective(logits, reference, batch["label"]), {}
  return loss_fn


def _flip_row(old: common.Member, new_pred: np.ndarray, labels: np.ndarray, **extra: Any) -> dict:
  return {**extra, **compat.flip_summary(labels, old.predicted("test"), new_pred)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The PC-training study (module docstring); returns the results dict.

  Config fields: seed, num_seeds (S), data (with heldout_fraction, heldout_seed), old.{model,
  num_steps}, new.{model, num_steps}, ensemble_size, selection.{candidates, criterion},
  methods.<name>.{method, weighting, lam | kd_alpha, ...} (`experiments.pc_objective`), and
  `experiments.common.TRAINING_FIELDS`.
  """
  common.check_positive(config, "num_seeds", "ensemble_size", "selection.candidates")
  for name, loss in config.methods.items():
    if loss.method not in pc_objective.TERMS:
      raise ValueError(f"config.methods.{name}.method={loss.method!r} is unknown: use one of "
                       f"{list(pc_objective.TERMS)} (plain CE is row 'none').")
    pc_objective.objective(loss, f"config.methods.{name}")
    if name in BUILTIN_ROWS:
      raise ValueError(f"config.methods.{name} clashes with a built-in row: rename it.")
  common.check_members(config, workdir, {"old": config.old, "new": config.new})
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
  pool = [member(f"plain/seed{i}", config.new, 1 + i) for i in range(num_seeds * group)]
  groups = [pool[s * group:(s + 1) * group] for s in range(num_seeds)]
  rel = lambda m: os.path.relpath(m.workdir, workdir)  # noqa: E731
  rows = {"none": [_flip_row(old, g[0].predicted("test"), labels, seed=s, workdir=rel(g[0]))
                   for s, g in enumerate(groups)]}
  for name, loss in config.methods.items():
    rows[name] = []
    for s in range(num_seeds):
      teachers = (groups[(s + 1) % num_seeds][:config.ensemble_size]
                  if loss.method == "ldi" else [old])
      student = member(f"{name}/seed{s}", config.new, 1 + s * group, loss=loss.to_dict(),
                       teachers=[t.fingerprint for t in teachers],
                       loss_fn=pc_loss_fn(teachers[0].model, loss.to_dict()),
                       aux=lambda teachers=teachers: tuple(t.variables for t in teachers))
      rows[name].append(_flip_row(old, student.predicted("test"), labels, seed=s,
                                  workdir=rel(student), teachers=[rel(t) for t in teachers]))
  rows["ensemble"] = []
  for s, members in enumerate(groups):
    members = members[:config.ensemble_size]
    pred = np.asarray(compat.ensemble_predict([m.logits("test") for m in members]))
    rows["ensemble"].append(_flip_row(old, pred, labels, seed=s, members=[rel(m) for m in members]))
  rows["selection"], rows["candidates_mean"] = [], []
  heldout_labels = old.predictions["heldout"]["label"]
  for s, members in enumerate(groups):
    candidates = members[:config.selection.candidates]
    chosen = compat.select_seed(heldout_labels, old.predicted("heldout"),
                                [m.predicted("heldout") for m in candidates],
                                criterion=config.selection.criterion)
    heldout_nfr = [compat.negative_flip_rate(heldout_labels, old.predicted("heldout"),
                                             m.predicted("heldout")) for m in candidates]
    rows["selection"].append(_flip_row(old, candidates[chosen].predicted("test"), labels, seed=s,
                                       candidates=[rel(m) for m in candidates],
                                       heldout_nfr=heldout_nfr, selected=chosen))
    each = [_flip_row(old, m.predicted("test"), labels) for m in candidates]
    rows["candidates_mean"].append({"seed": s, **{k: float(np.mean([e[k] for e in each]))
                                                  for k in common.FLIP_KEYS}})
  summary = {name: common.summarize(runs, common.FLIP_KEYS) for name, runs in rows.items()}
  targets = {name: common.paper_target(runs, rows[BASELINE_OF.get(name, "none")])
             for name, runs in rows.items() if name not in ("none", "candidates_mean")}
  return {"study": "pct", "dataset": data.name, "num_seeds": num_seeds,
          "old": {"workdir": rel(old),
                  "error_rate": compat.error_rate(labels, old.predicted("test"))},
          "split": {"train": len(train), "heldout": len(heldout), "test": int(len(labels)),
                    "heldout_indices": heldout_positions.tolist()},
          "runs": rows, "summary": summary, "targets": targets,
          "methods": {name: loss.to_dict() for name, loss in config.methods.items()}}


def _method_text(loss: Mapping[str, Any]) -> str:
  """The objective of a ``config.methods`` entry in words, e.g. '0.1·CE + 0.9·FD-KL (T=100, α=1, β=5)'."""
  term = {"fd_kl": "FD-KL", "fd_lm": "FD-LM", "kd": "KD", "ldi": "LDI"}[loss["method"]]
  details = {"fd_kl": ["temperature", "alpha", "beta"], "kd": ["temperature"],
             "fd_lm": ["alpha", "beta", "reduction"], "ldi": ["xi", "p", "exclude_gt"]}
  symbols = {"temperature": "T", "alpha": "α", "beta": "β", "xi": "ξ", "p": "p", "reduction": "reduction"}

  def show(key):
    if key == "exclude_gt":
      return "true class excluded" if loss[key] else "true class included"
    value = loss[key]
    return f"{symbols[key]}={value:g}" if isinstance(value, float) else f"{symbols[key]}={value}"
  shown = ", ".join(show(k) for k in details[loss["method"]] if k in loss)
  if loss.get("weighting", "sum") == "reference":
    a = loss["kd_alpha"]
    return f"{1 - a:g}·CE + {a:g}·{term} ({shown})"
  return f"CE + {loss.get('lam', 1.0):g}·{term} ({shown})"


def markdown(results: Mapping[str, Any]) -> str:
  """The PC-training tables: flip metrics (mean [95 % CI] over runs) and each row against its paired
  baseline (relative NFR change, error change, detectable change, verdict on the paper's target)."""
  n = results["num_seeds"]
  ci = stats.format_interval
  num_test = results["split"]["test"]
  flips = results["summary"]["none"]["nfr"]["mean"] * num_test
  lines = [f"PC training on {results['dataset']} — test split of {num_test} images; train "
           f"{results['split']['train']} / held-out {results['split']['heldout']}; mean [95 % "
           f"t-interval] over n = {n} runs (seeds). Old model error: "
           f"{100 * results['old']['error_rate']:.2f} %; a plain new model makes {flips:.0f} "
           "negative flips on average.", ""]
  lines += common.markdown_table(
      ["method", "error (%)", "NFR (%)", "NFI (%)", "relative NFR", "PFR (%)"],
      [[ROW_NAMES.get(name, name), ci(s["error_rate_new"]), ci(s["nfr"]), ci(s["nfi"], digits=1),
        ci(s["relative_nfr"], scale=1.0), ci(s["pfr"])]
       for name, s in results["summary"].items()])
  lines += ["", "Objectives: " + "; ".join(f"{ROW_NAMES.get(k, k)}: {_method_text(v)}"
                                          for k, v in results["methods"].items()) + ".", "",
            f"Against the paired baseline ('none' = the plain model of the same run; for seed "
            f"selection the mean of its candidates), n = {n} pairs: relative NFR change (mean ratio "
            f"− 1, Fieller's 95 % interval), error change (points, paired 95 % t-interval), the "
            f"smallest relative NFR change these pairs detect with 80 % power, and the paper's "
            f"target: NFR at least {100 * common.TARGET_NFR_REDUCTION:.0f} % lower with the error "
            f"at most {100 * common.TARGET_ERROR_INCREASE:.1f} point higher ('holds' only when both "
            "intervals lie inside it).", ""]
  cells = []
  for name, t in results["targets"].items():
    detectable = t["detectable_nfr_change"]
    cells.append([ROW_NAMES.get(name, name), ci(t["nfr_change"], digits=0, signed=True),
                  ci(t["error_change"], signed=True),
                  "n/a" if detectable is None else f"±{100 * detectable:.0f} %",
                  t["nfr_verdict"], t["error_verdict"], t["verdict"]])
  lines += common.markdown_table(["method", "NFR change (%)", "error change (points)",
                                  "detectable NFR change", "NFR −40 %", "error ≤ +0.5",
                                  "target"], cells)
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.launch(lambda config, workdir: common.run_study(run, markdown, config, workdir))
