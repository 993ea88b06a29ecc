"""Regression in text-classifier updates (Xie et al., ACL 2021): old → new, flips, remedies.

  python -m experiments.update_text --config configs/update_text_intents.py --workdir /tmp/update_text

One old model is trained; each *update* of ``config.updates`` names a new model (a larger model,
another architecture, the same model with other seeds, ...). For every update and repetition
r = 0..R−1 the study trains K plain new models (seeds s_r,0..s_r,K−1, disjoint from the old seed
and shared by all updates), a KD and a focal-distillation model (seed s_r,0), and reports on the
test split, for these rows:

* ``plain``: the plain new model s_r,0 (cross-entropy);
* one row per ``config.methods`` entry: L = CE + λ·D(z_new, z_old) (`experiments.pc_objective`;
  ``kd``: T²·KL(σ(z_old/T) ‖ σ(z_new/T)), the relaxed form of "be right wherever the old model
  was right"; ``fd_kl``: the same weighted by α + β·1[old right]);
* ``ensemble_old_new``: argmax of the mean logits of the old model and the plain new model;
* ``ensemble_new_seeds``: argmax of the mean logits of the first ``ensemble_size`` plain models;
* ``selection``: of the K plain models, the one with the lowest NFR on the held-out split
  (`compat.select_seed`; the test split never chooses).

Metrics per row (`compat.flip_summary`): accuracy, accuracy gain over the old model, NFR, NFI,
PFR — mean [95 % CI] over repetitions — and NFR / gain (ratio of the means; undefined for a gain
≤ 0); against the plain model of the same repetition (seed selection: against the mean of its K
candidates, what a random pick gives) the relative NFR change and the error change with their
intervals (`experiments.common.paper_target`). `compat.slices` adds NFR per behavioural slice of
the test set.

Training. Every model trains through the one loop (`lqf.runtime.loop` with `lqf.train.make_train_step`: AdamW,
dropout keys folded from the seed and the step, divergence guard, progress, ``metrics.jsonl``) and is
checkpointed in its workdir (``config.train.checkpoint_every``, and after the last step), so an
interrupted model resumes where it stopped.

Tokenizer and reuse. One byte-level BPE tokenizer is trained on the training texts (held-out
excluded) and saved in the study workdir and in every model's workdir, so old and new models read
text identically and a model can be reloaded from its workdir alone (`load_classifier`). Each
model lives in ``workdir/<update>/<row>/rep<r>/...`` with its checkpoints, tokenizer.json,
member.json (everything that defines it) and predictions.npz; a re-run reuses every model whose
member.json matches and retrains the others (`experiments.common.cached_member`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import compat
from compat import slices as slices_lib
from experiments import common, pc_objective, stats
from lqf import checks, inference, text_data, train
from lqf.models.text import create_text_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import cli, loop, parallel
from lqf.runtime.metric_writer import MetricWriter, Progress

EVAL_SETS = ("heldout", "test")
SUMMARY_KEYS = ("accuracy_new", "gain", "nfr", "nfi", "pfr")
BUILTIN_ROWS = ("plain", "ensemble_old_new", "ensemble_new_seeds", "selection")


def _sha1(record: Any) -> str:
  return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Encoded:
  """The study's data as token ids: ``tokens[split]`` (N, L) int32, ``labels[split]`` (N,)."""
  dataset: text_data.TextDataset
  splits: dict[str, text_data.TextSplit]
  tokens: dict[str, np.ndarray]
  tokenizer_path: str
  vocab_size: int
  fingerprint: str

  @property
  def labels(self) -> dict[str, np.ndarray]:
    return {name: split.labels for name, split in self.splits.items()}


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> Encoded:
  """Loads the data, fixes the held-out split, trains (or reuses) the tokenizer, encodes.

  The held-out split is the dataset's own (e.g. by template) or a ``config.heldout_fraction``
  part of the training split (`compat.split_heldout` with ``config.heldout_seed``).
  """
  dataset = text_data.load(config.data)
  if dataset.heldout is not None:
    splits = {"train": dataset.train, "heldout": dataset.heldout, "test": dataset.test}
  else:
    keep, held = compat.split_heldout(len(dataset.train), config.heldout_fraction,
                                      config.heldout_seed)
    splits = {"train": dataset.train.subset(keep), "heldout": dataset.train.subset(held),
              "test": dataset.test}
  data_record = {name: _sha1([list(s.texts), s.labels.tolist()]) for name, s in splits.items()}
  spec = {"tokenizer": common.as_json(config.tokenizer), "train_data": data_record["train"]}
  spec_path = os.path.join(workdir, "tokenizer_spec.json")
  path = os.path.join(workdir, text_data.TOKENIZER_FILE)
  saved = None
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      saved = json.load(f)
  if saved == spec and os.path.exists(path):
    tokenizer = text_data.load_tokenizer(workdir)
  else:
    tokenizer = text_data.train_tokenizer(splits["train"].texts, **common.as_json(config.tokenizer))
    text_data.save_tokenizer(tokenizer, workdir)
    with open(spec_path, "w") as f:
      json.dump(spec, f, indent=1)
  tokens = {name: text_data.encode(tokenizer, s.texts) for name, s in splits.items()}
  with open(path, "rb") as f:
    tokenizer_sha = hashlib.sha1(f.read()).hexdigest()
  return Encoded(dataset, splits, tokens, path, tokenizer.get_vocab_size(),
                 _sha1({"data": data_record, "tokenizer": tokenizer_sha}))


