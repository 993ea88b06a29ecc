"""Fine-tuning a pretrained classifier on a new task: LQF, its ablations and the nonlinear baselines.

One run = (source checkpoint, target data with k shots, method, seed) → test accuracy. The methods:

=================  ===================================================================================
``lqf``            linearize the ``trainable`` subset around w0, least squares against s·one-hot,
                   weight decay on δ, K-FAC preconditioning (`lqf.fit.fit_linearized`)
``lqf_relu``       the same on the ReLU-pretrained source network (``config.pretrained.relu_workdir``)
``lqf_ce``         cross-entropy on the linearized model (same preconditioner)
``lqf_no_kfac``    least squares on the linearized model, no K-FAC (Adam)
``linear_probe``   the head only (least squares on the frozen embedding = ridge regression)
``nonlinear``      cross-entropy fine-tuning of the same ``trainable`` subset of the real network (Adam)
``nonlinear_all``  cross-entropy fine-tuning of every parameter (Adam)
=================  ===================================================================================

BatchNorm stays in inference mode with the pretrained statistics for every method, so all methods see the
same network at w0. The new task's head is set first (`lqf.heads`), identically for every method.

Cached or streamed (`cache_plan`, ``config.lqf.cache_features``). A few-shot training set is held in
memory with the trunk features h of every image (and f(x; w0)): a step is a jvp through the tail only,
and LQF can take exact full-batch steps. A large one — a ResNet-50 on CIFAR-10 at 224 px, stage4 +
head trainable: h is 14×14×1024 float32 = 0.8 MB per image, 40 GB for 50k images, next to 30 GB of
images — is streamed instead: minibatches come from the seeded, checkpointable grain pipeline
(`lqf.data.train_iterator`, augmented when ``data.augment``), the trunk runs inside each jitted step,
the K-FAC factors come from one pass over at most ``lqf.kfac_examples`` training images, and the test
accuracy from one pass over the test split; nothing per example is kept. The test split is streamed
the same way when it does not fit next to the training set.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lqf import checkpoint as ckpt_lib
from lqf import data as data_lib
from lqf import fit as fit_lib
from lqf import heads
from lqf import kfac
from lqf import linearize as lin_lib
from lqf.data import bundled
from lqf.models import ResNet, create_model, recalibrate, torch_weights

METHODS = ("lqf", "lqf_relu", "lqf_ce", "lqf_no_kfac", "linear_probe", "nonlinear", "nonlinear_all")
HEAD = "^head/"
CACHE_MODES = ("auto", "always", "never")
EVAL_BATCH_SIZE = 512  # images per forward pass when embedding or evaluating

Arrays = tuple[np.ndarray, np.ndarray]  # images (N, H, W, C) float32, labels (N,) int32


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"config.method={method!r} is unknown: use one of {METHODS}.")


def load_source(workdir: str, pretrain_command: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The pretrained model's config section and variables from an orbax pretraining workdir.

  The model config's compute ``dtype`` is set to float32: fine-tuning (the linearization, the K-FAC
  factors) computes in float32 whatever the pretraining used (e.g. bfloat16 on ImageNet).
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


def load_torchvision_source(config: ml_collections.ConfigDict, images: Iterable[np.ndarray]
                            ) -> tuple[ml_collections.ConfigDict, dict]:
  """``config.model``'s architecture with torchvision/timm weights (head dropped), BN recalibrated.

  The file's ReLU weights go into ``config.model.activation`` (e.g. leaky ReLU); with
  ``pretrained.recalibrate_bn`` the BatchNorm statistics are recomputed on the first
  ``pretrained.recalibrate_batches`` batches of ``images`` (training images (B, H, W, C) in batches,
  `lqf.models.recalibrate`).
  """
  p = config.pretrained
  if not p.get("path"):
    raise ValueError("config.pretrained.path is not set: pass --config.pretrained.path=/path/resnet50.safetensors")
  model = create_model(config.model, 1)
  variables = torch_weights.load_torchvision(p.path, model, drop_head=True)
  if p.get("recalibrate_bn", False):
    batches = [jnp.asarray(x) for x in itertools.islice(images, p.recalibrate_batches)]
    variables = recalibrate.recalibrate_batch_stats(model, variables, batches)
  return config.model, variables


def set_head(model: ResNet, variables: dict, embeddings: np.ndarray, labels: np.ndarray,
             lqf: ml_collections.ConfigDict, seed: int) -> dict:
  """``variables`` with the new head of ``model`` (``lqf.head_init``) from the training embeddings."""
  head = heads.init_head(lqf.head_init, np.asarray(embeddings), labels, model.num_classes,
                         target_scale=lqf.target_scale, penalty=lqf.head_ridge, seed=seed)
  params = dict(variables["params"])
  params["head"] = jax.tree.map(jnp.asarray, head)
  return {"params": params, "batch_stats": variables["batch_stats"]}


def with_new_head(model_config: ml_collections.ConfigDict, variables: dict, train_images: np.ndarray,
                  train_labels: np.ndarray, num_classes: int, lqf: ml_collections.ConfigDict,
                  seed: int) -> tuple[ResNet, dict]:
  """The target model: the pretrained trunk with a new ``num_classes`` head (``lqf.head_init``)."""
  model = create_model(model_config, num_classes)
  emb = embed(model, variables, jnp.asarray(train_images))
  return model, set_head(model, variables, emb, train_labels, lqf, seed)


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: ResNet, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images, stop="head").mean(axis=(1, 2))


def embed(model: ResNet, variables: dict, images: jax.Array,
          batch_size: int = EVAL_BATCH_SIZE) -> jax.Array:
  """Penultimate embeddings (N, D) in inference mode, in batches."""
  return jnp.concatenate([_embed(model, variables, images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])


def real_examples(batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of an `lqf.data.eval_batches` batch without its padding (mask 0)."""
  keep = batch["mask"] > 0
  return batch["image"][keep], batch["label"][keep]


