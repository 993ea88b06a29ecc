"""Image update studies (experiments/update_pct.py, update_bct.py, via experiments/update.py) on smoke
configs: losses inside the real train step, tables, reuse of finished members."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import compat
from experiments import common, update_bct, update_pct
from experiments import update as update_experiment
from lqf import data as data_lib
from lqf import train as train_lib
from lqf.models import create_model
from lqf.runtime import config_util, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(name):
  return config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), name, "smoke")


def _loop_nfr(labels, old_pred, new_pred):
  flips = 0
  for y, o, n in zip(labels, old_pred, new_pred):
    flips += int(o == y and n != y)
  return flips / len(labels)


def _predictions(workdir, member):
  with np.load(os.path.join(workdir, member, common.PREDICTIONS_FILE)) as f:
    return {k: f[k] for k in f.files}


# --- the objectives inside the real training step ---------------------------------------------

# T = 4, not the paper's 100: at T = 100 the float32 KL of two near-uniform softmaxes carries a
# relative rounding error ~1e-4 that differs between two compiled programs.
LOSSES = {"fd_kl": dict(method="fd_kl", lam=0.7, alpha=1.0, beta=5.0, temperature=4.0),
          "fd_lm": dict(method="fd_lm", lam=0.3, alpha=1.0, beta=5.0),
          "ldi": dict(method="ldi", lam=2.0, xi=0.1, p=2.0),
          "fd_kl_reference": dict(method="fd_kl", weighting="reference", kd_alpha=0.9, alpha=1.0,
                                  beta=5.0, temperature=4.0),
          "fd_lm_reference": dict(method="fd_lm", weighting="reference", kd_alpha=0.9, alpha=1.0,
                                  beta=5.0, reduction="mean"),
          "ldi_reference": dict(method="ldi", weighting="reference", kd_alpha=0.8, xi=0.0, p=2.0,
                                exclude_gt=True)}
# The same objectives composed by hand from the compat terms: (z_new, z_old, y, CE) -> L.
BY_HAND = {
    "fd_kl": lambda z, o, y, ce: ce + 0.7 * compat.focal_distillation_kl(z, o, y, temperature=4.0),
    "fd_lm": lambda z, o, y, ce: ce + 0.3 * compat.focal_distillation_lm(z, o, y),
    "ldi": lambda z, o, y, ce: ce + 2.0 * compat.logit_difference_inhibition(z, o, xi=0.1),
    "fd_kl_reference": lambda z, o, y, ce: 0.1 * ce + 0.9 * compat.focal_distillation_kl(z, o, y,
                                                                                         temperature=4.0),
    "fd_lm_reference": lambda z, o, y, ce: 0.1 * ce + 0.9 * compat.focal_distillation_lm(z, o, y,
                                                                                         reduction="mean"),
    "ldi_reference": lambda z, o, y, ce: 0.2 * ce + 0.8 * compat.logit_difference_inhibition(
        z, o, labels=y, exclude_gt=True)}


class TinyNet(nn.Module):
  """Dense → BatchNorm → leaky ReLU (the embedding) → Dense head: the interface of lqf's ResNets,
  at a fraction of their compile time (a ResNet-8 train step takes ~5 s to compile on 2 cores)."""
  width: int

  @nn.compact
  def __call__(self, x, train=False, return_embedding=False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(self.width)(x.reshape(len(x), -1)))
    emb = nn.leaky_relu(h, 0.1)
    logits = nn.Dense(10, name="head")(emb)
    return (logits, emb) if return_embedding else logits


@pytest.mark.parametrize("name", [*LOSSES, "bct", "l2"])
def test_loss_fn_in_train_step_equals_direct_computation(name):
  data = smoke_config("update_pct_mnist").data
  source = data_lib.get_source(data, "train")
  batch = next(data_lib.train_iterator(source, data, global_batch_size=16, seed=0))
  model, old_model = TinyNet(16), TinyNet(12)
  x = jnp.asarray(batch["image"])
  teachers = tuple(old_model.init(jax.random.key(10 + i), x)
                   for i in range(2 if name.startswith("ldi") else 1))
  head = (jax.random.normal(jax.random.key(3), (16, 10)), None)  # a pseudo classifier: no bias
  if name == "bct":
    loss_fn, aux = update_bct.bct_loss_fn(0.5), head
  elif name == "l2":
    model = TinyNet(12)  # the L2 term needs equal embedding widths
    loss_fn, aux = update_bct.l2_loss_fn(old_model, 12), teachers[0]
  else:
    loss_fn, aux = update_pct.pc_loss_fn(old_model, LOSSES[name]), teachers
  mesh = parallel.data_mesh()
  tx = optax.sgd(0.1)
  state = train_lib.init_state(train_lib.init_variables(model, 0, x.shape[1:]), tx, 0, mesh)
  params, stats = state.state.params, state.state.batch_stats

  def direct(p):  # the objective written out with the compat functions; also returns the CE
    (logits, emb), _ = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   return_embedding=True, mutable=["batch_stats"])
    y = jnp.asarray(batch["label"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if name == "bct":
      return ce + 0.5 * compat.bct_influence_loss(emb, y, head[0]), ce
    if name == "l2":  # the reference's L2 baseline alone, summed over the 12 dimensions
      _, old_emb = old_model.apply(teachers[0], x, return_embedding=True)
      return 12 * compat.l2_embedding_loss(emb, old_emb), ce
    old_logits = sum(old_model.apply(v, x) for v in teachers) / len(teachers)
    return BY_HAND[name](logits, old_logits, y, ce), ce

  (expected, ce), grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
  assert abs(float(expected) - float(ce)) > 1e-3  # the compatibility term is active
  step = train_lib.make_train_step(model, tx, loss_fn, mesh)
  _, metrics = step(state, parallel.shard_batch(batch, mesh), aux)  # state is donated
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-4)


# --- the PC-training study, end to end ------------------------------------------------------


@pytest.fixture(scope="module")
def pct_run(tmp_path_factory):
  """The smoke PC study, with compat.select_seed spied on (what does selection see?)."""
  workdir = str(tmp_path_factory.mktemp("pct"))
  seen = []
  real_select = compat.select_seed

  def spy(heldout_labels, old_pred, candidates, **kw):
    seen.append((np.asarray(heldout_labels), [np.asarray(c) for c in candidates]))
    return real_select(heldout_labels, old_pred, candidates, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(compat, "select_seed", spy)
    results = update_experiment.run(smoke_config("update_pct_mnist"), workdir)
  return workdir, results, seen


def test_pct_results_match_saved_predictions(pct_run):
  workdir, results, _ = pct_run
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  old = _predictions(workdir, "old")
  labels, old_pred = old["test.label"], old["test.logits"].argmax(-1)
  assert results["old"]["error_rate"] == pytest.approx(np.mean(old_pred != labels))
  for method in ("none", "kd", "fd_kl", "fd_lm", "ldi"):
    for run in results["runs"][method]:
      new = _predictions(workdir, run["workdir"])
      np.testing.assert_array_equal(new["test.label"], labels)
      new_pred = new["test.logits"].argmax(-1)
      assert run["nfr"] == pytest.approx(_loop_nfr(labels, old_pred, new_pred))
      assert run["error_rate_new"] == pytest.approx(np.mean(new_pred != labels))
  for run in results["runs"]["ensemble"]:
    mean_logits = np.mean([_predictions(workdir, m)["test.logits"] for m in run["members"]], axis=0)
    assert run["nfr"] == pytest.approx(_loop_nfr(labels, old_pred, mean_logits.argmax(-1)))
  for run, selection in zip(results["runs"]["candidates_mean"], results["runs"]["selection"]):
    expected = np.mean([_loop_nfr(labels, old_pred,
                                  _predictions(workdir, m)["test.logits"].argmax(-1))
                        for m in selection["candidates"]])
    assert run["nfr"] == pytest.approx(expected)
  nfrs = [r["nfr"] for r in results["runs"]["fd_kl"]]
  assert results["summary"]["fd_kl"]["nfr"]["mean"] == pytest.approx(np.mean(nfrs))
  target = results["targets"]["fd_kl"]  # paired against 'none' run by run
  base = [r["nfr"] for r in results["runs"]["none"]]
  if np.mean(base) > 0:
    assert target["nfr_change"]["estimate"] == pytest.approx(np.mean(nfrs) / np.mean(base) - 1)
  errors = [r["error_rate_new"] - b["error_rate_new"]
            for r, b in zip(results["runs"]["fd_kl"], results["runs"]["none"])]
  assert target["error_change"]["mean"] == pytest.approx(np.mean(errors))
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| FD-KL |" in table and "seed selection" in table


def test_seed_selection_uses_a_heldout_part_of_train_only(pct_run):
  workdir, results, seen = pct_run
  data = smoke_config("update_pct_mnist").data
  data.heldout_fraction = None
  pool = data_lib.get_source(data, "train")  # the 100-shot pool the held-out part is cut from
  keep, held = compat.split_heldout(len(pool), 0.2, 0)
  heldout = np.asarray(results["split"]["heldout_indices"])  # positions in the pool
  np.testing.assert_array_equal(heldout, held)
  assert (results["split"]["train"], results["split"]["heldout"]) == (len(keep), len(held))
  member_data = _member_config(workdir, "old")["data"]
  assert (member_data["heldout_fraction"], member_data["heldout_seed"]) == (0.2, 0)
  data.heldout_fraction = 0.2  # what lqf.train.train reads for the old model: the pool minus held
  np.testing.assert_array_equal(data_lib.get_source(data, "train").indices, pool.indices[keep])
  old_heldout = _predictions(workdir, "old")["heldout.label"]
  np.testing.assert_array_equal(old_heldout, pool.labels[heldout])
  (heldout_labels, candidates), = seen  # one selection (1 seed) on the held-out labels, not test
  np.testing.assert_array_equal(heldout_labels, pool.labels[heldout])
  old_heldout_pred = _predictions(workdir, "old")["heldout.logits"].argmax(-1)
  run, = results["runs"]["selection"]
  for member, pred, nfr in zip(run["candidates"], candidates, run["heldout_nfr"]):
    np.testing.assert_array_equal(pred, _predictions(workdir, member)["heldout.logits"].argmax(-1))
    assert nfr == pytest.approx(_loop_nfr(heldout_labels, old_heldout_pred, pred))
  best = min(range(len(candidates)), key=lambda i: (run["heldout_nfr"][i], i))
  assert run["selected"] == best or run["heldout_nfr"][run["selected"]] == run["heldout_nfr"][best]
  selected = _predictions(workdir, run["candidates"][run["selected"]])
  old_pred = _predictions(workdir, "old")["test.logits"].argmax(-1)
  assert run["nfr"] == pytest.approx(
      _loop_nfr(selected["test.label"], old_pred, selected["test.logits"].argmax(-1)))


def test_rerun_reuses_finished_models(pct_run, monkeypatch):
  workdir, results, _ = pct_run
  stamp = os.path.getmtime(os.path.join(workdir, "plain", "seed0", common.PREDICTIONS_FILE))
  calls = []
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: calls.append(a))
  again = update_experiment.run(smoke_config("update_pct_mnist"), workdir)
  assert calls == [] and again == results
  assert os.path.getmtime(os.path.join(workdir, "plain", "seed0", common.PREDICTIONS_FILE)) == stamp


def _member_config(workdir, member):
  """The config a member trained with (lqf.train's config.json, ``overwrite`` dropped)."""
  with open(os.path.join(workdir, member, "config.json")) as f:
    return json.load(f)


def _fingerprint(workdir, member):
  """SHA-1 of what defines the member: its member.json identity (its lqf.train config and eval sets)."""
  with open(os.path.join(workdir, member, common.MEMBER_FILE)) as f:
    identity = json.load(f)["identity"]
  assert identity["config"] == _member_config(workdir, member)
  return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _member_identity(workdir, member):
  return _member_config(workdir, member)["member"]


def test_students_record_their_teachers(pct_run):
  workdir, results, _ = pct_run
  kd = _member_identity(workdir, "kd/seed0")
  assert kd == {"loss": smoke_config("update_pct_mnist").methods.kd.to_dict(),
                "teachers": [_fingerprint(workdir, "old")]}  # the held-out cut is in its data
  ldi, = results["runs"]["ldi"]
  assert _member_identity(workdir, ldi["workdir"])["teachers"] == [
      _fingerprint(workdir, t) for t in ldi["teachers"]]
  assert ldi["teachers"] == ["plain/seed0", "plain/seed1"]  # the 2-model ensemble reference
  seeds = [_member_config(workdir, m)["seed"] for m in ("old", "plain/seed0", "plain/seed1",
                                                         "kd/seed0")]
  assert seeds == [0, 1, 2, 1]  # old apart; students paired with the plain model of their seed


# --- BCT, end to end --------------------------------------------------------------------------


def _loop_top1(query, gallery, labels):
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  hits = 0
  for i in range(len(q)):
    sims = g @ q[i]
    sims[i] = -np.inf
    hits += int(labels[int(np.argmax(sims))] == labels[i])
  return hits / len(q)


@pytest.mark.slow
def test_bct_smoke_study(tmp_path):
  workdir = str(tmp_path)
  results = update_experiment.run(smoke_config("update_bct_mnist"), workdir)
  run, = results["runs"]
  emb = {k: _predictions(workdir, v)["test.embedding"] for k, v in run["workdirs"].items()}
  labels = _predictions(workdir, "old/seed0")["test.label"]
  assert sorted(np.unique(labels)) == list(range(10))  # retrieval over all ten digits
  for pair, (q, g) in {"bct/same | old": (emb["bct/same"], emb["old"]),
                       "bct/wider | old": (emb["bct/wider"], emb["old"]),
                       "edge | cloud": (emb["edge"], emb["new*/same"]),
                       "old | old": (emb["old"], emb["old"])}.items():
    assert run["retrieval"]["all"][pair]["top1"] == pytest.approx(_loop_top1(q, g, labels))
    new = labels >= 5
    assert run["retrieval"]["new_classes"][pair]["top1"] == pytest.approx(
        _loop_top1(q[new], g[new], labels[new]))
  check = results["summary"]["compatibility"]["all"]["bct/same"]["top1"]
  m = run["retrieval"]["all"]
  assert check["difference"]["mean"] == pytest.approx(m["bct/same | old"]["top1"]
                                                      - m["old | old"]["top1"])
  assert check["runs_meeting"] == int(m["bct/same | old"]["top1"] > m["old | old"]["top1"])
  if check["gain"] is not None:
    assert check["gain"]["estimate"] == pytest.approx(
        (m["bct/same | old"]["top1"] - m["old | old"]["top1"])
        / (m["new*/same | new*/same"]["top1"] - m["old | old"]["top1"]))
  assert _member_identity(workdir, "bct/same/seed0") == {
      "loss": {"kind": "influence", "lam": 1.0, "old_classifier": "pseudo"},
      "teachers": [_fingerprint(workdir, "old/seed0")]}
  assert _member_identity(workdir, "edge/seed0")["teachers"] == [
      _fingerprint(workdir, "new_star/same/seed0")]
  seeds = {m: _member_config(workdir, m)["seed"] for m in set(run["workdirs"].values())}
  assert seeds == {"old/seed0": 1, "new_star/same/seed0": 2, "bct/same/seed0": 2,
                   "l2/same/seed0": 2, "new_star/wider/seed0": 3, "bct/wider/seed0": 3,
                   "l2/wider/seed0": 3, "edge_star/seed0": 4, "edge/seed0": 4}  # no shared init
  assert "l2/same" not in run["error_rate"] and "old" not in run["error_rate"]
  assert "| BCT (same) / old |" in open(os.path.join(workdir, "results.md")).read()


# --- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize("study,field,value,message", [
    ("bct", "study", "xyz", "config.study='xyz' is unknown"),
    ("bct", "edge.model.widths", (2, 4, 8), "embedding dimensions differ"),
    ("bct", "edge.model.widths", (2, 4), r"model\.widths=\(2, 4\) is not 3 positive integers"),
    ("bct", "new.classes", (5, 6, 7, 8, 9), "must start with config.old.classes"),
    ("pct", "data.heldout_fraction", None, r"split 'heldout' needs .*data\.heldout_fraction"),
    ("pct", "data.heldout_fraction", 1.0, r"data\.heldout_fraction=1\.0 is outside \(0, 1\)"),
])
def test_bad_config_is_one_clear_line(tmp_path, study, field, value, message):
  config = smoke_config(f"update_{study}_mnist")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message):
    update_experiment.run(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "old"))  # refused before any training


def test_edge_model_takes_its_stage_widths_from_the_config():
  config = smoke_config("update_bct_mnist")
  edge = create_model(config.edge.model, 10)
  assert edge.widths == (2, 4, 16) and update_bct.embedding_dim(edge) == 16
  assert update_bct.embedding_dim(create_model(config.new.models.same, 10)) == 16  # (4, 8, 16)
  assert update_bct.embedding_dim(create_model(config.new.models.wider, 10)) == 16
