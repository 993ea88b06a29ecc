"""The text update study (experiments/update_text.py) on its smoke config: numbers, reload, reuse."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import compat
from experiments import common
from experiments import update_text as text_study
from experiments import update as update_experiment
from lqf import text_data, train
from lqf.runtime import config_util, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
  return config_util.load_sibling(os.path.join(ROOT, "configs", "x.py"), "update_text_intents",
                                  "smoke")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("text_study"))
  config = smoke_config()
  return config, workdir, text_study.run(config, workdir)


def _logits(workdir, member):
  with np.load(os.path.join(workdir, member, common.PREDICTIONS_FILE)) as f:
    return {k.split(".")[0]: f[k] for k in f.files if k.endswith(".logits")}


def _loop_nfr(labels, old, new):
  return sum(o == y and n != y for y, o, n in zip(labels, old, new)) / len(labels)


def test_rows_recompute_from_the_saved_predictions(study):
  config, workdir, results = study
  dataset = text_data.load(config.data)
  labels, heldout_labels = dataset.test.labels, dataset.heldout.labels
  old = _logits(workdir, results["old"]["workdir"])
  old_test, old_heldout = old["test"].argmax(-1), old["heldout"].argmax(-1)
  assert results["old"]["accuracy"] == pytest.approx(np.mean(old_test == labels))
  update = results["updates"]["architecture"]
  runs = update["runs"]
  plain = _logits(workdir, runs["plain"][0]["members"][0])["test"]
  assert runs["plain"][0]["nfr"] == pytest.approx(_loop_nfr(labels, old_test, plain.argmax(-1)))
  assert runs["plain"][0]["gain"] == pytest.approx(np.mean(plain.argmax(-1) == labels)
                                                   - np.mean(old_test == labels))
  pool = [_logits(workdir, m) for m in runs["selection"][0]["members"]]
  mean = np.mean([p["test"] for p in pool[:config.ensemble_size]], axis=0)
  assert runs["ensemble_new_seeds"][0]["nfr"] == pytest.approx(
      _loop_nfr(labels, old_test, mean.argmax(-1)))
  both = (old["test"] + plain) / 2
  assert runs["ensemble_old_new"][0]["nfr"] == pytest.approx(
      _loop_nfr(labels, old_test, both.argmax(-1)))
  heldout_nfr = [_loop_nfr(heldout_labels, old_heldout, p["heldout"].argmax(-1)) for p in pool]
  assert runs["selection"][0]["heldout_nfr"] == pytest.approx(heldout_nfr)
  chosen = runs["selection"][0]["selected"]
  assert heldout_nfr[chosen] == min(heldout_nfr)
  assert runs["selection"][0]["nfr"] == pytest.approx(
      _loop_nfr(labels, old_test, pool[chosen]["test"].argmax(-1)))
  for name in config.methods:
    distilled = _logits(workdir, runs[name][0]["members"][0])["test"].argmax(-1)
    assert runs[name][0]["nfr"] == pytest.approx(_loop_nfr(labels, old_test, distilled))
    assert runs[name][0]["accuracy_new"] == pytest.approx(np.mean(distilled == labels))
  all_nfr = [_loop_nfr(labels, old_test, p["test"].argmax(-1)) for p in pool]
  assert update["candidates_mean"][0]["nfr"] == pytest.approx(np.mean(all_nfr))
  for name, comparison in update["comparisons"].items():  # paired with the plain model (one rep)
    base = update["candidates_mean"][0] if name == "selection" else runs["plain"][0]
    assert comparison["error_change"]["mean"] == pytest.approx(
        runs[name][0]["error_rate_new"] - base["error_rate_new"])
  summary = update["summary"]["plain"]
  gain = summary["gain"]["mean"]
  assert summary["nfr_over_gain"] == (None if gain <= 0 else pytest.approx(
      summary["nfr"]["mean"] / gain))
  # Per-slice NFR of the plain update, e.g. of each class, equals a loop over its examples.
  for k, name in enumerate(dataset.class_names):
    members = labels == k
    expected = _loop_nfr(labels[members], old_test[members], plain.argmax(-1)[members])
    assert update["slices"]["plain"][f"class {name}"]["nfr"] == pytest.approx(expected)
  table = text_study.markdown(results)
  assert ("| architecture: cnn(width=8, kernel_sizes=[2, 3]) | seed selection (held-out NFR) |"
          in table)
  assert "| class " in table and "| words <= 4 |" in table and "| timer |" in table


def test_checkpoint_reload_reads_text_identically(study):
  config, workdir, results = study
  dataset = text_data.load(config.data)
  for member in (results["old"]["workdir"],
                 results["updates"]["architecture"]["runs"]["kd"][0]["members"][0]):
    directory = os.path.join(workdir, member)
    with open(os.path.join(directory, "tokenizer.json"), "rb") as a, \
        open(os.path.join(workdir, "tokenizer.json"), "rb") as b:
      assert a.read() == b.read()  # old and new models read text with one tokenizer
    reloaded = text_study.classify(directory, dataset.test.texts)
    saved = _logits(workdir, member)["test"]
    np.testing.assert_array_equal(reloaded.argmax(-1), saved.argmax(-1))
    np.testing.assert_allclose(reloaded, saved, rtol=1e-5, atol=1e-5)
    _, _, _, class_names = text_study.load_classifier(directory)
    assert class_names == dataset.class_names


def test_train_step_minimizes_the_compat_objective(study):
  config, workdir, _ = study
  data = text_study.prepare_data(config, workdir)
  loss = dict(method="fd_kl", lam=0.5, alpha=1.0, beta=5.0, temperature=2.0)
  spec = {"model": config.old.model.to_dict(), "train": config.train.to_dict(), "loss": loss,
          "class_names": list(data.dataset.class_names)}
  model, tx, step, _ = text_study._compiled_for(spec, data)  # pylint: disable=protected-access
  tokens = jnp.asarray(data.tokens["train"][:8])
  labels = data.labels["train"][:8]
  old_logits = jax.random.normal(jax.random.key(1), (8, len(data.dataset.class_names)))
  variables = model.init(jax.random.key(0), tokens)
  rng = jax.random.fold_in(jax.random.key(7), 0)  # step 1 draws dropout from fold_in(key(seed), 0)
  logits = model.apply(variables, tokens, train=True, rngs={"dropout": rng})
  expected = compat.cross_entropy(logits, labels) + 0.5 * compat.focal_distillation_kl(
      logits, old_logits, labels, alpha=1.0, beta=5.0, temperature=2.0)
  mesh = parallel.data_mesh()
  state = train.init_state(jax.tree.map(jnp.copy, variables), tx, 7, mesh)
  batch = parallel.shard_batch({"tokens": tokens, "label": labels, "old_logits": old_logits}, mesh)
  _, metrics = step(state, batch, None)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)  # two float32 programs (step vs eager)


def test_entry_point_runs_the_text_study(study, tmp_path):
  config, workdir, results = study
  saved = jax.config.jax_compilation_cache_dir
  compilation_cache.set_cache_dir(str(tmp_path / "jax_cache"))  # keep the entry point's own
  try:
    via_entry_point = update_experiment.run(config, workdir)  # reuses every model
  finally:
    compilation_cache.set_cache_dir(saved)
    compilation_cache.reset_cache()
  assert via_entry_point["study"] == "text"
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["updates"].keys() == results["updates"].keys()
  with open(os.path.join(workdir, "results.md")) as f:
    assert f.read() == text_study.markdown(via_entry_point)


def test_rerun_reuses_models_and_retrains_what_changed(study):
  config, workdir, results = study
  records = {}
  for root, _, names in os.walk(workdir):
    if common.MEMBER_FILE in names:
      records[os.path.relpath(root, workdir)] = os.path.getmtime(
          os.path.join(root, common.MEMBER_FILE))
  again = text_study.run(config, workdir)
  assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)
  config = copy.deepcopy(config)
  config.methods.kd.lam = 0.25
  changed = text_study.run(config, workdir)
  for member, mtime in records.items():
    retrained = os.path.getmtime(os.path.join(workdir, member, common.MEMBER_FILE)) != mtime
    assert retrained == member.startswith(os.path.join("architecture", "kd")), member
  assert changed["methods"]["kd"]["lam"] == 0.25


@pytest.mark.parametrize("field, value, message", [
    ("ensemble_size", 5, "config.ensemble_size=5 exceeds config.candidates=2"),
    ("repetitions", 0, "config.repetitions=0 must be a positive integer"),
    ("methods.kd.method", "ldi", "config.methods.kd.method='ldi' is not a distillation method"),
    ("train.lr", -1.0, "config.train.lr=-1.0 must be a positive number")])
def test_config_errors_name_the_field(tmp_path, field, value, message):
  config = smoke_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message):
    text_study.run(config, str(tmp_path))
