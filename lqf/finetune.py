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
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any

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
from lqf.models import ResNet, create_model, recalibrate, torch_weights

METHODS = ("lqf", "lqf_relu", "lqf_ce", "lqf_no_kfac", "linear_probe", "nonlinear", "nonlinear_all")
HEAD = "^head/"


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"config.method={method!r} is unknown: use one of {METHODS}.")


def load_source(workdir: str, pretrain_command: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The pretrained model's config section and variables from an orbax pretraining workdir."""
  try:
    variables, meta = ckpt_lib.load_pretrained(workdir)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"config.pretrained.workdir={workdir!r} holds no pretrained checkpoint: run "
        f"`{pretrain_command} --workdir {workdir}` first.") from None
  return ml_collections.ConfigDict(meta["config"]["model"]), variables


def load_torchvision_source(config: ml_collections.ConfigDict, images: np.ndarray,
                            batch_size: int = 64) -> tuple[ml_collections.ConfigDict, dict]:
  """``config.model``'s architecture with torchvision/timm weights (head dropped), BN recalibrated.

  The file's ReLU weights go into ``config.model.activation`` (e.g. leaky ReLU); with
  ``pretrained.recalibrate_bn`` the BatchNorm statistics are recomputed on the first
  ``pretrained.recalibrate_batches`` batches of the training images (`lqf.models.recalibrate`).
  """
  p = config.pretrained
  if not p.get("path"):
    raise ValueError("config.pretrained.path is not set: pass --config.pretrained.path=/path/resnet50.safetensors")
  model = create_model(config.model, 1)
  variables = torch_weights.load_torchvision(p.path, model, drop_head=True)
  if p.get("recalibrate_bn", False):
    batches = [jnp.asarray(images[i:i + batch_size])
               for i in range(0, len(images), batch_size)][:p.recalibrate_batches]
    variables = recalibrate.recalibrate_batch_stats(model, variables, batches)
  return config.model, variables


def with_new_head(model_config: ml_collections.ConfigDict, variables: dict, train_images: np.ndarray,
                  train_labels: np.ndarray, num_classes: int, lqf: ml_collections.ConfigDict,
                  seed: int) -> tuple[ResNet, dict]:
  """The target model: the pretrained trunk with a new ``num_classes`` head (``lqf.head_init``)."""
  model = create_model(model_config, num_classes)
  emb = embed(model, variables, jnp.asarray(train_images))
  head = heads.init_head(lqf.head_init, np.asarray(emb), train_labels, num_classes,
                         target_scale=lqf.target_scale, penalty=lqf.head_ridge, seed=seed)
  params = dict(variables["params"])
  params["head"] = jax.tree.map(jnp.asarray, head)
  return model, {"params": params, "batch_stats": variables["batch_stats"]}


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: ResNet, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images, stop="head").mean(axis=(1, 2))


