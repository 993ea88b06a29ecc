"""Supervised training of a classifier: the loop shared by pretraining and the compat update experiments.

config → data (grain) → model → objective → optax SGD + momentum with warm-up + cosine → jit over a data
mesh (batch sharded, state replicated and donated) → evaluation every ``eval_every`` steps → orbax
checkpoints (resumed automatically, data order included) and JSON-lines metrics.

Config fields read here (see ``configs/pretrain_mnist.py`` for a complete example):
  seed, batch_size (global), num_steps or num_epochs, eval_every (0 = once per epoch), log_every,
  checkpoint_every, keep_checkpoints, eval_batch_size, distributed, overwrite,
  optim.{lr, momentum, nesterov, weight_decay, warmup_steps}, model.*, data.*.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from lqf import checkpoint as ckpt_lib
from lqf import data as data_lib
from lqf import parallel
from lqf.metric_writer import MetricWriter, Progress
from lqf.models import create_model

# loss_fn(logits, embedding, batch, aux) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[jax.Array, jax.Array, dict, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def cross_entropy_loss(logits: jax.Array, embedding: jax.Array, batch: dict, aux: Any = None):
  """Mean softmax cross-entropy against integer labels (``embedding`` and ``aux`` unused)."""
  del embedding, aux
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, {}


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """``config.num_steps`` if set, else ``ceil(num_epochs · N / batch_size)``."""
  if config.get("num_steps"):
    steps = int(config.num_steps)
    field = "config.num_steps"
  else:
    steps = math.ceil(float(config.get("num_epochs", 0)) * num_train / config.batch_size)
    field = "config.num_epochs"
  if steps <= 0:
    raise ValueError(f"{field} gives {steps} training steps: set a positive config.num_steps or "
                     "config.num_epochs.")
  return steps


def make_optimizer(optim: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, linear warm-up then cosine decay, decoupled-free L2 on kernels.

  Weight decay λ adds λ·w to the gradient of every parameter with ≥ 2 dimensions (kernels), not of
  BatchNorm scales/biases or Dense biases.
  """
  if optim.lr <= 0:
    raise ValueError(f"config.optim.lr={optim.lr} must be positive (e.g. 0.1).")
  warmup = min(int(optim.get("warmup_steps", 0)), steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, steps) if warmup > 0 else \
      optax.cosine_decay_schedule(optim.lr, steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(optim.get("weight_decay", 0.0), mask=decay_mask),
      optax.sgd(schedule, momentum=optim.get("momentum", 0.9), nesterov=optim.get("nesterov", False)))