def distillation_loss_fn(loss: Mapping[str, Any]) -> train.LossFn:
  """`experiments.pc_objective.objective` of ``loss`` against the batch's ``old_logits`` (None: plain)."""
  objective = pc_objective.objective(loss)

  def loss_fn(logits, embedding, batch, aux):
    del embedding, aux
    return objective(logits, batch.get("old_logits"), batch["label"]), {}
  return loss_fn


@functools.lru_cache(maxsize=None)
def _compiled(model_json: str, num_classes: int, vocab_size: int, max_len: int,
              train_json: str, loss_json: str):
  """(model, optimizer, jitted guarded train step, jitted predict) for one configuration.

  Cached so that every seed of a configuration reuses one compilation.
  """
  model = create_text_model(ml_collections.ConfigDict(json.loads(model_json)), num_classes,
                            vocab_size, max_len)
  spec = json.loads(train_json)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, spec["lr"], min(spec["warmup_steps"], spec["num_steps"] - 1), spec["num_steps"])
  tx = optax.adamw(schedule, weight_decay=spec["weight_decay"])
  step = train.make_train_step(model, tx, distillation_loss_fn(json.loads(loss_json)),
                               parallel.data_mesh(), input_key="tokens")
  predict = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))
  return model, tx, step, predict


def _compiled_for(spec: Mapping[str, Any], data: Encoded):
  """`_compiled` for a member ``spec`` on ``data``."""
  as_json = lambda section: json.dumps(section, sort_keys=True)  # noqa: E731
  return _compiled(as_json(spec["model"]), len(spec["class_names"]), data.vocab_size,
                   data.tokens["train"].shape[1], as_json(spec["train"]), as_json(spec["loss"]))


