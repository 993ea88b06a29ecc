"""What the studies share: trained members cached by fingerprint, sweep rows, summaries, tables, plots.

* `Member` / `cached_member`: a trained model in its own workdir with ``member.json`` (what defines it)
  and ``predictions.npz`` (its outputs on the evaluation sets); a rerun whose record matches reuses it
  without training, so a study resumes where it stopped and retrains only what changed.
* `ensure_source`: a source model pretrained into a workdir unless it is there.
* `summarize` (mean, sample std with ddof = 1, n and the 95 % t-interval over runs:
  `experiments.stats.mean_interval`), `markdown_table`: every table of every study states its n and
  shows mean [95 % CI] (`experiments.stats.format_interval`).
* `Rows`: a sweep's rows appended to ``results.jsonl`` as they finish (resumable).
* `paper_target`: the PC-training target of Yan et al. (NFR −40 % at ≤ +0.5 point of error) on paired
  runs, with intervals, the smallest relative NFR change the runs can detect, and a verdict.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments import stats
from lqf import checks, methods, train
from lqf import data as data_lib
from lqf import fit as fit_lib
from lqf import linearize as lin_lib
from lqf.losses import WeightedTargets
from lqf.models import create_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import config_util, parallel
from lqf.runtime import task as task_lib

MEMBER_FILE = "member.json"
PREDICTIONS_FILE = "predictions.npz"
# Flip metrics summarized over seeds (keys of `compat.flip_summary`).
FLIP_KEYS = ("error_rate_new", "nfr", "nfi", "relative_nfr", "pfr")
# Targets of PC training (Yan et al.: FD-LM cuts ImageNet NFR 6.44 % → 2.35 % at +0.18 error).
TARGET_NFR_REDUCTION = 0.4
TARGET_ERROR_INCREASE = 0.005


def fingerprint(record: Any) -> str:
  """SHA-1 of a JSON record (sorted keys): what students store to notice a changed teacher."""
  return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()


def as_json(section: Any) -> Any:
  """A config section (or anything JSON-like) as plain JSON data: tuples become lists."""
  if isinstance(section, ml_collections.ConfigDict):
    section = section.to_dict()
  return json.loads(json.dumps(section))


@dataclasses.dataclass
class Member:
  """A trained model of a study.

  Attributes:
    workdir: its directory (its run's checkpoints, ``member.json``, ``predictions.npz``).
    fingerprint: SHA-1 of what defines it (`fingerprint`).
    predictions: {eval set: {field: array}}, e.g. 'logits' (N, K), 'embedding' (N, D), 'label' (N,).
    seconds: the training time (as recorded when it was trained).
    reused: loaded from an earlier run instead of trained now.
    model: the network, when the caller gives it.
  """
  workdir: str
  fingerprint: str
  predictions: dict[str, dict[str, np.ndarray]]
  seconds: float = 0.0
  reused: bool = False
  model: Any = None

  @functools.cached_property
  def variables(self) -> dict:
    """{'params', 'batch_stats'} of its final checkpoint."""
    return ckpt_lib.load_pretrained(self.workdir)[0]

  def logits(self, eval_set: str) -> np.ndarray:
    return self.predictions[eval_set]["logits"]

  def predicted(self, eval_set: str) -> np.ndarray:
    """argmax_k logits on ``eval_set``, shape (N,)."""
    return self.logits(eval_set).argmax(-1)


def cached_member(workdir: str, identity: dict, train_fn: Callable[[], dict[str, dict[str, np.ndarray]]],
                  *, model: Any = None, countdown: Countdown | None = None, name: str = "") -> Member:
  """The member defined by ``identity``: reused when ``workdir/member.json`` records it, else trained.

  Args:
    workdir: the member's directory.
    identity: JSON data that defines the member (config, seeds, teachers' fingerprints, eval sets).
    train_fn: trains (or resumes) it and returns its predictions {eval set: {field: array}}; called
      only when no matching record exists.
    model: the network, kept on the returned `Member`.
    countdown: counts the member as ``name`` when done (`Countdown.finish`).
  """
  identity = as_json(identity)
  record_path = os.path.join(workdir, MEMBER_FILE)
  predictions_path = os.path.join(workdir, PREDICTIONS_FILE)
  if os.path.exists(record_path) and os.path.exists(predictions_path):
    with open(record_path) as f:
      saved = json.load(f)
    if saved.get("identity") == identity:
      with np.load(predictions_path) as arrays:
        predictions: dict = {}
        for key in arrays.files:
          eval_set, field = key.split(".", 1)
          predictions.setdefault(eval_set, {})[field] = arrays[key]
      if countdown is not None:
        countdown.finish(name, 0.0, "reused")
      return Member(workdir, fingerprint(identity), predictions, saved.get("seconds", 0.0), True, model)
  start = time.perf_counter()
  predictions = train_fn()
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    np.savez(predictions_path, **{f"{name}.{field}": value for name, fields in predictions.items()
                                  for field, value in fields.items()})
    with open(record_path, "w") as f:
      json.dump({"identity": identity, "seconds": seconds}, f, indent=1)
  if countdown is not None:
    countdown.finish(name, seconds)
  return Member(workdir, fingerprint(identity), predictions, seconds, False, model)


class Countdown:
  """Names the items of a study ("model kd/seed0 (4/11, ETA 3m20s)") and logs their completion.

  The ETA is the mean time of the items trained so far in this run times the items left (items reused
  from an earlier run take no time and do not count).
  """

  def __init__(self, total: int, kind: str):
    self.total, self.kind = total, kind
    self.done, self._seconds, self._timed = 0, 0.0, 0
    self._start = None

  def _eta(self) -> str:
    if not self._timed:
      return ""
    left = (self.total - self.done) * self._seconds / self._timed
    return f", ETA {int(left // 60)}m{int(left % 60):02d}s"

  def start(self, name: str) -> str:
    """The label of the next item (and its timer starts)."""
    self._start = time.perf_counter()
    return f"{self.kind} {name} ({self.done + 1}/{self.total}{self._eta()})"

  def finish(self, name: str, seconds: float | None = None, detail: str = "") -> None:
    """Counts the item; ``seconds``: its training time (None: measured since `start`; 0: reused)."""
    seconds = time.perf_counter() - self._start if seconds is None else seconds
    self.done += 1
    if seconds > 0:
      self._seconds, self._timed = self._seconds + seconds, self._timed + 1
    logging.info("%s %s done (%d/%d%s)%s", self.kind, name, self.done, self.total, self._eta(),
                 f": {detail}" if detail else "")


@dataclasses.dataclass(frozen=True)
class LinearizedClassifier:
  """An LQF-fine-tuned classifier: f_lin(x; δ) = f(x; w0) + J(x)δ.

  Attributes:
    lin: the network linearized in its trainable tail.
    variables: w0 (the source trunk with this model's head).
    delta: δ.
  """
  lin: lin_lib.Linearized
  variables: dict
  delta: Any

  def logits_from_trunk(self, h: jax.Array) -> np.ndarray:
    """f_lin(x; δ) (N, C) from trunk features h (N, ...): the trunk is the same for every classifier
    fine-tuned from one source with one trainable set (the head is in the tail)."""
    return np.asarray(fit_lib.predict(self.lin, self.variables, self.delta, h))


def new_task(model_config: ml_collections.ConfigDict, source_variables: dict,
             train: tuple[np.ndarray, np.ndarray], num_classes: int, lqf: methods.LQFSettings, *,
             seed: int, head_data: tuple[np.ndarray, np.ndarray] | None = None,
             test: tuple[np.ndarray, np.ndarray] | None = None) -> task_lib.Task:
  """The source network with a new head (`lqf.runtime.task.with_new_head`) fitted on ``head_data`` (images,
  labels; default: the training set), as a `lqf.runtime.task.Task` on ``train`` (and ``test``) that caches
  the training features, so several fits on one training set compute the head and the features once."""
  images, labels = train if head_data is None else head_data
  emb = task_lib.embed(create_model(model_config, num_classes), source_variables, images)
  model, variables = task_lib.with_new_head(
      model_config, source_variables, emb, labels, num_classes, head_init=lqf.head_init,
      target_scale=lqf.target_scale, head_ridge=lqf.head_ridge, seed=seed)
  return task_lib.Task(model, variables, train, test)


def fit_task(task: task_lib.Task, lqf: methods.LQFSettings, targets: WeightedTargets
             ) -> LinearizedClassifier:
  """LQF (K-FAC, exact steps, ``lqf.fit.steps``) of ``task``'s training set against ``targets``; plain
  and regression-constrained fits go through one weighted least-squares code path (one compilation)."""
  lin = task.linearized(lqf.trainable)
  delta, _ = fit_lib.fit_linearized(lin, task.variables, task.features(lqf.trainable, "train"), targets,
                                    lqf.fit)
  return LinearizedClassifier(lin, task.variables, delta)


def ensure_source(pretrain_config: ml_collections.ConfigDict,
                  workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The source model's config and variables, pretrained into ``workdir`` first if not there yet."""
  try:
    return task_lib.load_source(workdir, "")
  except FileNotFoundError:
    pass
  logging.info("pretraining the source model into %s", workdir)
  train.train(pretrain_config, workdir, label=f"pretrain {os.path.basename(workdir)}")
  return task_lib.load_source(workdir, "")


def summarize(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict]:
  """{key: `experiments.stats.mean_interval`} over ``runs``: mean, sample std (ddof = 1), n, 95 % CI."""
  return {key: stats.mean_interval([run[key] for run in runs]) for key in keys}


def save_figure(fig: Any, path: str, caption: str) -> None:
  """Writes a study's matplotlib figure to ``path`` (120 dpi) with ``caption`` (e.g. what the error bars
  are) in small print at its lower right."""
  fig.text(0.99, 0.005, caption, ha="right", va="bottom", fontsize=8, color="0.3")
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(path, dpi=120)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """The lines of a markdown table."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
  return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def check_positive(config: ml_collections.ConfigDict, *fields: str) -> None:
  """Raises ValueError naming the first of the dotted ``fields`` that is not a positive integer."""
  for field in fields:
    value = config
    for key in field.split("."):
      value = value[key]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field}={value!r} must be a positive integer.")


def paper_target(method: Sequence[Mapping[str, float]], base: Sequence[Mapping[str, float]]) -> dict:
  """Yan et al.'s target on paired runs (``method[i]`` and ``base[i]`` share seed i): NFR ≥ 40 % lower
  with the error ≤ 0.5 point higher.

  Returns:
    'nfr_change': `experiments.stats.relative_change` of the NFR (mean ratio − 1, Fieller's 95 % CI;
    all None when the baseline makes no negative flip);
    'error_change': `experiments.stats.paired_difference` of the error rate;
    'detectable_nfr_change': the smallest relative NFR change these n pairs detect with 80 % power
    (`experiments.stats.detectable_difference` of the paired NFR differences' std over mean base
    NFR; None without spread);
    'nfr_verdict', 'error_verdict': `experiments.stats.verdict` of each interval against its target;
    'verdict': 'holds' if both hold, 'does not hold' if either does not, else 'cannot tell';
    'nfr_lower': the verdict on "the NFR is lower than the baseline's" (the interval below 0).
  """
  base_nfr = float(np.mean([r["nfr"] for r in base]))
  nfr = (stats.relative_change([r["nfr"] for r in method], [r["nfr"] for r in base]) if base_nfr > 0
         else {"estimate": None, "low": None, "high": None, "n": len(base)})  # no flips to cut
  error = stats.paired_difference([r["error_rate_new"] for r in method],
                                  [r["error_rate_new"] for r in base])
  spread = stats.paired_difference([r["nfr"] for r in method], [r["nfr"] for r in base])["std"]
  detectable = (stats.detectable_difference(spread, len(base)) / base_nfr
                if len(base) > 1 and spread > 0 and base_nfr > 0 else None)
  verdicts = (stats.verdict(nfr["low"], nfr["high"], -TARGET_NFR_REDUCTION, below=True),
              stats.verdict(error["low"], error["high"], TARGET_ERROR_INCREASE, below=True))
  overall = ("holds" if verdicts == ("holds", "holds") else
             "does not hold" if "does not hold" in verdicts else "cannot tell")
  return {"nfr_change": nfr, "error_change": error, "detectable_nfr_change": detectable,
          "nfr_verdict": verdicts[0], "error_verdict": verdicts[1], "verdict": overall,
          "nfr_lower": stats.verdict(nfr["low"], nfr["high"], 0.0, below=True)}


class Rows:
  """A sweep's rows (dicts), appended to ``<workdir>/results.jsonl`` as they finish.

  Opening it reads the rows of an interrupted sweep (``overwrite`` discards them), so the sweep
  resumes with the cells not done yet.
  """

  def __init__(self, workdir: str, *, overwrite: bool = False, name: str = "results.jsonl"):
    self.path = os.path.join(workdir, name)
    if overwrite and os.path.exists(self.path):
      os.remove(self.path)
    self.rows: list[dict] = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.rows = [json.loads(line) for line in f if line.strip()]

  def keys(self, *fields: str) -> set[tuple]:
    """The (field values) tuples of the rows done."""
    return {tuple(r[f] for f in fields) for r in self.rows}

  def append(self, row: dict) -> None:
    self.rows.append(row)
    if jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_study(run: Callable[[ml_collections.ConfigDict, str], dict], markdown: Callable[[dict], str],
              config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs a study, logs its tables and writes ``results.json`` and ``results.md``; returns its results."""
  results = run(config, workdir)
  table = write_results(workdir, results, markdown)
  logging.info("results:\n%s\nwrote %s and %s", table, os.path.join(workdir, "results.md"),
               os.path.join(workdir, "results.json"))
  return results


def write_results(workdir: str, results: Any, markdown: Callable[[Any], str]) -> str:
  """Writes ``results.json``, then ``results.md`` = ``markdown(results)`` in ``workdir`` (process 0),
  each whole (a temporary file renamed over it): the numbers first, so a table that fails to render
  loses nothing. Returns the table."""
  _write_whole(os.path.join(workdir, "results.json"), json.dumps(results, indent=1))
  table = markdown(results)
  _write_whole(os.path.join(workdir, "results.md"), table)
  return table


def _write_whole(path: str, text: str) -> None:
  if jax.process_index() == 0:
    with open(f"{path}.tmp", "w") as f:
      f.write(text)
    os.replace(f"{path}.tmp", path)


# Fields of a study config that every image member's `lqf.train` config copies.
TRAINING_FIELDS = ("batch_size", "eval_batch_size", "optim", "eval_every", "log_every",
                   "checkpoint_every", "keep_checkpoints", "distributed", "overwrite")


def member_config(config: ml_collections.ConfigDict, *, data: ml_collections.ConfigDict,
                  section: ml_collections.ConfigDict, seed: int,
                  **identity: Any) -> ml_collections.ConfigDict:
  """The `lqf.train` config of one image member.

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


def train_image_member(config: ml_collections.ConfigDict, workdir: str, *, model: Any,
                       eval_sources: Mapping[str, Any],
                       loss_fn: train.LossFn = train.cross_entropy_loss,
                       aux: Callable[[], Any] = lambda: None, countdown: Countdown | None = None,
                       name: str = "") -> Member:
  """Trains (`lqf.train.train`), resumes or reuses one image member; its predictions on the sets.

  Args:
    config: its `lqf.train` config (`member_config`); with its evaluation sets, what defines it.
    workdir: its directory.
    model: the network.
    eval_sources: {name: `lqf.data.Source`} to predict on after training (logits, embedding, label).
    loss_fn: the objective ``loss_fn(logits, embedding, batch, aux)``.
    aux: called only when the member trains; returns the ``aux`` pytree of ``loss_fn``.
    countdown: the study's `Countdown`; ``name`` names the member in it and in the progress lines.
  """
  label = countdown.start(name) if countdown is not None else name
  record = json.loads(config.to_json_best_effort())
  record.pop("overwrite", None)

  def train_fn():
    state, _ = train.train(config, workdir, loss_fn=loss_fn, aux=aux(), model=model, label=label)
    mesh = parallel.data_mesh()
    predict = train.make_predict(model, mesh)
    predictions = {}
    for name, source in eval_sources.items():
      batches = data_lib.eval_batches(source, config.data, batch_size=config.eval_batch_size)
      (logits, embedding), labels = parallel.apply_stream(predict, batches, args=(state.state.variables,),
                                                           mesh=mesh)
      predictions[name] = {"logits": logits, "embedding": embedding, "label": labels}
    return predictions
  return cached_member(workdir, {"config": record, "eval_sets": sorted(eval_sources)}, train_fn,
                       model=model, countdown=countdown, name=name)


def check_members(config: ml_collections.ConfigDict, workdir: str,
                  sections: Mapping[str, ml_collections.ConfigDict]) -> None:
  """Checks what an image study's members train with, before any data is read or model built: the data
  section, each member section's model and step count (``sections``: {'old': config.old, ...}, names
  for the messages) and the training fields they share (`lqf.train.check_config`); then takes the study
  workdir's lock (one study run at a time; its members claim their own sub-workdirs)."""
  try:
    data_lib.check(config.data)
  except ValueError as e:
    raise config_util.within("config.data", e, root="data") from None
  for name, section in sections.items():
    try:
      create_model(section.model, data_lib.num_classes(config.data))
      checks.check_count("num_steps", section.num_steps)
    except ValueError as e:
      raise config_util.within(f"config.{name}", e) from None
    train.check_config(member_config(config, data=config.data, section=section, seed=config.seed))
  ckpt_lib.lock_workdir(workdir)
