"""BCT (Shen et al., CVPR 2020) and heterogeneous search (Duggal et al., CVPR 2021): a new embedding
model whose features can be compared with the old model's gallery, and an edge model compatible with a
cloud model.

  python -m experiments.update_bct --config configs/update_bct_mnist.py --workdir /tmp/update_bct

Run s = 0..S−1 trains its own old embedding model on ``old.classes`` and, for each new architecture a of
``new.models`` (e.g. the old network itself, and a wider one with the same embedding dimension), three
new models on ``new.classes``:

* new*: cross-entropy only (no constraint);
* BCT: CE(new head) + λ·CE(W_oldᵀ·φ_new(x), y), where W_old = `compat.bct_pseudo_classifier`: for every
  class of the new training set, the class mean of the old model's L2-normalized embeddings, without
  bias, frozen, applied to the new model's raw embedding — as the reference implementation (openBCT)
  builds it (λ = 1 there);
* L2: the reference's L2 baseline, the squared distance between the L2-normalized new and old
  embeddings as the only loss (openBCT trains it so, as an MSE: `l2_loss_fn` says why the sum over
  dimensions; its classifier head is untrained, so it has no classification error).

and a narrow edge model trained with the influence loss through the trained head (with bias) of a
cloud model (that run's new* of the first architecture), next to an independent edge*.

Retrieval (`compat.retrieval_top1`, `compat.retrieval_map`) runs on the test split with query =
gallery and ``exclude_self=True``, over all test images and, separately, over the images of the old
classes and of the new classes. Per run and check (test pair vs reference pair, e.g. M(BCT, old) vs
M(old, old)) the study records M(test) − M(ref) and the update gain's numerator and denominator; over
the S runs it reports the mean difference with its paired 95 % t-interval — the empirical
compatibility criterion M(test) > M(ref) *holds* when the whole interval is above 0, *does not hold*
when it is below — and the update gain E[M(test) − M(ref)] / E[M(new*, new*) − M(ref)] with Fieller's
interval (`experiments.stats`).

Seeds: run s gives its R = 2 + A roles (old, each architecture, edge) the offsets 1 + s·R + r to
``config.seed`` (old r = 0, architecture a r = 1 + a, edge r = 1 + A), so models of different roles
never share an initialization (an independent edge model that shared its seed with the cloud model
was 92 % top-1 compatible with it, measured); new*, BCT and L2 of one architecture and run share a
seed (paired), and so do edge* and edge. Members are trained once and reused
(`experiments.common.Member`).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import ml_collections
import numpy as np

import compat
from experiments import common, stats
from lqf import data as data_lib
from lqf import train as train_lib
from lqf.models import create_model
from lqf.runtime import cli

RETRIEVAL_KEYS = ("top1", "map")
# Test images the retrieval runs over: all, or those of the old / the new classes only.
SUBSETS = ("all", "old_classes", "new_classes")
SUBSET_NAMES = {"all": "all", "old_classes": "old classes", "new_classes": "new classes"}
# Models per architecture (new*, BCT, L2) and of the heterogeneous pair.
ARCH_ROLES = ("new*", "bct", "l2")
EDGE_ROLES = ("edge*", "edge")


def embedding_dim(model: nn.Module) -> int:
  """D of the pooled embedding: the last stage's width times the block expansion."""
  return model.widths[-1] * model.block.expansion


def bct_loss_fn(lam: float) -> train_lib.LossFn:
  """BCT objective L = CE(w_new·φ_new(x), y) + λ·CE(W_oldᵀ·φ_new(x) [+ b_old], y).

  ``aux`` = (old kernel (D, K), old bias (K,) or None), frozen (`compat.bct_influence_loss`).
  """
  def loss_fn(logits, embedding, batch, aux):
    kernel, bias = aux
    ce, _ = train_lib.cross_entropy_loss(logits, embedding, batch)
    influence = compat.bct_influence_loss(embedding, batch["label"], kernel, bias)
    return ce + lam * influence, {"influence_loss": influence}
  return loss_fn


def l2_loss_fn(old_model: nn.Module, dim: int) -> train_lib.LossFn:
  """The L2 baseline alone: L = D·`compat.l2_embedding_loss` = ‖φ̂_new(x) − φ̂_old(x)‖² (summed over
  the D dimensions of the unit-normalized embeddings); ``aux`` = the old model's variables.

  The reference's MSE averages over D; the sum has the same minimizer and is the reference's SGD at D×
  its learning rate. With the mean, the study's 250 SGD steps barely moved the model (gradient norm
  ≈ 0.005; mean cosine to the old embeddings 0.81 after 250 steps, M(L2, old) 18 % top-1): an
  untrained model, not the baseline. With the sum the cosine reached 0.98 (measured, one run).
  """
  def loss_fn(logits, embedding, batch, aux):
    del logits
    _, old_embedding = old_model.apply(aux, batch["image"], train=False, return_embedding=True)
    l2 = dim * compat.l2_embedding_loss(embedding, old_embedding)
    return l2, {"l2_loss": l2}
  return loss_fn