def predict_logits(predict, params: Any, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Logits (N, K) of token ids (N, L), ``batch_size`` texts at a time (`lqf.inference`)."""
  return np.asarray(inference.apply_batched(predict, tokens, args=(params,), batch_size=batch_size))


def train_member(workdir: str, *, model: Mapping[str, Any], train_spec: Mapping[str, Any], seed: int,
                 loss: Mapping[str, Any], data: Encoded, class_names: Sequence[str],
                 teacher: common.Member | None = None, countdown: common.Countdown | None = None,
                 name: str = "") -> common.Member:
  """Trains one model through the one loop, or reuses it when ``workdir/member.json`` records its spec.

  Args:
    workdir: the model's directory.
    model: its ``model`` config section (`lqf.models.text.create_text_model`).
    train_spec: batch_size, num_steps, lr, warmup_steps, weight_decay, eval_batch_size, log_every,
      checkpoint_every.
    seed: initialization, data order and dropout.
    loss: a methods entry (`experiments.pc_objective`); ``{'method': 'none'}`` is plain cross-entropy.
    data: the encoded splits.
    class_names: the K class names (recorded for `load_classifier`).
    teacher: the old model, whose training-set logits the distillation term reads.
    countdown: the study's `experiments.common.Countdown`; ``name`` names the model there and in the
      progress lines.
  """
  spec = common.as_json({"model": dict(model), "train": dict(train_spec), "seed": int(seed),
                         "loss": dict(loss), "data": data.fingerprint,
                         "teacher": teacher.fingerprint if teacher else None,
                         "class_names": list(class_names)})
  if loss["method"] != "none" and teacher is None:
    raise ValueError(f"loss method {loss['method']!r} distills from the old model: pass teacher.")
  label = countdown.start(name) if countdown is not None else name

  def train_fn():
    tokens, labels = data.tokens["train"], data.labels["train"]
    net, tx, step, predict = _compiled_for(spec, data)
    old_logits = teacher_logits(teacher, data) if teacher is not None else None
    ckpt_lib.claim_workdir(workdir, ml_collections.ConfigDict({**spec, "overwrite": True}))
    mesh = parallel.data_mesh()
    state = train.init_state(net.init(jax.random.key(seed), jnp.asarray(tokens[:1])), tx, seed, mesh)
    order = (grain.MapDataset.range(len(tokens)).shuffle(seed=seed).repeat(None)
             .batch(train_spec["batch_size"], drop_remainder=True))

    def batches(start):
      for i in itertools.count(start):
        idx = order[i]
        batch = {"tokens": tokens[idx], "label": labels[idx]}
        if old_logits is not None:
          batch["old_logits"] = old_logits[idx]
        yield parallel.shard_batch(batch, mesh)
    steps = train_spec["num_steps"]
    checkpoints = ckpt_lib.RunCheckpoints(workdir, save_every=train_spec.get("checkpoint_every", steps))
    first = checkpoints.latest_step() or 0
    writer = MetricWriter(workdir, resume_step=first)
    try:
      result = loop.run(step, state, batches, steps=steps, args=(None,), checkpoints=checkpoints,
                        meta={"config": spec},
                        nonfinite_fix=lambda s: f"lower config.train.lr (now {train_spec['lr']})",
                        writer=writer,
                        progress=Progress(steps, train_spec["batch_size"],
                                          train_spec.get("log_every", max(1, steps // 5)), first, label))
    finally:
      writer.close()
      checkpoints.close()
    shutil.copy(data.tokenizer_path, os.path.join(workdir, text_data.TOKENIZER_FILE))
    params = result.state.state.params
    return {k: {"logits": predict_logits(predict, params, data.tokens[k], train_spec["eval_batch_size"])}
            for k in EVAL_SETS}
  return common.cached_member(workdir, spec, train_fn, countdown=countdown, name=name)


def teacher_logits(teacher: common.Member, data: Encoded) -> np.ndarray:
  """The old model's logits (N_train, K) on the training split (inference mode): KD targets."""
  spec = _spec(teacher.workdir)
  _, _, _, predict = _compiled_for(spec, data)
  return predict_logits(predict, teacher.variables["params"], data.tokens["train"],
                        spec["train"]["eval_batch_size"])


def _spec(workdir: str) -> dict:
  with open(os.path.join(workdir, common.MEMBER_FILE)) as f:
    return json.load(f)["identity"]


def load_classifier(workdir: str) -> tuple[nn.Module, Any, Any, tuple[str, ...]]:
  """(model, params, tokenizer, class names) of a trained model, from its workdir alone."""
  spec = _spec(workdir)
  tokenizer = text_data.load_tokenizer(workdir)
  model = create_text_model(ml_collections.ConfigDict(spec["model"]), len(spec["class_names"]),
                            tokenizer.get_vocab_size(), text_data.max_len(tokenizer))
  params = ckpt_lib.load_pretrained(workdir)[0]["params"]
  return model, params, tokenizer, tuple(spec["class_names"])


def classify(workdir: str, texts: Sequence[str]) -> np.ndarray:
  """Logits (N, K) of the model saved in ``workdir`` on raw ``texts``, read by its own tokenizer."""
  model, params, tokenizer, _ = load_classifier(workdir)
  return np.asarray(model.apply({"params": params},
                                jnp.asarray(text_data.encode(tokenizer, texts))))


def _check(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "repetitions", "candidates", "ensemble_size", "train.num_steps",
                        "train.batch_size", "train.eval_batch_size")
  checks.check_positive("config.train.lr", config.train.lr, 5e-3)
  checks.check_nonnegative("config.train.weight_decay", config.train.weight_decay, 1e-4)
  checks.check_count("config.train.warmup_steps", config.train.warmup_steps, least=0)
  if config.ensemble_size > config.candidates:
    raise ValueError(f"config.ensemble_size={config.ensemble_size} exceeds config.candidates="
                     f"{config.candidates}: the new-seed ensemble is built from the candidates.")
  for name, loss in config.methods.items():
    if loss.method not in ("kd", "fd_kl", "fd_lm"):
      raise ValueError(f"config.methods.{name}.method={loss.method!r} is not a distillation "
                       "method: use 'kd', 'fd_kl' or 'fd_lm'.")
    pc_objective.objective(loss, f"config.methods.{name}")
    if name in BUILTIN_ROWS:
      raise ValueError(f"config.methods.{name} clashes with a built-in row: rename it.")
  if not config.updates:
    raise ValueError("config.updates is empty: name at least one new model, e.g. "
                     "updates.larger.model.")


def _row(labels: np.ndarray, old_pred: np.ndarray, new_pred: np.ndarray, **extra) -> dict:
  summary = compat.flip_summary(labels, old_pred, new_pred)
  return {**extra, **summary, "gain": summary["accuracy_new"] - summary["accuracy_old"]}


def _summarize(runs: Sequence[Mapping[str, float]]) -> dict:
  """Mean [95 % CI] (`experiments.common.summarize`) of `SUMMARY_KEYS`, and NFR / gain of the means."""
  out = common.summarize(runs, SUMMARY_KEYS)
  gain = out["gain"]["mean"]
  out["nfr_over_gain"] = out["nfr"]["mean"] / gain if gain > 0 else None
  return out


def _mean_slices(per_rep: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict:
  """Per slice: its size and the mean over repetitions of NFR and of the flip share."""
  out = {}
  for name, first in per_rep[0].items():
    nfr = [r[name]["nfr"] for r in per_rep if r[name]["nfr"] is not None]
    share = [r[name]["share_of_negative_flips"] for r in per_rep
             if r[name]["share_of_negative_flips"] is not None]
    out[name] = {"n": first["n"], "nfr": float(np.mean(nfr)) if nfr else None,
                 "share_of_negative_flips": float(np.mean(share)) if share else None}
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or reuses) every model and returns the results (see the module docstring).

  Config fields: seed, data, heldout_fraction, heldout_seed, tokenizer.{vocab_size, max_len,
  min_frequency}, train.{batch_size, num_steps, lr, warmup_steps, weight_decay,
  eval_batch_size}, old.model, updates.<name>.model, methods.<name> (`experiments.pc_objective`
  kwargs), repetitions (R), candidates (K), ensemble_size, selection_criterion,
  slices.{length_edges, user}.
  """
  _check(config)
  ckpt_lib.lock_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  data = prepare_data(config, workdir)
  names = data.dataset.class_names
  labels, heldout_labels = data.labels["test"], data.labels["heldout"]
  k, m = config.candidates, config.ensemble_size
  countdown = common.Countdown(1 + len(config.updates) * config.repetitions * (k + len(config.methods)),
                               "model")

  def member(directory: str, **kw) -> common.Member:
    return train_member(directory, train_spec=common.as_json(config.train), data=data,
                        class_names=names, countdown=countdown,
                        name=os.path.relpath(directory, workdir), **kw)
  plain = {"method": "none"}
  old = member(os.path.join(workdir, "old"), model=common.as_json(config.old.model), seed=config.seed,
               loss=plain)
  old_pred, old_heldout = old.predicted("test"), old.predicted("heldout")
  test_slices = slices_lib.build_slices(data.splits["test"].texts, labels, names,
                                        common.as_json(config.slices))
  flat_slices = {n: mask for group in test_slices.values() for n, mask in group.items()}
  rel = lambda m: os.path.relpath(m.workdir, workdir)
  updates = {}
  for update_name, update in config.updates.items():
    model = common.as_json(update.model)
    rows = {name: [] for name in ("plain", *config.methods, *BUILTIN_ROWS[1:])}
    slices = {name: [] for name in rows}
    candidates_mean = []  # per repetition: the K candidates' mean metrics (a random pick, on average)
    seconds = []
    for r in range(config.repetitions):
      seeds = [config.seed + 1 + r * k + j for j in range(k)]
      base = os.path.join(workdir, update_name)
      pool = [member(os.path.join(base, "plain", f"rep{r}", f"seed{j}"), model=model, seed=s,
                     loss=plain) for j, s in enumerate(seeds)]
      chosen = compat.select_seed(heldout_labels, old_heldout,
                                  [p.predicted("heldout") for p in pool],
                                  criterion=config.selection_criterion)
      runs = {"plain": (pool[0].predicted("test"), {"members": [rel(pool[0])]}),
              "ensemble_old_new": (
                  compat.ensemble_predict([old.logits("test"), pool[0].logits("test")]),
                  {"members": [rel(old), rel(pool[0])]}),
              "ensemble_new_seeds": (
                  compat.ensemble_predict([p.logits("test") for p in pool[:m]]),
                  {"members": [rel(p) for p in pool[:m]]}),
              "selection": (pool[chosen].predicted("test"), {
                  "members": [rel(p) for p in pool], "selected": chosen,
                  "heldout_nfr": [compat.negative_flip_rate(heldout_labels, old_heldout,
                                                            p.predicted("heldout"))
                                  for p in pool]})}
      seconds += [p.seconds for p in pool]
      for name, loss in config.methods.items():
        distilled = member(os.path.join(base, name, f"rep{r}"), model=model, seed=seeds[0],
                           loss=common.as_json(loss), teacher=old)
        runs[name] = (distilled.predicted("test"), {"members": [rel(distilled)]})
      for name in rows:
        pred, extra = runs[name]
        rows[name].append(_row(labels, old_pred, np.asarray(pred), repetition=r, **extra))
      each = [_row(labels, old_pred, p.predicted("test")) for p in pool]
      candidates_mean.append({key: float(np.mean([e[key] for e in each])) for key in each[0]})
      for name in slices:
        slices[name].append(slices_lib.slice_flips(labels, old_pred, np.asarray(runs[name][0]),
                                                   flat_slices))
    updates[update_name] = {
        "model": model, "runs": rows, "candidates_mean": candidates_mean,
        "summary": {name: _summarize(runs) for name, runs in rows.items()},
        "comparisons": {name: common.paper_target(
            runs, candidates_mean if name == "selection" else rows["plain"])
            for name, runs in rows.items() if name != "plain"},
        "slices": {name: _mean_slices(per_rep) for name, per_rep in slices.items()},
        "seconds_per_plain_model": float(np.mean(seconds))}
  return {"study": "text",
          "dataset": {"name": data.dataset.name, "classes": list(names),
                      "info": data.dataset.info,
                      "sizes": {name: len(s) for name, s in data.splits.items()}},
          "tokenizer": {**common.as_json(config.tokenizer), "vocab": data.vocab_size},
          "old": {"model": common.as_json(config.old.model), "workdir": rel(old),
                  "accuracy": 1.0 - compat.error_rate(labels, old_pred), "seconds": old.seconds},
          "repetitions": config.repetitions, "candidates": k, "ensemble_size": m,
          "methods": common.as_json(config.methods),
          "slice_kinds": {kind: list(group) for kind, group in test_slices.items()},
          "updates": updates}


ROW_NAMES = {"plain": "plain update", "kd": "KD", "fd_kl": "focal distillation (FD-KL)",
             "ensemble_old_new": "ensemble old + new",
             "ensemble_new_seeds": "ensemble of new seeds",
             "selection": "seed selection (held-out NFR)"}


def _model_name(model: Mapping[str, Any]) -> str:
  fields = {"transformer": ("depth", "width", "num_heads"), "cnn": ("width", "kernel_sizes"),
            "bag_of_embeddings": ("width",)}.get(model["name"], ())
  return model["name"] + "(" + ", ".join(f"{f}={model.get(f)}" for f in fields) + ")"


def _pct(value: float | None, digits: int = 2) -> str:
  return "n/a" if value is None else f"{100 * value:.{digits}f}"


def markdown(results: Mapping[str, Any], top_classes: int = 8) -> str:
  """The update table (accuracy, gain, NFR, NFI, PFR, NFR / gain) and the slice tables."""
  pm = stats.format_interval
  d = results["dataset"]
  source = d["info"].get("source", "")
  if isinstance(source, Mapping):  # the user's files
    source = ", ".join(f"{part}: {os.path.basename(path)}" for part, path in source.items())
  lines = [f"Update regression on `{d['name']}` ({source}): "
           f"{len(d['classes'])} classes; train {d['sizes']['train']} / held-out "
           f"{d['sizes']['heldout']} / test {d['sizes']['test']} texts. Byte-level BPE "
           f"tokenizer, {results['tokenizer']['vocab']} tokens, length "
           f"{results['tokenizer']['max_len']}. Old model {_model_name(results['old']['model'])}: "
           f"test accuracy {_pct(results['old']['accuracy'])} %. Mean [95 % t-interval] over n = "
           f"{results['repetitions']} repetition(s) (new-model seeds); seed selection among "
           f"{results['candidates']} seeds, ensembles of {results['ensemble_size']} new seeds.",
           "", "| update | method | accuracy (%) | gain (pts) | NFR (%) | NFI (%) | NFR / gain | "
           "PFR (%) |", "|---|---|---|---|---|---|---|---|"]
  for update_name, update in results["updates"].items():
    for row, s in update["summary"].items():
      ratio = "n/a (gain ≤ 0)" if s["nfr_over_gain"] is None else f"{s['nfr_over_gain']:.2f}"
      lines.append(f"| {update_name}: {_model_name(update['model'])} | {ROW_NAMES.get(row, row)} "
                   f"| {pm(s['accuracy_new'])} | {pm(s['gain'])} | {pm(s['nfr'])} | "
                   f"{pm(s['nfi'], digits=1)} | {ratio} | {pm(s['pfr'])} |")
  lines += ["", "Against the plain update of the same repetition (seed selection: against the mean of "
            "its candidates), n = " f"{results['repetitions']} pairs: relative NFR change (mean "
            "ratio − 1, Fieller's 95 % interval; 'lower' = the whole interval below 0), error change "
            "(points, paired 95 % t-interval), the smallest relative NFR change the pairs detect "
            "with 80 % power, and the PC-training target (NFR −40 % at ≤ +0.5 point of error).", "",
            "| update | method | NFR change (%) | NFR lower | error change (points) | detectable NFR "
            "change | target |", "|---|---|---|---|---|---|---|"]
  for update_name, update in results["updates"].items():
    for row, t in update["comparisons"].items():
      detectable = t["detectable_nfr_change"]
      lines.append(f"| {update_name} | {ROW_NAMES.get(row, row)} | "
                   f"{pm(t['nfr_change'], digits=0, signed=True)} | {t['nfr_lower']} | "
                   f"{pm(t['error_change'], signed=True)} | "
                   f"{'n/a' if detectable is None else f'±{100 * detectable:.0f} %'} | "
                   f"{t['verdict']} |")
  kinds = results["slice_kinds"]
  for update_name, update in results["updates"].items():
    columns = list(update["slices"])
    plain = update["slices"]["plain"]
    by_nfr = sorted(kinds["class"], key=lambda n: -(plain[n]["nfr"] or 0.0))[:top_classes]
    shown = [*kinds["length"], *kinds["negation"], *kinds["user"], *by_nfr]
    lines += ["", f"NFR (%) per test slice, update `{update_name}` (classes: the {top_classes} "
              "with the highest plain NFR; share = the slice's part of all plain-update negative "
              "flips):", "",
              "| slice | n | share (%) | " + " | ".join(ROW_NAMES.get(c, c) for c in columns)
              + " |", "|---|---|---" + "|---" * len(columns) + "|"]
    for name in shown:
      cells = " | ".join(_pct(update["slices"][c][name]["nfr"]) for c in columns)
      lines.append(f"| {name} | {plain[name]['n']} | "
                   f"{_pct(plain[name]['share_of_negative_flips'], 1)} | {cells} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.launch(lambda config, workdir: common.run_study(run, markdown, config, workdir))