def embed(model: ResNet, variables: dict, images: jax.Array, batch_size: int = 512) -> jax.Array:
  """Penultimate embeddings (N, D) in inference mode, in batches."""
  return jnp.concatenate([_embed(model, variables, images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: ResNet, variables: dict, images: jax.Array) -> jax.Array:
  return model.apply(variables, images)


def accuracy(model: ResNet, variables: dict, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 512) -> float:
  """Top-1 accuracy of the (nonlinear) network in inference mode."""
  preds = np.concatenate([np.asarray(_logits(model, variables, jnp.asarray(images[i:i + batch_size])))
                          .argmax(-1) for i in range(0, len(images), batch_size)])
  return float(np.mean(preds == labels))


# ---------------------------------------------------------------------------------------------------
# Nonlinear fine-tuning (cross-entropy, Adam, BatchNorm frozen).

_ADAM = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _nonlinear_step(lin: lin_lib.Linearized, train: dict, opt_state: Any, variables: dict,
                    h: jax.Array, labels: jax.Array):
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
                   batch_size: int = 512) -> jax.Array:
  """h(x) = trunk(x; w0) for a dataset, in batches (the images themselves when everything trains)."""
  return jnp.concatenate([_trunk(lin, variables, jnp.asarray(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _tail(lin: lin_lib.Linearized, variables: dict, h: jax.Array) -> jax.Array:
  return lin.tail(variables, h)


def tail_logits(lin: lin_lib.Linearized, variables: dict, h: jax.Array, batch_size: int = 512) -> jax.Array:
  """f(x; w0) (N, C) from trunk features h (N, ...), in batches."""
  return jnp.concatenate([_tail(lin, variables, h[i:i + batch_size]) for i in range(0, len(h), batch_size)])


def finetune_nonlinear(model: ResNet, variables: dict, images: np.ndarray, labels: np.ndarray, *,
                       trainable: str, steps: int, lr: float, weight_decay: float, batch_size: int,
                       seed: int, checkpoints: ckpt_lib.RunCheckpoints | None = None) -> dict:
  """Cross-entropy fine-tuning of the ``trainable`` parameters with AdamW; returns new variables.

  The frozen trunk (everything before the first trainable layer, BatchNorm in inference mode, no
  augmentation) is a constant map, so its output is computed once and each step runs the trainable tail
  only — the same optimisation as running the whole network. Full batch when the training set has
  ≤ ``batch_size`` examples, else seeded minibatches (`lqf.fit.batch_order`). ``checkpoints``: saved
  and resumed as in `lqf.fit.fit_linearized`.
  """
  lin = lin_lib.linearize(model, variables, trainable)
  h = trunk_features(lin, variables, images)
  train = jax.tree.map(jnp.copy, lin_lib.select(variables["params"], lin.trainable))  # donated below
  opt_state = _ADAM.init(train)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr)
  opt_state.hyperparams["weight_decay"] = jnp.asarray(weight_decay)
  labels = jnp.asarray(labels)
  (train, opt_state), history, start = fit_lib.resume_loop(checkpoints, (train, opt_state), steps)
  values = list(history[:start])
  batches = itertools.islice(fit_lib.batch_order(len(images), min(batch_size, len(images)), seed),
                             start, None)
  for step, idx in zip(range(start + 1, steps + 1), batches):
    train, opt_state, loss = _nonlinear_step(lin, train, opt_state, variables, h[idx], labels[idx])
    values.append(loss)
    fit_lib.save_loop(checkpoints, step, (train, opt_state), values, steps)
  return {"params": lin_lib.replace(variables["params"], train), "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------------------------------------------
# One run.

def _fit_options(method: str, lqf: ml_collections.ConfigDict) -> dict[str, Any]:
  """How each linearized method is optimised (`lqf.fit.fit_linearized` arguments)."""
  if method == "lqf_ce":  # no exact step size for a non-quadratic loss: K-FAC + SGD with momentum
    return dict(loss="ce", preconditioner="kfac", optimizer="sgd", learning_rate=lqf.ce_lr,
                momentum=0.9, steps=lqf.ce_steps)
  if method == "lqf_no_kfac":
    return dict(loss="mse", preconditioner="none", optimizer="adam", learning_rate=lqf.adam_lr,
                steps=lqf.adam_steps)
  return dict(loss="mse", preconditioner="kfac", optimizer="quadratic", steps=lqf.steps)


@dataclasses.dataclass
class Task:
  """A target task ready for fine-tuning: the model with its new head, the data, and cached work.

  What several methods of one sweep cell compute alike is computed once per task: the linearization,
  the features (h, f0) of the train and test images and the K-FAC factors of a trainable set (lqf and
  lqf_ce share them). The trunk features h of the test images do not depend on the head or the shots,
  so tasks of one source model and target share them through ``test_trunk`` (split point -> h).
  """
  model: ResNet
  variables: dict
  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  test_trunk: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def _memo(self, key: tuple, compute):
    if key not in self._cache:
      self._cache[key] = compute()
    return self._cache[key]

  def linearized(self, trainable: str) -> lin_lib.Linearized:
    return self._memo(("lin", trainable), lambda: lin_lib.linearize(self.model, self.variables, trainable))

  def features(self, trainable: str, split: str) -> lin_lib.Features:
    """Cached (h, f0) of the ``split`` ('train' or 'test') images for the ``trainable`` tail."""
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

  def factors(self, trainable: str, batch_size: int = 128) -> kfac.KFACFactors:
    """K-FAC factors at w0 of the ``trainable`` tail over the training set (`lqf.kfac`)."""
    lin = self.linearized(trainable)
    return self._memo(("factors", trainable), lambda: kfac.curvature_factors(
        lin.tail, self.variables, self.features(trainable, "train").h, lin.trainable,
        batch_size=batch_size))


def run_method(method: str, task: Task, config: ml_collections.ConfigDict, seed: int,
               checkpoints: ckpt_lib.RunCheckpoints | None = None) -> dict[str, float]:
  """Fits ``method`` on ``task.train`` starting from ``task.variables`` and returns test metrics.

  ``checkpoints``: the fit's state is saved there and a rerun resumes from it (`lqf.fit.resume_loop`).
  """
  check_method(method)
  (x, y), (xt, yt) = task.train, task.test
  if method.startswith("nonlinear"):
    nl = config.nonlinear
    new = finetune_nonlinear(task.model, task.variables, x, y,
                             trainable="all" if method == "nonlinear_all" else config.lqf.trainable,
                             steps=nl.steps, lr=nl.lr, weight_decay=nl.weight_decay,
                             batch_size=nl.batch_size, seed=seed, checkpoints=checkpoints)
    return {"accuracy": accuracy(task.model, new, xt, yt)}
  lqf = config.lqf
  trainable = HEAD if method == "linear_probe" else lqf.trainable
  lin = task.linearized(trainable)
  options = _fit_options(method, lqf)
  if options["preconditioner"] == "kfac":
    options["factors"] = task.factors(trainable)
  delta, history = fit_lib.fit_linearized(lin, task.variables, task.features(trainable, "train"),
                                          jnp.asarray(y), target_scale=lqf.target_scale,
                                          weight_decay=lqf.weight_decay, seed=seed,
                                          checkpoints=checkpoints, **options)
  metrics = {"accuracy": fit_lib.evaluate(lin, task.variables, delta, task.features(trainable, "test"),
                                          jnp.asarray(yt))}
  if "loss" in history:
    metrics["train_loss"] = float(np.asarray(history["loss"])[-1])
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`experiments/finetune.py`: one method, one shot count, one seed; writes ``result.json``.

  The workdir is claimed for ``config`` (`lqf.checkpoint.claim_workdir`). With
  ``config.checkpoint_every`` > 0 the fit is checkpointed there every that many steps and after the
  last (δ or the fine-tuned parameters, optimizer state, losses); a rerun resumes from the latest
  checkpoint and ends with the same numbers as an uninterrupted run.
  """
  check_method(config.method)
  x, y = data_lib.load_arrays(config.data, config.data.train_split)
  if config.pretrained.get("format", "orbax") == "torchvision":
    model_config, variables = load_torchvision_source(config, x)
  else:
    source = config.pretrained.relu_workdir if config.method == "lqf_relu" else config.pretrained.workdir
    model_config, variables = load_source(source, config.pretrained.command)
    ckpt_lib.check_compatible(variables, create_model(model_config, 1), data_lib.image_shape(config.data),
                              source=f"config.pretrained.workdir={source!r}", skip="^params/head/")
  test = data_lib.load_arrays(config.data, config.data.test_split)
  model, variables = with_new_head(model_config, variables, x, y, data_lib.num_classes(config.data),
                                   config.lqf, config.seed)
  ckpt_lib.claim_workdir(workdir, config)
  every = config.get("checkpoint_every", 0)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, save_every=every) if every > 0 else None
  try:
    metrics = run_method(config.method, Task(model, variables, (x, y), test), config, config.seed,
                         checkpoints)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "result.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"method": config.method, "shots": config.data.shots, **metrics}, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "result.json"))
  return metrics
