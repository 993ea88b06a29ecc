"""BCT (Shen et al., CVPR 2020) and heterogeneous search (Duggal et al., CVPR 2021): a new embedding
model whose features can be compared with the old model's gallery, and an edge model compatible with a
cloud model.

  python -m experiments.update_bct --config configs/update_bct_mnist.py --workdir /tmp/update_bct

An old embedding model on ``old.classes``; per seed, new models on ``new.classes``: new* (no
constraint), BCT (CE + λ·CE through the old head, extended to the new classes by
`compat.synthesize_old_head` from the old model's class-mean embeddings of the new training set) and L2
(CE + λ·½‖φ_new − φ_old‖²); and a narrow edge model trained with the influence loss through the head of
a cloud model (that seed's new*), next to an independent edge*. Retrieval (`compat.retrieval_top1`,
`compat.retrieval_map`) runs on the test split with query = gallery and ``exclude_self=True``, over all
test images and, separately, over the images of the old classes and of the new classes. Members are
trained once and reused (`experiments.common.Member`); seeds as in `experiments.update_pct`.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import ml_collections
import numpy as np

import compat
from experiments import common
from lqf import cli
from lqf import data as data_lib
from lqf import train as train_lib
from lqf.models import create_model

RETRIEVAL_KEYS = ("top1", "map")
# Compatibility checks: (name, M(test pair), M(reference pair), M(upper pair)).
# The criterion is M(test) > M(reference); the gain [M(test) − M(ref)] / [M(upper) − M(ref)].
CHECKS = (("new*", "new*/old", "old/old", "new*/new*"),
          ("bct", "bct/old", "old/old", "new*/new*"),
          ("l2", "l2/old", "old/old", "new*/new*"),
          ("edge", "edge/cloud", "edge*/edge*", "new*/new*"))
# Test images the retrieval runs over: all, or those of the old / the new classes only.
SUBSETS = ("all", "old_classes", "new_classes")
PAIR_NAMES = {"old/old": "old / old", "new*/new*": "new* / new* (= cloud / cloud)",
              "new*/old": "new* / old", "bct/old": "BCT / old", "bct/bct": "BCT / BCT",
              "l2/old": "L2 / old", "l2/l2": "L2 / L2", "edge*/edge*": "edge* / edge*",
              "edge/cloud": "edge (BCT to cloud) / cloud", "edge*/cloud": "edge* / cloud",
              "edge/edge": "edge / edge"}
CHECK_NAMES = {"new*": "new* (no constraint): M(new*, old) > M(old, old)",
               "bct": "BCT: M(BCT, old) > M(old, old)", "l2": "L2: M(L2, old) > M(old, old)",
               "edge": "edge: M(edge, cloud) > M(edge*, edge*)"}
SUBSET_NAMES = {"all": "all", "old_classes": "old classes", "new_classes": "new classes"}


def embedding_dim(model: nn.Module) -> int:
  """D of the pooled embedding: the last stage's width times the block expansion."""
  return model.widths[-1] * model.block.expansion


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The BCT study (module docstring); returns the results dict.

  Config fields: seed, num_seeds, data, old.{model, num_steps, classes},
  new.{model, num_steps, classes, influence_lam, l2_lam}, edge.{model, num_steps, influence_lam},
  and `experiments.common.TRAINING_FIELDS`. ``new.classes`` must start with ``old.classes`` in the
  same order.
  """
  common.check_positive(config, "num_seeds")
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
  common.check_members(config, workdir, ("old", "new", "edge"))
  test = data_lib.get_source(new_data, new_data.get("test_split", "test"))
  synthesis = data_lib.get_source(new_data, new_data.get("train_split", "train"))
  subsets = dict(zip(SUBSETS, (np.ones(len(test), bool), test.labels < num_old,
                               test.labels >= num_old)))
  rel = lambda m: os.path.relpath(m.workdir, workdir)  # noqa: E731
  countdown = common.Countdown(1 + 5 * config.num_seeds, "model")

  def member(name: str, data, section, model, seed: int, eval_sources=None, **kw) -> common.Member:
    identity = {"loss": kw.pop("loss", {"kind": "cross_entropy"}),
                "teachers": kw.pop("teachers", [])}
    return common.train_image_member(
        common.member_config(config, data=data, section=section, seed=config.seed + seed, **identity),
        os.path.join(workdir, name), model=model, eval_sources=eval_sources or {"test": test},
        countdown=countdown, name=name, **kw)

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
    cloud_head = lambda cloud=new_star: (cloud.variables["params"]["head"]["kernel"],  # noqa: E731
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
                 "checks": {name: _checks(r) for name, r in retrieval.items()}})
  return {"study": "bct", "dataset": config.data.name, "num_seeds": config.num_seeds,
          "old": {"workdir": rel(old), "classes": list(old_ids)},
          "new_classes": list(new_ids), "embedding_dim": dims["config.new.model"],
          "runs": runs, "summary": _summary(runs)}


def _checks(retrieval: Mapping[str, Mapping[str, float]]) -> dict:
  """Per `CHECKS` row and metric: whether the criterion holds, and the gain (None if 0/0)."""
  checks = {}
  for name, test, reference, upper in CHECKS:
    checks[name] = {}
    for key in RETRIEVAL_KEYS:
      m_test, m_ref, m_upper = (retrieval[p][key] for p in (test, reference, upper))
      gain = None if m_upper == m_ref else compat.update_gain(m_test, m_ref, m_upper)
      checks[name][key] = {"criterion": compat.compatibility_criterion(m_test, m_ref),
                           "gain": gain}
  return checks


def _summary(runs: Sequence[Mapping[str, Any]]) -> dict:
  """Per subset: mean ± std over seeds of each pair's M and each gain; seeds meeting a criterion."""
  error = common.summarize([r["error_rate"] for r in runs], list(runs[0]["error_rate"]))
  retrieval, checks = {}, {}
  for subset in SUBSETS:
    per_run = [r["retrieval"][subset] for r in runs]
    retrieval[subset] = {p: common.summarize([m[p] for m in per_run], RETRIEVAL_KEYS) for p in per_run[0]}
    checks[subset] = {}
    for name, *_ in CHECKS:
      checks[subset][name] = {}
      for key in RETRIEVAL_KEYS:
        per_seed = [r["checks"][subset][name][key] for r in runs]
        gains = [{"gain": c["gain"]} for c in per_seed if c["gain"] is not None]
        checks[subset][name][key] = {
            "criterion_seeds": sum(c["criterion"] for c in per_seed),
            "gain": common.summarize(gains, ["gain"])["gain"] if gains else None}
  return {"retrieval": retrieval, "error_rate": error, "checks": checks}