def embed_batches(model: ResNet, variables: dict, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Penultimate embeddings (N, D) and labels (N,) of padded `lqf.data.eval_batches` batches."""
  embeddings, labels = [], []
  for batch in batches:
    keep = batch["mask"] > 0
    embeddings.append(np.asarray(_embed(model, variables, jnp.asarray(batch["image"])))[keep])
    labels.append(batch["label"][keep])
  return np.concatenate(embeddings), np.concatenate(labels)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: ResNet, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images)


_linearized_logits = jax.jit(lin_lib.Linearized.apply_images, static_argnums=0)


def accuracy(logits_fn: Callable[[jax.Array], jax.Array], batches: Iterable[dict]) -> float:
  """Top-1 accuracy of argmax ``logits_fn(images)`` (B, C) over batches {'image', 'label'} (and
  'mask', 0 for padding, as `lqf.data.eval_batches` yields them)."""
  correct = total = 0
  for batch in batches:
    hit = np.asarray(logits_fn(jnp.asarray(batch["image"]))).argmax(-1) == batch["label"]
    keep = batch["mask"] > 0 if "mask" in batch else np.ones(len(hit), bool)
    correct, total = correct + int(np.sum(hit & keep)), total + int(np.sum(keep))
  return correct / total


def array_batches(images: np.ndarray, labels: np.ndarray,
                  batch_size: int = EVAL_BATCH_SIZE) -> Iterator[dict]:
  """In-memory arrays as consecutive batches {'image', 'label'} (the last one shorter)."""
  for i in range(0, len(images), batch_size):
    yield {"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}


# ---------------------------------------------------------------------------------------------------
# Nonlinear fine-tuning (cross-entropy, Adam, BatchNorm frozen).

_ADAM = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.0)


@functools.partial(jax.jit, static_argnums=0, static_argnames="from_images", donate_argnums=(1, 2))
def _nonlinear_step(lin: lin_lib.Linearized, train: dict, opt_state: Any, variables: dict,
                    inputs: jax.Array, labels: jax.Array, from_images: bool = False):
  h = lin.trunk(variables, inputs) if from_images else inputs

  def loss_fn(t):
    logits = lin.tail({**variables, "params": lin_lib.replace(variables["params"], t)}, h)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads = jax.value_and_grad(loss_fn)(train)
  updates, opt_state = _ADAM.update(grads, opt_state, train)
  return optax.apply_updates(train, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _trunk(lin: lin_lib.Linearized, variables: dict, images: jax.Array) -> jax.Array:
  return lin.trunk(variables, images)


def trunk_features(lin: lin_lib.Linearized, variables: dict, images: np.ndarray,
                   batch_size: int = EVAL_BATCH_SIZE) -> jax.Array:
  """h(x) = trunk(x; w0) for a dataset, in batches (the images themselves when everything trains)."""
  return jnp.concatenate([_trunk(lin, variables, jnp.asarray(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _tail(lin: lin_lib.Linearized, variables: dict, h: jax.Array) -> jax.Array:
  return lin.tail(variables, h)


def tail_logits(lin: lin_lib.Linearized, variables: dict, h: jax.Array,
                batch_size: int = EVAL_BATCH_SIZE) -> jax.Array:
  """f(x; w0) (N, C) from trunk features h (N, ...), in batches."""
  return jnp.concatenate([_tail(lin, variables, h[i:i + batch_size]) for i in range(0, len(h), batch_size)])


def finetune_nonlinear(model: ResNet, variables: dict, images: np.ndarray | fit_lib.ImageStream,
                       labels: np.ndarray | None, *, trainable: str, steps: int, lr: float,
                       weight_decay: float, batch_size: int, seed: int,
                       checkpoints: ckpt_lib.RunCheckpoints | None = None) -> dict:
  """Cross-entropy fine-tuning of the ``trainable`` parameters with AdamW; returns new variables.

  In-memory ``images`` (N, H, W, C): the frozen trunk (everything before the first trainable layer,
  BatchNorm in inference mode, no augmentation) is a constant map, so its output is computed once and
  each step runs the trainable tail only — the same optimisation as running the whole network. Full
  batch when the training set has ≤ ``batch_size`` examples, else seeded minibatches
  (`lqf.fit.batch_order`). An `lqf.fit.ImageStream` (``labels`` None, ``batch_size`` unused): each
  step runs the trunk on its (possibly augmented) batch. ``checkpoints``: saved and resumed as in
  `lqf.fit.fit_linearized` (with the stream's position).
  """
  lin = lin_lib.linearize(model, variables, trainable)
  stream = images if isinstance(images, fit_lib.ImageStream) else None
  iterator = None if stream is None else stream.iterator
  train = jax.tree.map(jnp.copy, lin_lib.select(variables["params"], lin.trainable))  # donated below
  opt_state = _ADAM.init(train)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr)
  opt_state.hyperparams["weight_decay"] = jnp.asarray(weight_decay)
  (train, opt_state), history, start = fit_lib.resume_loop(checkpoints, (train, opt_state), steps,
                                                           iterator)
  values = list(history[:start])
  if stream is None:
    batches = fit_lib.minibatches(trunk_features(lin, variables, images), jnp.asarray(labels), None,
                                  min(batch_size, len(images)), seed, start)
  else:
    batches = fit_lib.minibatches(stream, None, None, stream.batch_size, seed, start)
  for step, (inputs, batch_labels, _) in zip(range(start + 1, steps + 1), batches):
    train, opt_state, loss = _nonlinear_step(lin, train, opt_state, variables, inputs, batch_labels,
                                             from_images=stream is not None)
    values.append(loss)
    fit_lib.save_loop(checkpoints, step, (train, opt_state), values, steps, iterator)
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
    images, _ = real_examples(batch)
    if max_examples is not None:
      images = images[:max_examples - n]
    if not len(images):
      break
    h = _trunk(lin, variables, jnp.asarray(images))
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

def _fit_options(method: str, lqf: ml_collections.ConfigDict) -> dict[str, Any]:
  """How each linearized method is optimised (`lqf.fit.fit_linearized` arguments)."""
  batch = dict(batch_size=lqf.batch_size)
  if method == "lqf_ce":  # no exact step size for a non-quadratic loss: K-FAC + SGD with momentum
    return dict(loss="ce", preconditioner="kfac", optimizer="sgd", learning_rate=lqf.ce_lr,
                momentum=0.9, steps=lqf.ce_steps, **batch)
  if method == "lqf_no_kfac":
    return dict(loss="mse", preconditioner="none", optimizer="adam", learning_rate=lqf.adam_lr,
                steps=lqf.adam_steps, **batch)
  if lqf.optimizer == "quadratic" and lqf.batch_size is not None:
    raise ValueError(f"config.lqf.optimizer='quadratic' needs the full batch (its step size minimises "
                     f"the whole quadratic), but config.lqf.batch_size={lqf.batch_size}: set "
                     "config.lqf.optimizer='sgd' (K-FAC + SGD with momentum) or batch_size=None.")
  return dict(loss="mse", preconditioner="kfac", optimizer=lqf.optimizer,
              learning_rate=lqf.learning_rate, momentum=lqf.momentum, steps=lqf.steps, **batch)


def trainable_of(method: str, config: ml_collections.ConfigDict) -> str:
  """The regex of the parameters ``method`` trains."""
  if method == "linear_probe":
    return HEAD
  return "all" if method == "nonlinear_all" else config.lqf.trainable


@dataclasses.dataclass
class Task:
  """A target task ready for fine-tuning: the model with its new head, the data, and cached work.

  ``train`` and ``test`` are each in memory (images, labels) or an `lqf.data.Source` streamed through
  the grain pipelines of ``data`` (the ``config.data`` section, needed then; see `cache_plan`);
  ``test`` may be None for fits that are evaluated elsewhere.

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
      images = (self.train if split == "train" else self.test)[0]
      if split == "train":
        h = trunk_features(lin, self.variables, images)
      else:
        if lin.split not in self.test_trunk:
          self.test_trunk[lin.split] = trunk_features(lin, self.variables, images)
        h = self.test_trunk[lin.split]
      return lin_lib.Features(h, tail_logits(lin, self.variables, h))
    return self._memo(("features", trainable, split), compute)

  def factors(self, trainable: str, batch_size: int = 128,
              max_examples: int | None = None) -> kfac.KFACFactors:
    """K-FAC factors at w0 of the ``trainable`` tail over the first ``max_examples`` training images
    (None: all; `lqf.kfac`), from the cached features or by one streamed pass over the evaluation-
    geometry (unaugmented) images (`stream_factors`)."""
    lin = self.linearized(trainable)

    def compute():
      if self.streamed:
        batches = data_lib.eval_batches(self.train, self.data, batch_size=batch_size)
        return stream_factors(lin, self.variables, batches, batch_size=batch_size,
                              max_examples=max_examples)
      h = self.features(trainable, "train").h[:max_examples]
      return kfac.curvature_factors(lin.tail, self.variables, h, lin.trainable, batch_size=batch_size)
    return self._memo(("factors", trainable, batch_size, max_examples), compute)

  def stream(self, batch_size: int, seed: int) -> fit_lib.ImageStream:
    """The streamed training set: seeded minibatches of ``batch_size`` (augmented if ``data.augment``),
    or full batches (each a new permutation) when the training set is smaller.

    One process reads all of them (fine-tuning runs in a single process).
    """
    batch_size = min(batch_size, len(self.train))
    iterator = data_lib.train_iterator(self.train, self.data, global_batch_size=batch_size, seed=seed,
                                       process_index=0, process_count=1)
    return fit_lib.ImageStream(iterator, batch_size)

  def test_batches(self) -> Iterator[dict]:
    """The test split in batches of `EVAL_BATCH_SIZE` (streamed ones padded, with a 'mask')."""
    if isinstance(self.test, data_lib.Source):
      return data_lib.eval_batches(self.test, self.data, batch_size=EVAL_BATCH_SIZE)
    return array_batches(*self.test)


def run_method(method: str, task: Task, config: ml_collections.ConfigDict, seed: int,
               checkpoints: ckpt_lib.RunCheckpoints | None = None) -> dict[str, float]:
  """Fits ``method`` on ``task.train`` starting from ``task.variables`` and returns test metrics.

  ``checkpoints``: the fit's state is saved there and a rerun resumes from it (`lqf.fit.resume_loop`).
  """
  check_method(method)
  trainable = trainable_of(method, config)
  if method.startswith("nonlinear"):
    nl = config.nonlinear
    images, labels = (task.stream(nl.batch_size, seed), None) if task.streamed else task.train
    new = finetune_nonlinear(task.model, task.variables, images, labels, trainable=trainable,
                             steps=nl.steps, lr=nl.lr, weight_decay=nl.weight_decay,
                             batch_size=nl.batch_size, seed=seed, checkpoints=checkpoints)
    return {"accuracy": accuracy(functools.partial(_logits, task.model, new), task.test_batches())}
  lqf = config.lqf
  lin = task.linearized(trainable)
  options = _fit_options(method, lqf)
  if options["preconditioner"] == "kfac":
    options["factors"] = task.factors(trainable, lqf.kfac_batch_size, lqf.kfac_examples)
  if task.streamed:
    train, labels = task.stream(options["batch_size"], seed), None
  else:
    train, labels = task.features(trainable, "train"), jnp.asarray(task.train[1])
  delta, history = fit_lib.fit_linearized(lin, task.variables, train, labels,
                                          target_scale=lqf.target_scale,
                                          weight_decay=lqf.weight_decay, seed=seed,
                                          checkpoints=checkpoints, **options)
  if isinstance(task.test, data_lib.Source):
    logits_fn = functools.partial(_linearized_logits, lin, delta, task.variables)
    metrics = {"accuracy": accuracy(logits_fn, task.test_batches())}
  else:
    metrics = {"accuracy": fit_lib.evaluate(lin, task.variables, delta,
                                            task.features(trainable, "test"), jnp.asarray(task.test[1]))}
  losses = np.asarray(history["loss"])
  if not np.all(np.isfinite(losses)):
    field = {"lqf_ce": "ce_lr", "lqf_no_kfac": "adam_lr"}.get(method, "learning_rate")
    raise FloatingPointError(
        f"the {method} objective became NaN or Inf at step {np.flatnonzero(~np.isfinite(losses))[0] + 1}"
        f" (optimizer {options['optimizer']!r}): lower config.lqf.{field} (now {lqf[field]}).")
  metrics["train_loss"] = float(losses[-1])
  return metrics


def cache_plan(config: ml_collections.ConfigDict, model: ResNet, num_train: int,
               num_test: int) -> tuple[bool, bool]:
  """(hold the training set in memory, hold the test set in memory) for ``config.method``.

  In memory means the float32 images and the trunk features h of ``config.method``'s tail (its input:
  e.g. 14×14×1024 for stage4 of a ResNet-50 at 224 px), cached once. ``config.lqf.cache_features``:
  'always', 'never' (stream both), or 'auto': the training set is cached when it is not augmented
  (``data.augment`` on a TFDS dataset) and its images + h fit in ``config.lqf.cache_gib`` GiB; the test
  set when it fits too, next to the cached training set. Streamed splits are read through grain.

  Raises:
    ValueError: an unknown mode, 'always' with augmentation, or full-batch LQF on a streamed training set.
  """
  lqf, data = config.lqf, config.data
  if lqf.cache_features not in CACHE_MODES:
    raise ValueError(f"config.lqf.cache_features={lqf.cache_features!r} is unknown: use one of "
                     f"{CACHE_MODES}.")
  augment = data.get("augment", False) and data.name not in bundled.NAMES
  if lqf.cache_features == "always" and augment:
    raise ValueError("config.lqf.cache_features='always' cannot cache augmented images (h changes every "
                     "step): set config.data.augment=False or cache_features='auto'.")
  shape = (1, *data_lib.image_shape(data))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
  lin = lin_lib.linearize(model, abstract, trainable_of(config.method, config))
  h = jax.eval_shape(lin.trunk, abstract, jax.ShapeDtypeStruct(shape, jnp.float32))
  per_example = 4 * (math.prod(shape) + math.prod(h.shape))
  train_bytes = num_train * per_example
  if lqf.cache_features == "auto":
    budget = lqf.cache_gib * 2 ** 30
    cache_train = not augment and train_bytes <= budget
    cache_test = (cache_train * train_bytes + num_test * per_example) <= budget
  else:
    cache_train = cache_test = lqf.cache_features == "always"
  if not cache_train and not config.method.startswith("nonlinear") and lqf.batch_size is None:
    why = ("config.data.augment=True" if augment else "config.lqf.cache_features='never'"
           if lqf.cache_features == "never" else
           f"{train_bytes / 2 ** 30:.1f} GiB of images and features > config.lqf.cache_gib={lqf.cache_gib}")
    raise ValueError(f"config.lqf.batch_size=None (full batch) needs the training features in memory, "
                     f"but they are streamed ({why}): set config.lqf.batch_size, e.g. 128.")
  return cache_train, cache_test


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`experiments/finetune.py`: one method, one shot count, one seed; writes ``result.json``.

  The training and test splits are held in memory or streamed (`cache_plan`). The workdir is claimed
  for ``config`` (`lqf.checkpoint.claim_workdir`). With ``config.checkpoint_every`` > 0 the fit is
  checkpointed there every that many steps and after the last (δ or the fine-tuned parameters,
  optimizer state, losses, a stream's position); a rerun resumes from the latest checkpoint and ends
  with the same numbers as an uninterrupted run.
  """
  check_method(config.method)
  data = config.data
  torchvision = config.pretrained.get("format", "orbax") == "torchvision"
  if not torchvision:
    source = config.pretrained.relu_workdir if config.method == "lqf_relu" else config.pretrained.workdir
    model_config, variables = load_source(source, config.pretrained.command)
    ckpt_lib.check_compatible(variables, create_model(model_config, 1), data_lib.image_shape(data),
                              source=f"config.pretrained.workdir={source!r}", skip="^params/head/")
  train_source = data_lib.get_source(data, data.train_split)
  if torchvision:
    first = data_lib.eval_batches(train_source, data, batch_size=64)
    model_config, variables = load_torchvision_source(config, (real_examples(b)[0] for b in first))
  test_source = data_lib.get_source(data, data.test_split)
  model = create_model(model_config, data_lib.num_classes(data))
  cache_train, cache_test = cache_plan(config, model, len(train_source), len(test_source))
  if cache_train:
    train = data_lib.source_arrays(train_source, data)
    emb, labels = embed(model, variables, jnp.asarray(train[0])), train[1]
  else:
    train = train_source
    emb, labels = embed_batches(model, variables, data_lib.eval_batches(
        train_source, data, batch_size=EVAL_BATCH_SIZE))
  variables = set_head(model, variables, emb, labels, config.lqf, config.seed)
  test = data_lib.source_arrays(test_source, data) if cache_test else test_source
  ckpt_lib.claim_workdir(workdir, config)
  every = config.get("checkpoint_every", 0)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, save_every=every) if every > 0 else None
  try:
    metrics = run_method(config.method, Task(model, variables, train, test, data=data), config,
                         config.seed, checkpoints)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "result.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"method": config.method, "shots": data.shots, **metrics}, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "result.json"))
  return metrics