def init_state(model: flax.linen.Module, tx: optax.GradientTransformation, seed: int,
               image_shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> TrainState:
  """Initial parameters (from ``seed``), replicated over the mesh."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(seed))


def make_train_step(model: flax.linen.Module, tx: optax.GradientTransformation,
                    loss_fn: LossFn, mesh: jax.sharding.Mesh):
  """``step(state, batch, aux) -> (state, metrics)``, jitted once with the state donated."""
  def step(state: TrainState, batch: dict, aux: Any):
    def objective(params):
      (logits, emb), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          return_embedding=True, mutable=["batch_stats"])
      loss, extra = loss_fn(logits, emb, batch, aux)
      return loss, (updates["batch_stats"], logits, extra)
    (loss, (stats, logits, extra)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=stats, opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads),
                       **extra}

  rep = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, parallel.batch_sharded(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_predict(model: flax.linen.Module, mesh: jax.sharding.Mesh):
  """``predict(variables, images) -> (logits, embedding)`` in inference mode, batch sharded."""
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(lambda v, x: model.apply(v, x, train=False, return_embedding=True),
                 in_shardings=(rep, shard), out_shardings=(shard, shard))


def predict_batches(predict, variables: dict, batches: Iterable[dict], mesh: jax.sharding.Mesh):
  """Logits, embeddings and labels of every (unpadded) example of ``batches`` as numpy arrays."""
  logits, embs, labels = [], [], []
  for batch in batches:
    mask = batch["mask"] > 0
    out_logits, out_emb = predict(variables, parallel.shard_batch({"x": batch["image"]}, mesh)["x"])
    logits.append(parallel.process_allgather(out_logits)[mask])
    embs.append(parallel.process_allgather(out_emb)[mask])
    labels.append(np.asarray(batch["label"])[mask])
  return np.concatenate(logits), np.concatenate(embs), np.concatenate(labels)


def evaluate(predict, variables: dict, batches: Iterable[dict], mesh) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over the examples of ``batches``."""
  logits, _, labels = predict_batches(predict, variables, batches, mesh)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": float(loss)}


def train(config: ml_collections.ConfigDict, workdir: str, *, loss_fn: LossFn = cross_entropy_loss,
          aux: Any = None, model: flax.linen.Module | None = None) -> tuple[TrainState, dict]:
  """Trains a classifier from ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: the experiment config (fields in the module docstring).
    workdir: where checkpoints, ``config.json`` and ``metrics.jsonl`` go.
    loss_fn: the objective, ``loss_fn(logits, embedding, batch, aux)``; cross-entropy by default.
    aux: a pytree passed to ``loss_fn`` on every step (e.g. a frozen old model's variables), replicated.
    model: the network; default ``create_model(config.model, num_classes)``.

  Returns:
    The final state and the final evaluation metrics on ``data.test_split``.
  """
  parallel.initialize_distributed(config.get("distributed", False))
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.claim_workdir(workdir, config)
  parallel.check_global_batch(config.batch_size, "config.batch_size")
  eval_bs = config.get("eval_batch_size", config.batch_size)
  parallel.check_global_batch(eval_bs, "config.eval_batch_size")

  train_source = data_lib.get_source(config.data, config.data.get("train_split", "train"))
  test_source = data_lib.get_source(config.data, config.data.get("test_split", "test"))
  steps = total_steps(config, len(train_source))
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  eval_every = config.get("eval_every", 0) or steps_per_epoch
  model = model or create_model(config.model, data_lib.num_classes(config.data))
  mesh = parallel.data_mesh()
  tx = make_optimizer(config.optim, steps)
  state = init_state(model, tx, config.seed, data_lib.image_shape(config.data), mesh)
  train_iter = data_lib.train_iterator(train_source, config.data, global_batch_size=config.batch_size,
                                       seed=config.seed)
  checkpoints = ckpt_lib.RunCheckpoints(workdir, max_to_keep=config.get("keep_checkpoints", 2),
                                        save_every=config.get("checkpoint_every", steps_per_epoch))
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(state, data_iterator=train_iter)
    logging.info("resumed from step %d in %s", int(state.step), checkpoints.directory)
  meta = {"config": json.loads(config.to_json_best_effort()), "num_classes": model.num_classes}

  train_step = make_train_step(model, tx, loss_fn, mesh)
  predict = make_predict(model, mesh)
  aux = parallel.replicate(aux, mesh)
  writer = MetricWriter(workdir)
  first = int(state.step)
  progress = Progress(steps, config.batch_size, config.get("log_every", 50), first)
  eval_metrics = {}
  for step in range(first + 1, steps + 1):
    batch = parallel.shard_batch(next(train_iter), mesh)
    state, metrics = train_step(state, batch, aux)
    if step % config.get("log_every", 50) == 0 or step == steps:
      metrics = jax.device_get(metrics)
      throughput = progress(step, float(metrics["loss"])) or {}
      writer.write(step, **{f"train_{k}": v for k, v in metrics.items()}, **throughput)
    if step % eval_every == 0 or step == steps:
      eval_metrics = evaluate(predict, state.variables,
                              data_lib.eval_batches(test_source, config.data, batch_size=eval_bs), mesh)
      writer.write(step, **{f"test_{k}": v for k, v in eval_metrics.items()})
      logging.info("step %d  test accuracy %.4f", step, eval_metrics["accuracy"])
    checkpoints.save(step, state, data_iterator=train_iter, meta=meta, force=step == steps)
  if not eval_metrics:  # resumed at the end: evaluate the restored state
    eval_metrics = evaluate(predict, state.variables,
                            data_lib.eval_batches(test_source, config.data, batch_size=eval_bs), mesh)
  checkpoints.close()
  return state, eval_metrics