def markdown(results: Mapping[str, Any]) -> str:
  """The BCT tables: retrieval per (query / gallery) pair, the criterion and the update gain."""
  summary, n = results["summary"], results["num_seeds"]
  retrieval = summary["retrieval"]
  pm = common.format_pm
  lines = [f"BCT on {results['dataset']}: old model on classes {results['old']['classes']}, new "
           f"models on {results['new_classes']}; retrieval on the test split (query = gallery, "
           f"self excluded) over all images, the old classes' and the new classes'; embedding "
           f"dim {results['embedding_dim']}; mean ± sample std over n = {n} seed(s).", ""]
  lines += common.markdown_table(
      ["query / gallery"] + [f"{m} {SUBSET_NAMES[s]} (%)" for s in SUBSETS for m in ("top-1", "mAP")],
      [[PAIR_NAMES.get(pair, pair)] + [pm(retrieval[s][pair][m]) for s in SUBSETS for m in RETRIEVAL_KEYS]
       for pair in retrieval["all"]])
  lines += ["", "Compatibility criterion (seeds where it holds) on all images and within the old "
            "and the new classes; update gain [M(test) − M(ref)] / [M(new*, new*) − M(ref)] on "
            "all images (within the old classes M(new*, new*) ≈ M(old, old), so the gain is "
            "0/0 there: see results.json):", ""]
  checks = summary["checks"]
  cells = []
  for name, *_ in CHECKS:
    row = [CHECK_NAMES.get(name, name)]
    for key in RETRIEVAL_KEYS:
      c = checks["all"][name][key]
      row += [f"{c['criterion_seeds']}/{n}", "n/a" if c["gain"] is None else pm(c["gain"], scale=1.0)]
    row += [f"{checks[s][name][k]['criterion_seeds']}/{n}" for k in RETRIEVAL_KEYS for s in SUBSETS[1:]]
    cells.append(row)
  lines += common.markdown_table(["check", "top-1", "top-1 gain", "mAP", "mAP gain", "top-1 old cl.",
                                  "top-1 new cl.", "mAP old cl.", "mAP new cl."], cells)
  lines += ["", *common.markdown_table(["model", "test error, all classes (%)"],
                                       [[name, pm(stat)] for name, stat in summary["error_rate"].items()])]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.launch(lambda config, workdir: common.run_study(run, markdown, config, workdir))