def _with_classes(data: ml_collections.ConfigDict, classes: Any) -> ml_collections.ConfigDict:
  data = copy.deepcopy(data)
  with data.unlocked():
    data.classes = None if classes is None else tuple(int(c) for c in classes)
  return data


def _retrieval(query: common.Member, gallery: common.Member, keep: np.ndarray) -> dict[str, float]:
  """Top-1 and mAP of ``query``'s test embeddings against ``gallery``'s, both cut to ``keep``.

  Query and gallery are the same images, so each query's own image is left out.
  """
  q, g = query.predictions["test"], gallery.predictions["test"]
  args = (q["embedding"][keep], q["label"][keep], g["embedding"][keep], g["label"][keep])
  return {"top1": compat.retrieval_top1(*args, exclude_self=True),
          "map": compat.retrieval_map(*args, exclude_self=True)}


def checks(arch_names: Sequence[str]) -> dict[str, tuple[str, str, str]]:
  """{check: (test pair, reference pair, upper pair)}: the criterion is M(test) > M(ref), the update
  gain [M(test) − M(ref)] / [M(upper) − M(ref)]."""
  out = {}
  for a in arch_names:
    for role in ARCH_ROLES:
      out[f"{role}/{a}"] = (f"{role}/{a} | old", "old | old", f"new*/{a} | new*/{a}")
  out["edge"] = ("edge | cloud", "edge* | edge*", "cloud | cloud")
  return out


