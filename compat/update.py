"""The model-update studies run by ``experiments/update.py``: PC training and BCT over `lqf.train`.

Every trained model (a *member*) has its own sub-workdir holding `lqf.train`'s checkpoints and
metrics, ``predictions.npz`` (its logits and embeddings on the evaluation sets) and ``member.json``
(its config). A member whose ``member.json`` records its current config is reused without calling
`lqf.train.train`; an interrupted one resumes from its checkpoint. A member's config holds the
fingerprints of the members it learns from, so changing the old model retrains its students (or,
without ``config.overwrite``, stops with a one-line error) instead of silently reusing them.

Seeds. The old model trains with ``config.seed``; every other role draws its own seeds (new models
``config.seed + 1 + s``, BCT edge models after those), so two models compared across roles never
share an initialization: Flax initializes same-named, same-shaped layers identically for one seed,
which made an independent edge model 92 % compatible with its cloud model (measured). Models of
one role that differ only in their loss share seed s (paired comparisons).

PC training (`run_pct`; Yan et al., CVPR 2021; Xie et al., ACL 2021). Old and new classifiers
share one label space and train on train∖held-out: ``config.data.heldout_fraction`` makes
`lqf.data.get_source` (hence `lqf.train.train`) return the training split minus a held-out part,
and the split ``'heldout'`` that part (`compat.split_heldout` of the k-shot pool); the test split
is only ever used for reporting. Rows:

* ``none``: plain new models (cross-entropy), the first S of a pool of S·G plain models, cut into
  S groups of G = max(ensemble_size, selection.candidates) consecutive seeds; ``none_all``: the
  whole pool (the targets compare each row with both);
* one row per entry of ``config.methods``: L = CE + λ·D(z_new, z_ref) (`compat.pc_training_loss`),
  z_ref the old model's logits, or for ``ldi`` the mean logits of the first ``ensemble_size``
  models of group (⌊s/G⌋ + 1) mod S (ELODI; it does not hold the student's seed when S > 1);
* ``ensemble``: the logit average of the first ``ensemble_size`` models of each group (paragon);
* ``selection``: per group, the first ``selection.candidates`` models; the one with the lowest
  held-out NFR (`compat.select_seed`) is evaluated on the test split.

BCT (`run_bct`; Shen et al., CVPR 2020; Duggal et al., CVPR 2021). An old embedding model on
``old.classes``; per seed, new models on ``new.classes``: new* (no constraint), BCT (CE + λ·CE
through the old head, extended to the new classes by `compat.synthesize_old_head` from the old
model's class-mean embeddings of the new training set) and L2 (CE + λ·½‖φ_new − φ_old‖²); and a
narrow edge model trained with the influence loss through the head of a cloud model (that seed's
new*), next to an independent edge*. Retrieval (`compat.retrieval_top1`, `compat.retrieval_map`)
runs on the test split with query = gallery and ``exclude_self=True``, over all test images and,
separately, over the images of the old classes and of the new classes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

import compat
from lqf import checkpoint as ckpt_lib
from lqf import data as data_lib
from lqf import parallel
from lqf import train as train_lib
from lqf.models import create_model

MEMBER_FILE = "member.json"
PREDICTIONS_FILE = "predictions.npz"
# Fields of the study config that every member's `lqf.train` config copies.
TRAINING_FIELDS = ("batch_size", "eval_batch_size", "optim", "eval_every", "log_every",
                   "checkpoint_every", "keep_checkpoints", "distributed", "overwrite")
# Flip metrics summarized over seeds (keys of `compat.flip_summary`).
FLIP_KEYS = ("error_rate_new", "nfr", "nfi", "relative_nfr", "pfr")
RETRIEVAL_KEYS = ("top1", "map")
# Targets of the PC study (Yan et al.: FD-LM cuts ImageNet NFR 6.44 % → 2.35 % at +0.18 error).
TARGET_NFR_REDUCTION = 0.4
TARGET_ERROR_INCREASE = 0.005
# PC rows the targets compare against: plain models of the S paired seeds, and all S·G of them.
BASELINES = ("none", "none_all")


def embedding_dim(model: nn.Module) -> int:
  """D of the pooled embedding: the last stage's width times the block expansion."""
  return model.widths[-1] * model.block.expansion


