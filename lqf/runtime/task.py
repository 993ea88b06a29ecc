"""One fine-tuning run of a study: a pretrained source, a target task with k shots, a method → test accuracy.

`load_source` reads the pretrained model from its orbax workdir; `with_new_head` gives it the target's head
(`lqf.heads`, identically for every method); a `Task` holds the target's data (in memory or streamed through
the grain pipelines, `lqf.runtime.memory.cache_plan`) and what several methods of one sweep cell compute
alike; `run_method` runs one registered method (`lqf.methods`) on it, through the runtime's loop
(checkpoints, progress lines, metric rows). BatchNorm stays in inference mode with the pretrained statistics
for every method, so all methods see the same network at w0.

Cached or streamed. A few-shot training set is held in memory with the trunk features h of every image
(and f(x; w0)): a step is a jvp through the tail only, and LQF can take exact full-batch steps. A large one
is streamed instead: minibatches come from the seeded, checkpointable grain pipeline
(`lqf.data.train_iterator`, augmented when ``data.augment``), the trunk runs inside each jitted step, the
K-FAC factors come from one pass over at most ``kfac_examples`` training images
(`lqf.kfac.stream_factors`), and the test accuracy from one pass over the test split; nothing per
example is kept.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lqf import data as data_lib
from lqf import fit as fit_lib
from lqf import heads, inference, kfac, methods, preconditioners
from lqf import linearize as lin_lib
from lqf.losses import one_hot_targets
from lqf.models import create_model
from lqf.network import Model
from lqf.nonlinear import finetune_nonlinear
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import loop, parallel
from lqf.runtime.metric_writer import MetricWriter, Progress

Arrays = tuple[np.ndarray, np.ndarray]  # images (N, H, W, C) float32, labels (N,) int32


def load_source(workdir: str, pretrain_command: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The pretrained model's config section and variables from an orbax pretraining workdir.

  The model config's compute ``dtype`` is set to float32: fine-tuning (the linearization, the K-FAC
  factors) computes in float32 whatever the pretraining used (e.g. bfloat16 on ImageNet).
  ``pretrain_command`` is named in the error when the workdir holds no checkpoint.
  """
  try:
    variables, meta = ckpt_lib.load_pretrained(workdir)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"config.pretrained.workdir={workdir!r} holds no pretrained checkpoint: run "
        f"`{pretrain_command} --workdir {workdir}` first.") from None
  model_config = ml_collections.ConfigDict(meta["config"]["model"])
  model_config.dtype = "float32"
  return model_config, variables


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: Model, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images, return_embedding=True)[1]


def embed(model: Model, variables: dict, images: np.ndarray) -> jax.Array:
  """Penultimate embeddings (N, D) of images (N, H, W, C) in inference mode (the head's input,
  ``model.apply(..., return_embedding=True)``, `lqf.network`)."""
  return inference.apply_batched(_embed, images, args=(model, variables))