def _section(model: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": model, "num_steps": num_steps})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The BCT study (module docstring); returns the results dict.

  Config fields: seed, num_seeds (S), data, old.{model, num_steps, classes},
  new.{models.<architecture>, num_steps, classes, influence_lam}, edge.{model, num_steps,
  influence_lam}, and `experiments.common.TRAINING_FIELDS`. ``new.classes`` must start with
  ``old.classes`` in the same order; every model's embedding dimension must be the old one's.
  """
  common.check_positive(config, "num_seeds")
  if not config.new.models:
    raise ValueError("config.new.models is empty: name at least one new architecture, e.g. "
                     "new.models.same = the old model's config.")
  old_data = _with_classes(config.data, config.old.classes)
  new_data = _with_classes(config.data, config.new.classes)
  num_old, num_new = data_lib.num_classes(old_data), data_lib.num_classes(new_data)
  new_ids = range(num_new) if new_data.classes is None else new_data.classes
  old_ids = range(num_old) if old_data.classes is None else old_data.classes
  if tuple(new_ids[:num_old]) != tuple(old_ids) or num_new <= num_old:
    raise ValueError(f"config.new.classes={tuple(new_ids)} must start with config.old.classes="
                     f"{tuple(old_ids)} in that order and add new classes.")
  arch_names = list(config.new.models)
  old_model = create_model(config.old.model, num_old)
  new_models = {a: create_model(config.new.models[a], num_new) for a in arch_names}
  edge_model = create_model(config.edge.model, num_new)
  dims = {"config.old.model": embedding_dim(old_model), "config.edge.model": embedding_dim(edge_model),
          **{f"config.new.models.{a}": embedding_dim(m) for a, m in new_models.items()}}
  if len(set(dims.values())) != 1:
    raise ValueError(f"embedding dimensions differ: {dims}; set the models' last-stage widths "
                     "equal (e.g. config.edge.model.widths=(4, 8, 64) with width 16 elsewhere).")
  common.check_members(config, workdir, {
      "old": config.old, "edge": config.edge,
      **{f"new.models.{a}": _section(config.new.models[a], config.new.num_steps) for a in arch_names}})
  test = data_lib.get_source(new_data, new_data.get("test_split", "test"))
  synthesis = data_lib.get_source(new_data, new_data.get("train_split", "train"))
  subsets = dict(zip(SUBSETS, (np.ones(len(test), bool), test.labels < num_old,
                               test.labels >= num_old)))
  rel = lambda m: os.path.relpath(m.workdir, workdir)  # noqa: E731
  roles_per_run = 2 + len(arch_names)
  total = config.num_seeds * (1 + len(ARCH_ROLES) * len(arch_names) + len(EDGE_ROLES))
  countdown = common.Countdown(total, "model")
  lam, edge_lam = config.new.influence_lam, config.edge.influence_lam

  def member(name: str, data, section, model, seed: int, eval_sources=None, **kw) -> common.Member:
    identity = {"loss": kw.pop("loss", {"kind": "cross_entropy"}),
                "teachers": kw.pop("teachers", [])}
    return common.train_image_member(
        common.member_config(config, data=data, section=section, seed=config.seed + seed, **identity),
        os.path.join(workdir, name), model=model, eval_sources=eval_sources or {"test": test},
        countdown=countdown, name=name, **kw)

  runs = []
  for s in range(config.num_seeds):
    offset = 1 + s * roles_per_run
    old = member(f"old/seed{s}", old_data, config.old, old_model, offset,
                 eval_sources={"test": test, "synthesis": synthesis})
    pseudo = compat.bct_pseudo_classifier(old.predictions["synthesis"]["embedding"],
                                          old.predictions["synthesis"]["label"], num_new)
    models = {"old": old}
    for a_index, a in enumerate(arch_names):
      section = _section(config.new.models[a], config.new.num_steps)
      seed = offset + 1 + a_index
      models[f"new*/{a}"] = member(f"new_star/{a}/seed{s}", new_data, section, new_models[a], seed)
      models[f"bct/{a}"] = member(
          f"bct/{a}/seed{s}", new_data, section, new_models[a], seed,
          loss={"kind": "influence", "lam": lam, "old_classifier": "pseudo"},
          teachers=[old.fingerprint], loss_fn=bct_loss_fn(lam), aux=lambda pseudo=pseudo: (pseudo, None))
      models[f"l2/{a}"] = member(
          f"l2/{a}/seed{s}", new_data, section, new_models[a], seed,
          loss={"kind": "normalized_squared_distance"}, teachers=[old.fingerprint],
          loss_fn=l2_loss_fn(old.model, dims["config.old.model"]), aux=lambda old=old: old.variables)
    cloud = models[f"new*/{arch_names[0]}"]
    edge_seed = offset + 1 + len(arch_names)
    models["edge*"] = member(f"edge_star/seed{s}", new_data, config.edge, edge_model, edge_seed)
    cloud_head = lambda cloud=cloud: (cloud.variables["params"]["head"]["kernel"],  # noqa: E731
                                      cloud.variables["params"]["head"]["bias"])
    models["edge"] = member(f"edge/seed{s}", new_data, config.edge, edge_model, edge_seed,
                            loss={"kind": "influence", "lam": edge_lam},
                            teachers=[cloud.fingerprint], loss_fn=bct_loss_fn(edge_lam),
                            aux=cloud_head)
    models["cloud"] = cloud
    pairs = {f"{name} | {name}": (m, m) for name, m in models.items() if name != "cloud"}
    pairs["cloud | cloud"] = (cloud, cloud)
    for a in arch_names:
      for role in ARCH_ROLES:
        pairs[f"{role}/{a} | old"] = (models[f"{role}/{a}"], old)
    pairs["edge | cloud"] = (models["edge"], cloud)
    pairs["edge* | cloud"] = (models["edge*"], cloud)
    retrieval = {name: {pair: _retrieval(*members, keep) for pair, members in pairs.items()}
                 for name, keep in subsets.items()}
    # Classification error on all classes: not for the old model (it knows the old classes only) nor
    # for L2 models (no trained classifier).
    classified = {k: m for k, m in models.items()
                  if not k.startswith("l2/") and k not in ("cloud", "old")}
    runs.append({"seed": s, "workdirs": {k: rel(m) for k, m in models.items()},
                 "error_rate": {k: compat.error_rate(m.predictions["test"]["label"],
                                                     m.predicted("test"))
                                for k, m in classified.items()},
                 "retrieval": retrieval})
  checks_ = checks(arch_names)
  return {"study": "bct", "dataset": config.data.name, "num_seeds": config.num_seeds,
          "old_classes": list(old_ids), "new_classes": list(new_ids),
          "embedding_dim": dims["config.old.model"],
          "architectures": {a: common.as_json(config.new.models[a]) for a in arch_names},
          "checks": {k: list(v) for k, v in checks_.items()},
          "runs": runs, "summary": _summary(runs, checks_)}


def _summary(runs: Sequence[Mapping[str, Any]], checks_: Mapping[str, Sequence[str]]) -> dict:
  """Per subset: each pair's M (mean [CI] over runs); per check and metric the paired difference
  M(test) − M(ref), its verdict, and the update gain (Fieller) when M(upper) − M(ref) is resolved."""
  error = common.summarize([r["error_rate"] for r in runs], list(runs[0]["error_rate"]))
  retrieval, compatibility = {}, {}
  for subset in SUBSETS:
    per_run = [r["retrieval"][subset] for r in runs]
    retrieval[subset] = {p: common.summarize([m[p] for m in per_run], RETRIEVAL_KEYS)
                         for p in per_run[0]}
    compatibility[subset] = {}
    for name, (test, ref, upper) in checks_.items():
      compatibility[subset][name] = {}
      for key in RETRIEVAL_KEYS:
        m = {p: np.array([r[p][key] for r in per_run]) for p in (test, ref, upper)}
        difference = stats.paired_difference(m[test], m[ref])
        gain = stats.relative_change(m[test] - m[ref], m[upper] - m[ref]) if np.mean(
            m[upper] - m[ref]) != 0 else None
        compatibility[subset][name][key] = {
            "difference": difference,
            "criterion": stats.verdict(difference["low"], difference["high"], 0.0, below=False),
            "runs_meeting": int(np.sum(m[test] > m[ref])),
            "gain": None if gain is None else {
                "estimate": gain["estimate"] + 1, "n": gain["n"],
                **{k: None if gain[k] is None else gain[k] + 1 for k in ("low", "high")}}}
  return {"retrieval": retrieval, "error_rate": error, "compatibility": compatibility}


def _pair_name(pair: str) -> str:
  query, gallery = pair.split(" | ")
  names = {"new*": "new*", "bct": "BCT", "l2": "L2"}
  out = []
  for part in (query, gallery):
    role, _, arch = part.partition("/")
    out.append(f"{names.get(role, role)} ({arch})" if arch else part)
  return " / ".join(out)


def markdown(results: Mapping[str, Any]) -> str:
  """The BCT tables: retrieval per (query / gallery) pair, the criterion and the update gain."""
  summary, n = results["summary"], results["num_seeds"]
  retrieval = summary["retrieval"]
  ci = stats.format_interval
  archs = ", ".join(f"{a}: {m['name']} widths {m.get('widths') or m.get('width')}"
                    for a, m in results["architectures"].items())
  lines = [f"BCT on {results['dataset']}: old models on classes {results['old_classes']}, new models "
           f"on {results['new_classes']} ({archs}); every run (seed) has its own old model. "
           f"Retrieval on the test split (query = gallery, self excluded) over all images, the old "
           f"classes' and the new classes'; embedding dim {results['embedding_dim']}; mean [95 % "
           f"t-interval] over n = {n} runs.", ""]
  lines += common.markdown_table(
      ["query / gallery"] + [f"{m} {SUBSET_NAMES[s]} (%)" for s in SUBSETS for m in ("top-1", "mAP")],
      [[_pair_name(pair)] + [ci(retrieval[s][pair][m], digits=1) for s in SUBSETS
                             for m in RETRIEVAL_KEYS]
       for pair in retrieval["all"]])
  lines += ["", f"Compatibility: M(test) − M(ref) in points (mean [paired 95 % t-interval], n = {n}); "
            "the criterion M(test) > M(ref) holds when the whole interval is above 0, does not hold "
            "when it is below, and cannot be told otherwise (the runs where it holds in brackets). "
            "Update gain E[M(test) − M(ref)] / E[M(upper) − M(ref)] (Fieller's 95 % interval; "
            "n/a when the denominator is not resolved). Within the old classes M(new*, new*) ≈ "
            "M(old, old), so the gain is read on all images only.", ""]
  compat_ = summary["compatibility"]
  cells = []
  for name, (test, ref, upper) in results["checks"].items():
    row = [f"M({_pair_name(test)}) vs M({_pair_name(ref)})"]
    for key in RETRIEVAL_KEYS:
      c = compat_["all"][name][key]
      gain = c["gain"]
      row += [f"{ci(c['difference'], digits=1, signed=True)} {c['criterion']} "
              f"({c['runs_meeting']}/{n})",
              "n/a" if gain is None or gain["low"] is None else ci(gain, scale=1.0)]
    for subset in SUBSETS[1:]:
      c = compat_[subset][name]["top1"]
      row.append(f"{ci(c['difference'], digits=1, signed=True)} {c['criterion']}")
    cells.append(row)
  lines += common.markdown_table(["check", "top-1 difference, all", "top-1 gain",
                                  "mAP difference, all", "mAP gain", "top-1 difference, old classes",
                                  "top-1 difference, new classes"], cells)
  lines += ["", *common.markdown_table(
      ["model", "test error, all classes (%)"],
      [[name, ci(stat)] for name, stat in summary["error_rate"].items()]),
      "", "L2 models have no classification error: they train on the L2 term alone (as openBCT)."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.launch(lambda config, workdir: common.run_study(run, markdown, config, workdir))