@dataclasses.dataclass
class Member:
  """A trained model of a study.

  Attributes:
    model: the Flax network.
    workdir: its directory (checkpoints, ``predictions.npz``, ``member.json``).
    fingerprint: SHA-1 of its config; students record it to notice a changed teacher.
    predictions: {set name: {'logits' (N, K), 'embedding' (N, D), 'label' (N,)}} as numpy.
  """
  model: nn.Module
  workdir: str
  fingerprint: str
  predictions: dict[str, dict[str, np.ndarray]]

  @functools.cached_property
  def variables(self) -> dict:
    """{'params', 'batch_stats'} of its final checkpoint."""
    return ckpt_lib.load_pretrained(self.workdir)[0]

  def predicted(self, eval_set: str) -> np.ndarray:
    """argmax_k logits on ``eval_set``, shape (N,)."""
    return self.predictions[eval_set]["logits"].argmax(-1)


def member_config(config: ml_collections.ConfigDict, *, data: ml_collections.ConfigDict,
                  section: ml_collections.ConfigDict, seed: int,
                  **identity: Any) -> ml_collections.ConfigDict:
  """The `lqf.train` config of one member.

  Args:
    config: the study config (its `TRAINING_FIELDS` are copied).
    data: the member's ``data`` section.
    section: its model section: ``model`` and ``num_steps``.
    seed: its training seed (initialization and data order).
    **identity: what else defines it (loss, teachers' fingerprints), stored under ``member`` so
      that a change is seen by `lqf.train.train`'s workdir check.
  """
  member = ml_collections.ConfigDict()
  for field in TRAINING_FIELDS:
    member[field] = copy.deepcopy(config[field])
  member.seed = int(seed)
  member.data = copy.deepcopy(data)
  member.model = copy.deepcopy(section.model)
  member.num_steps = int(section.num_steps)
  member.member = ml_collections.ConfigDict(identity)
  return member


def _config_record(config: ml_collections.ConfigDict) -> dict:
  record = json.loads(config.to_json_best_effort())
  record.pop("overwrite", None)
  return record


def train_member(config: ml_collections.ConfigDict, workdir: str, *, model: nn.Module,
                 eval_sources: Mapping[str, Any],
                 loss_fn: train_lib.LossFn = train_lib.cross_entropy_loss,
                 aux: Callable[[], Any] = lambda: None) -> Member:
  """Trains, resumes or reuses one member and returns it with its predictions.

  Reuse: if ``workdir/member.json`` records this config (``overwrite`` aside) and these evaluation
  sets, `lqf.train.train` is not called and the saved predictions are returned.

  Args:
    config: its `lqf.train` config (`member_config`).
    workdir: its directory.
    model: the network.
    eval_sources: {name: `lqf.data.Source`} to predict on after training.
    loss_fn: the objective ``loss_fn(logits, embedding, batch, aux)``.
    aux: called only when `lqf.train.train` runs; returns the ``aux`` pytree of ``loss_fn``.
  """
  config_record = _config_record(config)
  record = {"config": config_record, "eval_sets": sorted(eval_sources)}
  fingerprint = hashlib.sha1(json.dumps(config_record, sort_keys=True).encode()).hexdigest()
  record_path = os.path.join(workdir, MEMBER_FILE)
  predictions_path = os.path.join(workdir, PREDICTIONS_FILE)
  if os.path.exists(record_path) and os.path.exists(predictions_path):
    with open(record_path) as f:
      saved = json.load(f)
    if saved == record:
      with np.load(predictions_path) as arrays:
        predictions = {name: {field: arrays[f"{name}.{field}"] for field in
                              ("logits", "embedding", "label")} for name in eval_sources}
      return Member(model, workdir, fingerprint, predictions)
  state, _ = train_lib.train(config, workdir, loss_fn=loss_fn, aux=aux(), model=model)
  mesh = parallel.data_mesh()
  predict = train_lib.make_predict(model, mesh)
  predictions = {}
  for name, source in eval_sources.items():
    batches = data_lib.eval_batches(source, config.data, batch_size=config.eval_batch_size)
    logits, embedding, label = train_lib.predict_batches(predict, state.variables, batches, mesh)
    predictions[name] = {"logits": logits, "embedding": embedding, "label": label}
  if jax.process_index() == 0:
    np.savez(predictions_path, **{f"{name}.{field}": value for name, fields in predictions.items()
                                  for field, value in fields.items()})
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2)
  return Member(model, workdir, fingerprint, predictions)


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