def embed_stream(model: Model, variables: dict, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Penultimate embeddings (N, D) and labels (N,) of padded `lqf.data.eval_batches` batches."""
  return parallel.apply_stream(_embed, batches, args=(model, variables))


def with_new_head(model_config: ml_collections.ConfigDict, variables: dict, embeddings: np.ndarray,
                  labels: np.ndarray, num_classes: int, *, head_init: str, target_scale: float,
                  head_ridge: float, seed: int) -> tuple[Model, dict]:
  """The target model: the pretrained trunk with a new ``num_classes`` head (`lqf.heads.init_head`)
  from the training set's penultimate ``embeddings`` (N, D) (`embed`) and ``labels``."""
  model = create_model(model_config, num_classes)
  head = heads.init_head(head_init, np.asarray(embeddings), labels, num_classes,
                         target_scale=target_scale, penalty=head_ridge, seed=seed)
  params = {**variables["params"], "head": jax.tree.map(jnp.asarray, head)}
  return model, {**variables, "params": params}


@dataclasses.dataclass
class Task:
  """A target task ready for fine-tuning: the model with its new head, the data, and cached work.

  ``train`` and ``test`` are each in memory (images, labels) or an `lqf.data.Source` streamed through
  the grain pipelines of ``data`` (the data config section, needed then; see
  `lqf.runtime.memory.cache_plan`); ``test``
  may be None for fits that are evaluated elsewhere. ``validation`` (in memory, optional): a tuning
  study's validation set (`lqf.data.VALIDATION_SPLIT`), scored next to the test set by `run_method`.

  What several methods of one sweep cell compute alike is computed once per task: the linearization,
  the features (h, f0) of in-memory train, test and validation images and the K-FAC factors of a
  trainable set (lqf and lqf_ce share them). The trunk features h of the test and validation images do
  not depend on the head or the shots, so tasks of one source model and target share them through
  ``eval_trunk`` ((split, split point) -> h).
  """
  model: Model
  variables: dict
  train: Arrays | data_lib.Source
  test: Arrays | data_lib.Source | None = None
  eval_trunk: dict[tuple[str, str], jax.Array] = dataclasses.field(default_factory=dict)
  data: ml_collections.ConfigDict | None = None
  validation: Arrays | None = None
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def streamed(self) -> bool:
    """Whether the training images are streamed (no features cached)."""
    return isinstance(self.train, data_lib.Source)

  def _memo(self, key: tuple, compute):
    if key not in self._cache:
      self._cache[key] = compute()
    return self._cache[key]

  def linearized(self, trainable: str) -> lin_lib.Linearized:
    return self._memo(("lin", trainable), lambda: lin_lib.linearize(self.model, self.variables, trainable))

  def features(self, trainable: str, split: str) -> lin_lib.Features:
    """Cached (h, f0) of the in-memory ``split`` ('train', 'test' or 'validation') images for the
    ``trainable`` tail."""
    lin = self.linearized(trainable)

    def compute():
      if split == "train":
        return lin.features(self.variables, self.train[0])
      key = (split, lin.split)
      if key not in self.eval_trunk:
        self.eval_trunk[key] = lin.trunk_features(self.variables, getattr(self, split)[0])
      h = self.eval_trunk[key]
      return lin_lib.Features(h, inference.apply_batched(lin_lib.jit_tail, h, args=(lin, self.variables)))
    return self._memo(("features", trainable, split), compute)

  def curvature(self, trainable: str, options: fit_lib.FitOptions,
                max_examples: int | None = None) -> fit_lib.Curvature:
    """What ``options.preconditioner`` needs at w0 for the ``trainable`` tail, over the first
    ``max_examples`` training images (None: all): K-FAC factors (`lqf.kfac`) from the cached features or
    by one streamed pass over the evaluation-geometry (unaugmented) images (`lqf.kfac.stream_factors`), or the
    Nyström sketch (`lqf.nystrom`) of the cached features."""
    lin = self.linearized(trainable)
    chunk = options.curvature_batch_size

    def compute():
      if not self.streamed:
        return fit_lib.curvature_of(options, lin, self.variables,
                                    self.features(trainable, "train").h[:max_examples])
      if options.preconditioner != "kfac":
        raise ValueError(f"config.lqf.preconditioner={options.preconditioner!r} needs the training "
                         "features in memory (its sketch reads them twice), but they are streamed: use "
                         "'kfac' for a streamed training set.")
      return kfac.stream_factors(lin, self.variables, data_lib.eval_batches(self.train, self.data, batch_size=chunk),
                            batch_size=chunk, max_examples=max_examples)
    return self._memo(("curvature", trainable, options.preconditioner, chunk, options.nystrom_rank,
                       max_examples), compute)

  def stream(self, batch_size: int, seed: int, target_scale: float = 15.0) -> fit_lib.ImageStream:
    """The streamed training set: seeded minibatches of ``batch_size`` (augmented if ``data.augment``),
    or full batches (each a new permutation) when the training set is smaller.

    One process reads all of them (fine-tuning runs in a single process).
    """
    batch_size = min(batch_size, len(self.train))
    iterator = data_lib.train_iterator(self.train, self.data, global_batch_size=batch_size, seed=seed,
                                       process_index=0, process_count=1)
    return fit_lib.ImageStream(iterator, batch_size, self.model.num_classes, target_scale)

  def test_logits(self, fn, args: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(``fn(*args, images)`` over the test images, their labels), in memory or streamed."""
    if isinstance(self.test, data_lib.Source):
      return parallel.apply_stream(fn, data_lib.eval_batches(
          self.test, self.data, batch_size=inference.EVAL_BATCH_SIZE), args=args)
    return np.asarray(inference.apply_batched(fn, self.test[0], args=args)), np.asarray(self.test[1])


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: Model, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images)


_linearized_logits = jax.jit(lin_lib.Linearized.apply_images, static_argnums=0)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels)))


def run_method(name: str, task: Task, lqf: methods.LQFSettings, nonlinear: methods.NonlinearSettings,
               seed: int, checkpoints: ckpt_lib.RunCheckpoints | None = None, *, log_every: int = 0,
               writer: MetricWriter | None = None) -> dict[str, float]:
  """Fits the registered method ``name`` (`lqf.methods`) on ``task.train`` starting from
  ``task.variables`` and returns test metrics.

  ``checkpoints``: the fit's state is saved there and a rerun resumes from it (`lqf.runtime.loop.run`).
  ``log_every`` > 0: a progress line every that many steps (label: the method), and ``train_loss``
  rows in ``writer``. Metrics: ``accuracy`` on the test split (and ``validation_accuracy`` when the
  task has a validation set); ``train_loss`` (the objective's last value) for the linearized methods; for
  an exact fit (optimizer 'exact') also ``weight_decay`` (λ, the chosen one for 'loo'),
  ``relative_residual`` (its certificate) and ``iterations``.
  """
  method = methods.get(name, "config.method")
  trainable = method.trainable(lqf)
  first = 0 if checkpoints is None or checkpoints.latest_step() is None else checkpoints.latest_step()

  def run(steps: int, batch: int):
    progress = Progress(steps, batch, log_every, first, name) if log_every else None
    return functools.partial(loop.run, checkpoints=checkpoints, writer=writer, progress=progress)
  if not method.linearized:
    images, labels = ((task.stream(nonlinear.batch_size, seed), None) if task.streamed else task.train)
    batch = nonlinear.batch_size if task.streamed else min(nonlinear.batch_size, len(labels))
    new = finetune_nonlinear(task.model, task.variables, images, labels, trainable=trainable,
                             settings=nonlinear, seed=seed, run=run(nonlinear.steps, batch))
    scores = {"accuracy": _accuracy(*task.test_logits(_logits, (task.model, new)))}
    if task.validation is not None:
      scores["validation_accuracy"] = _accuracy(inference.apply_batched(
          _logits, task.validation[0], args=(task.model, new)), task.validation[1])
    return scores
  lin = task.linearized(trainable)
  options = method.fit_options(lqf)
  curvature = None
  if options.preconditioner != preconditioners.NONE and options.optimizer != "exact":
    curvature = task.curvature(trainable, options, lqf.kfac_examples)
  if task.streamed:
    train, targets = task.stream(options.batch_size, seed, lqf.target_scale), None
  else:
    train = task.features(trainable, "train")
    targets = one_hot_targets(jnp.asarray(task.train[1]), task.model.num_classes, lqf.target_scale)
  delta, history = fit_lib.fit_linearized(
      lin, task.variables, train, targets, options, curvature=curvature, seed=seed,
      run=run(options.steps, options.batch_size or len(task.train[1])),
      nonfinite_fix=lambda stopped: (
          f"the {name} objective diverged (optimizer {options.optimizer!r}): lower "
          f"config.lqf.{method.learning_rate_field} (now {options.learning_rate})"))
  if isinstance(task.test, data_lib.Source):
    accuracy = _accuracy(*task.test_logits(_linearized_logits, (lin, delta, task.variables)))
  else:
    accuracy = fit_lib.evaluate(lin, task.variables, delta, task.features(trainable, "test"),
                                jnp.asarray(task.test[1]))
  scores = {"accuracy": accuracy, "train_loss": float(history["loss"][-1])}
  if task.validation is not None:
    scores["validation_accuracy"] = fit_lib.evaluate(lin, task.variables, delta, task.features(
        trainable, "validation"), jnp.asarray(task.validation[1]))
  exact = {k: float(history[k]) for k in ("weight_decay", "relative_residual", "iterations") if k in history}
  return {**scores, **exact}
