"""Fine-tuning a pretrained classifier on a new task: LQF, its ablations and the nonlinear baselines.

One run = (source variables, target task with k shots, method, seed) → test accuracy (`run_method`). The
methods:

=================  ===================================================================================
``lqf``            linearize the ``trainable`` subset around w0, least squares against s·one-hot,
                   weight decay on δ, K-FAC preconditioning (`lqf.fit.fit_linearized`)
``lqf_relu``       the same on the ReLU-pretrained source network (the caller passes that source)
``lqf_ce``         cross-entropy on the linearized model (same preconditioner, SGD with momentum)
``lqf_no_kfac``    the ``lqf`` fit without preconditioner (same step rule and steps)
``linear_probe``   the head only (least squares on the frozen embedding = ridge regression)
``nonlinear``      cross-entropy fine-tuning of the same ``trainable`` subset of the real network (Adam)
``nonlinear_all``  cross-entropy fine-tuning of every parameter (Adam)
=================  ===================================================================================

Settings are plain values (`LQFSettings`, `NonlinearSettings`; a config's ``lqf`` and ``nonlinear``
sections hold the same fields). BatchNorm stays in inference mode with the pretrained statistics for every
method, so all methods see the same network at w0. The new task's head is set first (`with_new_head`,
`lqf.heads`), identically for every method.

Cached or streamed (`cache_plan`). A few-shot training set is held in memory with the trunk features h
of every image (and f(x; w0)): a step is a jvp through the tail only, and LQF can take exact full-batch
steps. A large one — a ResNet-50 on CIFAR-10 at 224 px, stage4 + head trainable: h is 14×14×1024
float32 = 0.8 MB per image, 40 GB for 50k images, next to 30 GB of images — is streamed instead:
minibatches come from the seeded, checkpointable grain pipeline (`lqf.data.train_iterator`, augmented
when ``data.augment``), the trunk runs inside each jitted step, the K-FAC factors come from one pass over
at most ``kfac_examples`` training images (`stream_factors`), and the test accuracy from one pass over
the test split; nothing per example is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lqf import checks, guard, heads, inference, kfac
from lqf import data as data_lib
from lqf import fit as fit_lib
from lqf import linearize as lin_lib
from lqf.data import bundled
from lqf.losses import one_hot_targets
from lqf.models import DTYPES, ResNet, create_model
from lqf.runtime import checkpoint as ckpt_lib
from lqf.runtime import loop, parallel
from lqf.runtime.metric_writer import MetricWriter, Progress

METHODS = ("lqf", "lqf_relu", "lqf_ce", "lqf_no_kfac", "linear_probe", "nonlinear", "nonlinear_all")
HEAD = "^head/"
CACHE_MODES = ("auto", "always", "never")

Arrays = tuple[np.ndarray, np.ndarray]  # images (N, H, W, C) float32, labels (N,) int32


def check_method(method: str, field: str = "config.method") -> None:
  if method not in METHODS:
    raise ValueError(f"{field}={method!r} is unknown: use one of {METHODS}.")


@dataclasses.dataclass(frozen=True)
class LQFSettings:
  """How the linearized methods fit and what they cache (a config's ``lqf`` section).

  Attributes:
    trainable: regex of the trainable parameters (`lqf.linearize.trainable_mask`).
    target_scale: s of the targets s·e_y.
    weight_decay: λ on δ = w − w0 (also the K-FAC damping).
    steps: steps of lqf, lqf_relu, lqf_no_kfac and linear_probe.
    batch_size: None = full batch; else minibatches (with ``optimizer='sgd'``).
    preconditioner: of lqf, lqf_relu, linear_probe and lqf_ce: 'kfac' (`lqf.kfac`) or 'nystrom'
      (`lqf.nystrom`, cached training features only).
    nystrom_rank: ℓ of the Nyström sketch.
    optimizer: 'quadratic' (exact step size and momentum, full batch) or 'sgd' (preconditioned).
    learning_rate, momentum: of 'sgd'; learning_rate 'auto' = 0.2 × the stable limit 2(1 + β)/λmax(MH)
      (`lqf.stability`).
    ce_lr, ce_steps: lqf_ce (K-FAC + SGD with momentum 0.9 on cross-entropy).
    kfac_examples: the K-FAC pass reads the first N training images (None: all).
    curvature_batch_size: examples per chunk of the curvature pass (K-FAC factors, Nyström sketch).
    cache_features: 'auto' | 'always' | 'never' (`cache_plan`).
    cache_gib: the 'auto' budget for cached images + trunk features.
    head_init: 'ridge' | 'random' | 'zero' (`lqf.heads`).
    head_ridge: the ridge penalty α = head_ridge · N.
  """
  trainable: str = "^(stage3|head)/"
  target_scale: float = 15.0
  weight_decay: float = 1e-3
  steps: int = 40
  batch_size: int | None = None
  preconditioner: str = "kfac"
  nystrom_rank: int = 128
  optimizer: str = "quadratic"
  learning_rate: float | str = "auto"
  momentum: float = 0.9
  ce_lr: float = 0.1
  ce_steps: int = 100
  kfac_examples: int | None = None
  curvature_batch_size: int = 128
  cache_features: str = "auto"
  cache_gib: float = 4.0
  head_init: str = "ridge"
  head_ridge: float = 1.0

  def __post_init__(self):
    try:
      re.compile(self.trainable)
    except (re.error, TypeError) as e:
      raise ValueError(f"trainable={self.trainable!r} is not a regex ({e}): use e.g. '^(stage3|head)/' "
                       "or 'all'.") from None
    checks.check_positive("target_scale", self.target_scale, 15.0)
    checks.check_choice("optimizer", self.optimizer, ("quadratic", "sgd"))
    for field, example in (("ce_lr", 0.1), ("cache_gib", 4.0), ("head_ridge", 1.0)):
      checks.check_positive(field, getattr(self, field), example)
    for field in ("ce_steps", "curvature_batch_size", "nystrom_rank"):
      checks.check_count(field, getattr(self, field))
    checks.check_count("kfac_examples", self.kfac_examples, optional=True)
    checks.check_choice("cache_features", self.cache_features, CACHE_MODES)
    checks.check_choice("head_init", self.head_init, heads.HEAD_INITS)
    for method in ("lqf", "lqf_ce", "lqf_no_kfac"):
      self.fit_options(method)  # FitOptions checks λ, steps, the optimizer against the batch size

  def fit_options(self, method: str) -> fit_lib.FitOptions:
    """How ``method`` (a linearized one) optimises δ (`lqf.fit.FitOptions`)."""
    common = dict(weight_decay=self.weight_decay, batch_size=self.batch_size,
                  curvature_batch_size=self.curvature_batch_size, nystrom_rank=self.nystrom_rank)
    if method == "lqf_ce":  # no exact step size for a non-quadratic loss: preconditioned SGD + momentum
      return fit_lib.FitOptions(loss="ce", preconditioner=self.preconditioner, optimizer="sgd",
                                learning_rate=self.ce_lr, momentum=0.9, steps=self.ce_steps, **common)
    preconditioner = "none" if method == "lqf_no_kfac" else self.preconditioner
    return fit_lib.FitOptions(loss="mse", preconditioner=preconditioner, optimizer=self.optimizer,
                              learning_rate=self.learning_rate, momentum=self.momentum,
                              steps=self.steps, **common)

  def learning_rate_field(self, method: str) -> str:
    """The setting that holds ``method``'s learning rate (for the divergence message)."""
    return "ce_lr" if method == "lqf_ce" else "learning_rate"


@dataclasses.dataclass(frozen=True)
class NonlinearSettings:
  """Cross-entropy fine-tuning of the real network with AdamW (a config's ``nonlinear`` section).

  ``dtype``: the network's compute dtype, 'float32' or 'bfloat16' (faster on GPUs and TPUs; the
  parameters, gradients and Adam's state stay float32). Nothing of it is certified, so it may round; the
  linearized methods always compute in float32 (`load_source`).
  """
  steps: int = 100
  lr: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 128
  dtype: str = "float32"

  def __post_init__(self):
    checks.check_choice("dtype", self.dtype, tuple(DTYPES))
    checks.check_count("steps", self.steps)
    checks.check_positive("lr", self.lr, 1e-3)
    checks.check_nonnegative("weight_decay", self.weight_decay, 0.0)
    checks.check_count("batch_size", self.batch_size)


def trainable_of(method: str, trainable: str) -> str:
  """The regex of the parameters ``method`` trains (``trainable``: the LQF tail's)."""
  if method == "linear_probe":
    return HEAD
  return "all" if method == "nonlinear_all" else trainable


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
def _embed(model: ResNet, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images, stop="head").mean(axis=(1, 2))


def embed(model: ResNet, variables: dict, images: np.ndarray) -> jax.Array:
  """Penultimate embeddings (N, D) of images (N, H, W, C) in inference mode."""
  return inference.apply_batched(_embed, images, args=(model, variables))


def embed_stream(model: ResNet, variables: dict, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Penultimate embeddings (N, D) and labels (N,) of padded `lqf.data.eval_batches` batches."""
  return parallel.apply_stream(_embed, batches, args=(model, variables))


def with_new_head(model_config: ml_collections.ConfigDict, variables: dict, embeddings: np.ndarray,
                  labels: np.ndarray, num_classes: int, *, head_init: str, target_scale: float,
                  head_ridge: float, seed: int) -> tuple[ResNet, dict]:
  """The target model: the pretrained trunk with a new ``num_classes`` head (`lqf.heads.init_head`)
  from the training set's penultimate ``embeddings`` (N, D) (`embed`) and ``labels``."""
  model = create_model(model_config, num_classes)
  head = heads.init_head(head_init, np.asarray(embeddings), labels, num_classes,
                         target_scale=target_scale, penalty=head_ridge, seed=seed)
  params = {**variables["params"], "head": jax.tree.map(jnp.asarray, head)}
  return model, {"params": params, "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------------------------------------------
# Nonlinear fine-tuning (cross-entropy, Adam, BatchNorm frozen).

_ADAM = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.0)


def _nonlinear_update(state: tuple[Any, Any], batch: tuple[jax.Array, jax.Array], variables: dict, *,
                      step: jax.Array, lin: lin_lib.Linearized, from_images: bool = False):
  del step
  train, opt_state = state
  inputs, labels = batch
  h = lin.trunk(variables, inputs) if from_images else inputs

  def loss_fn(t):
    logits = lin.tail({**variables, "params": lin_lib.replace(variables["params"], t)}, h)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads = jax.value_and_grad(loss_fn)(train)
  updates, opt_state = _ADAM.update(grads, opt_state, train)
  return (optax.apply_updates(train, updates), opt_state), {"loss": loss}


_nonlinear_step = jax.jit(guard.guarded(_nonlinear_update), static_argnames=("lin", "from_images"),
                          donate_argnums=0)


def finetune_nonlinear(model: ResNet, variables: dict, images: np.ndarray | fit_lib.ImageStream,
                       labels: np.ndarray | None, *, trainable: str, settings: NonlinearSettings,
                       seed: int, checkpoints: ckpt_lib.RunCheckpoints | None = None,
                       progress: Progress | None = None, writer: MetricWriter | None = None) -> dict:
  """Cross-entropy fine-tuning of the ``trainable`` parameters with AdamW; returns new variables.

  In-memory ``images`` (N, H, W, C): the frozen trunk (everything before the first trainable layer,
  BatchNorm in inference mode, no augmentation) is a constant map, so its output is computed once and
  each step runs the trainable tail only — the same optimisation as running the whole network. Full
  batch when the training set has ≤ ``settings.batch_size`` examples, else seeded minibatches
  (`lqf.fit.batch_order`). An `lqf.fit.ImageStream` (``labels`` None): each step runs the trunk on its
  (possibly augmented) batch. ``checkpoints``: saved and resumed as in `lqf.fit.fit_linearized` (with
  the stream's position), through the one loop (`lqf.runtime.loop.run`). The network computes in
  ``settings.dtype``; the returned variables are float32.
  """
  lin = lin_lib.linearize(model.clone(dtype=DTYPES[settings.dtype]), variables, trainable)
  stream = images if isinstance(images, fit_lib.ImageStream) else None
  train = jax.tree.map(jnp.copy, lin_lib.select(variables["params"], lin.trainable))  # donated below
  opt_state = _ADAM.init(train)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(settings.lr)
  opt_state.hyperparams["weight_decay"] = jnp.asarray(settings.weight_decay)
  if stream is None:
    h = lin.trunk_features(variables, images)
    batches = lambda start: fit_lib.minibatches(  # noqa: E731
        h, jnp.asarray(labels), min(settings.batch_size, len(images)), seed, start)
  else:
    batches = lambda start: stream.batches()  # noqa: E731
  result = loop.run(functools.partial(_nonlinear_step, lin=lin, from_images=stream is not None),
                    guard.init((train, opt_state)), batches, steps=settings.steps, args=(variables,),
                    checkpoints=checkpoints, data_iterator=None if stream is None else stream.iterator,
                    nonfinite_fix=lambda s: f"lower the learning rate (now {settings.lr})",
                    progress=progress, writer=writer)
  train = result.state.state[0]
  return {"params": lin_lib.replace(variables["params"], train), "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------------------------------------------
# Streaming passes.

def stream_factors(lin: lin_lib.Linearized, variables: dict, batches: Iterable[dict], *,
                   batch_size: int = 128, max_examples: int | None = None) -> kfac.KFACFactors:
  """The K-FAC factors at w0 of the first ``max_examples`` (None: all) images of ``batches``.

  One pass, one batch of images at a time ({'image', 'mask'} as `lqf.data.eval_batches` yields
  them): h = trunk(x) of the batch, its factors F_b = `lqf.kfac.curvature_factors` (``batch_size``
  examples per K-FAC chunk), and F = Σ_b n_b F_b / Σ_b n_b. Every factor is a mean over examples, so F
  equals `curvature_factors` on the concatenated h of those examples. The curvature is constant, so
  this pass is never repeated.
  """
  total, n = None, 0
  for batch in batches:
    images = np.asarray(batch["image"])[np.asarray(batch["mask"]) > 0]
    if max_examples is not None:
      images = images[:max_examples - n]
    if not len(images):
      break
    h = lin.trunk_features(variables, images, batch_size=len(images))
    factors = kfac.curvature_factors(lin.tail, variables, h, lin.trainable, batch_size=batch_size)
    weighted = jax.tree.map(lambda f: len(images) * f, factors)
    total = weighted if total is None else jax.tree.map(jnp.add, total, weighted)
    n += len(images)
  if total is None:
    raise ValueError("no training images for the K-FAC factors: check config.data (classes, shots, "
                     "train_split) and config.lqf.kfac_examples (>= 1, or None for all).")
  return jax.tree.map(lambda f: f / n, total)


# ---------------------------------------------------------------------------------------------------
# One run.

@dataclasses.dataclass
class Task:
  """A target task ready for fine-tuning: the model with its new head, the data, and cached work.

  ``train`` and ``test`` are each in memory (images, labels) or an `lqf.data.Source` streamed through
  the grain pipelines of ``data`` (the data config section, needed then; see `cache_plan`); ``test``
  may be None for fits that are evaluated elsewhere.

  What several methods of one sweep cell compute alike is computed once per task: the linearization,
  the features (h, f0) of in-memory train and test images and the K-FAC factors of a trainable set (lqf
  and lqf_ce share them). The trunk features h of the test images do not depend on the head or the
  shots, so tasks of one source model and target share them through ``test_trunk`` (split point -> h).
  """
  model: ResNet
  variables: dict
  train: Arrays | data_lib.Source
  test: Arrays | data_lib.Source | None = None
  test_trunk: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  data: ml_collections.ConfigDict | None = None
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
    """Cached (h, f0) of the in-memory ``split`` ('train' or 'test') images for the ``trainable`` tail."""
    lin = self.linearized(trainable)

    def compute():
      if split == "train":
        return lin.features(self.variables, self.train[0])
      if lin.split not in self.test_trunk:
        self.test_trunk[lin.split] = lin.trunk_features(self.variables, self.test[0])
      h = self.test_trunk[lin.split]
      return lin_lib.Features(h, inference.apply_batched(lin_lib.jit_tail, h, args=(lin, self.variables)))
    return self._memo(("features", trainable, split), compute)

  def curvature(self, trainable: str, options: fit_lib.FitOptions,
                max_examples: int | None = None) -> fit_lib.Curvature:
    """What ``options.preconditioner`` needs at w0 for the ``trainable`` tail, over the first
    ``max_examples`` training images (None: all): K-FAC factors (`lqf.kfac`) from the cached features or
    by one streamed pass over the evaluation-geometry (unaugmented) images (`stream_factors`), or the
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
      return stream_factors(lin, self.variables, data_lib.eval_batches(self.train, self.data, batch_size=chunk),
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
def _logits(model: ResNet, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images)


_linearized_logits = jax.jit(lin_lib.Linearized.apply_images, static_argnums=0)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels)))


def run_method(method: str, task: Task, lqf: LQFSettings, nonlinear: NonlinearSettings, seed: int,
               checkpoints: ckpt_lib.RunCheckpoints | None = None, *, log_every: int = 0,
               writer: MetricWriter | None = None) -> dict[str, float]:
  """Fits ``method`` on ``task.train`` starting from ``task.variables`` and returns test metrics.

  ``checkpoints``: the fit's state is saved there and a rerun resumes from it (`lqf.runtime.loop.run`).
  ``log_every`` > 0: a progress line every that many steps (label: the method), and ``train_loss``
  rows in ``writer``. Metrics: ``accuracy`` on the test split; ``train_loss`` (the objective's last
  value) for the linearized methods.
  """
  check_method(method)
  trainable = trainable_of(method, lqf.trainable)
  first = 0 if checkpoints is None or checkpoints.latest_step() is None else checkpoints.latest_step()

  def progress(steps: int, batch: int) -> Progress | None:
    return Progress(steps, batch, log_every, first, method) if log_every else None
  if method.startswith("nonlinear"):
    images, labels = ((task.stream(nonlinear.batch_size, seed), None) if task.streamed else task.train)
    batch = nonlinear.batch_size if task.streamed else min(nonlinear.batch_size, len(labels))
    new = finetune_nonlinear(task.model, task.variables, images, labels, trainable=trainable,
                             settings=nonlinear, seed=seed, checkpoints=checkpoints,
                             progress=progress(nonlinear.steps, batch), writer=writer)
    return {"accuracy": _accuracy(*task.test_logits(_logits, (task.model, new)))}
  lin = task.linearized(trainable)
  options = lqf.fit_options(method)
  curvature = None
  if options.preconditioner != "none":
    curvature = task.curvature(trainable, options, lqf.kfac_examples)
  if task.streamed:
    train, targets = task.stream(options.batch_size, seed, lqf.target_scale), None
  else:
    train = task.features(trainable, "train")
    targets = one_hot_targets(jnp.asarray(task.train[1]), task.model.num_classes, lqf.target_scale)
  field = lqf.learning_rate_field(method)
  delta, history = fit_lib.fit_linearized(
      lin, task.variables, train, targets, options, curvature=curvature, seed=seed,
      run=functools.partial(loop.run, checkpoints=checkpoints, writer=writer,
                            progress=progress(options.steps, options.batch_size or len(task.train[1]))),
      nonfinite_fix=lambda stopped: (
          f"the {method} objective diverged (optimizer {options.optimizer!r}): lower "
          f"config.lqf.{field} (now {getattr(lqf, field)})"))
  if isinstance(task.test, data_lib.Source):
    accuracy = _accuracy(*task.test_logits(_linearized_logits, (lin, delta, task.variables)))
  else:
    accuracy = fit_lib.evaluate(lin, task.variables, delta, task.features(trainable, "test"),
                                jnp.asarray(task.test[1]))
  return {"accuracy": accuracy, "train_loss": float(history["loss"][-1])}


def cache_plan(method: str, lqf: LQFSettings, data: ml_collections.ConfigDict, model: ResNet,
               num_train: int, num_test: int) -> tuple[bool, bool]:
  """(hold the training set in memory, hold the test set in memory) for ``method``.

  In memory means the float32 images and the trunk features h of ``method``'s tail (its input: e.g.
  14×14×1024 for stage4 of a ResNet-50 at 224 px), cached once. ``lqf.cache_features``: 'always',
  'never' (stream both), or 'auto': the training set is cached when it is not augmented
  (``data.augment`` on a TFDS dataset) and its images + h fit in ``lqf.cache_gib`` GiB; the test set
  when it fits too, next to the cached training set. Streamed splits are read through grain.

  Raises:
    ValueError: an unknown mode, 'always' with augmentation, or full-batch LQF on a streamed training set.
  """
  if lqf.cache_features not in CACHE_MODES:
    raise ValueError(f"config.lqf.cache_features={lqf.cache_features!r} is unknown: use one of "
                     f"{CACHE_MODES}.")
  augment = data.get("augment", False) and data.name not in bundled.NAMES
  if lqf.cache_features == "always" and augment:
    raise ValueError("config.lqf.cache_features='always' cannot cache augmented images (h changes every "
                     "step): set config.data.augment=False or cache_features='auto'.")
  shape = (1, *data_lib.image_shape(data))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
  lin = lin_lib.linearize(model, abstract, trainable_of(method, lqf.trainable))
  h = jax.eval_shape(lin.trunk, abstract, jax.ShapeDtypeStruct(shape, jnp.float32))
  per_example = 4 * (math.prod(shape) + math.prod(h.shape))
  train_bytes = num_train * per_example
  if lqf.cache_features == "auto":
    budget = lqf.cache_gib * 2 ** 30
    cache_train = not augment and train_bytes <= budget
    cache_test = (cache_train * train_bytes + num_test * per_example) <= budget
  else:
    cache_train = cache_test = lqf.cache_features == "always"
  if not cache_train and not method.startswith("nonlinear") and lqf.batch_size is None:
    why = ("config.data.augment=True" if augment else "config.lqf.cache_features='never'"
           if lqf.cache_features == "never" else
           f"{train_bytes / 2 ** 30:.1f} GiB of images and features > config.lqf.cache_gib={lqf.cache_gib}")
    raise ValueError(f"config.lqf.batch_size=None (full batch) needs the training features in memory, "
                     f"but they are streamed ({why}): set config.lqf.batch_size, e.g. 128.")
  return cache_train, cache_test