def bct_loss_fn(lam: float) -> train_lib.LossFn:
  """BCT objective L = CE(w_new·φ_new(x), y) + λ·CE(w_old·φ_new(x) + b_old, y).

  ``aux`` = (old kernel (D, K), old bias (K,)), frozen (`compat.bct_influence_loss`).
  """
  def loss_fn(logits, embedding, batch, aux):
    kernel, bias = aux
    ce, _ = train_lib.cross_entropy_loss(logits, embedding, batch)
    influence = compat.bct_influence_loss(embedding, batch["label"], kernel, bias)
    return ce + lam * influence, {"influence_loss": influence}
  return loss_fn


def l2_loss_fn(old_model: nn.Module, lam: float) -> train_lib.LossFn:
  """L2 baseline L = CE(w_new·φ_new(x), y) + λ·½‖φ_new(x) − φ_old(x)‖²; ``aux`` = old variables."""
  def loss_fn(logits, embedding, batch, aux):
    _, old_embedding = old_model.apply(aux, batch["image"], train=False, return_embedding=True)
    ce, _ = train_lib.cross_entropy_loss(logits, embedding, batch)
    l2 = compat.l2_embedding_loss(embedding, old_embedding)
    return ce + lam * l2, {"l2_loss": l2}
  return loss_fn


def summarize(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict]:
  """{key: {'mean', 'std'}} over ``runs``; std is the sample std (ddof = 1), 0 for one run."""
  out = {}
  for key in keys:
    values = np.asarray([run[key] for run in runs], np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    out[key] = {"mean": float(np.mean(values)), "std": std}
  return out


def _check_positive(config: ml_collections.ConfigDict, *fields: str) -> None:
  for field in fields:
    value = functools.reduce(lambda c, k: c[k], field.split("."), config)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field}={value!r} must be a positive integer.")


def _flip_row(old: Member, new_pred: np.ndarray, labels: np.ndarray, **extra: Any) -> dict:
  return {**extra, **compat.flip_summary(labels, old.predicted("test"), new_pred)}


def paper_target(method: Mapping[str, Mapping[str, float]],
                 base: Mapping[str, Mapping[str, float]]) -> dict:
  """Relative NFR reduction and error change (mean over seeds) of a `summarize`d row against a baseline
  row, and whether they meet Yan et al.'s target (NFR ≥ 40 % lower, error ≤ 0.5 point higher)."""
  base_nfr = base["nfr"]["mean"]
  reduction = 1 - method["nfr"]["mean"] / base_nfr if base_nfr > 0 else None
  increase = method["error_rate_new"]["mean"] - base["error_rate_new"]["mean"]
  return {"nfr_reduction": reduction, "error_increase": increase,
          "met": reduction is not None and reduction >= TARGET_NFR_REDUCTION
                 and increase <= TARGET_ERROR_INCREASE}


def run_pct(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The PC-training study (see the module docstring); returns the results dict.

  Config fields: seed, num_seeds (S), data (with heldout_fraction, heldout_seed), old.{model,
  num_steps}, new.{model, num_steps}, ensemble_size, selection.{candidates, criterion},
  methods.<name>.{method, lam, ...} (`compat.pc_training_loss` kwargs), and `TRAINING_FIELDS`.
  """
  _check_positive(config, "num_seeds", "ensemble_size", "selection.candidates")
  for name, loss in config.methods.items():
    if loss.method not in compat.PC_METHODS or loss.method == "none":
      raise ValueError(f"config.methods.{name}.method={loss.method!r} is unknown: use one of "
                       f"{[m for m in compat.PC_METHODS if m != 'none']} (plain CE is row 'none').")
    if name in ("none", "ensemble", "selection"):
      raise ValueError(f"config.methods.{name} clashes with a built-in row: rename it.")
  data = config.data
  train = data_lib.get_source(data, data.get("train_split", "train"))
  heldout = data_lib.get_source(data, data_lib.HELDOUT_SPLIT)
  # Positions of the held-out records in the pool that `compat.split_heldout` cut (train ∪ held-out,
  # both sorted subsets of one sorted pool).
  heldout_positions = np.searchsorted(np.union1d(train.indices, heldout.indices), heldout.indices)
  eval_sources = {"test": data_lib.get_source(data, data.get("test_split", "test")),
                  "heldout": heldout}
  num_classes = data_lib.num_classes(data)

  def member(name: str, section, seed: int, **kw) -> Member:  # seed: offset to config.seed
    identity = {"loss": kw.pop("loss", {"method": "none"}), "teachers": kw.pop("teachers", [])}
    return train_member(member_config(config, data=data, section=section,
                                      seed=config.seed + seed, **identity),
                        os.path.join(workdir, name), model=create_model(section.model, num_classes),
                        eval_sources=eval_sources, **kw)

  old = member("old", config.old, 0)
  labels = old.predictions["test"]["label"]
  num_seeds, group = config.num_seeds, max(config.ensemble_size, config.selection.candidates)
  pool = [member(f"plain/seed{s}", config.new, 1 + s) for s in range(num_seeds * group)]
  groups = [pool[r * group:(r + 1) * group] for r in range(num_seeds)]
  rel = lambda m: os.path.relpath(m.workdir, workdir)
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
    pred = np.asarray(compat.ensemble_predict([m.predictions["test"]["logits"] for m in members]))
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
  summary = {name: summarize(runs, FLIP_KEYS) for name, runs in rows.items()}
  targets = {name: {base: paper_target(summary[name], summary[base]) for base in BASELINES}
             for name in rows if name not in BASELINES}
  return {"study": "pct", "dataset": data.name, "num_seeds": num_seeds,
          "old": {"workdir": rel(old),
                  "error_rate": compat.error_rate(labels, old.predicted("test"))},
          "split": {"train": len(train), "heldout": len(heldout), "test": int(len(labels)),
                    "heldout_indices": heldout_positions.tolist()},
          "runs": rows, "summary": summary, "targets": targets,
          "methods": {name: loss.to_dict() for name, loss in config.methods.items()}}


def _with_classes(data: ml_collections.ConfigDict, classes: Any) -> ml_collections.ConfigDict:
  data = copy.deepcopy(data)
  with data.unlocked():
    data.classes = None if classes is None else tuple(int(c) for c in classes)
  return data


def _retrieval(query: Member, gallery: Member, keep: np.ndarray) -> dict[str, float]:
  """Top-1 and mAP of ``query``'s test embeddings against ``gallery``'s, both cut to ``keep``.

  Query and gallery are the same images, so each query's own image is left out.
  """
  q, g = query.predictions["test"], gallery.predictions["test"]
  args = (q["embedding"][keep], q["label"][keep], g["embedding"][keep], g["label"][keep])
  return {"top1": compat.retrieval_top1(*args, exclude_self=True),
          "map": compat.retrieval_map(*args, exclude_self=True)}


# Compatibility checks of the BCT study: (name, M(test pair), M(reference pair), M(upper pair)).
# The criterion is M(test) > M(reference); the gain [M(test) − M(ref)] / [M(upper) − M(ref)].
BCT_CHECKS = (("new*", "new*/old", "old/old", "new*/new*"),
              ("bct", "bct/old", "old/old", "new*/new*"),
              ("l2", "l2/old", "old/old", "new*/new*"),
              ("edge", "edge/cloud", "edge*/edge*", "new*/new*"))
# Test images the retrieval runs over: all, or those of the old / the new classes only.
BCT_SUBSETS = ("all", "old_classes", "new_classes")


def run_bct(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The BCT study (see the module docstring); returns the results dict.

  Config fields: seed, num_seeds, data, old.{model, num_steps, classes},
  new.{model, num_steps, classes, influence_lam, l2_lam}, edge.{model, num_steps, influence_lam},
  and `TRAINING_FIELDS`. ``new.classes`` must start with ``old.classes`` in the same order.
  """
  _check_positive(config, "num_seeds")
  old_data = _with_classes(config.data, config.old.classes)
  new_data = _with_classes(config.data, config.new.classes)
  num_old, num_new = data_lib.num_classes(old_data), data_lib.num_classes(new_data)
  new_ids = range(num_new) if new_data.classes is None else new_data.classes
  old_ids = range(num_old) if old_data.classes is None else old_data.classes
  if tuple(new_ids[:num_old]) != tuple(old_ids) or num_new <= num_old:
    raise ValueError(f"config.new.classes={tuple(new_ids)} must start with config.old.classes="
                     f"{tuple(old_ids)} in that order and add new classes.")
  old_model = create_model(config.old.model, num_old)
  new_model = create_model(config.new.model, num_new)
  edge_model = create_model(config.edge.model, num_new)
  dims = {f"config.{k}.model": embedding_dim(m) for k, m in
          (("old", old_model), ("new", new_model), ("edge", edge_model))}
  if len(set(dims.values())) != 1:
    raise ValueError(f"embedding dimensions differ: {dims}; set the models' last-stage widths "
                     "equal (e.g. config.edge.model.widths=(4, 8, 64) with width 16 elsewhere).")
  test = data_lib.get_source(new_data, new_data.get("test_split", "test"))
  synthesis = data_lib.get_source(new_data, new_data.get("train_split", "train"))
  subsets = dict(zip(BCT_SUBSETS, (np.ones(len(test), bool), test.labels < num_old,
                                   test.labels >= num_old)))
  rel = lambda m: os.path.relpath(m.workdir, workdir)

  def member(name: str, data, section, model, seed: int, eval_sources=None, **kw) -> Member:
    identity = {"loss": kw.pop("loss", {"kind": "cross_entropy"}),
                "teachers": kw.pop("teachers", [])}
    return train_member(member_config(config, data=data, section=section,
                                      seed=config.seed + seed, **identity),
                        os.path.join(workdir, name), model=model,
                        eval_sources=eval_sources or {"test": test}, **kw)

  old = member("old", old_data, config.old, old_model, 0,
               eval_sources={"test": test, "synthesis": synthesis})
  head = old.variables["params"]["head"]
  old_head = compat.synthesize_old_head(
      old.predictions["synthesis"]["embedding"], old.predictions["synthesis"]["label"],
      head["kernel"], head["bias"], num_new)
  old_old = {name: _retrieval(old, old, keep) for name, keep in subsets.items()}
  runs = []
  for s in range(config.num_seeds):
    new_seed, edge_seed = 1 + s, 1 + config.num_seeds + s  # offsets to config.seed
    new_star = member(f"new_star/seed{s}", new_data, config.new, new_model, new_seed)
    bct = member(f"bct/seed{s}", new_data, config.new, new_model, new_seed,
                 loss={"kind": "influence", "lam": config.new.influence_lam},
                 teachers=[old.fingerprint], loss_fn=bct_loss_fn(config.new.influence_lam),
                 aux=lambda: old_head)
    l2 = member(f"l2/seed{s}", new_data, config.new, new_model, new_seed,
                loss={"kind": "l2", "lam": config.new.l2_lam}, teachers=[old.fingerprint],
                loss_fn=l2_loss_fn(old.model, config.new.l2_lam), aux=lambda: old.variables)
    edge_star = member(f"edge_star/seed{s}", new_data, config.edge, edge_model, edge_seed)
    cloud_head = lambda cloud=new_star: (cloud.variables["params"]["head"]["kernel"],
                                         cloud.variables["params"]["head"]["bias"])
    edge = member(f"edge/seed{s}", new_data, config.edge, edge_model, edge_seed,
                  loss={"kind": "influence", "lam": config.edge.influence_lam},
                  teachers=[new_star.fingerprint],
                  loss_fn=bct_loss_fn(config.edge.influence_lam), aux=cloud_head)
    models = {"new*": new_star, "bct": bct, "l2": l2, "edge*": edge_star, "edge": edge}
    pairs = {"new*/new*": (new_star, new_star), "new*/old": (new_star, old),
             "bct/bct": (bct, bct), "bct/old": (bct, old), "l2/l2": (l2, l2), "l2/old": (l2, old),
             "edge*/edge*": (edge_star, edge_star), "edge/edge": (edge, edge),
             "edge/cloud": (edge, new_star), "edge*/cloud": (edge_star, new_star)}
    retrieval = {name: {"old/old": old_old[name],
                        **{pair: _retrieval(*members, keep) for pair, members in pairs.items()}}
                 for name, keep in subsets.items()}
    runs.append({"seed": s, "workdirs": {k: rel(m) for k, m in models.items()},
                 "error_rate": {k: compat.error_rate(m.predictions["test"]["label"],
                                                     m.predicted("test"))
                                for k, m in models.items()},
                 "retrieval": retrieval,
                 "checks": {name: _bct_checks(r) for name, r in retrieval.items()}})
  return {"study": "bct", "dataset": config.data.name, "num_seeds": config.num_seeds,
          "old": {"workdir": rel(old), "classes": list(old_ids)},
          "new_classes": list(new_ids), "embedding_dim": dims["config.new.model"],
          "runs": runs, "summary": _bct_summary(runs)}


def _bct_checks(retrieval: Mapping[str, Mapping[str, float]]) -> dict:
  """Per `BCT_CHECKS` row and metric: whether the criterion holds, and the gain (None if 0/0)."""
  checks = {}
  for name, test, reference, upper in BCT_CHECKS:
    checks[name] = {}
    for key in RETRIEVAL_KEYS:
      m_test, m_ref, m_upper = (retrieval[p][key] for p in (test, reference, upper))
      gain = None if m_upper == m_ref else compat.update_gain(m_test, m_ref, m_upper)
      checks[name][key] = {"criterion": compat.compatibility_criterion(m_test, m_ref),
                           "gain": gain}
  return checks


def _bct_summary(runs: Sequence[Mapping[str, Any]]) -> dict:
  """Per subset: mean ± std over seeds of each pair's M and each gain; seeds meeting a criterion."""
  error = summarize([r["error_rate"] for r in runs], list(runs[0]["error_rate"]))
  retrieval, checks = {}, {}
  for subset in BCT_SUBSETS:
    per_run = [r["retrieval"][subset] for r in runs]
    retrieval[subset] = {p: summarize([m[p] for m in per_run], RETRIEVAL_KEYS) for p in per_run[0]}
    checks[subset] = {}
    for name, *_ in BCT_CHECKS:
      checks[subset][name] = {}
      for key in RETRIEVAL_KEYS:
        per_seed = [r["checks"][subset][name][key] for r in runs]
        gains = [{"gain": c["gain"]} for c in per_seed if c["gain"] is not None]
        checks[subset][name][key] = {
            "criterion_seeds": sum(c["criterion"] for c in per_seed),
            "gain": summarize(gains, ["gain"])["gain"] if gains else None}
  return {"retrieval": retrieval, "error_rate": error, "checks": checks}


def format_pm(stat: Mapping[str, float], scale: float = 100.0, digits: int = 2) -> str:
  """``"mean ± std"`` of a `summarize` entry, scaled (×100: percent)."""
  return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


PCT_ROW_NAMES = {"none": "none (plain new model, paired seeds)",
                 "none_all": "none (all plain new models)", "kd": "KD", "fd_kl": "FD-KL",
                 "fd_lm": "FD-LM", "ldi": "LDI (ensemble reference)",
                 "ensemble": "ensemble paragon", "selection": "seed selection (held-out NFR)"}


def pct_markdown(results: Mapping[str, Any]) -> str:
  """The PC-training table: error, NFR, NFI, relative NFR, PFR, mean ± std over seeds."""
  n, runs = results["num_seeds"], results["runs"]
  lines = [f"PC training on {results['dataset']} — test split of {results['split']['test']} "
           f"images; train {results['split']['train']} / held-out {results['split']['heldout']}; "
           f"mean ± std over the runs of each row ({n} seeds; {len(runs['none_all'])} for all "
           f"plain models). Old model error: {100 * results['old']['error_rate']:.2f} %.", "",
           "| method | runs | error (%) | NFR (%) | NFI (%) | relative NFR | PFR (%) |",
           "|---|---|---|---|---|---|---|"]
  for name, s in results["summary"].items():
    lines.append(f"| {PCT_ROW_NAMES.get(name, name)} | {len(runs[name])} | "
                 f"{format_pm(s['error_rate_new'])} | {format_pm(s['nfr'])} | "
                 f"{format_pm(s['nfi'], digits=1)} | "
                 f"{format_pm(s['relative_nfr'], scale=1.0)} | {format_pm(s['pfr'])} |")
  lines += ["", f"Target (paper): NFR at least {100 * TARGET_NFR_REDUCTION:.0f} % lower than "
            f"'none' with the error at most {100 * TARGET_ERROR_INCREASE:.1f} point higher; "
            "against the paired plain models and against all plain models.", "",
            "| method | NFR change vs paired | error change (points) | met | NFR change vs all "
            "plain | error change (points) | met |", "|---" * 7 + "|"]
  for name, target in results["targets"].items():
    cells = []
    for base in BASELINES:
      t = target[base]
      reduction = "n/a" if t["nfr_reduction"] is None else f"{-100 * t['nfr_reduction']:+.1f} %"
      cells += [reduction, f"{100 * t['error_increase']:+.2f}", "yes" if t["met"] else "no"]
    lines.append(f"| {PCT_ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


BCT_PAIR_NAMES = {"old/old": "old / old", "new*/new*": "new* / new* (= cloud / cloud)",
                  "new*/old": "new* / old", "bct/old": "BCT / old", "bct/bct": "BCT / BCT",
                  "l2/old": "L2 / old", "l2/l2": "L2 / L2", "edge*/edge*": "edge* / edge*",
                  "edge/cloud": "edge (BCT to cloud) / cloud", "edge*/cloud": "edge* / cloud",
                  "edge/edge": "edge / edge"}
BCT_CHECK_NAMES = {"new*": "new* (no constraint): M(new*, old) > M(old, old)",
                   "bct": "BCT: M(BCT, old) > M(old, old)", "l2": "L2: M(L2, old) > M(old, old)",
                   "edge": "edge: M(edge, cloud) > M(edge*, edge*)"}


BCT_SUBSET_NAMES = {"all": "all", "old_classes": "old classes", "new_classes": "new classes"}


def bct_markdown(results: Mapping[str, Any]) -> str:
  """The BCT tables: retrieval per (query / gallery) pair, the criterion and the update gain."""
  summary, n = results["summary"], results["num_seeds"]
  retrieval = summary["retrieval"]
  header = " | ".join(f"{m} {BCT_SUBSET_NAMES[s]} (%)" for s in BCT_SUBSETS
                      for m in ("top-1", "mAP"))
  lines = [f"BCT on {results['dataset']}: old model on classes {results['old']['classes']}, new "
           f"models on {results['new_classes']}; retrieval on the test split (query = gallery, "
           f"self excluded) over all images, the old classes' and the new classes'; embedding "
           f"dim {results['embedding_dim']}; mean ± std over {n} seed(s).", "",
           f"| query / gallery | {header} |", "|---" * (1 + 2 * len(BCT_SUBSETS)) + "|"]
  for pair in retrieval["all"]:
    cells = [format_pm(retrieval[s][pair][m]) for s in BCT_SUBSETS for m in RETRIEVAL_KEYS]
    lines.append(f"| {BCT_PAIR_NAMES.get(pair, pair)} | " + " | ".join(cells) + " |")
  lines += ["", "Compatibility criterion (seeds where it holds) on all images and within the old "
            "and the new classes; update gain [M(test) − M(ref)] / [M(new*, new*) − M(ref)] on "
            "all images (within the old classes M(new*, new*) ≈ M(old, old), so the gain is "
            "0/0 there: see results.json):", "",
            "| check | top-1 | top-1 gain | mAP | mAP gain | top-1 old cl. | top-1 new cl. | "
            "mAP old cl. | mAP new cl. |", "|---" * 9 + "|"]
  checks = summary["checks"]
  for name, *_ in BCT_CHECKS:
    cells = []
    for key in RETRIEVAL_KEYS:
      c = checks["all"][name][key]
      cells += [f"{c['criterion_seeds']}/{n}",
                "n/a" if c["gain"] is None else format_pm(c["gain"], scale=1.0)]
    cells += [f"{checks[s][name][k]['criterion_seeds']}/{n}" for k in RETRIEVAL_KEYS
              for s in BCT_SUBSETS[1:]]
    lines.append(f"| {BCT_CHECK_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
  lines += ["", "| model | test error, all classes (%) |", "|---|---|"]
  lines += [f"| {name} | {format_pm(stat)} |" for name, stat in summary["error_rate"].items()]
  return "\n".join(lines) + "\n"


STUDIES = {"pct": (run_pct, pct_markdown), "bct": (run_bct, bct_markdown)}
